"""Config fields shared by every trl_credit trainer: which estimator, and the prefix-tree estimators' knobs."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class CreditArguments:
    r"""
    > Parameters that control credit assignment

    advantage_estimator (`str`, *optional*, defaults to `"grpo"`):
        How per-token advantages are computed. `"grpo"`: TRL's group-relative outcome advantage, identical to
        `trl.GRPOTrainer`. `"tempo"`: GRPO plus branch-gated TD corrections from the group's prefix tree
        ([TEMPO](https://huggingface.co/papers/2509.18314)). `"gigpo"`: GRPO plus the anchor-state Monte-Carlo
        residual on the prefix tree ([GiGPO](https://huggingface.co/papers/2505.10978), single-turn adaptation).
        Any name registered with `trl_credit.credit.register_advantage_estimator`, or the dotted import path of such
        a function, also works.
    branch_td_coef (`float`, *optional*, defaults to `1.0`):
        TEMPO: coefficient of the branch-gated TD term (the paper and official code use 1). `0.0` gives GRPO.
    gigpo_step_weight (`float`, *optional*, defaults to `1.0`):
        GiGPO: weight ω of the step (anchor-state) advantage (1 in every official script). `0.0` gives GRPO.
    gigpo_branch_only (`bool`, *optional*, defaults to `True`):
        GiGPO: apply the step term only at branch tokens of the prefix tree. `False` applies `r_i − V(s_t)` on every
        shared-prefix token; its zero-sum terms cancel only under token-level loss normalization, so it is rejected
        with `loss_type="grpo"` or `"sapo"`.
    gigpo_step_norm (`str`, *optional*, defaults to `"auto"`):
        GiGPO: normalization of the step residual `r_i − V(s)`. `"std"`: divided by the std of the rewards of its own
        step group `D(s)` (the completions through the state `s`; 1 for a group of one), as the official
        `mean_std_norm`. `"none"`: not divided, as the official `mean_norm`. `"auto"`: `"none"` with
        `scale_rewards="none"`, else `"std"`, so that `scale_rewards="none"` is exactly GiGPO's default `mean_norm` and
        `scale_rewards="group"` its `mean_std_norm`. `scale_rewards` normalizes the episode term.
    """

    advantage_estimator: str = field(
        default="grpo",
        metadata={
            "help": "How per-token advantages are computed: 'grpo' (TRL's, identical to trl.GRPOTrainer), 'tempo' "
            "(prefix-tree branch-gated TD, https://huggingface.co/papers/2509.18314), 'gigpo' (anchor-state MC "
            "residual, https://huggingface.co/papers/2505.10978), 'vineppo', a registered name, or a dotted import "
            "path of an estimator function."
        },
    )
    branch_td_coef: float = field(
        default=1.0,
        metadata={"help": "TEMPO: coefficient of the branch-gated TD term (1 = paper). 0 gives GRPO."},
    )
    gigpo_step_weight: float = field(
        default=1.0,
        metadata={"help": "GiGPO: weight (omega) of the anchor-state step advantage (1 = official scripts)."},
    )
    gigpo_branch_only: bool = field(
        default=True,
        metadata={
            "help": "GiGPO: apply the step term only at branch tokens. False = ungated token-level form, which needs "
            "token-level loss normalization (rejected with loss_type 'grpo'/'sapo')."
        },
    )

    gigpo_step_norm: str = field(
        default="auto",
        metadata={
            "help": "GiGPO: normalization of the step residual r - V(s): 'std' (std of its own step group, official "
            "mean_std_norm), 'none' (official mean_norm) or 'auto' ('none' with scale_rewards='none', else 'std')."
        },
    )

    _provides_critic = False  # PPOConfig: the trainer builds a critic for "critic_values" estimators

    def _validate_credit(self) -> None:
        from ..credit import get_advantage_estimator

        estimator = get_advantage_estimator(self.advantage_estimator)  # ValueError naming the registered ones
        if "critic_values" in estimator.credit_requires and not self._provides_critic:
            raise ValueError(
                f"advantage_estimator={self.advantage_estimator!r} needs a learned critic, which "
                f"{type(self).__name__} has no fields for: use trl_credit.PPOConfig with trl_credit.PPOTrainer."
            )
        for name in ("branch_td_coef", "gigpo_step_weight"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}.")
        if self.scale_rewards not in ("group", "batch", "none"):
            raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {self.scale_rewards!r}.")
        from ..credit.tempo import GIGPO_STEP_NORMS

        if self.gigpo_step_norm not in GIGPO_STEP_NORMS:
            raise ValueError(
                f"gigpo_step_norm must be one of {GIGPO_STEP_NORMS}, got {self.gigpo_step_norm!r}: 'std' divides "
                "GiGPO's step residual by the std of its step group, 'none' leaves it raw, 'auto' follows "
                "scale_rewards."
            )

        if self.advantage_estimator in ("tempo", "gigpo") and self.multi_objective_aggregation != "sum_then_normalize":
            raise ValueError(
                f"advantage_estimator={self.advantage_estimator!r} computes prefix-tree values of the summed reward "
                "and needs multi_objective_aggregation='sum_then_normalize' (the default)."
            )
        if self.advantage_estimator == "gigpo" and not self.gigpo_branch_only and self.loss_type in ("grpo", "sapo"):
            raise ValueError(
                f"gigpo_branch_only=False with loss_type={self.loss_type!r}: the ungated GiGPO step terms sum to zero "
                "over the members of a shared prefix and cancel only when every token has the same loss weight; "
                "per-sequence length normalization leaves a length-correlated bias. Use a token-level loss_type "
                "('dapo', the default, 'bnpo' or 'dr_grpo') or keep gigpo_branch_only=True."
            )

        if self.credit_is_token_level:
            if self.importance_sampling_level == "sequence":
                raise ValueError(
                    "importance_sampling_level='sequence' averages the log-ratio over the completion, so the gradient "
                    "of every token sees only the mean advantage and token-level credit is lost. Use "
                    "importance_sampling_level='token' (the default) with token-level credit "
                    f"(advantage_estimator={self.advantage_estimator!r})."
                )
            if self.use_liger_kernel:
                raise ValueError(
                    "use_liger_kernel=True routes the loss to Liger's fused GRPO loss, which takes one advantage per "
                    "completion and cannot apply per-token advantages. Set use_liger_kernel=False with "
                    f"advantage_estimator={self.advantage_estimator!r}."
                )

    @property
    def credit_is_token_level(self) -> bool:
        """Whether the advantages differ across the tokens of a completion."""
        from ..credit import get_advantage_estimator

        estimator = get_advantage_estimator(self.advantage_estimator)
        return self.token_weighting != "none" or not estimator.credit_sequence_level
