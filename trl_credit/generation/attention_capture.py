"""
Capture the per-head attention statistics of the attention rhythm (WAAD, FAI, backward distance) without keeping any
attention map.

A custom attention function is registered in transformers' `AttentionInterface` (and in
`ALL_MASK_ATTENTION_FUNCTIONS`: a name missing there makes the model build no mask at all). While a capture is
active the model's text config points at it, and for every layer:

- not sampled: it calls transformers' SDPA function unchanged (the fast kernel, bit-identical outputs);
- sampled: it also forms `softmax(QKᵀ)` for the response query rows in chunks (fp32, GQA through a grouped matmul,
  no `repeat_kv` copy of K), reduces each chunk at once to its diagonal bands (WAAD: `d < W`; FAI:
  `H_lo ≤ d ≤ H_hi`) and its backward distance, and drops it. Per head it keeps `(B, H, T)` floats per statistic;
  the largest transient is one chunk, `B·H·chunk·N` floats, plus the FAI band `B·H·T·(H_hi − H_lo + 1)`;
- after the last sampled layer it raises a private exception that ends the forward (the upper third of the network
  and the LM head never run).

The same function can ride along a forward that must run anyway (TRL's `old_per_token_logps` pass): with
`stop_early=False` every output is identical to SDPA's, so the log-probabilities do not change.

Requirements: a model whose attention modules call `ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation)`
(`_supports_attention_backend = True`: Llama, Qwen2/2.5/3, Mistral, …) and carry `layer_idx`;
`check_attention_capture` verifies both with a tiny forward and raises a clear error otherwise.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch

from ..credit.attention import attention_band, compute_fai_band, compute_waad_band


CAPTURE_ATTN_IMPLEMENTATION = "trl_credit_capture"
# Elements of one query chunk's fp32 attention rows, B·H·chunk·N (≈ 256 MB); logits and probabilities coexist.
DEFAULT_CHUNK_ELEMENTS = 2**26


class _StopForward(Exception):
    """Raised inside the last sampled layer to end the capture forward early."""


class AttentionCaptureError(ValueError):
    pass


@dataclass
class AttentionStats:
    """
    Per-head statistics of the sampled layers over the completion tokens.

    Parameters:
        layers (`list[int]`):
            Sampled layer indices; head `k` of the `K = len(layers)·H` axis is head `k % H` of layer `layers[k // H]`.
        waad (`torch.Tensor` of shape `(B, K, T)`):
            Per-head WAAD at each completion token's row (`P + t + row_shift`).
        fai (`torch.Tensor` of shape `(B, K, T)`):
            Per-head FAI of each completion token (`−inf` where the horizon is empty or the token is padding).
        row_distance (`torch.Tensor` of shape `(B, K, T)`):
            `Σ_s A[t, s]·(t − s)` at each completion row; its mean over valid rows is the head distance.
    """

    layers: list[int]
    waad: torch.Tensor
    fai: torch.Tensor
    row_distance: torch.Tensor


@dataclass
class _CaptureState:
    config: object
    layers: list[int]
    window: int
    h_lo: int
    h_hi: int
    row_shift: int
    completion_length: int | None
    stop_early: bool
    chunk_elements: int
    records: dict[int, list[dict[str, torch.Tensor]]] = field(default_factory=dict)
    seen_modules_without_layer_idx: bool = False
    unsupported: str | None = None
    timed: bool = False  # measure the statistics' own time (riding along a pass that runs anyway)
    stats_time: float = 0.0

    @property
    def last_layer(self) -> int:
        return self.layers[-1]


_ACTIVE: _CaptureState | None = None


def _sdpa(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _capture_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    state = _ACTIVE
    kwargs = dict(kwargs, dropout=dropout, scaling=scaling)
    if state is None or getattr(module, "config", None) is not state.config:
        return _sdpa(module, query, key, value, attention_mask, **kwargs)
    layer = getattr(module, "layer_idx", None)
    if layer is None:
        state.seen_modules_without_layer_idx = True
        return _sdpa(module, query, key, value, attention_mask, **kwargs)
    if layer not in state.layers:
        return _sdpa(module, query, key, value, attention_mask, **kwargs)
    for name in ("softcap", "s_aux", "position_bias"):
        if kwargs.get(name) is not None:
            state.unsupported = (
                f"{type(module).__name__} passes `{name}` to its attention function; the attention-rhythm capture "
                "computes plain softmax(QK^T) probabilities and would misread them."
            )
            raise _StopForward
    if query.shape[0] > 0:
        start = _synchronized_time(query.device) if state.timed else 0.0
        # fp32 statistics even inside a bf16 autocast region (autocast would run the matmuls in bf16).
        with torch.autocast(device_type=query.device.type, enabled=False):
            stats = _layer_statistics(module, query, key, attention_mask, scaling, kwargs.get("is_causal"), state)
        state.records.setdefault(layer, []).append(stats)
        if state.timed:
            state.stats_time += _synchronized_time(query.device) - start
    if state.stop_early and layer == state.last_layer:
        raise _StopForward
    return _sdpa(module, query, key, value, attention_mask, **kwargs)


def _synchronized_time(device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def register_capture_attention() -> str:
    """Register the capture function (idempotent) and return its `attn_implementation` name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(CAPTURE_ATTN_IMPLEMENTATION, _capture_attention_forward)
    # Without this the model builds no mask for an unknown implementation name (masking_utils `_preprocess_mask_*`).
    ALL_MASK_ATTENTION_FUNCTIONS.register(CAPTURE_ATTN_IMPLEMENTATION, sdpa_mask)
    return CAPTURE_ATTN_IMPLEMENTATION


