"""Config fields for macro actions (MA-RLHF): the segmentation every value source (critic, MC, prefix tree) shares."""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field

# Register the estimators that read segments ("macro_tempo", "gae") before any config validates its estimator name.
from ..credit import macro as _macro  # noqa: F401
from ..credit import ppo as _ppo  # noqa: F401


@dataclass
class MacroActionArguments:
    r"""
    > Parameters that control macro actions ([MA-RLHF](https://huggingface.co/papers/2410.02743))

    macro_action (`str` or `None`, *optional*, defaults to `None`):
        Contiguous runs of generated tokens on which credit is computed (generation is unchanged). `None`: the
        estimator's native granularity (tokens for `"gae"`, reasoning steps for `"vineppo"`). `"token"`: one token per
        macro. `"ngram"`: every `macro_action_n` tokens (MA-RLHF's fixed n-gram: n = 5 for text, 10 for code).
        `"random_ngram"`: lengths shuffled from `macro_action_lengths`, the rest of the completion as one macro.
        `"punctuation"`: sentence, clause, line and bracket boundaries read from the decoded tokens (stands in for the
        paper's constituency parser). `"perplexity"`: cut where the per-token perplexity rises. `"step"`: reasoning
        steps (the VinePPO splitter; with `"vineppo"` exactly its native steps). Used by estimators that read
        segments: `"gae"` (MA-PPO), `"vineppo"` (MC values at macro boundaries), `"macro_tempo"` (TEMPO with tree
        nodes at macro boundaries).
    macro_action_n (`int`, *optional*, defaults to `5`):
        Macro length for `macro_action="ngram"`. `1` equals token-level credit exactly.
    macro_action_max_len (`int` or `None`, *optional*, defaults to `None`):
        For `"punctuation"`, `"perplexity"` and `"step"`: split macros longer than this many tokens.
    macro_action_lengths (`list[int]`, *optional*, defaults to `[1, 2, 3, 5, 10]`):
        For `"random_ngram"`: the lengths to shuffle (the official list; it contains 1).
    macro_action_repeat_times (`int`, *optional*, defaults to `1`):
        For `"random_ngram"`: copies of each length in the list.
    macro_action_seed (`int` or `None`, *optional*, defaults to `None`):
        Seed of the `"random_ngram"` shuffles, combined with the global step (reproducible on resume). `None` uses
        `seed`.
    macro_action_last_singleton (`bool`, *optional*, defaults to `True`):
        Make the last completion token its own macro, so that the outcome reward is not averaged with the KL penalties
        of other tokens (official MA-RLHF convention). `False` with `macro_reward_agg="mean"` divides the outcome by
        the last macro's length (a warning says so). Ignored by `macro_action="step"` with Monte-Carlo values
        (`"vineppo"`), which uses exactly the native reasoning steps.
    macro_value_agg (`str`, *optional*, defaults to `"mean"`):
        Value of a macro from its token values (critic): `"mean"` (official code), `"first"` (value at the macro's
        start state, semi-MDP theory), `"last"`, or `"position"` (weights ∝ 1/(j+1)).
    macro_reward_agg (`str`, *optional*, defaults to `"mean"`):
        Reward of a macro from its token rewards (KL penalties and the outcome): `"mean"` (official code) or `"sum"`
        (the paper's definition).
    macro_ratio_level (`str`, *optional*, defaults to `"token"`):
        Importance ratio of the clipped surrogate: `"token"` (per token, as the official code), `"macro_product"`
        (the product of the macro's token ratios: the paper's `π(ω|s)/π_old(ω|s)`, which saturates the clip range
        much more often) or `"macro_geomean"` (their geometric mean, GSPO-style). Every token of a macro then shares
        its ratio. Needs `macro_action`, `beta=0.0` and no `off_policy_mask_threshold` (both read the per-token
        log-probs). With critic-free GRPO this is the only thing a macro can change: use
        `advantage_estimator="macro_tempo", branch_td_coef=0.0` (exactly GRPO's advantage).
    macro_ppl_boundary (`str`, *optional*, defaults to `"code"`):
        For `"perplexity"`: `"code"` starts a macro at the token before a perplexity rise (official code); `"paper"`
        at the rising token (perplexity non-increasing inside every macro). The perplexity is read from the reference
        log-probs when the trainer computes them (TRL's `beta`, `PPOTrainer`'s `kl_coef`; no extra forward pass),
        otherwise from the sampling policy's; `credit/macro_ppl_reference` logs which (1 = reference).
    """

    macro_action: str | None = field(
        default=None,
        metadata={
            "help": "Macro actions (MA-RLHF): None (estimator's native granularity), 'token', 'ngram', "
            "'random_ngram', 'punctuation', 'perplexity' or 'step'.",
        },
    )
    macro_action_n: int = field(
        default=5,
        metadata={"help": "Macro length for macro_action='ngram' (5 text, 10 code in MA-RLHF; 1 = token level)."},
    )
    macro_action_max_len: int | None = field(
        default=None,
        metadata={"help": "For 'punctuation', 'perplexity' and 'step': split macros longer than this."},
    )
    macro_action_lengths: list[int] = field(
        default_factory=lambda: [1, 2, 3, 5, 10],
        metadata={"help": "For 'random_ngram': lengths to shuffle (official list [1, 2, 3, 5, 10])."},
    )
    macro_action_repeat_times: int = field(
        default=1,
        metadata={"help": "For 'random_ngram': copies of each length in the list."},
    )
    macro_action_seed: int | None = field(
        default=None,
        metadata={"help": "Seed of the 'random_ngram' shuffles (combined with the global step). None uses `seed`."},
    )
    macro_action_last_singleton: bool = field(
        default=True,
        metadata={"help": "Make the last completion token its own macro (official MA-RLHF convention)."},
    )
    macro_value_agg: str = field(
        default="mean",
        metadata={
            "help": "Macro value from the token values: 'mean' (official), 'first' (start state), 'last', 'position'.",
        },
    )
    macro_reward_agg: str = field(
        default="mean",
        metadata={
            "help": "Macro reward from the token rewards: 'mean' (official code) or 'sum' (paper).",
        },
    )
    macro_ratio_level: str = field(
        default="token",
        metadata={
            "help": "Importance ratio: 'token' (official code), 'macro_product' (paper) or 'macro_geomean' "
            "(GSPO-style), shared by the tokens of a macro."
        },
    )
    macro_ppl_boundary: str = field(
        default="code",
        metadata={
            "help": "For 'perplexity': 'code' (start at the token before a rise, official) or 'paper' (at the rise).",
        },
    )

    def _validate_macro_action(self) -> None:
        from ..credit import get_advantage_estimator
        from ..credit.macro import MACRO_ACTIONS, PPL_BOUNDARIES, RATIO_LEVELS, REWARD_AGGREGATIONS, VALUE_AGGREGATIONS

        if self.macro_action is not None and self.macro_action not in MACRO_ACTIONS:
            raise ValueError(f"macro_action must be None or one of {MACRO_ACTIONS}, got {self.macro_action!r}.")
        if self.macro_action_n < 1:
            raise ValueError(
                f"macro_action_n={self.macro_action_n}: a macro action of {self.macro_action_n} tokens is empty. Use "
                "macro_action_n >= 1 (1 = token-level credit; MA-RLHF uses 5 for text and 10 for code)."
            )
        if self.macro_action_max_len is not None and self.macro_action_max_len < 1:
            raise ValueError(
                f"macro_action_max_len={self.macro_action_max_len}: macros cannot be split into chunks of fewer than "
                "1 token. Use None (no limit) or a length >= 1."
            )
        lengths = list(self.macro_action_lengths or [])
        if not lengths or any(int(n) < 1 for n in lengths):
            raise ValueError(
                f"macro_action_lengths={lengths}: every random n-gram length must be >= 1 and the list non-empty "
                "(official list: [1, 2, 3, 5, 10])."
            )
        if self.macro_action_repeat_times < 1:
            raise ValueError(f"macro_action_repeat_times must be >= 1, got {self.macro_action_repeat_times}.")
        for name, allowed in (
            ("macro_value_agg", VALUE_AGGREGATIONS),
            ("macro_reward_agg", REWARD_AGGREGATIONS),
            ("macro_ppl_boundary", PPL_BOUNDARIES),
            ("macro_ratio_level", RATIO_LEVELS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}.")
        if self.macro_action == "step":
            try:
                from ..credit import steps  # noqa: F401
            except ImportError as e:
                raise ValueError(
                    f"macro_action='step' needs the reasoning-step splitter (trl_credit.credit.steps): {e}"
                ) from e
        if self.macro_ratio_level != "token":
            if self.macro_action is None:
                raise ValueError(
                    f"macro_ratio_level={self.macro_ratio_level!r} needs macro actions: set macro_action (e.g. "
                    "'ngram' with macro_action_n=5)."
                )
            if self.beta != 0.0 or self.off_policy_mask_threshold is not None:
                raise ValueError(
                    f"macro_ratio_level={self.macro_ratio_level!r} replaces the per-token log-probabilities of the "
                    "loss by their macro aggregate, which TRL's KL term (beta) and off-policy mask "
                    "(off_policy_mask_threshold) would then read. Set beta=0.0 (or kl_coef with PPOTrainer) and "
                    "off_policy_mask_threshold=None, or keep macro_ratio_level='token'."
                )
        if self.macro_action is None:
            return
        estimator = get_advantage_estimator(self.advantage_estimator)
        if "segments" not in estimator.credit_requires:
            raise ValueError(
                f"macro_action={self.macro_action!r} has no effect with advantage_estimator="
                f"{self.advantage_estimator!r}, which does not read segments. Macro actions change the credit of "
                "estimators with a value per segment: 'gae' (trl_credit.PPOTrainer, MA-PPO), 'vineppo' (MC values at "
                "macro boundaries) or 'macro_tempo' (TEMPO with tree nodes at macro boundaries). With critic-free "
                "GRPO and an outcome reward every macro gets the same advantage, so macro grouping changes nothing "
                "(ma-rlhf spec §8.2). Unset macro_action or pick one of these estimators."
            )
        single_token = self.macro_action == "token" or (self.macro_action == "ngram" and self.macro_action_n == 1)
        reads_macro_rewards = "macro_reward_agg" in inspect.signature(estimator).parameters
        if reads_macro_rewards and not self.macro_action_last_singleton and self.macro_reward_agg == "mean":
            if not single_token:
                warnings.warn(
                    "macro_action_last_singleton=False with macro_reward_agg='mean': the outcome reward sits on the "
                    "last token and the last macro's reward is the mean over its tokens, so the outcome is divided by "
                    "the length of the last macro (and mixed with its KL penalties). Keep "
                    "macro_action_last_singleton=True (official MA-RLHF) or use macro_reward_agg='sum' (the paper's "
                    "macro reward).",
                    UserWarning,
                    stacklevel=3,
                )
