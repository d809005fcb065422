"""`trl_credit.PPOConfig`: PPO with a learned critic on TRL 1.16, with the field names of TRL ≤ 1.12's `PPOConfig`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from ..credit import ppo as _ppo
from .grpo import GRPOConfig

PPO_ESTIMATORS = ("gae", "vineppo")
DEFAULT_KL_COEF = 0.05  # TRL 1.12 PPOConfig and MA-RLHF


@dataclass
class PPOConfig(GRPOConfig):
    r"""
    Configuration class for [`trl_credit.PPOTrainer`]: PPO with a learned critic (generalized advantage estimation),
    or with Monte-Carlo values (VinePPO), on top of every [`trl_credit.GRPOConfig`] option (generation, vLLM, reward
    functions, PEFT, loss types). Field names follow TRL ≤ 1.12's `PPOConfig` where they mean the same thing; its
    aliases `num_ppo_epochs`, `cliprange` and `response_length` set TRL 1.16's `num_iterations`, `epsilon` and
    `max_completion_length`.

    Parameters:
        > Parameters that control the advantage

        advantage_estimator (`str`, *optional*, defaults to `"gae"`):
            `"gae"`: a learned critic and generalized advantage estimation (classic PPO; with `macro_action`, MA-PPO).
            `"vineppo"`: Monte-Carlo values of reasoning-step states; no critic is built.
        gamma (`float`, *optional*, defaults to `1.0`):
            Discount factor between tokens (or macro actions).
        lam (`float`, *optional*, defaults to `0.95`):
            GAE λ ([Schulman et al.](https://huggingface.co/papers/1506.02438)): 0 = TD(0), 1 = Monte-Carlo return.
        kl_coef (`float` or `None`, *optional*, defaults to `None`):
            KL penalty `−kl_coef · KL_t` added to every token reward before GAE (classic RLHF PPO). `None` means
            `0.05` (TRL 1.12, MA-RLHF) with `advantage_estimator="gae"` and `beta=0.0`, otherwise `0.0`. Exactly one KL
            placement may be used: this one, or TRL's `beta` (KL in the loss).
        kl_estimator (`str`, *optional*, defaults to `"k1"`):
            KL estimator of the penalty: `"k1"` (`log π_old − log π_ref`) or `"k3"` (non-negative, lower variance).
        whiten_rewards (`bool`, *optional*, defaults to `False`):
            Whiten the token rewards (without shifting their mean) over the batch before GAE.
        whiten_advantages (`bool`, *optional*, defaults to `False`):
            Whiten the advantages over the batch's valid tokens. TRL ≤ 1.12 always did; MA-RLHF does not.
        missing_eos_penalty (`float` or `None`, *optional*, defaults to `None`):
            Subtracted from the reward of completions that end without an EOS token (truncated), as in TRL 1.12.

        > Parameters that control the critic

        vf_coef (`float`, *optional*, defaults to `0.1`):
            Weight of the value loss added to the policy loss.
        cliprange_value (`float`, *optional*, defaults to `0.2`):
            Clip range of the value update: `V_clip = V_old + clip(V − V_old, ±cliprange_value)`, loss
            `0.5 · max((V − R)², (V_clip − R)²)`.
        value_model_init (`str` or `None`, *optional*, defaults to `None`):
            Checkpoint of the critic when the trainer gets no `value_model`: `None` initializes it from the policy
            checkpoint (its backbone, a new zero-initialized scalar head); a path loads a sequence-classification
            checkpoint (e.g. a reward model, as MA-RLHF does) with `num_labels=1`.
        value_learning_rate (`float` or `None`, *optional*, defaults to `None`):
            Learning rate of the critic's optimizer parameter group (same schedule as the policy). `None` uses
            `learning_rate`.
        value_peft_config (`dict` or `None`, *optional*, defaults to `None`):
            Keyword arguments of a `peft.LoraConfig` for a LoRA critic (its score head is always fully trained). A
            `peft.PeftConfig` can also be passed to the trainer as `value_peft_config`.

        > Aliases of TRL ≤ 1.12 `PPOConfig` fields

        num_ppo_epochs (`int` or `None`, *optional*, defaults to `None`):
            Sets `num_iterations` (PPO epochs over each generation batch).
        cliprange (`float` or `None`, *optional*, defaults to `None`):
            Sets `epsilon` (policy ratio clip range).
        response_length (`int` or `None`, *optional*, defaults to `None`):
            Sets `max_completion_length`.

    Every other parameter, including the macro-action fields (`macro_action`, `macro_action_n`, …), is documented in
    [`trl_credit.GRPOConfig`].
    """

    _VALID_DICT_FIELDS = GRPOConfig._VALID_DICT_FIELDS + ["value_peft_config"]

    advantage_estimator: str = field(
        default="gae",
        metadata={"help": "'gae' (learned critic, GAE; MA-PPO with macro_action) or 'vineppo' (MC values, no critic)."},
    )
    gamma: float = field(default=1.0, metadata={"help": "Discount factor between tokens (or macro actions)."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda (0 = TD(0), 1 = Monte-Carlo return)."})
    kl_coef: float | None = field(
        default=None,
        metadata={
            "help": "KL penalty in the token rewards (classic PPO). None = 0.05 with 'gae' and beta=0, else 0. Do not "
            "combine with beta (KL in the loss)."
        },
    )
    kl_estimator: str = field(default="k1", metadata={"help": "KL estimator of the penalty: 'k1' or 'k3'."})
    whiten_rewards: bool = field(default=False, metadata={"help": "Whiten the token rewards before GAE."})
    whiten_advantages: bool = field(
        default=False,
        metadata={"help": "Whiten the advantages over the batch (TRL <= 1.12 always did; MA-RLHF does not)."},
    )
    missing_eos_penalty: float | None = field(
        default=None, metadata={"help": "Subtracted from the reward of completions without an EOS token."}
    )
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Clip range of the value update."})
    value_model_init: str | None = field(
        default=None,
        metadata={
            "help": "Critic checkpoint when the trainer gets no value_model: None = the policy checkpoint with a new "
            "scalar head; a path = a sequence-classification checkpoint (e.g. a reward model)."
        },
    )
    value_learning_rate: float | None = field(
        default=None, metadata={"help": "Learning rate of the critic's parameter group. None = learning_rate."}
    )
    value_peft_config: dict[str, Any] | str | None = field(
        default=None, metadata={"help": "peft.LoraConfig keyword arguments (JSON on the CLI) for a LoRA critic."}
    )
    num_ppo_epochs: int | None = field(default=None, metadata={"help": "TRL <= 1.12 name of num_iterations."})
    cliprange: float | None = field(default=None, metadata={"help": "TRL <= 1.12 name of epsilon."})
    response_length: int | None = field(default=None, metadata={"help": "TRL <= 1.12 name of max_completion_length."})

    _provides_critic = True

    def __post_init__(self):
        self._resolve_ppo_aliases()
        if self.kl_coef is None:
            self.kl_coef = DEFAULT_KL_COEF if self.advantage_estimator == "gae" and self.beta == 0.0 else 0.0
        super().__post_init__()
        self._validate_ppo()

    def _resolve_ppo_aliases(self) -> None:
        defaults = {f.name: f.default for f in fields(GRPOConfig)}
        for alias, target in (
            ("num_ppo_epochs", "num_iterations"),
            ("cliprange", "epsilon"),
            ("response_length", "max_completion_length"),
        ):
            value = getattr(self, alias)
            if value is None:
                continue
            current = getattr(self, target)
            if current != defaults[target] and current != value:
                raise ValueError(
                    f"{alias}={value} (TRL <= 1.12 name) and {target}={current} are the same setting with different "
                    f"values. Set only one of them."
                )
            setattr(self, target, value)

    def _validate_ppo(self) -> None:
        if self.advantage_estimator not in PPO_ESTIMATORS:
            raise ValueError(
                f"PPOConfig supports advantage_estimator in {PPO_ESTIMATORS}, got {self.advantage_estimator!r}. "
                "Critic-free estimators (grpo, tempo, gigpo, macro_tempo, …) run with trl_credit.GRPOConfig and "
                "GRPOTrainer."
            )
        for name, low, high in (("gamma", 0.0, 1.0), ("lam", 0.0, 1.0)):
            value = getattr(self, name)
            if not (low <= value <= high):
                raise ValueError(f"{name} must be in [{low}, {high}], got {value}.")
        for name in ("vf_coef", "kl_coef"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}.")
        if self.missing_eos_penalty is not None and not math.isfinite(self.missing_eos_penalty):
            raise ValueError(
                f"missing_eos_penalty must be a finite number or None, got {self.missing_eos_penalty}: it is "
                "subtracted from rewards, and a non-finite reward is unscorable."
            )
        if not (math.isfinite(self.cliprange_value) and self.cliprange_value > 0):
            raise ValueError(
                f"cliprange_value must be > 0, got {self.cliprange_value}: the value update is clipped to "
                "±cliprange_value around the rollout values (TRL 1.12 and MA-RLHF use 0.2)."
            )
        if self.kl_estimator not in _ppo.KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {_ppo.KL_ESTIMATORS}, got {self.kl_estimator!r}.")
        if self.value_learning_rate is not None and not self.value_learning_rate > 0:
            raise ValueError(f"value_learning_rate must be > 0 or None, got {self.value_learning_rate}.")
        if self.kl_coef != 0.0 and self.beta != 0.0:
            raise ValueError(
                f"The KL penalty is configured twice: kl_coef={self.kl_coef} (in the token rewards, classic PPO) and "
                f"beta={self.beta} (in the loss, TRL's GRPO). Use one: set beta=0.0 to keep the penalty in the rewards "
                "or kl_coef=0.0 to keep TRL's loss term."
            )
        if self.advantage_estimator == "vineppo":
            critic_fields = [
                name for name in ("value_model_init", "value_learning_rate", "value_peft_config")
                if getattr(self, name) is not None
            ]  # fmt: skip
            if critic_fields:
                raise ValueError(
                    f"advantage_estimator='vineppo' estimates values with Monte-Carlo rollouts and builds no critic, "
                    f"but {', '.join(critic_fields)} configure one. Remove them, or use advantage_estimator='gae'."
                )
            if self.kl_coef != 0.0:
                raise ValueError(
                    f"kl_coef={self.kl_coef} puts a KL penalty into GAE's token rewards, which "
                    "advantage_estimator='vineppo' does not use (its Monte-Carlo values exclude the KL, as the "
                    "official code). Use beta for a KL term in the loss."
                )
        if isinstance(self.value_peft_config, str):
            raise ValueError(
                "value_peft_config must be a dict of peft.LoraConfig arguments (JSON on the command line), got "
                f"{self.value_peft_config!r}."
            )
