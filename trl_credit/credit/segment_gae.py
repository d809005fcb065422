r"""
Generalized advantage estimation over **segments** (reasoning steps, macro actions, or single tokens).

A completion is cut into segments `k = 0..S_i−1` (every token belongs to exactly one). With `V_k` the value of the
state at the start of segment `k`, `V_{S_i} = 0` (terminal), `R_k` the reward collected in segment `k` (the outcome
reward on the last segment, plus optional dense segment rewards such as a KL penalty):

$$\delta_k = R_k + \gamma V_{k+1} - V_k,\quad A_k = \delta_k + \gamma\lambda A_{k+1},\quad \mathrm{Ret}_k = A_k + V_k$$

and every token of segment `k` gets `A_k` (and `Ret_k`).

- VinePPO (https://huggingface.co/papers/2410.01679): segments = reasoning steps, `V_k` = Monte-Carlo values,
  `γ = 1, λ = 0` (TD(0); the last step uses the real reward). Steps past the estimation cap have `NaN` values and are
  back-filled with the reward-to-go `V_k = R_k + γ V_{k+1}`, which makes their advantage 0 (official behaviour).
- MA-PPO (https://huggingface.co/papers/2410.02743): segments = macro actions, `V_k` = macro value from a critic,
  `γ = 1, λ = 0.95`. Single-token segments give classic token-level GAE exactly.

Deviations: none from the equations above; the official VinePPO code back-fills only the trailing capped steps, here
any `NaN` value inside `S_i` is back-filled the same way (callers that interpolate values do so before calling).
"""

from __future__ import annotations

import torch


def segment_counts(segment_ids: torch.Tensor) -> torch.Tensor:
    """`(N,)` long: segments of each row of `segment_ids (N, T)` (largest id + 1), 0 for a row without tokens, also
    when the batch has no token column at all (`T = 0`, where a reduction over the tokens would fail)."""
    if segment_ids.size(1) == 0:
        return torch.zeros(segment_ids.size(0), dtype=torch.long, device=segment_ids.device)
    return (segment_ids.max(dim=1).values + 1).clamp(min=0)


def max_segments(segment_ids: torch.Tensor) -> int:
    """The most segments of any row, 0 for a batch without rows or tokens."""
    return int(segment_counts(segment_ids).max()) if segment_ids.numel() else 0


def _segment_counts(segment_ids: torch.Tensor, S: int) -> torch.Tensor:
    num_segments = segment_counts(segment_ids)
    if (num_segments > S).any():
        raise ValueError(
            f"segment_ids reach {int(num_segments.max()) - 1} but segment_values has only {S} columns: one value per "
            "segment is needed."
        )
    return num_segments


