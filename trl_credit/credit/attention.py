r"""
Attention-rhythm token weights: WAAD, FAI, preplan/anchor detection and the three γ strategies.

Li et al., "Attention Illuminates LLM Reasoning: The Preplan-and-Anchor Rhythm Enables Fine-Grained Policy
Optimization", https://huggingface.co/papers/2510.13554 (no official code exists; this is a reimplementation from the
paper's text, v1 and v2).

Per head `(l, h)` the attention-weighted mean backward distance over response rows `R` ranks the heads (eq. 7-8):

$$d^{(l,h)} = \frac{1}{|R|}\sum_{t\in R}\sum_{s\le t} A^{(l,h)}_{t,s}\,(t-s)$$

the lowest `head_frac` form `H_loc`, the highest `H_glob`, and their mean maps `Ā^loc`, `Ā^glob` give (eq. 9-10)

$$\mathrm{WAAD}_t = \sum_{s\le t} \bar A^{loc}_{t,s}\,\min(t-s, W), \qquad
  \mathrm{FAI}_s = \frac{1}{|\mathcal T(s)|}\sum_{t\in\mathcal T(s)} \bar A^{glob}_{t,s},\quad
  \mathcal T(s) = \{t\in R : s+H_{lo}\le t\le \min(N-1, s+H_{hi})\}.$$

Preplan tokens are the top-`q` of `Δ_t = |WAAD_t − WAAD_{t+1}|`, anchors the top-`q` of FAI, both per response; the
weights are (eq. 12-19)

$$\gamma_t = 1 + (\gamma_{amp}-1)\big[\mathbb 1\{t\in T_{glob}\setminus D\} + (1-\alpha)\mathbb 1\{t\in D\}
  + \alpha\,\mathbb 1\{t\in I(D)\}\big]$$

for the coupled ("rhythm") strategy, `1 + (γ_amp − 1)·1{t ∈ T_loc}` for "preplan" (local-chunk credit) and
`1 + (γ_amp − 1)·1{t ∈ T_glob}` for "anchor" (global-anchor credit). The loss sees `A_t·γ_t` with γ detached.

Both statistics are linear in the attention map, so WAAD/FAI of a head-group mean map equal the mean over the group of
the per-head statistics; and because attention rows sum to 1, WAAD needs only the diagonal band of width `W` and FAI
only the band `H_lo ≤ t − s ≤ H_hi`. The band forms below (`compute_waad_band`, `compute_fai_band`) are what the
capture pass (`trl_credit.generation.attention_capture`) evaluates per head and query chunk; the full-map forms are the
definitions, kept as test references.

Deviations from the paper / open choices we made (the paper leaves these unspecified; all but the last are options):
- Layers: `round(linspace(⌊L/3⌋, ⌊2L/3⌋, 5))`, 0-indexed, duplicates dropped (`rhythm_layer_indices`).
- Heads are ranked among the sampled layers only, per batch by default (also per sequence, or frozen after the first
  batch); `n = round(head_frac·K)` heads on each side, at least 1 and at most `K // 2` so the groups never overlap.
- τ_waad = per-response median WAAD (`waad_tau_quantile=0.5`), τ_Δ = the smallest Δ among the preplan tokens,
  `intro(s) = argmax_{u∈[s−k, s−1]} Δ_u` (first maximum), k = 2, α = 0.5.
- FAI = −∞ where the horizon is empty (the last `H_lo` tokens): never an anchor unless a response is so short that
  top-`q` must take them (ties then resolve by position).
- Δ of the last token is 0; top-`q` keeps `ceil(q·T)` tokens per response with ties broken by position, and the
  product `q·T` is rounded to 9 decimals before the ceiling (so 0.4·15 selects 6 tokens, not 7 as a bare float
  product would).
- WAAD row alignment: token `o_t` uses its own input row `P + t` (`row_shift=0`, paper-literal) or the row that
  predicted it (`row_shift=−1`).
- Sign gating and renormalization are applied by `trl_credit.credit.weights.apply_token_weights`.

Notation:
    `B` completions, `T` completion tokens, `N` prompt + completion positions, `K` sampled (layer, head) pairs,
    `W` the WAAD window, `D = H_hi − H_lo + 1` the FAI band width.
"""

