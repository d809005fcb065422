r"""
SPO-chain: segment advantages at low-probability cutpoints, from Monte-Carlo values, trained on the cutpoint tokens
only ([SPO](https://huggingface.co/papers/2505.23564), Guo et al., NeurIPS 2025; official code
`AIFrameResearch/SPO`).

With `p_t = π_old(y_t | x, y_<t)` the sampling policy's probability of each completion token at the sampling
temperature, the **cutpoints** are the tokens with `p_t < ρ` and the **probability mask** is `w_t = 1[p_t < ρ]`. With
`C = (c_0 < c_1 < …)` the cutpoints, every `k`-th one opens a segment, `B = (c_0, c_k, c_{2k}, …)`, and the state
before it, `s_{B_j} = x ⊕ y_{<B_j}`, gets a Monte-Carlo value `V̂` (prepared by the trainer: requirement
`"mc_values"`, VinePPO's rollout engine). The segments are `[0, B_0), [B_0, B_1), …, [B_{m−1}, T)` and each gets the
TD(0) advantage with `γ = 1` and the reward as terminal value:

$$A_j = \hat V(s_{B_{j+1}}) - \hat V(s_{B_j}),\qquad A_{m-1} = r - \hat V(s_{B_{m-1}}),\qquad
A_{\text{lead}} = 0 \ \text{(the leading segment } [0, B_0) \text{ when } B_0 > 0\text{; } \hat V(\text{prompt})
\text{ is estimated only when } B_0 = 0),$$

so that $\sum_j A_j = r - \hat V(s_{B_0})$. This is `compute_segment_gae(gamma=1, lam=0)` with the leading state's
value `NaN` (back-filled with the reward-to-go, hence advantage 0), exactly the official `_compute_token_advantages`.
Every token of segment `j` gets `A_j`; with the probability mask (`spo_prob_mask=True`, official) only the cutpoint
tokens enter the loss: the estimator returns `loss_mask = w` (`CreditOutput.loss_mask`), which the trainer multiplies
into TRL's loss mask, so masked tokens leave the policy loss, its normalizer and the KL term. Rows without any
cutpoint need no rollout and train on no token.

Normalization `spo_advantage_norm` (official: `"batch"`): `(A − mean) / sqrt(var + 1e-8)` with the mean and the
unbiased variance taken over the loss-mask weights as frequency weights (the masked tokens only; every valid token when
the mask is off); `"group"` does the same within each prompt's group; `"none"` keeps the raw TD advantages.

Deviations from the official code (spec `spo.md` §8; the quirks we do not copy):

- one threshold `ρ` and one rule `p < ρ` for cutpoints, mask and whitening (the official generator zeroes advantages
  where `p > 0.9`, the loss masks `p ≥ 0.9`: a token with `p = 0.9` exactly kept its advantage but was masked);
- `spo_prob_mask=False` gives every token of a segment its advantage (the official switch only changed the
  normalizer, the generator had already zeroed the advantages of the high-probability tokens);
- states are token-id prefixes of the sampled completion (the official code decodes them to text and re-tokenizes);
- EOS is trained like any token (masked only if `p ≥ ρ`; the official tokenization drops it);
- no estimation cap by default (`vine_max_steps`; the official `max_step_for_value_estimation: 25` has no effect);
- the user's reward functions (no `-2` for two `"####"`);
- the KL term is TRL's per-token `beta` term on the masked tokens, not the official sequence-summed, clamped k3, and no
  mini-batch is zeroed when the mean ratio exceeds 10;
- whitening statistics span the generation batch of all processes (the official code whitens each optimizer
  mini-batch; identical when `steps_per_generation = 1`).

Notation: `N` completions, `T` padded completion length, `S` segment columns, `G` group size, `ρ` threshold, `k`
cutpoints per segment.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .batch import CreditBatch, CreditOutput
from .registry import register_advantage_estimator
from .segment_gae import compute_segment_gae


SPO_ADVANTAGE_NORMS = ("batch", "group", "none")
SPO_WHITEN_EPS = 1e-8  # official masked_whiten


class CutpointSegments(NamedTuple):
    """
    The cutpoint segmentation of a batch (`cutpoint_boundaries`).

    Attributes:
        segment_ids (`torch.Tensor` of shape `(N, T)`, long): segment of every token, `-1` on padding.
        estimated_states (`torch.Tensor` of shape `(N, S)`, bool): segment start states that need a value (their
            start is a boundary cutpoint); `False` for a leading segment without cutpoint and beyond `S_i`.
        cutpoint_mask (`torch.Tensor` of shape `(N, T)`, float): the probability mask `1[p_t < ρ]` on real tokens.
    """

    segment_ids: torch.Tensor
    estimated_states: torch.Tensor
    cutpoint_mask: torch.Tensor


def _check_logps(logps: torch.Tensor, mask: torch.Tensor, rho: float) -> torch.Tensor:
    if logps.dim() != 2 or tuple(mask.shape) != tuple(logps.shape):
        raise ValueError(
            f"logps and mask must both have shape (N, T); got {tuple(logps.shape)} and {tuple(mask.shape)}."
        )
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not (0.0 < rho <= 1.0):
        raise ValueError(f"The cutpoint threshold rho must be a probability in (0, 1], got {rho!r}.")
    valid = mask > 0
    bad = valid & torch.isnan(logps)
    if bool(bad.any()):
        raise ValueError(
            f"{int(bad.sum())} real completion token(s) have a NaN log-probability; cutpoints need the sampling "
            "policy's log-probability of every token (pass finite log-probs, or 0.0 where none is known: such a "
            "token is never a cutpoint)."
        )
    return valid


@torch.no_grad()
def probability_mask(logps: torch.Tensor, mask: torch.Tensor, rho: float = 0.9) -> torch.Tensor:
    r"""
    SPO's probability mask `w_t = 1[exp(logp_t) < ρ]` on real tokens: the cutpoint tokens.

    Args:
        logps (`torch.Tensor` of shape `(N, T)`):
            Log-probabilities of the sampled tokens under the sampling policy at the sampling temperature.
        mask (`torch.Tensor` of shape `(N, T)`):
            1 on real completion tokens, 0 on padding.
        rho (`float`, *optional*, defaults to `0.9`):
            Threshold `ρ ∈ (0, 1]`; a token with `p = ρ` exactly is not a cutpoint.

    Returns:
        `torch.Tensor` of shape `(N, T)`, float32: 1 on cutpoint tokens, 0 elsewhere (padding included).

    Example:
    ```python
    >>> probability_mask(torch.tensor([[0.95, 0.5, 0.9]]).log(), torch.ones(1, 3), rho=0.9).tolist()
    [[0.0, 1.0, 0.0]]
    ```
    """
    valid = _check_logps(logps, mask, rho)
    # p and ρ compared at the log-probs' precision (at least float32), so that p = ρ exactly stays out
    dtype = logps.dtype if logps.dtype == torch.float64 else torch.float32
    below = torch.exp(logps.to(dtype)) < torch.tensor(rho, dtype=dtype)
    return (valid & below).to(torch.float32)


@torch.no_grad()
def cutpoint_boundaries(logps: torch.Tensor, mask: torch.Tensor, rho: float = 0.9, k: int = 5) -> CutpointSegments:
    r"""
    SPO-chain's segmentation: a segment opens at every `k`-th cutpoint (`p_t < ρ`), counting from the first.

    `C = [t : p_t < ρ]`, `B = C[0::k]`; segments `[0, B_0), [B_0, B_1), …, [B_{m−1}, T_i)`. The start state of a segment
    is estimated iff its start is in `B` (every segment but a leading `[0, B_0)` with `B_0 > 0`). A row without any
    cutpoint is one segment with no estimated state (its advantage is 0 and, with the mask, it trains no token).

    Args:
        logps (`torch.Tensor` of shape `(N, T)`):
            The sampling policy's log-probabilities of the sampled tokens at the sampling temperature.
        mask (`torch.Tensor` of shape `(N, T)`):
            1 on real completion tokens, 0 on padding; right-padded (a row's real tokens come first).
        rho (`float`, *optional*, defaults to `0.9`):
            Cutpoint threshold `ρ ∈ (0, 1]` (official 0.9). `ρ = 1` makes every token with `p < 1` a cutpoint.
        k (`int`, *optional*, defaults to `5`):
            Cutpoints per segment (official `cutpoint_interval`, 5); `k = 1` cuts before every cutpoint.

    Returns:
        [`CutpointSegments`]: `segment_ids (N, T)`, `estimated_states (N, S)` with `S = max(1, max_i S_i)`,
        `cutpoint_mask (N, T)`.

    Example (spec vector 1: cutpoints at 1, 3, 5, 7, 9, `k = 2` → boundaries 1, 5, 9; the leading state is not
    estimated):
    ```python
    >>> p = torch.tensor([[0.99, 0.72, 1.0, 0.85, 1.0, 0.56, 0.92, 0.23, 0.98, 0.11, 1.0, 0.95]])
    >>> seg = cutpoint_boundaries(p.log(), torch.ones_like(p), rho=0.9, k=2)
    >>> seg.segment_ids.tolist(), seg.estimated_states.tolist()
    ([[0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3]], [[False, True, True, True]])
    ```
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"The number of cutpoints per segment k must be an integer >= 1, got {k!r}.")
    cut = probability_mask(logps, mask, rho).bool()
    valid = mask > 0
    N, T = valid.shape
    lengths = valid.sum(dim=1)
    positions = torch.arange(T, device=valid.device)[None, :]
    if not torch.equal(valid, positions < lengths[:, None]):
        raise ValueError("mask must be right-padded: each row's real tokens first, then padding (1…1 0…0).")
    rank = cut.long().cumsum(dim=1) - 1
    boundary = cut & (rank % k == 0)
    starts = boundary.clone()
    starts[:, :1] |= valid[:, :1]  # every non-empty row opens a segment at token 0 (the leading one if no cutpoint)
    segment_ids = torch.where(valid, starts.long().cumsum(dim=1) - 1, torch.full_like(rank, -1))
    num_segments = starts.sum(dim=1)
    S = max(int(num_segments.max()) if N else 0, 1)
    estimated = torch.arange(S, device=valid.device)[None, :] < num_segments[:, None]
    estimated[:, 0] &= boundary[:, 0] if T else False
    return CutpointSegments(segment_ids, estimated, cut.to(torch.float32))


