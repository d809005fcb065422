"""Config fields of SPO (Segment Policy Optimization): `advantage_estimator="spo_chain"` and `"spo_tree"`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..credit import spo as _spo  # noqa: F401  (registers the "spo_chain" estimator before validation)


SPO_ESTIMATORS = ("spo_chain", "spo_tree")
SPO_CUTPOINT_LOGPS = ("policy", "sampling")


@dataclass
class SPOArguments:
    r"""
    > Parameters that control SPO ([Segment Policy Optimization](https://huggingface.co/papers/2505.23564))

    spo_cutpoint_threshold (`float`, *optional*, defaults to `0.9`):
        `ρ`: a completion token is a cutpoint when the sampling policy gave it probability `p < ρ` (at the sampling
        temperature). Cutpoints place SPO-chain's segment boundaries and form the probability mask of both SPO
        estimators. In `(0, 1]`; the official code hard-codes 0.9. `1.0` makes every token with `p < 1` a cutpoint.
    spo_cutpoints_per_segment (`int`, *optional*, defaults to `5`):
        `k`, SPO-chain only: a new segment (with a Monte-Carlo value of the state before it) opens at every `k`-th
        cutpoint, counting from the first (the official `cutpoint_interval`, 5; the paper's "int5"). `1` cuts before
        every cutpoint.
    spo_prob_mask (`bool`, *optional*, defaults to `True`):
        Train only the cutpoint tokens (official `use_prob_mask`): the other tokens leave the policy loss, its
        normalizer and the `beta` KL term (a loss mask, not a weight on the advantage). `False`: every token of a
        segment gets the segment's advantage.
    spo_cutpoint_logps (`str`, *optional*, defaults to `"policy"`):
        Which log-probabilities define cutpoints and the mask. `"policy"` (official): the training policy's at the
        sampling temperature, i.e. TRL's `old_per_token_logps` when TRL computes them (vLLM with importance-sampling
        correction, or generation misaligned with optimizer steps; no extra pass), else one no-grad forward pass.
        `"sampling"`: the log-probs vLLM returned while sampling (no extra pass; they follow vLLM's logprobs mode,
        TRL's default being processed, i.e. after temperature and top-p/top-k renormalization); needs `use_vllm=True`.
    spo_advantage_norm (`str`, *optional*, defaults to `"batch"`):
        `"batch"` (official): whiten the token advantages over the batch's masked tokens (loss-mask weights as
        frequency weights, unbiased variance). `"group"`: the same within each prompt's group. `"none"`: raw segment
        advantages.
    spo_tree_shape (`list[int]`, *optional*, defaults to `[6, 6, 6]`):
        SPO-tree only: branching factor of each tree level, `(b_0, …, b_{D−1})`; the tree has `Π b_d` leaf slots per
        prompt (official 6-6-6: 216). `num_generations` must divide `Π b_d`: the trained completions are all slots
        (`num_generations = Π b_d`) or a subset, the others only serving as values.
    spo_tree_segment_tokens (`int`, *optional*, defaults to `100`):
        `M`, SPO-tree only: tokens per segment of every level but the last, which gets the rest of
        `max_completion_length`; `(D − 1)·M < max_completion_length` (official 30 on GSM8K, 100 on MATH, 600 for
        long chains of thought).
    spo_tree_node_weighting (`bool`, *optional*, defaults to `True`):
        SPO-tree only: weigh each token's loss by `1/n`, `n` the trained completions sharing its tree node, so that
        every node (segment) counts once, like one official training edge.
    spo_tree_skip_zero_advantage (`bool`, *optional*, defaults to `True`):
        SPO-tree only: segments with advantage exactly 0 leave the loss (the official `only_adv_greater_than_zero`
        edge filter).
    """

    spo_cutpoint_threshold: float = field(
        default=0.9,
        metadata={
            "help": "SPO: rho, a token is a cutpoint when its sampling probability p < rho (official 0.9); in (0, 1]."
        },
    )
    spo_cutpoints_per_segment: int = field(
        default=5,
        metadata={"help": "SPO-chain: k, a segment (with an MC value) opens at every k-th cutpoint (official 5)."},
    )
    spo_prob_mask: bool = field(
        default=True,
        metadata={
            "help": "SPO: train only the cutpoint tokens; the others leave the loss, its normalizer and the KL "
            "(official). False gives every token its segment's advantage."
        },
    )
    spo_cutpoint_logps: str = field(
        default="policy",
        metadata={
            "help": "SPO: log-probs that define cutpoints: 'policy' (official; TRL's old_per_token_logps, or one "
            "no-grad pass) or 'sampling' (vLLM's sampling log-probs, no extra pass; needs use_vllm)."
        },
    )
    spo_advantage_norm: str = field(
        default="batch",
        metadata={
            "help": "SPO: 'batch' (official: whiten over the batch's masked tokens), 'group' (per group) or 'none'."
        },
    )
    spo_tree_shape: list[int] = field(
        default_factory=lambda: [6, 6, 6],
        metadata={
            "help": "SPO-tree: branching factor per level (official [6, 6, 6]); num_generations must divide the "
            "product."
        },
    )
    spo_tree_segment_tokens: int = field(
        default=100,
        metadata={
            "help": "SPO-tree: M, tokens per segment of every level but the last (official 30/100/600); "
            "(levels - 1) * M < max_completion_length."
        },
    )
    spo_tree_node_weighting: bool = field(
        default=True,
        metadata={"help": "SPO-tree: weigh each token by 1/n (n trained completions sharing its node)."},
    )
    spo_tree_skip_zero_advantage: bool = field(
        default=True,
        metadata={"help": "SPO-tree: segments with advantage 0 leave the loss (official edge filter)."},
    )

    def _validate_spo(self) -> None:
        from ..credit.spo import SPO_ADVANTAGE_NORMS

        rho = self.spo_cutpoint_threshold
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not (math.isfinite(rho) and 0 < rho <= 1):
            raise ValueError(
                f"spo_cutpoint_threshold must be a probability in (0, 1], got {rho!r} (official 0.9; a token is a "
                "cutpoint when p < spo_cutpoint_threshold)."
            )
        for name in ("spo_cutpoints_per_segment", "spo_tree_segment_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
        for name in ("spo_prob_mask", "spo_tree_node_weighting", "spo_tree_skip_zero_advantage"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        if self.spo_cutpoint_logps not in SPO_CUTPOINT_LOGPS:
            raise ValueError(
                f"spo_cutpoint_logps must be one of {SPO_CUTPOINT_LOGPS}, got {self.spo_cutpoint_logps!r}."
            )
        if self.spo_advantage_norm not in SPO_ADVANTAGE_NORMS:
            raise ValueError(
                f"spo_advantage_norm must be one of {SPO_ADVANTAGE_NORMS}, got {self.spo_advantage_norm!r}."
            )
        shape = self.spo_tree_shape
        if (
            isinstance(shape, (str, bytes))
            or not isinstance(shape, (list, tuple))
            or not shape
            or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in shape)
        ):
            raise ValueError(
                f"spo_tree_shape must be a non-empty list of integers >= 1 (children per node at each level), got "
                f"{shape!r}; e.g. [6, 6, 6] (official) or [4, 4, 2]."
            )
        self.spo_tree_shape = [int(b) for b in shape]

        if self.advantage_estimator == "spo_tree":
            self._validate_spo_tree_shape()
        if not self.uses_spo_cutpoints:
            return
        if self.spo_cutpoint_logps == "sampling" and not self.use_vllm:
            raise ValueError(
                "spo_cutpoint_logps='sampling' reads the log-probs vLLM returns while sampling, but use_vllm=False "
                "(transformers generation returns none). Set use_vllm=True, or spo_cutpoint_logps='policy' (one "
                "no-grad forward pass when TRL computes no old log-probs)."
            )
        if self.advantage_estimator == "spo_chain":
            if self.macro_action is not None:
                raise ValueError(
                    f"advantage_estimator='spo_chain' cuts completions at low-probability cutpoints "
                    f"(spo_cutpoints_per_segment), but macro_action={self.macro_action!r} asks for macro-action "
                    "segments. Remove macro_action, or use advantage_estimator='vineppo' for Monte-Carlo values at "
                    "macro-action boundaries."
                )
            if self.vine_boundary_stride != 1:
                raise ValueError(
                    f"vine_boundary_stride={self.vine_boundary_stride} interpolates VinePPO step values, but "
                    "SPO-chain estimates every segment boundary; coarsen the segments with spo_cutpoints_per_segment "
                    "instead (or cap them with vine_max_steps)."
                )

    def _validate_spo_tree_shape(self) -> None:
        """The tree checks that need only the config (the SPO-tree runtime checks the rest)."""
        shape = self.spo_tree_shape
        slots = math.prod(shape)
        if slots % self.num_generations != 0:
            raise ValueError(
                f"num_generations={self.num_generations} must divide the tree's {slots} leaf slots (spo_tree_shape="
                f"{shape}, product {slots}): set num_generations={slots} to train every slot, or a divisor of {slots} "
                "to train a subset (the other slots serve only as values), or change spo_tree_shape."
            )
        inner = (len(shape) - 1) * self.spo_tree_segment_tokens
        if inner >= self.max_completion_length:
            raise ValueError(
                f"spo_tree_shape={shape} with spo_tree_segment_tokens={self.spo_tree_segment_tokens} spends "
                f"{inner} tokens on the {len(shape) - 1} inner levels, leaving nothing of max_completion_length="
                f"{self.max_completion_length} for the last level: (levels - 1) * spo_tree_segment_tokens must be < "
                "max_completion_length. Lower spo_tree_segment_tokens, use fewer levels, or raise "
                "max_completion_length."
            )
        if getattr(self, "macro_action", None) is not None:
            raise ValueError(
                f"advantage_estimator='spo_tree' uses the tree's levels as segments, but macro_action="
                f"{self.macro_action!r} asks for macro-action segments. Remove macro_action (the tree's granularity "
                "is spo_tree_segment_tokens)."
            )
        budget_keys = {"max_tokens", "max_new_tokens", "n", "num_return_sequences"}
        fixed = sorted(budget_keys & set(self.generation_kwargs or {}))
        if fixed:
            raise ValueError(
                f"generation_kwargs sets {fixed}, but SPO-tree derives each level's budget (spo_tree_segment_tokens, "
                "then the rest of max_completion_length) and its number of children (spo_tree_shape) itself. Remove "
                "them."
            )

    @property
    def uses_spo_cutpoints(self) -> bool:
        """Whether the configured estimator reads the sampling policy's per-token probabilities (cutpoints, mask)."""
        from ..credit import get_advantage_estimator

        if self.advantage_estimator in SPO_ESTIMATORS:
            return True
        return getattr(get_advantage_estimator(self.advantage_estimator), "credit_segmentation", None) == "cutpoints"
