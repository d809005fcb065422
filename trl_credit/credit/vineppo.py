r"""
VinePPO step advantages from Monte-Carlo state values ([VinePPO](https://huggingface.co/papers/2410.01679),
Kazemnejad et al., ICML 2025).

The value of the state before reasoning step `k` is the mean reward of `K` continuations sampled from it with the
current policy, $\hat V(s_k) = \frac{1}{K}\sum_{j=1}^{K} r(s_k, \tilde y_j)$ (prepared by the trainer, requirement
`"mc_values"`). Each step gets the one-step TD advantage, with $\gamma = 1$ and a terminal value of 0:

$$A_k = R_k + \hat V(s_{k+1}) - \hat V(s_k), \qquad R_k = r\,\mathbb 1[k = S-1], \qquad \hat V(s_S) = 0,$$

so the last step uses the real reward, $A_{S-1} = r - \hat V(s_{S-1})$, and $\sum_k A_k = r - \hat V(s_0)$. The outcome
`r` of a completion that reached the horizon without EOS is `vine_truncation_penalty`, the value a truncated
Monte-Carlo continuation gets (`apply_truncation_penalty`, one rule for both; the official unfinished-response
penalty), so `r − V̂` never compares two different rewards. Every
token of step `k` gets $A_k$. States past the cap `vine_max_steps` are back-filled with the reward-to-go (advantage 0),
exactly as the official code; this is `compute_segment_gae(gamma=1, lam=0)`. States skipped by a boundary stride
(`vine_boundary_stride > 1`) are linearly interpolated before (`interpolate_state_values`).

Normalization `vine_advantage_norm`:
- `"batch"` (paper): token advantages whitened over the valid tokens of the batch, `(A − mean) / sqrt(var + 1e-8)`
  with the unbiased variance; "zero" advantages become `−mean/std`, as in the paper;
- `"group"`: the same over the tokens of each prompt's group;
- `"none"`: raw TD advantages in `[−1, 1]` for 0/1 rewards.

Deviations from the paper: the whitening statistics are taken over the generation batch (all processes), which is the
optimizer mini-batch only when `steps_per_generation = 1`; the paper whitens each optimizer mini-batch. The KL term is
TRL's per-token `beta` term in the loss, not the paper's token-summed, clamped k3 term, and it never enters the MC
value (as in the official code, McGill-NLP/VinePPO#14).

Notation: `N` completions, `T` tokens, `G` group size, `K` rollouts per state, `S` steps.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .batch import CreditBatch, CreditOutput
from .registry import register_advantage_estimator
from .segment_gae import compute_segment_gae, segment_counts


ADVANTAGE_NORMS = ("batch", "group", "none")
WHITEN_EPS = 1e-8  # official masked_whiten


def segment_starts(segment_ids: torch.Tensor, num_columns: int) -> torch.Tensor:
    """`(N, S)` long: the token index where each segment starts (`b_k`), `-1` beyond the row's last segment."""
    N, T = segment_ids.shape
    positions = torch.arange(T, device=segment_ids.device).expand(N, T)
    starts = torch.full((N, num_columns + 1), T + 1, dtype=torch.long, device=segment_ids.device)
    valid = segment_ids >= 0
    index = torch.where(valid, segment_ids, torch.full_like(segment_ids, num_columns))
    starts.scatter_reduce_(1, index, torch.where(valid, positions, T + 1), reduce="amin")
    starts = starts[:, :num_columns]
    num_segments = segment_counts(segment_ids)
    k = torch.arange(num_columns, device=segment_ids.device)[None, :]
    return torch.where(k < num_segments[:, None], starts, torch.full_like(starts, -1))