@torch.no_grad()
def masked_whiten(advantages: torch.Tensor, weights: torch.Tensor, eps: float = SPO_WHITEN_EPS) -> torch.Tensor:
    r"""
    `(A − mean) / sqrt(var + eps)` with the statistics over `weights` taken as frequency weights:
    `mean = Σ w A / Σ w`, `var = Σ w (A − mean)² / (Σ w − 1)` (unbiased; 0 when `Σ w ≤ 1`). With 0/1 weights this
    is the official `masked_whiten` over the masked tokens. Returned as it is when `Σ w = 0`.

    Args:
        advantages (`torch.Tensor` of any shape): the raw advantages.
        weights (`torch.Tensor` of the same shape): non-negative weights (the loss mask).
        eps (`float`, *optional*, defaults to `1e-8`): added to the variance.

    Returns:
        `torch.Tensor` like `advantages` (float32), whitened everywhere (callers zero what is outside the mask).

    Example (spec vector 1: mean 0.15, unbiased std 0.37914 over the 5 masked tokens):
    ```python
    >>> a = torch.tensor([-.25, -.25, .5, .5, .25, 0.0])
    >>> [round(x, 4) for x in masked_whiten(a, torch.tensor([1.0, 1, 1, 1, 1, 0])).tolist()[:5]]
    [-1.055, -1.055, 0.9231, 0.9231, 0.2638]
    ```
    """
    if tuple(weights.shape) != tuple(advantages.shape):
        raise ValueError(f"weights {tuple(weights.shape)} must have the shape of advantages {tuple(advantages.shape)}.")
    a = advantages.to(torch.float64)
    w = weights.to(torch.float64)
    n = w.sum()
    if n <= 0:
        return advantages.to(torch.float32)
    mean = (a * w).sum() / n
    var = (((a - mean) ** 2) * w).sum() / (n - 1) if n > 1 else torch.zeros((), dtype=torch.float64)
    return ((a - mean) / torch.sqrt(var + eps)).to(torch.float32)


