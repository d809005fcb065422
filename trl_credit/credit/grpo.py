r"""
GRPO's group-relative outcome advantage, bit for bit as TRL 1.16 computes it inline in
`GRPOTrainer._generate_and_score_completions`. It is the parity anchor of every other estimator.

$$A_i = \frac{r_i - \mu_{g(i)}}{\sigma + 10^{-4}}$$

with $\mu_g$ the NaN-aware group mean, $\sigma$ the Bessel-corrected NaN-aware std of the group (`scale_rewards=
"group"`), of the whole batch (`"batch"`), or no division (`"none"`, Dr. GRPO,
https://huggingface.co/papers/2503.20783).
Unscorable completions (`NaN` reward) get advantage 0.

Deviations from TRL: none (tested bit-exact against `trl.GRPOTrainer`). Paper: DeepSeekMath,
https://huggingface.co/papers/2402.03300.
"""

from __future__ import annotations

import torch

from .batch import CreditBatch, CreditOutput
from .registry import register_advantage_estimator


SCALE_REWARDS = ("group", "batch", "none")
TRL_EPS = 1e-4  # TRL divides by std + 1e-4 (verl uses 1e-6)


def nanstd(x: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Bessel-corrected std ignoring NaNs; NaN where fewer than 2 values (same arithmetic as `trl.trainer.utils`)."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    variance = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True)
    count = torch.sum(~torch.isnan(x), dim=dim, keepdim=True)
    correction = count / (count - 1)
    correction = torch.where(count > 1, correction, torch.full_like(correction, float("nan")))
    variance *= correction
    std = torch.sqrt(variance)
    if keepdim:
        return std
    return std.squeeze(dim) if dim is not None else std.squeeze()


def _check_scale(scale_rewards: str) -> None:
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}.")


def reward_std(rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group") -> torch.Tensor:
    """
    The std TRL uses for `scale_rewards`, broadcast to `(N,)`: the group std for `"group"` and `"none"` (TRL logs
    it for `"none"` without dividing), the batch std for `"batch"`. Zeros when a group (or the batch) has one member.
    """
    _check_scale(scale_rewards)
    if scale_rewards in ("group", "none"):
        if num_generations > 1:
            return nanstd(rewards.view(-1, num_generations), dim=1).repeat_interleave(num_generations, dim=0)
        return torch.zeros_like(rewards)
    if rewards.numel() > 1:
        return nanstd(rewards).expand_as(rewards)
    return torch.zeros_like(rewards)


def advantage_denominator(rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group") -> torch.Tensor:
    """`(N,)` divisor of TRL's advantage: `std + 1e-4`, or ones for `scale_rewards="none"`."""
    if scale_rewards == "none":
        _check_scale(scale_rewards)
        return torch.ones_like(rewards)
    return reward_std(rewards, num_generations, scale_rewards) + TRL_EPS


@torch.no_grad()
def compute_grpo_advantages(
    rewards: torch.Tensor,
    num_generations: int,
    scale_rewards: str = "group",
    *,
    rewards_per_func: torch.Tensor | None = None,
    reward_weights: torch.Tensor | None = None,
    multi_objective_aggregation: str = "sum_then_normalize",
) -> torch.Tensor:
    r"""
    TRL 1.16's GRPO advantages.

    Args:
        rewards (`torch.Tensor` of shape `(N,)`):
            Aggregated rewards (`nansum` of the weighted per-function rewards); `NaN` = unscorable.
        num_generations (`int`):
            Group size `G`; groups are consecutive blocks of `G` rows.
        scale_rewards (`str`, *optional*, defaults to `"group"`):
            `"group"`, `"batch"` or `"none"`, as `GRPOConfig.scale_rewards`.
        rewards_per_func (`torch.Tensor` of shape `(N, F)`, *optional*):
            Required for `multi_objective_aggregation="normalize_then_sum"`.
        reward_weights (`torch.Tensor` of shape `(F,)`, *optional*):
            Required for `multi_objective_aggregation="normalize_then_sum"`.
        multi_objective_aggregation (`str`, *optional*, defaults to `"sum_then_normalize"`):
            As `GRPOConfig.multi_objective_aggregation`.

    Returns:
        `torch.Tensor` of shape `(N,)`: the advantages, 0 for unscorable completions.

    Example:
    ```python
    >>> compute_grpo_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0]), num_generations=2)
    tensor([ 0.7070, -0.7070,  0.0000,  0.0000])
    ```
    """
    _check_scale(scale_rewards)
    G = num_generations
    if multi_objective_aggregation == "sum_then_normalize":
        mean = torch.nanmean(rewards.view(-1, G), dim=1).repeat_interleave(G, dim=0)
        advantages = rewards - mean
        if scale_rewards != "none":
            advantages = advantages / (reward_std(rewards, G, scale_rewards) + TRL_EPS)
    elif multi_objective_aggregation == "normalize_then_sum":
        if rewards_per_func is None or reward_weights is None:
            raise ValueError("normalize_then_sum needs rewards_per_func (N, F) and reward_weights (F,).")
        F = rewards_per_func.size(1)
        grouped = rewards_per_func.view(-1, G, F)
        mean_k = torch.nanmean(grouped, dim=1, keepdim=True)
        std_k = nanstd(grouped, dim=1, keepdim=True) if G > 1 else torch.zeros_like(mean_k)
        reward_k = ((grouped - mean_k) / (std_k + TRL_EPS)).view(-1, F)
        summed = (reward_k * reward_weights.to(reward_k.device).unsqueeze(0)).nansum(dim=1)
        summed[torch.isnan(rewards_per_func).all(dim=1)] = torch.nan
        std = nanstd(summed).expand_as(summed) if summed.numel() > 1 else torch.zeros_like(summed)
        advantages = (summed - torch.nanmean(summed)) / (std + TRL_EPS)
    else:
        raise ValueError(
            f"multi_objective_aggregation must be 'sum_then_normalize' or 'normalize_then_sum', got "
            f"{multi_objective_aggregation!r}."
        )
    return torch.nan_to_num(advantages, nan=0.0)


@register_advantage_estimator("grpo", sequence_level=True)
def grpo_estimator(
    batch: CreditBatch, *, scale_rewards: str = "group", multi_objective_aggregation: str = "sum_then_normalize"
) -> CreditOutput:
    """TRL's sequence-level advantage, `(N,)`; TRL's loss broadcasts it over tokens."""
    adv = compute_grpo_advantages(
        batch.rewards,
        batch.num_generations,
        scale_rewards,
        rewards_per_func=batch.rewards_per_func,
        reward_weights=batch.reward_weights,
        multi_objective_aggregation=multi_objective_aggregation,
    )
    return CreditOutput(advantages=adv)