@torch.no_grad()
def interpolate_state_values(
    segment_ids: torch.Tensor,
    segment_values: torch.Tensor,
    rewards: torch.Tensor,
    interpolate: torch.Tensor,
) -> torch.Tensor:
    r"""
    Fill the values of states skipped by a boundary stride by linear interpolation in token position between the
    nearest estimated state before and the next anchor after: the next estimated state, or else the first back-filled
    state (past the cap) or the end of the completion, whose value-to-go is the reward `r`. Conservative per segment,
    so telescoping still holds; with no skipped state it is the identity.

    Args:
        segment_ids (`torch.Tensor` of shape `(N, T)`, long): step of each token, `-1` on padding.
        segment_values (`torch.Tensor` of shape `(N, S)`): MC values where estimated, `NaN` elsewhere.
        rewards (`torch.Tensor` of shape `(N,)`): outcome rewards (`NaN` rows are left as they are).
        interpolate (`torch.Tensor` of shape `(N, S)`, bool): the states to fill.

    Returns:
        `torch.Tensor` of shape `(N, S)`: the values with the `interpolate` entries filled.

    Example (steps of 2 tokens, states 0 and 2 estimated, state 1 halfway, state 3 halfway to `r = 1`):
    ```python
    >>> seg = torch.tensor([[0, 0, 1, 1, 2, 2, 3, 3]])
    >>> interpolate_state_values(seg, torch.tensor([[0.2, float("nan"), 0.6, float("nan")]]), torch.tensor([1.0]),
    ...                          torch.tensor([[False, True, False, True]]))
    tensor([[0.2000, 0.4000, 0.6000, 0.8000]])
    ```
    """
    values = segment_values.clone()
    if not bool(interpolate.any()):
        return values
    N, S = values.shape
    starts = segment_starts(segment_ids, S).tolist()
    num_segments = segment_counts(segment_ids).tolist()
    lengths = (segment_ids >= 0).sum(dim=1).tolist()
    v = values.tolist()
    fill = interpolate.tolist()
    for i in range(N):
        if not any(fill[i]) or rewards[i].isnan():
            continue
        r = float(rewards[i])
        S_i = num_segments[i]
        # anchors: (token position, value) of estimated states, then the first back-filled state or the end
        anchors = []
        for k in range(S_i):
            if not fill[i][k] and v[i][k] == v[i][k]:  # estimated (not NaN)
                anchors.append((starts[i][k], v[i][k]))
            elif not fill[i][k]:
                anchors.append((starts[i][k], r))  # past the cap: back-filled with the reward-to-go
                break
        else:
            anchors.append((lengths[i], r))
        for k in range(S_i):
            if not fill[i][k]:
                continue
            pos = starts[i][k]
            left = max((a for a in anchors if a[0] <= pos), default=anchors[0], key=lambda a: a[0])
            right = min((a for a in anchors if a[0] > pos), default=left, key=lambda a: a[0])
            if right[0] == left[0]:
                v[i][k] = left[1]
            else:
                w = (pos - left[0]) / (right[0] - left[0])
                v[i][k] = (1 - w) * left[1] + w * right[1]
    return torch.tensor(v, dtype=values.dtype, device=values.device)