@torch.no_grad()
def spo_normalize(advantages: torch.Tensor, weights: torch.Tensor, norm: str, num_generations: int) -> torch.Tensor:
    r"""
    SPO's advantage normalization (`spo_advantage_norm`), zero where the weight is 0.

    Args:
        advantages (`torch.Tensor` of shape `(N, T)`): raw segment advantages.
        weights (`torch.Tensor` of shape `(N, T)`): the loss-mask weights (frequency weights of the statistics).
        norm (`str`): `"batch"` (official: whitening over the batch's weighted tokens), `"group"` (the same within
            each group of `num_generations` consecutive rows) or `"none"`.
        num_generations (`int`): group size `G`.

    Returns:
        `torch.Tensor` of shape `(N, T)`, float32.
    """
    if norm not in SPO_ADVANTAGE_NORMS:
        raise ValueError(f"spo_advantage_norm must be one of {SPO_ADVANTAGE_NORMS}, got {norm!r}.")
    if norm == "batch":
        out = masked_whiten(advantages, weights)
    elif norm == "group":
        N, G = advantages.size(0), num_generations
        if G < 1 or N % G:
            raise ValueError(f"{N} rows are not whole groups of num_generations={G}.")
        out = torch.cat([masked_whiten(advantages[g : g + G], weights[g : g + G]) for g in range(0, N, G)]) if N else (
            advantages.to(torch.float32)
        )
    else:
        out = advantages.to(torch.float32)
    return torch.where(weights > 0, out, torch.zeros_like(out))


