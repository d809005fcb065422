"""Pure, vectorized credit-assignment math. Imports torch only: never trl, accelerate, vllm or a trainer.

Every estimator is registered in `ADVANTAGE_ESTIMATORS` with the signature
`fn(batch: CreditBatch, *, <hyper-parameters>) -> CreditOutput`; its keyword-only parameters are read from the config
fields of the same name.
"""

from .attention import (
    RHYTHM_STRATEGIES,
    aggregate_heads,
    attention_band,
    compute_fai,
    compute_fai_band,
    compute_row_distance,
    compute_waad,
    compute_waad_band,
    dominated_anchors,
    group_heads,
    rhythm_gammas,
    rhythm_layer_indices,
    top_q_mask,
    waad_delta,
)
from .batch import CreditBatch, CreditOutput, nonfinite_rewards_to_nan
from .grpo import advantage_denominator, compute_grpo_advantages, nanstd, reward_std
from .macro import (
    boundary_segments,
    compute_macro_tempo_advantages,
    macro_aggregate,
    macro_log_ratio,
    ngram_segments,
    perplexity_segments,
    punctuation_segments,
    punctuation_token_flags,
    random_ngram_segments,
    segments_from_starts,
    token_segments,
)
from .ppo import compute_gae_advantages, explained_variance, kl_penalty
from .prefix_tree import PrefixTreeValues, prefix_tree_values
from .registry import (
    ADVANTAGE_ESTIMATORS,
    call_estimator,
    estimator_kwargs,
    get_advantage_estimator,
    register_advantage_estimator,
    validate_credit_output,
)
from .segment_gae import compute_segment_gae
from .spo import (
    SPO_ADVANTAGE_NORMS,
    CutpointSegments,
    compute_spo_chain_advantages,
    cutpoint_boundaries,
    masked_whiten,
    probability_mask,
    spo_normalize,
)
from .spo_tree import (
    compute_spo_tree_advantages,
    num_tree_slots,
    tree_node_counts,
    tree_node_values,
    tree_paths_tensor,
    tree_segment_ids,
    tree_slot_leaves,
)
from .steps import STEP_SPLITS, estimated_state_mask, segment_completions, split_math, split_newline
from .tempo import compute_gigpo_advantages, compute_tempo_advantages
from .vineppo import compute_vineppo_advantages, interpolate_state_values
from .weights import apply_token_weights, entropy_threshold, entropy_token_weights


__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "RHYTHM_STRATEGIES",
    "SPO_ADVANTAGE_NORMS",
    "STEP_SPLITS",
    "CutpointSegments",
    "compute_spo_chain_advantages",
    "cutpoint_boundaries",
    "masked_whiten",
    "probability_mask",
    "spo_normalize",
    "compute_spo_tree_advantages",
    "num_tree_slots",
    "tree_node_counts",
    "tree_node_values",
    "tree_paths_tensor",
    "tree_segment_ids",
    "tree_slot_leaves",
    "boundary_segments",
    "compute_gae_advantages",
    "compute_macro_tempo_advantages",
    "compute_vineppo_advantages",
    "estimated_state_mask",
    "explained_variance",
    "interpolate_state_values",
    "kl_penalty",
    "macro_aggregate",
    "macro_log_ratio",
    "ngram_segments",
    "perplexity_segments",
    "punctuation_segments",
    "punctuation_token_flags",
    "random_ngram_segments",
    "segment_completions",
    "segments_from_starts",
    "split_math",
    "split_newline",
    "token_segments",
    "aggregate_heads",
    "apply_token_weights",
    "attention_band",
    "compute_fai",
    "compute_fai_band",
    "compute_row_distance",
    "compute_waad",
    "compute_waad_band",
    "dominated_anchors",
    "entropy_threshold",
    "entropy_token_weights",
    "group_heads",
    "rhythm_gammas",
    "rhythm_layer_indices",
    "top_q_mask",
    "waad_delta",
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
    "nonfinite_rewards_to_nan",
    "prefix_tree_values",
    "register_advantage_estimator",
    "reward_std",
    "validate_credit_output",
]