def apply_truncation_penalty(
    rewards: torch.Tensor,
    completion_ids: Sequence[Sequence[int]],
    max_completion_length: int,
    eos_token_ids: Sequence[int],
    truncation_penalty: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""
    The outcome VinePPO uses for each training completion: `truncation_penalty` for a completion that reached the
    horizon `max_completion_length` without ending in EOS (the same rule and value as a truncated Monte-Carlo
    continuation, `trl_credit.generation.rollouts`), the reward otherwise. Unscorable rows (`NaN`) stay `NaN`.

    Args:
        rewards (`torch.Tensor` of shape `(N,)`): the reward functions' weighted sum, `NaN` = unscorable.
        completion_ids (`Sequence[Sequence[int]]`, length `N`): real tokens of each completion (EOS included).
        max_completion_length (`int`): the training horizon.
        eos_token_ids (`Sequence[int]`): token ids that end a completion.
        truncation_penalty (`float`, *optional*, defaults to `0.0`): `vine_truncation_penalty`.

    Returns:
        `(outcomes (N,), truncated (N,) bool)`, outcomes in the dtype of `rewards`.

    Example:
    ```python
    >>> apply_truncation_penalty(torch.tensor([1.0, 1.0, float("nan")]), [[5, 2], [5, 6, 7], [5, 6, 7]], 3, [2])
    (tensor([1., 0., nan]), tensor([False,  True,  True]))
    ```
    """
    if len(completion_ids) != rewards.numel():
        raise ValueError(f"Got {len(completion_ids)} completions for {rewards.numel()} rewards.")
    eos = set(eos_token_ids)
    truncated = torch.tensor(
        [len(c) >= max_completion_length and (len(c) == 0 or c[-1] not in eos) for c in completion_ids],
        dtype=torch.bool,
        device=rewards.device,
    )
    penalty = torch.full_like(rewards, truncation_penalty)
    return torch.where(truncated & ~torch.isnan(rewards), penalty, rewards), truncated


def _whiten(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`(A − mean) / sqrt(var + 1e-8)` over `mask` (unbiased variance; 0 variance with one token)."""
    n = mask.sum()
    if n == 0:
        return advantages
    mean = (advantages * mask).sum() / n
    var = (((advantages - mean) ** 2) * mask).sum() / (n - 1) if n > 1 else torch.zeros((), dtype=advantages.dtype)
    return (advantages - mean) / torch.sqrt(var + WHITEN_EPS)


@register_advantage_estimator("vineppo", requires=("segments", "mc_values"))
@torch.no_grad()
def compute_vineppo_advantages(batch: CreditBatch, *, vine_advantage_norm: str = "batch") -> CreditOutput:
    r"""
    VinePPO token advantages from the batch's step segmentation and MC state values.

    Args:
        batch ([`CreditBatch`]):
            Needs `segment_ids (N, T)` and `segment_values (N, S)` (`NaN` = not estimated: back-filled with the
            reward-to-go), prepared by the trainer for the `"mc_values"` requirement.
        vine_advantage_norm (`str`, *optional*, defaults to `"batch"`):
            `"batch"` (paper: whitening over the batch's valid tokens), `"group"` (whitening per group), `"none"`.

    Returns:
        [`CreditOutput`] with `advantages (N, T)`, exactly 0 outside the loss mask and on unscorable rows, and
        diagnostics: `vine_adv_raw_mean`, `vine_adv_raw_std`, `vine_nonzero_frac` (before normalization),
        `vine_steps_mean`, `vine_root_value_mean` (mean `V̂(s_0)`), `vine_value_mean` (mean estimated `V̂`).

    Example (the spec's telescoping vector; no normalization):
    ```python
    >>> batch = CreditBatch(
    ...     completion_ids=torch.zeros(1, 5, dtype=torch.long), completion_mask=torch.ones(1, 5),
    ...     rewards=torch.tensor([1.0]), num_generations=1, segment_ids=torch.tensor([[0, 1, 2, 3, 4]]),
    ...     segment_values=torch.tensor([[0.4, 0.6, 0.2, 0.9, 0.7]]))
    >>> compute_vineppo_advantages(batch, vine_advantage_norm="none").advantages
    tensor([[ 0.2000, -0.4000,  0.7000, -0.2000,  0.3000]])
    ```
    """
    if vine_advantage_norm not in ADVANTAGE_NORMS:
        raise ValueError(f"vine_advantage_norm must be one of {ADVANTAGE_NORMS}, got {vine_advantage_norm!r}.")
    if batch.segment_ids is None or batch.segment_values is None:
        raise ValueError(
            "advantage_estimator='vineppo' needs batch.segment_ids and batch.segment_values (the 'mc_values' "
            "requirement); use trl_credit.GRPOTrainer, which prepares them with Monte-Carlo rollouts."
        )
    mask = batch.mask * (batch.segment_ids >= 0)
    scorable = ~torch.isnan(batch.rewards)
    mask = mask * scorable[:, None]
    raw = compute_segment_gae(batch.rewards, batch.segment_ids, batch.segment_values, gamma=1.0, lam=0.0)
    raw = raw.to(torch.float32) * mask

    if vine_advantage_norm == "batch":
        advantages = _whiten(raw, mask)
    elif vine_advantage_norm == "group":
        G = batch.num_generations
        advantages = torch.zeros_like(raw)
        for g in range(raw.size(0) // G):
            rows = slice(g * G, (g + 1) * G)
            advantages[rows] = _whiten(raw[rows], mask[rows])
    else:
        advantages = raw
    advantages = advantages * mask

    valid = mask > 0
    num_segments = segment_counts(batch.segment_ids)
    has_steps = num_segments > 0
    values = batch.segment_values.to(torch.float32)
    seg_valid = torch.arange(values.size(1))[None, :] < num_segments[:, None]
    estimated = values[seg_valid & ~torch.isnan(values)]
    root = values[has_steps, 0] if values.size(1) else values.new_zeros(0)
    root = root[~torch.isnan(root)]
    metrics = {
        "vine_adv_raw_mean": raw[valid].mean().item() if valid.any() else 0.0,
        "vine_adv_raw_std": raw[valid].std().item() if int(valid.sum()) > 1 else 0.0,
        "vine_nonzero_frac": (raw[valid] != 0).float().mean().item() if valid.any() else 0.0,
        "vine_steps_mean": num_segments[has_steps].float().mean().item() if has_steps.any() else 0.0,
        "vine_root_value_mean": root.mean().item() if root.numel() else 0.0,
        "vine_value_mean": estimated.mean().item() if estimated.numel() else 0.0,
    }
    return CreditOutput(advantages=advantages, metrics=metrics)
