"""The single input bundle every advantage estimator reads, and the output every estimator returns."""

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
            1 on real completion tokens (EOS included), 0 on padding. Defines the prefix tree and the steps.
        rewards (`torch.Tensor` of shape `(N,)`):
            Outcome reward of each completion, already aggregated over reward functions with their weights. `NaN`
            marks an unscorable completion (every reward function returned `None`); its advantage is 0.
        num_generations (`int`):
            Group size `G`: rows `[g·G, (g+1)·G)` are the completions of one prompt.
        loss_mask (`torch.Tensor` of shape `(N, T)`, *optional*):
            Tokens that enter the loss (`completion_mask * tool_mask` in TRL). Advantages are exactly 0 outside it.
            Defaults to `completion_mask`.
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
        if self.num_generations < 1 or N % self.num_generations != 0:
            raise ValueError(
                f"The batch of {N} completions is not made of whole groups of num_generations={self.num_generations}."
            )
        for name in ("loss_mask", "segment_ids", "values", "token_rewards", "old_logps", "ref_logps", "entropies"):
            x = getattr(self, name)
            if x is not None and tuple(x.shape) != (N, T):
                raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {(N, T)}.")
        if self.segment_values is not None and (self.segment_values.dim() != 2 or self.segment_values.size(0) != N):
            raise ValueError(f"segment_values has shape {tuple(self.segment_values.shape)}, expected ({N}, S).")

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
        metrics (`dict[str, float]`):
            Diagnostics, logged under `credit/<name>`.
    """

    advantages: torch.Tensor
    returns: torch.Tensor | None = None
    metrics: dict[str, float] = field(default_factory=dict)
