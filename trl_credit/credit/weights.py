r"""
Token weights and how they compose with any estimator's advantages; entropy "forking token" weights.

Composition (specs README, "Composition order"), per completion, everything detached:

1. the estimator's advantages `A` (`(B,)` sequence-level or `(B, T)` per token);
2. token weights `w` (attention rhythm γ, entropy);
3. sign gating: `w_t = 1` where `A_t < 0` for `sign="nonneg"` (the attention paper's v1; per token, so per-token
   estimators whose signs vary along a completion are gated token by token);
4. optional renormalization to mean 1 over the completion's valid tokens (`w̃ = w / mean_valid(w)`), which keeps
   each completion's advantage mass `Σ_t A_{i,t}` and hence the loss scale under every TRL `loss_type`;
5. `A·w`; TRL's own `top_entropy_quantile` mask is applied afterwards, inside the loss.

Padding weights are exactly 1. Every weighting here is strictly positive except the 80/20 `"mask"` mode (below), so
`sign(A·w) = sign(A)` and TRL's sign-dependent paths (off-policy mask, SAPO, VESPO) see the estimator's signs.

High-entropy forking tokens, Wang et al., "Beyond the 80/20 Rule: High-Entropy Minority Tokens Drive Effective
Reinforcement Learning for LLM Reasoning", https://huggingface.co/papers/2506.01939: the objective keeps only tokens
whose entropy is in the top-ρ quantile of the batch, `1{H_{i,t} ≥ τ_ρ}`, with ρ = 0.2 and the normalizer counting all
tokens.

- `mode="mask"`: `w = 1{H ≥ τ_ρ}` (the paper's selection). The zero weights make those tokens' surrogate exactly 0;
  unlike TRL's `top_entropy_quantile` (which multiplies the whole per-token loss), the KL penalty and the entropy
  bonus still act on masked tokens, and the selection comes from the pre-update policy of the generation step
  rather than from each loss forward. Do not combine it with `top_entropy_quantile < 1` (two masks) or with
  renormalization (a completion without a selected token has no mean to divide by).
- `mode="boost"` (default): `w = boost` on the selected tokens, 1 elsewhere: the "high-entropy credit" baseline of the
  attention-rhythm paper (top 40 % × 1.5 there). Strictly positive, composes with everything.
- `scope="batch"`: `τ_ρ` is the `(1 − ρ)` quantile of all valid entropies in scope (the paper; TRL uses the same
  `torch.quantile` and `≥` rule over each loss micro-batch); `scope="sequence"`: the top `ceil(ρ·T_i)` tokens of each
  completion.

Notation:
    `B` completions, `T` completion tokens.
"""

from __future__ import annotations

import torch

from .attention import top_q_mask


TOKEN_WEIGHT_SIGNS = ("both", "nonneg")
ENTROPY_MODES = ("boost", "mask")
ENTROPY_SCOPES = ("batch", "sequence")