from __future__ import annotations

import math

import torch


RHYTHM_STRATEGIES = ("preplan", "anchor", "rhythm")
HEAD_GROUPINGS = ("batch", "sequence", "static")


# ── sampled layers ─────────────────────────────────────────────────────────────────────────────────────────────────
def rhythm_layer_indices(num_layers: int, num_sampled: int = 5) -> list[int]:
    """
    The paper's "five evenly spaced layers within the middle third": `round(linspace(⌊L/3⌋, ⌊2L/3⌋, n))`, 0-indexed,
    duplicates dropped (a 36-layer model gives `[12, 15, 18, 21, 24]`; a 2-layer model `[0, 1]`).
    """
    if num_layers < 1 or num_sampled < 1:
        raise ValueError(f"num_layers and num_sampled must be >= 1, got {num_layers} and {num_sampled}.")
    lo, hi = num_layers // 3, (2 * num_layers) // 3
    points = torch.linspace(lo, hi, num_sampled, dtype=torch.float64).round().long().tolist()
    return sorted(set(min(p, num_layers - 1) for p in points))


# ── full-map definitions (references) ─────────────────────────────────────────────────────────────────────────────
def compute_waad(attn: torch.Tensor, window: int) -> torch.Tensor:
    r"""
    Windowed Average Attention Distance over full maps (the paper's definition, eq. 9).

    Args:
        attn (`torch.Tensor` of shape `(..., N, N)`):
            Causal, row-stochastic attention map(s) (a head-group mean map, or per-head maps).
        window (`int`):
            Clipping window `W` (10 in the paper).

    Returns:
        `torch.Tensor` of shape `(..., N)`: `WAAD_t = Σ_s A[t, s]·min(t − s, W)` for every row `t`, in `[0, W]`.
    """
    N = attn.shape[-1]
    pos = torch.arange(N, device=attn.device)
    dist = (pos[:, None] - pos[None, :]).clamp(0, window).to(attn.dtype)
    return (attn * dist).sum(-1)


