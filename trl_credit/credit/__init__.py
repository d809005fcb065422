"""Pure, vectorized credit-assignment math. Imports torch only: never trl, accelerate, vllm or a trainer.

Every estimator is registered in `ADVANTAGE_ESTIMATORS` with the signature
`fn(batch: CreditBatch, *, <hyper-parameters>) -> CreditOutput`; its keyword-only parameters are read from the config
fields of the same name.
"""

from .batch import CreditBatch, CreditOutput
from .grpo import advantage_denominator, compute_grpo_advantages, nanstd, reward_std
from .prefix_tree import PrefixTreeValues, prefix_tree_values
from .registry import (
    ADVANTAGE_ESTIMATORS,
    call_estimator,
    estimator_kwargs,
    get_advantage_estimator,
    register_advantage_estimator,
)
from .segment_gae import compute_segment_gae
from .tempo import compute_gigpo_advantages, compute_tempo_advantages


__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "CreditBatch",
    "CreditOutput",
    "PrefixTreeValues",
    "advantage_denominator",
    "call_estimator",
    "compute_gigpo_advantages",
    "compute_grpo_advantages",
    "compute_segment_gae",
    "compute_tempo_advantages",
    "estimator_kwargs",
    "get_advantage_estimator",
    "nanstd",
    "prefix_tree_values",
    "register_advantage_estimator",
    "reward_std",
]
