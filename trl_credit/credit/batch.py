"""The single input bundle every advantage estimator reads, the output every estimator returns, and the one rule for
rewards that are not finite numbers."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class CreditBatch:
    r"""
    Everything an advantage estimator may read, over the **global** generation batch in TRL's row order (the `G`
    completions of a prompt are consecutive rows; groups never straddle the batch, they may straddle ranks, which the
    trainer resolves before building the batch).

    Parameters:
        completion_ids (`torch.Tensor` of shape `(N, T)`, long):
            Completion token ids, right-padded.
        completion_mask (`torch.Tensor` of shape `(N, T)`):
            1 on every generated token (EOS included), 0 on padding, also for a completion TRL masks out of the loss
            (`mask_truncated_completions`). Defines the structure: prefix tree, steps, segments. Never derive
            structure from `loss_mask`.
        rewards (`torch.Tensor` of shape `(N,)`):
            Outcome reward of each completion, already aggregated over reward functions with their weights. `NaN`
            marks an unscorable completion (every reward function returned `None`, or no reward was a finite number:
            [`nonfinite_rewards_to_nan`]); its advantage is 0. ±inf is refused.
        num_generations (`int`):
            Group size `G`: rows `[g·G, (g+1)·G)` are the completions of one prompt.
        loss_mask (`torch.Tensor` of shape `(N, T)`, *optional*):
            Tokens that enter the loss (TRL's `completion_mask * tool_mask`, all 0 for a truncated completion under
            `mask_truncated_completions`). Advantages are exactly 0 outside it. Defaults to `completion_mask`.
        rewards_per_func (`torch.Tensor` of shape `(N, F)`, *optional*):
            Unaggregated rewards (`NaN` = `None`), needed only for `multi_objective_aggregation="normalize_then_sum"`.
        reward_weights (`torch.Tensor` of shape `(F,)`, *optional*):
            Weights of the reward functions.
        segment_ids (`torch.Tensor` of shape `(N, T)`, long, *optional*):
            Index of the segment (reasoning step, macro action) each token belongs to, `0..S_i-1`; `-1` on padding.
        segment_values (`torch.Tensor` of shape `(N, S)`, *optional*):
            Value of the state at the start of each segment (Monte-Carlo or critic); `NaN` beyond `S_i` or where the
            state was not estimated (back-filled by the estimator).
        values (`torch.Tensor` of shape `(N, T)`, *optional*):
            Per-token critic values `V(s_t)`.
        token_rewards (`torch.Tensor` of shape `(N, T)`, *optional*):
            Dense per-token rewards (e.g. a KL penalty), added to the outcome reward on the last token by estimators
            that use them.
        old_logps, ref_logps, entropies (`torch.Tensor` of shape `(N, T)`, *optional*):
            Log-probabilities of the sampling policy and of the reference model; per-token entropies.
        estimated_states (`torch.Tensor` of shape `(N, S)`, bool, *optional*):
            Which segment start states need a value (Monte-Carlo rollouts), chosen by the segmentation itself (SPO's
            cutpoints: every segment but a leading one without cutpoint). `None` lets the value source choose (every
            step state, capped).
        cutpoint_mask (`torch.Tensor` of shape `(N, T)`, *optional*):
            SPO's probability mask `1[π_old(y_t) < ρ]` on real tokens (the cutpoint tokens), 0 elsewhere.
        tree_paths (`torch.Tensor` of shape `(N, D)`, long, *optional*):
            SPO-tree: the child index at each level of the sampled tree along the completion's root-to-leaf path,
            `-1` past its leaf (the completion's segments are the tree levels in `segment_ids`).

    Notation:
        `N` completions in the global generation batch, `T` padded completion length, `G` group size, `S` segments.
    """

    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    rewards: torch.Tensor
    num_generations: int
    loss_mask: torch.Tensor | None = None
    rewards_per_func: torch.Tensor | None = None
    reward_weights: torch.Tensor | None = None
    segment_ids: torch.Tensor | None = None
    segment_values: torch.Tensor | None = None
    values: torch.Tensor | None = None
    token_rewards: torch.Tensor | None = None
    old_logps: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None
    entropies: torch.Tensor | None = None
    estimated_states: torch.Tensor | None = None
    cutpoint_mask: torch.Tensor | None = None
    tree_paths: torch.Tensor | None = None

    def __post_init__(self):
        N, T = self.completion_ids.shape if self.completion_ids.dim() == 2 else (None, None)
        if N is None:
            raise ValueError(f"completion_ids must be 2-D (N, T), got shape {tuple(self.completion_ids.shape)}.")
        if tuple(self.completion_mask.shape) != (N, T):
            raise ValueError(
                f"completion_mask has shape {tuple(self.completion_mask.shape)}, expected {(N, T)} like completion_ids."
            )
        if tuple(self.rewards.shape) != (N,):
            raise ValueError(f"rewards has shape {tuple(self.rewards.shape)}, expected ({N},): one per completion.")
        for name in ("rewards", "rewards_per_func"):
            x = getattr(self, name)
            if x is not None and torch.isinf(x).any():
                raise ValueError(
                    f"{name} holds {int(torch.isinf(x).sum())} infinite value(s). A reward that is not a finite number "
                    "is unscorable: replace it with NaN first (`nonfinite_rewards_to_nan`, which the trainers apply)."
                )
        if self.num_generations < 1 or N % self.num_generations != 0:
            raise ValueError(
                f"The batch of {N} completions is not made of whole groups of num_generations={self.num_generations}."
            )
        names = ("loss_mask", "segment_ids", "values", "token_rewards", "old_logps", "ref_logps", "entropies")
        for name in (*names, "cutpoint_mask"):
            x = getattr(self, name)
            if x is not None and tuple(x.shape) != (N, T):
                raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {(N, T)}.")
        if self.segment_values is not None and (self.segment_values.dim() != 2 or self.segment_values.size(0) != N):
            raise ValueError(f"segment_values has shape {tuple(self.segment_values.shape)}, expected ({N}, S).")
        if self.estimated_states is not None and (
            self.estimated_states.dim() != 2 or self.estimated_states.size(0) != N
        ):
            raise ValueError(f"estimated_states has shape {tuple(self.estimated_states.shape)}, expected ({N}, S).")
        if self.tree_paths is not None and (self.tree_paths.dim() != 2 or self.tree_paths.size(0) != N):
            raise ValueError(f"tree_paths has shape {tuple(self.tree_paths.shape)}, expected ({N}, D).")

    @property
    def mask(self) -> torch.Tensor:
        """The loss mask as a float tensor `(N, T)` (falls back to `completion_mask`)."""
        m = self.loss_mask if self.loss_mask is not None else self.completion_mask
        return m.to(torch.float32)


@dataclass
class CreditOutput:
    """
    What an estimator returns.

    Parameters:
        advantages (`torch.Tensor` of shape `(N,)` or `(N, T)`):
            Sequence-level (broadcast over tokens by TRL's loss) or per-token advantages; per-token advantages are
            exactly 0 outside the loss mask.
        returns (`torch.Tensor` of shape `(N, T)`, *optional*):
            Value targets for a critic (PPO).
        loss_mask (`torch.Tensor` of shape `(N, T)`, *optional*):
            Non-negative per-token loss weights (0/1 for a mask), multiplied into the loss mask the trainer hands to
            TRL's loss (`completion_mask * tool_mask`): a token with weight 0 leaves the policy loss, its normalizer
            (per-sequence or batch token counts, `num_items_in_batch`) and the `beta` KL term, unlike a weight on the
            advantage. Any estimator may return one (SPO's probability mask). `None` keeps TRL's mask.
        metrics (`dict[str, float]`):
            Diagnostics, logged under `credit/<name>`.
    """

    advantages: torch.Tensor
    returns: torch.Tensor | None = None
    loss_mask: torch.Tensor | None = None
    metrics: dict[str, float] = field(default_factory=dict)


def nonfinite_rewards_to_nan(
    rewards_per_func: torch.Tensor, reward_weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, int]:
    """
    The one rule for rewards that are not finite numbers: a reward of ±inf is treated like a reward function returning
    `None` (`NaN`, skipped by the NaN-aware baselines; a completion with no finite reward is unscorable, advantage 0).
    A completion whose weighted sum over the functions is not finite (overflow, infinite weight) becomes unscorable as
    a whole. Every estimator, TRL's own advantage and its reward logs then see `NaN`, never ±inf.

    Args:
        rewards_per_func (`torch.Tensor` of shape `(N, F)` or `(N,)`):
            Rewards per completion and reward function; `NaN` = `None`.
        reward_weights (`torch.Tensor` of shape `(F,)`, *optional*):
            Weights of the reward functions (the weighted sum is checked for overflow).

    Returns:
        `(rewards, replaced)`: the rewards with `NaN` in place of every non-finite value (the input tensor itself when
        nothing is replaced, so finite rewards stay bit-identical), and the number of values that were replaced.

    Example:
    ```python
    >>> nonfinite_rewards_to_nan(torch.tensor([[1.0, float("inf")], [float("-inf"), float("nan")], [2.0, 0.0]]))
    (tensor([[1., nan],
            [nan, nan],
            [2., 0.]]), 2)
    ```
    """
    bad = torch.isinf(rewards_per_func)
    if reward_weights is not None and rewards_per_func.dim() == 2:
        weights = reward_weights.to(device=rewards_per_func.device, dtype=rewards_per_func.dtype)
        finite = torch.where(bad, torch.zeros_like(rewards_per_func), rewards_per_func)
        total = (finite * weights.unsqueeze(0)).nansum(dim=1)
        bad = bad | (~torch.isfinite(total))[:, None] & ~torch.isnan(rewards_per_func)
    replaced = int(bad.sum())
    if replaced == 0:
        return rewards_per_func, 0
    return torch.where(bad, torch.full_like(rewards_per_func, float("nan")), rewards_per_func), replaced