def compute_fai(
    attn: torch.Tensor,
    response_start: int,
    h_lo: int,
    h_hi: int,
    row_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""
    Future Attention Influence over full maps (the paper's definition, eq. 10).

    Args:
        attn (`torch.Tensor` of shape `(..., N, N)`):
            Causal attention map(s).
        response_start (`int`):
            Index `P` of the first response row; only rows `t ≥ P` are receivers.
        h_lo, h_hi (`int`):
            Horizon `H_lo ≤ t − s ≤ H_hi` (10 and 100 in the paper's v2).
        row_mask (`torch.Tensor` of shape `(..., N)`, *optional*):
            Receiver rows that exist (use it for padded maps); all rows by default.

    Returns:
        `torch.Tensor` of shape `(..., N)`: the mean of column `s` over the receiver rows, `−inf` where there is none.
    """
    N = attn.shape[-1]
    pos = torch.arange(N, device=attn.device)
    gap = pos[:, None] - pos[None, :]  # (t, s)
    sel = ((gap >= h_lo) & (gap <= h_hi) & (pos[:, None] >= response_start)).to(attn.dtype)
    if row_mask is not None:
        sel = sel * row_mask.to(attn.dtype).unsqueeze(-1)
    counts = sel.sum(-2)
    sums = (attn * sel).sum(-2)
    return torch.where(counts > 0, sums / counts.clamp(min=1), torch.full_like(sums, -math.inf))


def compute_row_distance(attn: torch.Tensor) -> torch.Tensor:
    """
    Attention-weighted backward distance of every row, `Σ_s A[t, s]·(t − s)`, shape `(..., N)` from `(..., N, N)`.
    Its mean over response rows is the head distance `d^{(l,h)}` of eq. 7.
    """
    N = attn.shape[-1]
    pos = torch.arange(N, device=attn.device, dtype=attn.dtype)
    return pos - attn @ pos


# ── band forms (what the capture evaluates) ────────────────────────────────────────────────────────────────────────
def attention_band(attn: torch.Tensor, offsets: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """
    Diagonal bands of attention rows: `band[..., i, j] = attn[..., i, rows[i] − offsets[j]]`, 0 where that column is
    negative.

    Args:
        attn (`torch.Tensor` of shape `(..., R, N)`):
            Attention rows (a full map when `R = N`, or a chunk of query rows).
        offsets (`torch.Tensor` of shape `(D,)`, long):
            Backward distances to read.
        rows (`torch.Tensor` of shape `(R,)`, long, *optional*):
            Absolute position of each row; `arange(R)` by default.

    Returns:
        `torch.Tensor` of shape `(..., R, D)`.
    """
    R = attn.shape[-2]
    if rows is None:
        rows = torch.arange(R, device=attn.device)
    cols = rows[:, None] - offsets.to(rows.device)[None, :]
    inside = cols >= 0
    index = cols.clamp(min=0).expand(*attn.shape[:-2], R, offsets.numel())
    return attn.gather(-1, index) * inside.to(attn.dtype)


def compute_waad_band(band: torch.Tensor, window: int) -> torch.Tensor:
    r"""
    WAAD from the diagonal band alone, O(N·W):

    $$\mathrm{WAAD}_t = \sum_{d=0}^{W-1} d\,A_{t,t-d} + W\Big(1-\sum_{d=0}^{W-1}A_{t,t-d}\Big)$$

    Args:
        band (`torch.Tensor` of shape `(..., N, W)`):
            `band[..., t, d] = A[t, t − d]` for `d = 0..W−1` (see [`attention_band`]); rows must be row-stochastic.
        window (`int`):
            `W`, equal to `band.shape[-1]`.

    Returns:
        `torch.Tensor` of shape `(..., N)`.
    """
    if band.shape[-1] != window:
        raise ValueError(f"The WAAD band has width {band.shape[-1]}, expected window={window}.")
    d = torch.arange(window, device=band.device, dtype=band.dtype)
    return (band * d).sum(-1) + window * (1.0 - band.sum(-1))


def fai_horizon_counts(
    row_mask: torch.Tensor, response_start: int, h_lo: int, h_hi: int
) -> torch.Tensor:
    """`|𝒯(s)|` for every column `s`: receiver rows `t ≥ response_start` with `row_mask` and `H_lo ≤ t − s ≤ H_hi`."""
    N = row_mask.shape[-1]
    receivers = row_mask.to(torch.float32).clone()
    receivers[..., :response_start] = 0
    # Sliding-window sum over t in [s + h_lo, s + h_hi] via a cumulative sum.
    csum = torch.nn.functional.pad(receivers.cumsum(-1), (1, 0))
    pos = torch.arange(N, device=row_mask.device)
    lo = (pos + h_lo).clamp(max=N)
    hi = (pos + h_hi + 1).clamp(max=N)
    return csum[..., hi] - csum[..., lo]


def compute_fai_band(
    band: torch.Tensor,
    response_start: int,
    h_lo: int,
    h_hi: int,
    row_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""
    FAI from the band `H_lo ≤ t − s ≤ H_hi` alone, O(N·(H_hi − H_lo)).

    Args:
        band (`torch.Tensor` of shape `(..., N, D)`, `D = h_hi − h_lo + 1`):
            `band[..., t, j] = A[t, t − h_lo − j]` (see [`attention_band`] with `offsets = arange(h_lo, h_hi + 1)`).
        response_start, h_lo, h_hi, row_mask:
            As in [`compute_fai`]; positions are the band's row indices.

    Returns:
        `torch.Tensor` of shape `(..., N)`, `−inf` where the horizon holds no receiver row.
    """
    N, D = band.shape[-2], band.shape[-1]
    if D != h_hi - h_lo + 1:
        raise ValueError(f"The FAI band has width {D}, expected h_hi - h_lo + 1 = {h_hi - h_lo + 1}.")
    if row_mask is None:
        row_mask = torch.ones(band.shape[:-1], dtype=torch.bool, device=band.device)
    receivers = row_mask.bool().clone()
    receivers[..., :response_start] = False
    # Zero the rows that do not receive, pad with zero rows, then read the anti-diagonals through a strided view:
    # element [s + h_lo + j, j] of a contiguous (rows, D) block sits at offset s·D + j·(D + 1) + h_lo·D.
    padded = torch.nn.functional.pad(band * receivers.unsqueeze(-1).to(band.dtype), (0, 0, 0, h_hi + 1)).contiguous()
    lead = padded.shape[:-2]
    picked = padded.as_strided((*lead, N, D), (*padded.stride()[:-2], D, D + 1), h_lo * D)
    sums = picked.sum(-1)
    counts = fai_horizon_counts(row_mask, response_start, h_lo, h_hi).to(sums.dtype)
    return torch.where(counts > 0, sums / counts.clamp(min=1), torch.full_like(sums, -math.inf))


# ── head grouping ──────────────────────────────────────────────────────────────────────────────────────────────────
def num_group_heads(num_heads: int, head_frac: float) -> int:
    """Heads per group: `round(head_frac·K)`, at least 1, at most `K // 2` (so the two groups never overlap)."""
    n = max(1, int(round(head_frac * num_heads + 1e-9)))
    return min(n, max(1, num_heads // 2))


def group_heads(distance: torch.Tensor, head_frac: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Split heads into local-focused (smallest mean backward distance) and global-focused (largest) groups.

    Args:
        distance (`torch.Tensor` of shape `(..., K)`):
            Mean backward distance of each sampled head (e.g. per sequence `(B, K)`, or pooled `(K,)`).
        head_frac (`float`, *optional*, defaults to `0.3`):
            Fraction of heads in each group (the paper's "bottom/top 30%").

    Returns:
        `(local, global)`: boolean masks of shape `(..., K)`; ties are broken by head index.
    """
    K = distance.shape[-1]
    n = num_group_heads(K, head_frac)
    order = torch.sort(distance, dim=-1, stable=True).indices
    local = torch.zeros_like(distance, dtype=torch.bool).scatter_(-1, order[..., :n], True)
    glob = torch.zeros_like(distance, dtype=torch.bool).scatter_(-1, order[..., K - n :], True)
    return local, glob


def masked_row_mean(stat: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(sum, count)` of `stat (..., K, T)` over the tokens where `mask (..., T)` holds: shapes `(..., K)`, `(...,)`."""
    m = mask.to(stat.dtype)
    return (stat * m.unsqueeze(-2)).sum(-1), m.sum(-1)


def aggregate_heads(stat: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """
    Mean of per-head statistics over a head group (exact for WAAD and FAI, which are linear in the map).

    Args:
        stat (`torch.Tensor` of shape `(B, K, T)`):
            Per-head WAAD or FAI (FAI may hold `−inf`).
        group (`torch.Tensor` of shape `(B, K)` or `(K,)`, bool):
            The heads to average.

    Returns:
        `torch.Tensor` of shape `(B, T)`.
    """
    if group.dim() == 1:
        group = group.unsqueeze(0).expand(stat.shape[0], -1)
    sel = group.unsqueeze(-1)
    total = torch.where(sel, stat, torch.zeros_like(stat)).sum(-2)
    return total / group.sum(-1, keepdim=True).clamp(min=1).to(stat.dtype)


# ── detection ──────────────────────────────────────────────────────────────────────────────────────────────────────
def waad_delta(waad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`Δ_t = |WAAD_t − WAAD_{t+1}|` where both tokens are valid, else 0 (the last token's Δ is 0). Shapes `(B, T)`."""
    valid = mask.bool()
    delta = torch.zeros_like(waad)
    if waad.size(1) == 0:  # no token
        return delta
    delta[:, :-1] = (waad[:, :-1] - waad[:, 1:]).abs()
    both = valid.clone()
    both[:, :-1] &= valid[:, 1:]
    both[:, -1] = False
    return torch.where(both, delta, torch.zeros_like(delta))


def _num_selected(mask: torch.Tensor, q: float) -> torch.Tensor:
    lengths = mask.to(torch.float64).sum(-1)
    # Round before the ceiling: 0.4 * 15 is 6.000000000000001 in binary floating point.
    return torch.ceil(torch.round(q * lengths, decimals=9)).long()


def _valid_first_order(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Indices sorting each row by (valid first, score descending, position ascending)."""
    key = torch.nan_to_num(scores.to(torch.float64), nan=-math.inf)
    order = torch.sort(-key, dim=-1, stable=True).indices  # -(-inf) = inf sorts last; stable keeps positions
    valid_sorted = mask.bool().gather(-1, order)
    second = torch.sort((~valid_sorted).to(torch.int8), dim=-1, stable=True).indices
    return order.gather(-1, second)


def top_q_mask(scores: torch.Tensor, mask: torch.Tensor, q: float) -> torch.Tensor:
    """
    Per-row top-`q` selection: the `ceil(q·T_i)` valid tokens with the largest scores (`−inf` allowed; ties broken by
    position, like a stable descending sort).

    Args:
        scores (`torch.Tensor` of shape `(B, T)`).
        mask (`torch.Tensor` of shape `(B, T)`): valid tokens.
        q (`float`): fraction in `(0, 1]`.

    Returns:
        `torch.Tensor` of shape `(B, T)`, bool, never set on invalid tokens.
    """
    order = _valid_first_order(scores, mask)
    k = _num_selected(mask, q)
    ranks = torch.arange(scores.shape[-1], device=scores.device).expand_as(order)
    chosen = ranks < k.unsqueeze(-1)
    return torch.zeros_like(mask, dtype=torch.bool).scatter_(-1, order, chosen) & mask.bool()


def masked_quantile(values: torch.Tensor, mask: torch.Tensor, quantile: float) -> torch.Tensor:
    """Per-row quantile over valid entries with linear interpolation (NumPy's default; 0.5 = `np.median`). `(B,)`."""
    filled = torch.where(mask.bool(), values, torch.full_like(values, math.inf))
    ordered = torch.sort(filled, dim=-1).values
    n = mask.bool().sum(-1)
    if values.size(-1) == 0:  # no entry in any row
        return torch.zeros(values.shape[:-1], dtype=values.dtype, device=values.device)
    pos = quantile * (n - 1).clamp(min=0).to(values.dtype)
    lo = pos.floor().long()
    hi = pos.ceil().long()
    v_lo = ordered.gather(-1, lo.unsqueeze(-1)).squeeze(-1)
    v_hi = ordered.gather(-1, hi.unsqueeze(-1)).squeeze(-1)
    out = v_lo + (pos - lo.to(values.dtype)) * (v_hi - v_lo)
    return torch.where(n > 0, out, torch.zeros_like(out))


def dominated_anchors(
    waad: torch.Tensor,
    delta: torch.Tensor,
    anchors: torch.Tensor,
    preplans: torch.Tensor,
    mask: torch.Tensor,
    k: int = 2,
    waad_tau_quantile: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Locally dominated anchors `D` and their introductory tokens `I(D)` (paper §5.2).

    An anchor `t` is dominated when `WAAD_t ≤ τ_waad` (the per-response `waad_tau_quantile` of WAAD, the median by
    default) and `max_{u∈[t−k, t−1]} Δ_u ≥ τ_Δ` (the smallest Δ among the preplan tokens); its intro is the first
    argmax of Δ in that window.

    Args:
        waad, delta (`torch.Tensor` of shape `(B, T)`): aggregated WAAD and its Δ.
        anchors, preplans, mask (`torch.Tensor` of shape `(B, T)`, bool): `T_glob`, `T_loc`, valid tokens.
        k (`int`): look-back window.
        waad_tau_quantile (`float`): quantile of WAAD used as `τ_waad`.

    Returns:
        `(dominated, intros)`: boolean masks of shape `(B, T)`.
    """
    B, T = waad.shape
    valid = mask.bool()
    if T == 0:  # no token: nothing dominated, no introduction
        return torch.zeros_like(valid), torch.zeros_like(valid)
    tau_w = masked_quantile(waad, valid, waad_tau_quantile)
    tau_d = torch.where(preplans, delta, torch.full_like(delta, math.inf)).min(-1).values
    # Window u = t − k .. t − 1, oldest first, so argmax returns the first maximum like np.argmax.
    lag = torch.arange(k, 0, -1, device=waad.device)  # k, k-1, ..., 1
    pos = torch.arange(T, device=waad.device)
    u = pos[:, None] - lag[None, :]  # (T, k)
    window = delta[:, u.clamp(min=0)]  # (B, T, k)
    inside = (u >= 0).expand(B, T, k) & valid[:, u.clamp(min=0)]
    window = torch.where(inside, window, torch.full_like(window, -math.inf))
    wmax, warg = window.max(-1)
    has_window = torch.isfinite(wmax)
    dominated = anchors & valid & has_window & (waad <= tau_w[:, None]) & (wmax >= tau_d[:, None])
    intro_pos = pos[None, :] - k + warg
    target = torch.where(dominated, intro_pos, torch.full_like(intro_pos, T))  # non-dominated -> a dummy column
    intros = torch.zeros(B, T + 1, dtype=torch.bool, device=waad.device).scatter_(1, target, True)[:, :T]
    return dominated, intros & valid


def rhythm_gammas(
    waad: torch.Tensor,
    fai: torch.Tensor,
    mask: torch.Tensor,
    strategy: str = "rhythm",
    *,
    quantile: float = 0.4,
    gamma_amp: float = 1.5,
    alpha: float = 0.5,
    k: int = 2,
    waad_tau_quantile: float = 0.5,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""
    Per-token weights γ of the three strategies, vectorized over the batch (every statistic is per response).

    Args:
        waad (`torch.Tensor` of shape `(B, T)`):
            WAAD of the local-head group at each completion token.
        fai (`torch.Tensor` of shape `(B, T)`):
            FAI of the global-head group (`−inf` where the horizon is empty).
        mask (`torch.Tensor` of shape `(B, T)`):
            Tokens that can be selected (the loss mask).
        strategy (`str`, *optional*, defaults to `"rhythm"`):
            `"preplan"` (local-chunk credit, eq. 12-13), `"anchor"` (global-anchor credit, eq. 14-15) or `"rhythm"`
            (coupled rhythm credit, eq. 16-19).
        quantile (`float`, *optional*, defaults to `0.4`): `q`, fraction of tokens selected per response.
        gamma_amp (`float`, *optional*, defaults to `1.5`): `γ_amp`.
        alpha (`float`, *optional*, defaults to `0.5`): share of a dominated anchor's bonus moved to its intro.
        k (`int`, *optional*, defaults to `2`): look-back window for dominated anchors.
        waad_tau_quantile (`float`, *optional*, defaults to `0.5`): `τ_waad` as a per-response WAAD quantile.

    Returns:
        `(gamma, classes)`: `gamma` of shape `(B, T)`, exactly 1 outside `mask`; `classes` maps `"preplan"`,
        `"anchor"`, `"dominated"`, `"intro"` to boolean `(B, T)` masks and `"delta"` to Δ.

    Example (the spec's worked example):
    ```python
    >>> waad = torch.tensor([[1.0, 4.0, 1.5, 1.2, 5.0, 0.8, 0.9, 3.5, 0.7, 0.6]])
    >>> fai = torch.tensor([[.02, .03, .10, .01, .04, .12, .02, .05, .09, -float("inf")]])
    >>> rhythm_gammas(waad, fai, torch.ones(1, 10))[0]
    tensor([[1.0000, 1.0000, 1.5000, 1.0000, 1.2500, 1.2500, 1.0000, 1.7500, 1.2500, 1.0000]])
    ```
    """
    if strategy not in RHYTHM_STRATEGIES:
        raise ValueError(f"strategy must be one of {RHYTHM_STRATEGIES}, got {strategy!r}.")
    waad = waad.detach().to(torch.float32)
    fai = fai.detach().to(torch.float32)
    valid = mask.bool()
    delta = waad_delta(waad, valid)
    preplans = top_q_mask(delta, valid, quantile)
    anchors = top_q_mask(fai, valid, quantile)
    dominated, intros = dominated_anchors(waad, delta, anchors, preplans, valid, k, waad_tau_quantile)
    bonus = gamma_amp - 1.0
    one = torch.ones_like(waad)
    if strategy == "preplan":
        gamma = one + bonus * preplans.to(waad.dtype)
    elif strategy == "anchor":
        gamma = one + bonus * anchors.to(waad.dtype)
    else:
        gamma = (
            one
            + bonus * (anchors & ~dominated).to(waad.dtype)
            + (1.0 - alpha) * bonus * dominated.to(waad.dtype)
            + alpha * bonus * intros.to(waad.dtype)
        )
    gamma = torch.where(valid, gamma, one)
    classes = {"preplan": preplans, "anchor": anchors, "dominated": dominated, "intro": intros, "delta": delta}
    return gamma, classes