def _row_validity(attention_mask, b: int, N: int, device) -> torch.Tensor:
    """Rows of real tokens `(b, N)`: a token is real iff it may attend to itself."""
    if attention_mask is None:
        return torch.ones(b, N, dtype=torch.bool, device=device)
    diag = attention_mask[:, 0].diagonal(dim1=-2, dim2=-1)  # (b or 1, N)
    valid = diag if attention_mask.dtype == torch.bool else diag > torch.finfo(diag.dtype).min / 2
    return valid.expand(b, N)


@torch.no_grad()
def _layer_statistics(module, query, key, attention_mask, scaling, is_causal, state: _CaptureState):
    b, H, N, d = query.shape
    Hkv = key.shape[1]
    groups = H // Hkv
    T = state.completion_length if state.completion_length is not None else N
    rs = N - T  # first completion row (prompts are left-padded to a common width)
    shift = state.row_shift
    if rs + shift < 0:
        raise AttentionCaptureError(f"waad_row_shift={shift} needs a prompt of at least {-shift} token(s).")
    scale = scaling if scaling is not None else d**-0.5
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    device = query.device
    k = key.to(torch.float32)
    pos = torch.arange(N, device=device)
    pos_f = pos.to(torch.float32)
    valid = _row_validity(attention_mask, b, N, device)
    W, D = state.window, state.h_hi - state.h_lo + 1
    offs_w = torch.arange(W, device=device)
    offs_f = torch.arange(state.h_lo, state.h_hi + 1, device=device)

    waad = torch.zeros(b, H, T, device=device)
    dist = torch.zeros(b, H, T, device=device)
    fai_band = torch.zeros(b, H, T, D, device=device)
    first = rs + min(shift, 0)
    # Chunks of at most N/8 rows (≥ 64) even when memory allows more: each chunk reads only the keys up to its last
    # row, which skips most of the causal upper triangle.
    chunk = max(1, min(state.chunk_elements // max(1, b * H * N), max(64, -(-N // 8))))
    for c0 in range(first, N, chunk):
        c1 = min(N, c0 + chunk)
        c = c1 - c0
        rows = pos[c0:c1]
        # Keys after the chunk's last row are masked for every row of a causal layer: skip them.
        keys = N
        if causal and (attention_mask is None or not attention_mask[:, :, c0:c1, c1:].any()):
            keys = c1
        q = (query[:, :, c0:c1].to(torch.float32) * scale).reshape(b, Hkv, groups * c, d)
        logits = torch.matmul(q, k[:, :, :keys].transpose(-1, -2)).view(b, H, c, keys)
        # A finite minimum instead of -inf: a row with no visible key (left padding) then gives finite garbage that
        # is discarded below, instead of NaN that would need a pass over the whole chunk to clean.
        if attention_mask is None:
            if causal:
                logits.masked_fill_(pos[None, :keys] > rows[:, None], torch.finfo(torch.float32).min)
        elif attention_mask.dtype == torch.bool:
            logits.masked_fill_(~attention_mask[:, :, c0:c1, :keys], torch.finfo(torch.float32).min)
        else:
            logits.add_(attention_mask[:, :, c0:c1, :keys].to(torch.float32)).clamp_(min=torch.finfo(torch.float32).min)
        probs = torch.softmax(logits, dim=-1)
        del logits

        # WAAD of completion token t reads row rs + t + shift.
        w0, w1 = max(c0, rs + shift), min(c1, N + shift)
        if w1 > w0:
            band = attention_band(probs[:, :, w0 - c0 : w1 - c0], offs_w, rows=pos[w0:w1])
            waad[:, :, w0 - rs - shift : w1 - rs - shift] = compute_waad_band(band, W)
        # Distance and the FAI band use the completion rows themselves.
        r0 = max(c0, rs)
        if c1 > r0:
            part = probs[:, :, r0 - c0 :]
            dist[:, :, r0 - rs : c1 - rs] = pos_f[r0:c1] - part @ pos_f[:keys]
            fai_band[:, :, r0 - rs : c1 - rs] = attention_band(part, offs_f, rows=pos[r0:c1])
        del probs

    # Receivers are the real completion rows; band rows are relative to the completion start.
    fai = compute_fai_band(fai_band, 0, state.h_lo, state.h_hi, row_mask=valid[:, None, rs:])
    del fai_band
    own = valid[:, None, rs:].expand(b, H, T)
    if shift:
        waad_rows_valid = valid[:, None, rs + shift : N + shift].expand(b, H, T)
        waad = torch.where(waad_rows_valid & own, waad, torch.zeros_like(waad))
    return {
        "waad": torch.where(own, waad, torch.zeros_like(waad)),
        "fai": torch.where(own, fai, torch.full_like(fai, -math.inf)),
        "row_distance": torch.where(own, dist, torch.zeros_like(dist)),
    }


# ── model plumbing ─────────────────────────────────────────────────────────────────────────────────────────────────
def _transformers_model(model):
    """The `PreTrainedModel` under PEFT / DDP / compile wrappers."""
    seen = 0
    while seen < 8:
        seen += 1
        if hasattr(model, "get_base_model"):  # peft.PeftModel
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, torch.nn.Module):  # DDP
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        else:
            break
    return model


def text_config(model):
    base = _transformers_model(model)
    config = getattr(base, "config", None)
    if config is None:
        raise AttentionCaptureError(
            f"{type(base).__name__} has no `config`; attention capture needs a transformers model."
        )
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def num_hidden_layers(model) -> int:
    config = text_config(model)
    n = getattr(config, "num_hidden_layers", None)
    if not isinstance(n, int):
        raise AttentionCaptureError(
            f"{type(config).__name__} has no integer `num_hidden_layers`; set `rhythm_layers` explicitly."
        )
    return n


@contextmanager
def attention_capture(
    model,
    layers: Sequence[int],
    *,
    window: int = 10,
    h_lo: int = 10,
    h_hi: int = 100,
    row_shift: int = 0,
    completion_length: int | None = None,
    stop_early: bool = True,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> Iterator[_CaptureState]:
    """
    Route the model's attention through the capture function while the context is active, then restore the model's
    own implementation. Every forward inside records, per sampled layer, one entry per call in `state.records`.

    Args:
        model: a transformers model, possibly wrapped by PEFT or DDP.
        layers (`Sequence[int]`): sampled layers (0-indexed).
        window, h_lo, h_hi (`int`): WAAD window and FAI horizon.
        row_shift (`int`): 0 (token's own row) or −1 (the row that predicted it) for WAAD.
        completion_length (`int`, *optional*): number of trailing positions that are the completion (all by default).
        stop_early (`bool`): end each forward after the last sampled layer (raises inside; use `run_capture_forward`).
        chunk_elements (`int`): budget of one query chunk, `B·H·rows·N`.
    """
    global _ACTIVE
    if _ACTIVE is not None:
        raise AttentionCaptureError("An attention capture is already active; captures do not nest.")
    name = register_capture_attention()
    config = text_config(model)
    state = _CaptureState(
        config=config,
        layers=sorted(set(int(l) for l in layers)),
        window=window,
        h_lo=h_lo,
        h_hi=h_hi,
        row_shift=row_shift,
        completion_length=completion_length,
        stop_early=stop_early,
        chunk_elements=chunk_elements,
    )
    # Set the internal attribute: the public setter would recurse into sub-configs (vision towers keep theirs).
    previous = config._attn_implementation_internal
    config._attn_implementation_internal = name
    _ACTIVE = state
    try:
        yield state
    finally:
        _ACTIVE = None
        config._attn_implementation_internal = previous


def run_capture_forward(model, **inputs) -> bool:
    """Run `model(**inputs)` inside an active capture; `True` if it was ended early after the last sampled layer."""
    state = _ACTIVE
    try:
        model(**inputs)
        stopped = False
    except _StopForward:
        stopped = True
    if state is not None and state.unsupported:
        raise AttentionCaptureError(state.unsupported + " Use token_weighting='entropy' with this model.")
    return stopped


def collect_stats(state: _CaptureState, completion_length: int) -> AttentionStats:
    """Stack the recorded per-layer statistics into `(B, K, T)` tensors (each call right-padded to `T`)."""
    missing = [l for l in state.layers if l not in state.records]
    if missing:
        raise AttentionCaptureError(_unsupported_message(state, missing))
    out = {}
    for key, fill in (("waad", 0.0), ("fai", -math.inf), ("row_distance", 0.0)):
        per_layer = []
        for layer in state.layers:
            parts = []
            for rec in state.records[layer]:
                x = rec[key]
                pad = completion_length - x.shape[-1]
                parts.append(torch.nn.functional.pad(x, (0, pad), value=fill) if pad > 0 else x)
            per_layer.append(torch.cat(parts, dim=0))  # (B, H, T)
        out[key] = torch.stack(per_layer, dim=1).flatten(1, 2)  # (B, L·H, T)
    return AttentionStats(layers=list(state.layers), **out)


def _unsupported_message(state: _CaptureState, missing: list[int]) -> str:
    reason = (
        "its attention modules have no `layer_idx` attribute"
        if state.seen_modules_without_layer_idx
        else "its attention does not go through transformers' `AttentionInterface` (config._attn_implementation)"
    )
    return (
        f"Cannot capture attention of layers {missing} for the attention-rhythm token weighting: {reason}. Use a model "
        "whose attention supports the AttentionInterface (e.g. Llama, Qwen2/2.5/3, Mistral; "
        "`model._supports_attention_backend` is True), or token_weighting='entropy', which needs no attention maps."
    )


def _gradient_checkpointing_off(model, gradient_checkpointing_kwargs):
    if getattr(model, "is_gradient_checkpointing", False):
        from trl.models.utils import disable_gradient_checkpointing

        return disable_gradient_checkpointing(model, gradient_checkpointing_kwargs)
    return nullcontext()


def _trim(input_ids, attention_mask, completion_length):
    """Drop columns that are padding in every row (left of the prompts, right of the completions)."""
    present = attention_mask.bool().any(0)
    prompt_width = input_ids.shape[1] - completion_length
    real_prompt = present[:prompt_width].nonzero()
    left = int(real_prompt[0]) if real_prompt.numel() else prompt_width - 1
    left = min(left, max(prompt_width - 1, 0))
    real_completion = present[prompt_width:].nonzero()
    right = prompt_width + (int(real_completion[-1]) + 1 if real_completion.numel() else 1)
    right = min(right, input_ids.shape[1])
    return input_ids[:, left:right], attention_mask[:, left:right], right - prompt_width


@torch.no_grad()
def capture_attention_stats(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_length: int,
    layers: Sequence[int],
    *,
    window: int = 10,
    h_lo: int = 10,
    h_hi: int = 100,
    row_shift: int = 0,
    batch_size: int | None = None,
    stop_early: bool = True,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    gradient_checkpointing_kwargs: dict | None = None,
) -> AttentionStats:
    """
    One no-grad forward of `model` over prompt ⊕ completion, micro-batched, returning the per-head statistics of the
    sampled layers. The model's own attention implementation and gradient-checkpointing state are restored after.

    Args:
        model: the policy (transformers model, possibly under PEFT/DDP), in its current (pre-update) weights.
        input_ids, attention_mask (`torch.Tensor` of shape `(B, P + T)`):
            Left-padded prompts followed by right-padded completions (TRL's layout).
        completion_length (`int`): `T`, the width of the completion part.
        layers (`Sequence[int]`): sampled layers.
        window, h_lo, h_hi, row_shift: see [`attention_capture`].
        batch_size (`int`, *optional*): sequences per forward (all at once by default).
        stop_early (`bool`, *optional*, defaults to `True`): end each forward after the last sampled layer. Turn it
            off for sharded models (FSDP, ZeRO-3), whose parameter-gathering hooks expect complete forwards.
        chunk_elements (`int`): budget of one query chunk of attention probabilities (`B·H·rows·N` floats).
        gradient_checkpointing_kwargs (`dict`, *optional*): passed back when re-enabling gradient checkpointing.

    Returns:
        [`AttentionStats`] with tensors of shape `(B, K, T)` on the model's device.
    """
    B = input_ids.shape[0]
    batch_size = batch_size or B
    with _gradient_checkpointing_off(model, gradient_checkpointing_kwargs):
        with attention_capture(
            model,
            layers,
            window=window,
            h_lo=h_lo,
            h_hi=h_hi,
            row_shift=row_shift,
            stop_early=stop_early,
            chunk_elements=chunk_elements,
        ) as state:
            for start in range(0, B, batch_size):
                ids, am, T_mb = _trim(
                    input_ids[start : start + batch_size], attention_mask[start : start + batch_size], completion_length
                )
                state.completion_length = T_mb
                run_capture_forward(model, input_ids=ids, attention_mask=am, use_cache=False, logits_to_keep=1)
    return collect_stats(state, completion_length)


@torch.no_grad()
def check_attention_capture(
    model, layers: Sequence[int], *, stop_early: bool = True, gradient_checkpointing_kwargs: dict | None = None
) -> None:
    """
    Verify with a tiny forward (one sequence of 8 tokens) that the attention of every sampled layer can be captured;
    raise `AttentionCaptureError` (a `ValueError`) naming the problem and the fix otherwise.
    """
    base = _transformers_model(model)
    if not getattr(base, "_supports_attention_backend", False):
        raise AttentionCaptureError(
            f"{type(base).__name__} does not route its attention through transformers' `AttentionInterface` "
            "(`_supports_attention_backend` is False), so the attention-rhythm token weighting cannot read its "
            "attention. Use a model that does (e.g. Llama, Qwen2/2.5/3, Mistral) or token_weighting='entropy'."
        )
    L = num_hidden_layers(model)
    bad = [l for l in layers if not 0 <= l < L]
    if bad:
        raise AttentionCaptureError(f"rhythm_layers {bad} are out of range for a model with {L} layers (0..{L - 1}).")
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    ids = torch.zeros(1, 8, dtype=torch.long, device=device)
    am = torch.ones_like(ids)
    capture_attention_stats(
        model,
        ids,
        am,
        completion_length=4,
        layers=layers,
        window=2,
        h_lo=1,
        h_hi=2,
        stop_early=stop_early,
        gradient_checkpointing_kwargs=gradient_checkpointing_kwargs,
    )