@torch.no_grad()
def apply_token_weights(
    advantages: torch.Tensor,
    weights: torch.Tensor,
    mask: torch.Tensor,
    *,
    sign: str = "both",
    renormalize: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""
    Multiply advantages by detached token weights after sign gating and optional per-completion renormalization.

    Args:
        advantages (`torch.Tensor` of shape `(B,)` or `(B, T)`):
            The estimator's advantages.
        weights (`torch.Tensor` of shape `(B, T)`):
            Raw token weights (γ for the attention rhythm); values outside `mask` are ignored.
        mask (`torch.Tensor` of shape `(B, T)`):
            Tokens that enter the loss.
        sign (`str`, *optional*, defaults to `"both"`):
            `"both"`: weights apply to every token (the attention paper's v2). `"nonneg"`: tokens with `A < 0` keep
            weight 1 (v1).
        renormalize (`bool`, *optional*, defaults to `False`):
            Divide each completion's weights by their mean over valid tokens (mean 1; the papers do not).

    Returns:
        `(weighted_advantages, effective_weights)`, both `(B, T)`; effective weights are exactly 1 outside `mask`
        and carry no gradient.
    """
    if sign not in TOKEN_WEIGHT_SIGNS:
        raise ValueError(f"sign must be one of {TOKEN_WEIGHT_SIGNS}, got {sign!r}.")
    valid = mask.bool()
    adv = advantages.detach()
    if adv.dim() == 1:
        adv = adv.unsqueeze(1)
    adv = adv.expand(valid.shape)
    w = weights.detach().to(torch.float32)
    one = torch.ones_like(w)
    w = torch.where(valid, w, one)
    if sign == "nonneg":
        w = torch.where(adv < 0, one, w)
    if renormalize:
        count = valid.sum(-1, keepdim=True).clamp(min=1).to(w.dtype)
        mean = torch.where(valid, w, torch.zeros_like(w)).sum(-1, keepdim=True) / count
        w = torch.where(valid & (mean > 0), w / mean.clamp(min=torch.finfo(w.dtype).tiny), w)
    return adv.to(torch.float32) * w, w


def entropy_threshold(entropies: torch.Tensor, mask: torch.Tensor, rho: float) -> torch.Tensor:
    """
    `τ_ρ`, the `(1 − ρ)` quantile (linear interpolation, as `torch.quantile` in TRL's `get_high_entropy_mask`) of the
    valid entropies; `+inf` when there are none. Pass the entropies of the whole scope (e.g. gathered across ranks).
    """
    values = entropies[mask.bool()].to(torch.float32)
    if values.numel() == 0:
        return torch.tensor(float("inf"), device=entropies.device)
    return torch.quantile(values, 1.0 - rho)


@torch.no_grad()
def entropy_token_weights(
    entropies: torch.Tensor,
    mask: torch.Tensor,
    *,
    rho: float = 0.2,
    mode: str = "boost",
    boost: float = 1.5,
    scope: str = "batch",
    threshold: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""
    Weights for high-entropy "forking" tokens.

    Args:
        entropies (`torch.Tensor` of shape `(B, T)`):
            Per-token entropies of the sampling policy (TRL divides the logits by the temperature first).
        mask (`torch.Tensor` of shape `(B, T)`):
            Valid tokens; padding is never selected and keeps weight 1.
        rho (`float`, *optional*, defaults to `0.2`):
            Fraction of tokens selected (the 80/20 paper's ρ).
        mode (`str`, *optional*, defaults to `"boost"`):
            `"boost"`: selected tokens get `boost`, others 1. `"mask"`: selected tokens 1, others 0 (the paper).
        boost (`float`, *optional*, defaults to `1.5`):
            Weight of the selected tokens in `"boost"` mode.
        scope (`str`, *optional*, defaults to `"batch"`):
            `"batch"`: `H ≥ τ_ρ` with `τ_ρ` the `(1 − ρ)` quantile over the batch (or the given `threshold`).
            `"sequence"`: the top `ceil(ρ·T_i)` tokens of each completion.
        threshold (`torch.Tensor` or `float`, *optional*):
            Precomputed `τ_ρ` for `scope="batch"` (e.g. over the global batch); computed from `entropies` otherwise.

    Returns:
        `(weights, selected)`, both `(B, T)`: float weights (exactly 1 on padding) and the boolean selection.
    """
    if mode not in ENTROPY_MODES:
        raise ValueError(f"mode must be one of {ENTROPY_MODES}, got {mode!r}.")
    if scope not in ENTROPY_SCOPES:
        raise ValueError(f"scope must be one of {ENTROPY_SCOPES}, got {scope!r}.")
    valid = mask.bool()
    h = entropies.detach().to(torch.float32)
    if scope == "sequence":
        selected = top_q_mask(h, valid, rho)
    else:
        tau = entropy_threshold(h, valid, rho) if threshold is None else torch.as_tensor(threshold, device=h.device)
        selected = (h >= tau) & valid
    one = torch.ones_like(h)
    if mode == "boost":
        weights = torch.where(selected, one * boost, one)
    else:
        weights = torch.where(valid & ~selected, torch.zeros_like(h), one)
    return weights, selected