@torch.no_grad()
def compute_segment_gae(
    rewards: torch.Tensor,
    segment_ids: torch.Tensor,
    segment_values: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.0,
    *,
    segment_rewards: torch.Tensor | None = None,
    return_returns: bool = False,
):
    r"""
    Segment-level GAE, broadcast to tokens.

    Args:
        rewards (`torch.Tensor` of shape `(N,)`):
            Terminal outcome reward of each completion, collected in its last segment. `NaN` (unscorable) gives an
            all-zero row.
        segment_ids (`torch.Tensor` of shape `(N, T)`, long):
            Segment index of every token, non-decreasing from 0 to `S_i − 1` along the completion; `-1` on padding.
        segment_values (`torch.Tensor` of shape `(N, S)`):
            Value of the state at the start of each segment (`S ≥ max S_i`). `NaN` inside `S_i` = not estimated,
            back-filled with the reward-to-go; entries beyond `S_i` are ignored.
        gamma (`float`, *optional*, defaults to `1.0`):
            Discount between segments.
        lam (`float`, *optional*, defaults to `0.0`):
            GAE λ (0 = TD(0) as VinePPO; 1 = Monte-Carlo return minus value).
        segment_rewards (`torch.Tensor` of shape `(N, S)`, *optional*):
            Dense rewards of each segment (e.g. the KL penalty aggregated over the segment), added to the outcome.
        return_returns (`bool`, *optional*, defaults to `False`):
            Also return the value targets `Ret_k = A_k + V_k` broadcast to tokens.

    Returns:
        `torch.Tensor` of shape `(N, T)`: advantages, 0 on padding; and the `(N, T)` returns if `return_returns`.
        A batch without any token (`T = 0`, or every segment id `-1`) gives zeros of that shape, whatever `S`.

    Example (the VinePPO spec's telescoping vector: 5 steps, `r = 1`, `V = [.4, .6, .2, .9, .7]`):
    ```python
    >>> seg = torch.tensor([[0, 1, 2, 3, 4, -1]])
    >>> compute_segment_gae(torch.tensor([1.0]), seg, torch.tensor([[0.4, 0.6, 0.2, 0.9, 0.7]]))
    tensor([[ 0.2000, -0.4000,  0.7000, -0.2000,  0.3000,  0.0000]])
    ```

    Notation: `N` completions, `T` tokens, `S` segment columns, `S_i` segments of completion `i`.
    """
    if segment_ids.dim() != 2 or segment_values.dim() != 2 or rewards.dim() != 1:
        raise ValueError(
            f"Expected rewards (N,), segment_ids (N, T), segment_values (N, S); got {tuple(rewards.shape)}, "
            f"{tuple(segment_ids.shape)}, {tuple(segment_values.shape)}."
        )
    N, S = segment_values.shape
    if segment_ids.size(0) != N or rewards.size(0) != N:
        raise ValueError("rewards, segment_ids and segment_values must have the same number of rows N.")
    if segment_rewards is not None and tuple(segment_rewards.shape) != (N, S):
        raise ValueError(f"segment_rewards must have shape {(N, S)}, got {tuple(segment_rewards.shape)}.")
    device = segment_values.device
    segment_ids = segment_ids.long()
    num_segments = _segment_counts(segment_ids, S)
    seg_valid = torch.arange(S, device=device)[None, :] < num_segments[:, None]  # (N, S)
    dtype = torch.float32 if segment_values.dtype in (torch.float16, torch.bfloat16) else segment_values.dtype
    if S == 0 or segment_ids.size(1) == 0:  # no segment in any row (checked above): nothing to credit
        zeros = torch.zeros(segment_ids.shape, dtype=dtype, device=device)
        return (zeros, zeros.clone()) if return_returns else zeros

    scorable = ~torch.isnan(rewards)
    R = torch.zeros(N, S, dtype=dtype, device=device)
    if segment_rewards is not None:
        R = R + torch.nan_to_num(segment_rewards.to(dtype), nan=0.0)
    last = (num_segments - 1).clamp(min=0)
    R[torch.arange(N, device=device), last] += torch.where(scorable & (num_segments > 0), rewards.to(dtype), 0.0)
    R = torch.where(seg_valid, R, torch.zeros_like(R))
    V = torch.where(seg_valid, segment_values.to(dtype), torch.full_like(R, float("nan")))

    advantages = torch.zeros(N, S, dtype=dtype, device=device)
    running = torch.zeros(N, dtype=dtype, device=device)
    next_value = torch.zeros(N, dtype=dtype, device=device)  # V_{S_i} = 0
    for k in range(S - 1, -1, -1):
        inside = seg_valid[:, k]
        has_next = (k + 1) < num_segments
        next_v = torch.where(has_next, next_value, torch.zeros_like(next_value))
        # Back-fill: an unestimated state takes the reward-to-go, so its segment's TD error is 0.
        v_k = torch.where(torch.isnan(V[:, k]), R[:, k] + gamma * next_v, V[:, k])
        v_k = torch.where(inside, v_k, torch.zeros_like(v_k))
        delta = R[:, k] + gamma * next_v - v_k
        running = torch.where(inside, delta + gamma * lam * torch.where(has_next, running, 0.0), 0.0)
        advantages[:, k] = running
        V[:, k] = v_k
        next_value = torch.where(inside, v_k, next_value)

    valid_tok = segment_ids >= 0
    index = segment_ids.clamp(min=0)
    keep = valid_tok & scorable[:, None]
    adv_tok = torch.where(keep, advantages.gather(1, index), torch.zeros((), dtype=dtype, device=device))
    if not return_returns:
        return adv_tok
    ret = advantages + torch.where(seg_valid, V, torch.zeros_like(V))
    ret_tok = torch.where(valid_tok, ret.gather(1, index), torch.zeros((), dtype=dtype, device=device))
    return adv_tok, ret_tok