def _row_mean(x: torch.Tensor, rows: torch.Tensor) -> float:
    return x[rows].to(torch.float64).mean().item() if bool(rows.any()) else 0.0


@register_advantage_estimator("spo_chain", requires=("segments", "mc_values"))
@torch.no_grad()
def compute_spo_chain_advantages(
    batch: CreditBatch, *, spo_prob_mask: bool = True, spo_advantage_norm: str = "batch"
) -> CreditOutput:
    r"""
    SPO-chain token advantages and loss mask from the cutpoint segmentation and the Monte-Carlo boundary values.

    Args:
        batch ([`CreditBatch`]):
            Needs `segment_ids (N, T)` and `cutpoint_mask (N, T)` (`cutpoint_boundaries`, the `"segments"`
            requirement) and `segment_values (N, S)` (`NaN` where not estimated: the leading segment without
            cutpoint; the `"mc_values"` requirement). `trl_credit.GRPOTrainer` prepares them.
        spo_prob_mask (`bool`, *optional*, defaults to `True`):
            Official: train only the cutpoint tokens (returned as `loss_mask`). `False`: every token of a segment
            gets its advantage and the loss mask is left as it is.
        spo_advantage_norm (`str`, *optional*, defaults to `"batch"`):
            `"batch"` (official whitening over the masked tokens), `"group"` or `"none"`.

    Returns:
        [`CreditOutput`] with `advantages (N, T)` (0 outside the mask and on unscorable rows), `loss_mask (N, T)`
        (with the probability mask) and diagnostics: `spo_cutpoints_mean` (`n_c` per row), `spo_boundaries_mean`
        (estimated states per row), `spo_mask_frac` (share of real tokens in the mask), `spo_rows_without_cutpoint`,
        `spo_adv_raw_mean`, `spo_adv_raw_std`, `spo_nonzero_frac` (before normalization, over the trained tokens),
        `spo_value_mean` (mean estimated `V̂`).

    Example (spec vector 2: first token a cutpoint, `k = 3`, `V̂(s_0) = 0.6`, `V̂(s_5) = 0.3`, `r = 0`):
    ```python
    >>> p = torch.tensor([[0.5, 0.95, 0.8, 0.99, 0.7, 0.6, 0.97, 0.4, 0.999, 0.3]])
    >>> seg = cutpoint_boundaries(p.log(), torch.ones_like(p), rho=0.9, k=3)
    >>> batch = CreditBatch(completion_ids=torch.zeros(1, 10, dtype=torch.long), completion_mask=torch.ones(1, 10),
    ...                     rewards=torch.tensor([0.0]), num_generations=1, segment_ids=seg.segment_ids,
    ...                     segment_values=torch.tensor([[0.6, 0.3]]), cutpoint_mask=seg.cutpoint_mask)
    >>> [round(x, 2) for x in compute_spo_chain_advantages(batch, spo_advantage_norm="none").advantages[0].tolist()]
    [-0.3, 0.0, -0.3, 0.0, -0.3, -0.3, 0.0, -0.3, 0.0, -0.3]
    ```
    """
    if spo_advantage_norm not in SPO_ADVANTAGE_NORMS:
        raise ValueError(f"spo_advantage_norm must be one of {SPO_ADVANTAGE_NORMS}, got {spo_advantage_norm!r}.")
    if batch.segment_ids is None or batch.segment_values is None:
        raise ValueError(
            "advantage_estimator='spo_chain' needs batch.segment_ids (cutpoint segments) and batch.segment_values "
            "(Monte-Carlo values of their start states); use trl_credit.GRPOTrainer, which prepares them."
        )
    if spo_prob_mask and batch.cutpoint_mask is None:
        raise ValueError(
            "advantage_estimator='spo_chain' with spo_prob_mask=True needs batch.cutpoint_mask (the tokens with "
            "p < rho, from cutpoint_boundaries); pass it, or set spo_prob_mask=False."
        )
    mask = batch.mask
    if mask.size(1) == 0:  # no completion token at all
        empty = torch.zeros_like(mask)
        return CreditOutput(advantages=empty, loss_mask=empty if spo_prob_mask else None, metrics={})
    rows_valid = (mask * (batch.segment_ids >= 0)) > 0
    scorable = ~torch.isnan(batch.rewards)
    valid = (rows_valid & scorable[:, None]).to(torch.float32)
    raw = compute_segment_gae(batch.rewards, batch.segment_ids, batch.segment_values, gamma=1.0, lam=0.0)
    raw = raw.to(torch.float32) * valid
    if spo_prob_mask:
        cut = (batch.cutpoint_mask > 0).to(torch.float32)
        loss_mask = mask * cut
        weights = valid * cut
    else:
        loss_mask = None
        weights = valid
    advantages = spo_normalize(raw, weights, spo_advantage_norm, batch.num_generations)

    # ── diagnostics ──
    active = rows_valid.any(dim=1)
    trained = weights > 0
    metrics: dict[str, float] = {}
    if batch.cutpoint_mask is not None:
        n_c = ((batch.cutpoint_mask > 0) & rows_valid).sum(dim=1)
        metrics["spo_cutpoints_mean"] = _row_mean(n_c, active)
        metrics["spo_rows_without_cutpoint"] = float((active & (n_c == 0)).sum())
        real = rows_valid.sum()
        metrics["spo_mask_frac"] = float(n_c.sum() / real) if real > 0 else 0.0
    values = batch.segment_values.to(torch.float32)
    num_segments = (batch.segment_ids.max(dim=1).values + 1).clamp(min=0)
    inside = torch.arange(values.size(1), device=values.device)[None, :] < num_segments[:, None]
    if batch.estimated_states is not None:
        est = batch.estimated_states.bool()
        width = min(est.size(1), inside.size(1))
        boundaries = (est[:, :width] & inside[:, :width]).sum(dim=1)
    else:
        boundaries = (inside & ~torch.isnan(values)).sum(dim=1)
    metrics["spo_boundaries_mean"] = _row_mean(boundaries, active)
    estimated = values[inside & ~torch.isnan(values)]
    metrics["spo_value_mean"] = estimated.mean().item() if estimated.numel() else math.nan
    metrics["spo_adv_raw_mean"] = raw[trained].mean().item() if bool(trained.any()) else 0.0
    metrics["spo_adv_raw_std"] = raw[trained].std().item() if int(trained.sum()) > 1 else 0.0
    metrics["spo_nonzero_frac"] = (raw[trained] != 0).float().mean().item() if bool(trained.any()) else 0.0
    return CreditOutput(advantages=advantages, loss_mask=loss_mask, metrics=metrics)


# The trainer answers the "segments" requirement with cutpoint segments for estimators that declare this.
compute_spo_chain_advantages.credit_segmentation = "cutpoints"
