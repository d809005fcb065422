"""Attention rhythm: WAAD/FAI definitions and band forms, γ strategies, and the capture pass on real tiny models."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trl_credit.credit.attention import (
    aggregate_heads,
    attention_band,
    compute_fai,
    compute_fai_band,
    compute_row_distance,
    compute_waad,
    compute_waad_band,
    group_heads,
    masked_quantile,
    rhythm_gammas,
    rhythm_layer_indices,
    top_q_mask,
)


# ── the spec's NumPy reference (attention-rhythm.md §14), one completion, no batching ───────────────────────────────
def np_topq(x, q):
    k = int(np.ceil(round(q * len(x), 9)))  # the spec's `ceil(q * len(x))`, robust to 0.4 * 15 = 6.000000000000001
    m = np.zeros(len(x), bool)
    m[np.argsort(-np.asarray(x, float), kind="stable")[:k]] = True
    return m


def np_gammas(waad_r, fai_r, strategy="coupled", q=0.4, g_amp=1.5, alpha=0.5, k=2):
    T = len(waad_r)
    delta = np.zeros(T)
    delta[:-1] = np.abs(waad_r[:-1] - waad_r[1:])
    T_loc, T_glob = np_topq(delta, q), np_topq(fai_r, q)
    if strategy == "local":
        return 1 + (g_amp - 1) * T_loc
    if strategy == "global":
        return 1 + (g_amp - 1) * T_glob
    tau_w, tau_d = np.median(waad_r), delta[T_loc].min()
    D = np.zeros(T, bool)
    I = np.zeros(T, bool)
    for t in np.flatnonzero(T_glob):
        lo = max(0, t - k)
        if t > lo and waad_r[t] <= tau_w and delta[lo:t].max() >= tau_d:
            D[t] = True
            I[lo + int(np.argmax(delta[lo:t]))] = True
    return 1 + (g_amp - 1) * (T_glob & ~D) + (1 - alpha) * (g_amp - 1) * D + alpha * (g_amp - 1) * I


PAPER_NAMES = {"preplan": "local", "anchor": "global", "rhythm": "coupled"}


def random_maps(rng, shape, n):
    m = np.tril(rng.random((*shape, n, n)) + 1e-3)
    return torch.tensor(m / m.sum(-1, keepdims=True))


# ── definitions and band forms ─────────────────────────────────────────────────────────────────────────────────────
def test_spec_vectors_waad_and_fai_full_and_banded():
    rng = np.random.default_rng(0)
    M = np.tril(rng.random((8, 8)))
    A = torch.tensor(M / M.sum(1, keepdims=True))
    expected_waad = torch.tensor([1.0061, 1.4114, 1.3010, 1.7726, 1.5536], dtype=torch.float64)
    torch.testing.assert_close(compute_waad(A, 2)[3:], expected_waad, atol=1e-4, rtol=0)
    band_waad = compute_waad_band(attention_band(A, torch.arange(2)), 2)
    torch.testing.assert_close(band_waad[3:], expected_waad, atol=1e-4, rtol=0)
    expected_fai = torch.tensor([0.1086, 0.1810, 0.0445, 0.0324, -math.inf], dtype=torch.float64)
    torch.testing.assert_close(compute_fai(A, 3, 1, 3)[3:], expected_fai, atol=1e-4, rtol=0)
    band_fai = compute_fai_band(attention_band(A, torch.arange(1, 4)), 3, 1, 3)
    torch.testing.assert_close(band_fai[3:], expected_fai, atol=1e-4, rtol=0)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 24),
    window=st.integers(1, 12),
    h_lo=st.integers(0, 8),
    span=st.integers(0, 12),
    start_frac=st.floats(0, 1),
    seed=st.integers(0, 2**16),
)
def test_band_forms_equal_full_map_references(n, window, h_lo, span, start_frac, seed):
    rng = np.random.default_rng(seed)
    A = random_maps(rng, (2, 3), n)
    rows = torch.tensor(rng.random((2, 3, n)) < 0.8)
    h_hi = h_lo + span
    start = int(start_frac * n)
    waad_band = compute_waad_band(attention_band(A, torch.arange(window)), window)
    torch.testing.assert_close(waad_band, compute_waad(A, window))
    band = attention_band(A, torch.arange(h_lo, h_hi + 1))
    full = compute_fai(A, start, h_lo, h_hi, row_mask=rows)
    banded = compute_fai_band(band, start, h_lo, h_hi, row_mask=rows)
    assert torch.equal(torch.isinf(full), torch.isinf(banded))
    torch.testing.assert_close(banded[torch.isfinite(full)], full[torch.isfinite(full)])
    # FAI is the plain column mean over the horizon's receiver rows (invariant 3), brute force:
    b, h = 1, 2
    for s in range(n):
        ts = [t for t in range(max(s + h_lo, start), min(n - 1, s + h_hi) + 1) if rows[b, h, t]]
        want = A[b, h, ts, s].mean().item() if ts else -math.inf
        assert full[b, h, s].item() == pytest.approx(want)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 20), window=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_waad_range_and_row_distance(n, window, seed):
    A = random_maps(np.random.default_rng(seed), (2,), n)
    waad = compute_waad(A, window)
    assert (waad >= -1e-12).all() and (waad <= window + 1e-12).all()
    eye = torch.eye(n, dtype=torch.float64)
    assert torch.equal(compute_waad(eye, window), torch.zeros(n, dtype=torch.float64))  # all mass on itself
    pos = torch.arange(n, dtype=torch.float64)
    brute = torch.stack([(A[..., t, : t + 1] * (t - pos[: t + 1])).sum(-1) for t in range(n)], -1)
    torch.testing.assert_close(compute_row_distance(A), brute)


# ── detection and γ ───────────────────────────────────────────────────────────────────────────────────────────────
WAAD_EX = torch.tensor([[1.0, 4.0, 1.5, 1.2, 5.0, 0.8, 0.9, 3.5, 0.7, 0.6]])
FAI_EX = torch.tensor([[0.02, 0.03, 0.10, 0.01, 0.04, 0.12, 0.02, 0.05, 0.09, -math.inf]])


@pytest.mark.parametrize(
    "strategy, expected",
    [
        ("preplan", [1.5, 1, 1, 1.5, 1.5, 1, 1, 1.5, 1, 1]),
        ("anchor", [1, 1, 1.5, 1, 1, 1.5, 1, 1.5, 1.5, 1]),
        ("rhythm", [1, 1, 1.5, 1, 1.25, 1.25, 1, 1.75, 1.25, 1]),
    ],
)
def test_spec_worked_example_gammas(strategy, expected):
    gamma, classes = rhythm_gammas(WAAD_EX, FAI_EX, torch.ones(1, 10), strategy)
    torch.testing.assert_close(gamma, torch.tensor([expected]))
    assert gamma.mean().item() == pytest.approx(1.2)
    if strategy == "rhythm":
        assert classes["dominated"][0].nonzero().flatten().tolist() == [5, 8]
        assert classes["intro"][0].nonzero().flatten().tolist() == [4, 7]


@st.composite
def padded_batches(draw):
    B = draw(st.integers(1, 5))
    T = draw(st.integers(1, 30))
    lengths = [draw(st.integers(0, T)) for _ in range(B)]
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    # Few distinct values, so that ties (the stable tie rule) and −inf FAI are exercised.
    waad = rng.integers(0, 6, (B, T)).astype(float) + (rng.random((B, T)) if draw(st.booleans()) else 0)
    fai = rng.integers(0, 5, (B, T)).astype(float) / 10
    h_lo = draw(st.integers(0, 4))
    for b, n in enumerate(lengths):
        fai[b, max(n - h_lo, 0) :] = -np.inf
    mask = np.arange(T)[None, :] < np.array(lengths)[:, None]
    return waad, fai, mask, lengths


@settings(max_examples=80, deadline=None)
@given(
    batch=padded_batches(),
    strategy=st.sampled_from(["preplan", "anchor", "rhythm"]),
    q=st.sampled_from([0.2, 0.4, 0.6, 1.0]),
    alpha=st.sampled_from([0.25, 0.5, 0.75]),
    k=st.integers(1, 3),
)
def test_batched_gammas_equal_the_numpy_reference_per_completion(batch, strategy, q, alpha, k):
    waad, fai, mask, lengths = batch
    gamma, _ = rhythm_gammas(
        torch.tensor(waad, dtype=torch.float32), torch.tensor(fai, dtype=torch.float32), torch.tensor(mask),
        strategy, quantile=q, alpha=alpha, k=k,
    )  # fmt: skip
    for b, n in enumerate(lengths):
        if n == 0:
            assert (gamma[b] == 1).all()
            continue
        want = np_gammas(
            waad[b, :n].astype(np.float32).astype(float), fai[b, :n].astype(np.float32).astype(float),
            PAPER_NAMES[strategy], q=q, alpha=alpha, k=k,
        )  # fmt: skip
        np.testing.assert_allclose(gamma[b, :n].numpy(), want, rtol=0, atol=1e-6)
        assert (gamma[b, n:] == 1).all()  # padding weights are exactly 1


def attainable(gamma_amp, alpha):
    b = gamma_amp - 1
    parts = [0.0, b, (1 - alpha) * b]  # undominated anchor / dominated anchor / neither
    return {round(1 + p + i * alpha * b, 6) for p in parts for i in (0, 1)}


@settings(max_examples=40, deadline=None)
@given(batch=padded_batches(), gamma_amp=st.sampled_from([1.0, 1.5, 2.0]), alpha=st.sampled_from([0.25, 0.5]))
def test_strategy_gamma_sets_and_bonus_accounting(batch, gamma_amp, alpha):
    waad, fai, mask, lengths = batch
    args = (torch.tensor(waad, dtype=torch.float32), torch.tensor(fai, dtype=torch.float32), torch.tensor(mask))
    valid = torch.tensor(mask)
    for strategy in ("preplan", "anchor"):
        g, classes = rhythm_gammas(*args, strategy, gamma_amp=gamma_amp, alpha=alpha)
        assert set(torch.unique(g).tolist()) <= {1.0, gamma_amp}
        key = "preplan" if strategy == "preplan" else "anchor"
        for b, n in enumerate(lengths):  # |T_loc| = |T_glob| = ceil(q·T) (invariant 4)
            assert classes[key][b].sum().item() == math.ceil(round(0.4 * n, 9))
    g, c = rhythm_gammas(*args, "rhythm", gamma_amp=gamma_amp, alpha=alpha)
    assert {round(v, 6) for v in g[valid].tolist()} <= attainable(gamma_amp, alpha)
    assert (g >= 1).all()
    bonus = gamma_amp - 1
    for b in range(len(lengths)):  # invariant 6: Σ(γ−1) = b·(|T_glob| − α|D| + α|I(D)|)
        want = bonus * (c["anchor"][b].sum() - alpha * c["dominated"][b].sum() + alpha * c["intro"][b].sum())
        assert (g[b] - 1).sum().item() == pytest.approx(want.item(), abs=1e-5)
    if gamma_amp == 1.0:
        assert torch.equal(g, torch.ones_like(g))  # γ_amp = 1 ⇒ γ ≡ 1 exactly


def test_mean_gamma_is_one_plus_bonus_times_q_without_renormalization():
    rng = np.random.default_rng(1)
    B, T = 64, 200
    waad = torch.tensor(rng.random((B, T)) * 10, dtype=torch.float32)
    fai = torch.tensor(rng.random((B, T)), dtype=torch.float32)
    fai[:, -10:] = -math.inf
    mask = torch.ones(B, T, dtype=torch.bool)
    for strategy in ("preplan", "anchor"):
        g, _ = rhythm_gammas(waad, fai, mask, strategy)
        assert g.mean().item() == pytest.approx(1 + 0.5 * 0.4)
    g, c = rhythm_gammas(waad, fai, mask, "rhythm")
    # Back-allocation moves bonus from dominated anchors to their intros; only shared intros lose some of it.
    assert 1.15 < g.mean().item() <= 1.2 + 1e-6
    assert c["dominated"].any() and c["intro"].any()


def test_gammas_depend_only_on_their_own_completion():
    rng = np.random.default_rng(2)
    waad = torch.tensor(rng.random((6, 15)), dtype=torch.float32)
    fai = torch.tensor(rng.random((6, 15)), dtype=torch.float32)
    mask = torch.ones(6, 15, dtype=torch.bool)
    mask[2, 9:] = False
    perm = torch.tensor([3, 0, 5, 1, 2, 4])
    g, _ = rhythm_gammas(waad, fai, mask)
    g_perm, _ = rhythm_gammas(waad[perm], fai[perm], mask[perm])
    assert torch.equal(g[perm], g_perm)


def test_top_q_breaks_ties_by_position_and_never_selects_padding():
    scores = torch.tensor([[1.0, 3.0, 3.0, 3.0, -math.inf, 0.0], [-math.inf, -math.inf, 5.0, 2.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    sel = top_q_mask(scores, mask, 0.5)
    assert sel[0].tolist() == [False, True, True, True, False, False]
    assert sel[1].tolist() == [False, False, True, True, False, False]  # padding 9.0s are never selected
    sel = top_q_mask(scores[1:], mask[1:], 0.75)  # 3 of 4 valid: the first −inf is taken, in position order
    assert sel[0].tolist() == [True, False, True, True, False, False]


def test_masked_quantile_matches_numpy_median():
    x = torch.tensor([[3.0, 1.0, 2.0, 10.0, 7.0], [4.0, 1.0, 0.0, 0.0, 0.0]])
    m = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    torch.testing.assert_close(masked_quantile(x, m, 0.5), torch.tensor([np.median([3, 1, 2, 10]), 2.5]).float())


def test_layer_indices_are_the_middle_third():
    assert rhythm_layer_indices(36) == [12, 15, 18, 21, 24]
    assert rhythm_layer_indices(28) == [9, 11, 14, 16, 18]
    assert rhythm_layer_indices(2) == [0, 1]
    assert rhythm_layer_indices(4) == [1, 2]


def test_group_heads_takes_extremes_without_overlap():
    d = torch.tensor([5.0, 1.0, 9.0, 3.0, 7.0, 2.0, 8.0, 4.0, 6.0, 0.5])
    local, glob = group_heads(d, 0.3)
    assert local.nonzero().flatten().tolist() == [1, 5, 9]
    assert glob.nonzero().flatten().tolist() == [2, 4, 6]
    local, glob = group_heads(torch.tensor([[1.0, 2.0], [2.0, 1.0]]), 0.3)  # per sequence, K = 2
    assert local.tolist() == [[True, False], [False, True]] and not (local & glob).any()
    stat = torch.tensor([[[1.0, 2.0], [3.0, -math.inf], [5.0, 6.0]]])
    mean = aggregate_heads(stat, torch.tensor([True, True, False]))
    torch.testing.assert_close(mean, torch.tensor([[2.0, -math.inf]]))


# ── the capture pass on real tiny models ───────────────────────────────────────────────────────────────────────────
@pytest.fixture(scope="module")
def gqa_model_dir(tmp_path_factory):
    from trl_credit.testing import build_tiny_model

    # 4 layers so that the middle-third layers are [1, 2] and the pass must stop before layer 3; 4 query heads of
    # dim 32 sharing 2 KV heads (GQA).
    return build_tiny_model(
        tmp_path_factory.mktemp("gqa") / "model", num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2
    )


def padded_batch(vocab_size, prompt_lengths, completion_lengths, P, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    B = len(prompt_lengths)
    ids = torch.randint(3, vocab_size, (B, P + T), generator=g)
    mask = torch.zeros(B, P + T, dtype=torch.long)
    for b, (p, c) in enumerate(zip(prompt_lengths, completion_lengths)):
        mask[b, P - p : P] = 1  # left-padded prompt
        mask[b, P : P + c] = 1  # right-padded completion
    return ids * mask, mask


def eager_reference(model, ids, mask, P, layers, window, h_lo, h_hi, row_shift):
    """WAAD/FAI/distance per (layer, head) from `output_attentions` maps, sequence by sequence: (B, K, T) each."""
    with torch.no_grad():
        maps = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    B, T = ids.shape[0], ids.shape[1] - P
    H = maps[0].shape[1]
    out = {k: torch.zeros(B, len(layers) * H, T, dtype=torch.float64) for k in ("waad", "row_distance")}
    out["fai"] = torch.full((B, len(layers) * H, T), -math.inf, dtype=torch.float64)
    for b in range(B):
        real = mask[b].nonzero().flatten()
        s0, e = real[0].item(), real[-1].item() + 1
        p = P - s0
        n = e - P
        for i, layer in enumerate(layers):
            A = maps[layer][b, :, s0:e, s0:e].double()
            sl = slice(i * H, (i + 1) * H)
            out["waad"][b, sl, :n] = compute_waad(A, window)[:, p + row_shift : p + row_shift + n]
            out["fai"][b, sl, :n] = compute_fai(A, p, h_lo, h_hi)[:, p:]
            out["row_distance"][b, sl, :n] = compute_row_distance(A)[:, p:]
    return out


def assert_stats_close(stats, ref, atol=1e-4):
    for key in ("waad", "fai", "row_distance"):
        got, want = getattr(stats, key).double(), ref[key]
        assert torch.equal(torch.isinf(got), torch.isinf(want)), key
        fin = torch.isfinite(want)
        torch.testing.assert_close(got[fin], want[fin], atol=atol, rtol=1e-4, msg=key)


@pytest.mark.parametrize("which", ["default_tiny", "gqa"])
@pytest.mark.parametrize("row_shift", [0, -1])
def test_capture_equals_eager_maps_reduced_by_the_references(which, row_shift, tiny_model_dir, gqa_model_dir):
    from transformers import AutoModelForCausalLM

    from trl_credit.generation.attention_capture import capture_attention_stats

    path = tiny_model_dir if which == "default_tiny" else gqa_model_dir
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    eager = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    layers = rhythm_layer_indices(model.config.num_hidden_layers)
    P, T = 7, 26
    ids, mask = padded_batch(model.config.vocab_size, [7, 4, 1], [26, 17, 9], P, T)
    kw = dict(window=4, h_lo=2, h_hi=9, row_shift=row_shift)
    # batch_size=2 and a tiny chunk budget exercise micro-batch trimming and query chunking.
    stats = capture_attention_stats(model, ids, mask, T, layers, batch_size=2, chunk_elements=300, **kw)
    assert stats.waad.shape == (3, len(layers) * model.config.num_attention_heads, T)
    assert_stats_close(stats, eager_reference(eager, ids, mask, P, layers, **kw))
    assert model.config._attn_implementation == "sdpa"  # restored


def test_capture_stops_after_last_sampled_layer_and_never_materializes_a_full_map(gqa_model_dir):
    from torch.utils._python_dispatch import TorchDispatchMode
    from transformers import AutoModelForCausalLM

    from trl_credit.generation.attention_capture import capture_attention_stats

    class LargestFloatTensor(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.is_floating_point():
                    self.largest = max(self.largest, t.numel())
            return out

    model = AutoModelForCausalLM.from_pretrained(gqa_model_dir, attn_implementation="sdpa").eval()
    calls = []
    model.model.layers[3].register_forward_hook(lambda *a: calls.append(1))
    # One sequence long enough that a (H, N, N) map outgrows every activation of this tiny model.
    B, P, T = 1, 8, 152
    N, H = P + T, model.config.num_attention_heads
    assert H * N * N > 2 * N * model.config.intermediate_size
    ids, mask = padded_batch(model.config.vocab_size, [6], [150], P, T)
    with LargestFloatTensor() as probe:
        capture_attention_stats(model, ids, mask, T, [1, 2], window=4, h_lo=2, h_hi=9, chunk_elements=B * H * 8 * N)
    assert calls == []  # layer 3 and the LM head never ran
    assert probe.largest < H * N * N  # no (H, N, N) map, not even one sequence's
    model.set_attn_implementation("eager")
    with torch.no_grad(), LargestFloatTensor() as probe_eager:  # the detector does see full maps when they exist
        model(input_ids=ids[:1], attention_mask=mask[:1], output_attentions=True)
    assert probe_eager.largest >= H * N * N


def test_capture_riding_along_a_full_forward_keeps_logits_bit_identical(gqa_model_dir):
    from transformers import AutoModelForCausalLM

    from trl_credit.generation.attention_capture import attention_capture, capture_attention_stats, collect_stats

    model = AutoModelForCausalLM.from_pretrained(gqa_model_dir, attn_implementation="sdpa").eval()
    P, T = 6, 20
    ids, mask = padded_batch(model.config.vocab_size, [6, 3], [20, 11], P, T, seed=3)
    kw = dict(window=3, h_lo=1, h_hi=5)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        with attention_capture(model, [1, 2], stop_early=False, completion_length=T, **kw) as state:
            riding = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(plain, riding)
    alone = capture_attention_stats(model, ids, mask, T, [1, 2], **kw)
    along = collect_stats(state, T)
    for key in ("waad", "fai", "row_distance"):
        torch.testing.assert_close(getattr(along, key), getattr(alone, key), atol=1e-5, rtol=1e-5)


def test_capture_with_lora_gradient_checkpointing_and_train_mode(gqa_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from trl_credit.generation.attention_capture import capture_attention_stats

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(gqa_model_dir, attn_implementation="eager")
    # init_lora_weights=False: random adapters, so the adapted attention differs from the base model's.
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "k_proj"], init_lora_weights=False))
    model.gradient_checkpointing_enable()
    model.train()
    P, T = 5, 18
    ids, mask = padded_batch(base.config.vocab_size, [5, 2], [18, 12], P, T, seed=4)
    kw = dict(window=3, h_lo=1, h_hi=6, row_shift=0)
    stats = capture_attention_stats(model, ids, mask, T, [1, 2], **kw)
    assert model.is_gradient_checkpointing and base.config._attn_implementation == "eager"
    assert not stats.waad.requires_grad
    model.eval()
    assert_stats_close(stats, eager_reference(model, ids, mask, P, [1, 2], **kw))
    with model.disable_adapter():
        assert not torch.allclose(capture_attention_stats(model, ids, mask, T, [1, 2], **kw).fai, stats.fai)


def test_capture_in_bf16_is_close_to_the_fp32_reference(gqa_model_dir):
    from transformers import AutoModelForCausalLM

    from trl_credit.generation.attention_capture import capture_attention_stats

    eager = AutoModelForCausalLM.from_pretrained(gqa_model_dir, attn_implementation="eager").eval()
    model = AutoModelForCausalLM.from_pretrained(gqa_model_dir, dtype=torch.bfloat16).eval()
    P, T = 6, 24
    ids, mask = padded_batch(eager.config.vocab_size, [6, 2], [24, 15], P, T, seed=5)
    kw = dict(window=4, h_lo=2, h_hi=8, row_shift=0)
    stats = capture_attention_stats(model, ids, mask, T, [1, 2], **kw)
    assert stats.waad.dtype == torch.float32
    ref = eager_reference(eager, ids, mask, P, [1, 2], **kw)
    torch.testing.assert_close(stats.waad.double(), ref["waad"], atol=0.05, rtol=0.02)
    fin = torch.isfinite(ref["fai"])
    torch.testing.assert_close(stats.fai.double()[fin], ref["fai"][fin], atol=0.01, rtol=0.05)


def test_models_whose_attention_cannot_be_captured_fail_with_a_clear_error(tiny_model_dir):
    from transformers import AutoModelForCausalLM, MambaConfig, MambaForCausalLM

    from trl_credit.generation.attention_capture import AttentionCaptureError, check_attention_capture

    mamba = MambaForCausalLM(MambaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=2, state_size=4))
    with pytest.raises(AttentionCaptureError, match="AttentionInterface"):
        check_attention_capture(mamba, [0])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(AttentionCaptureError, match="out of range"):
        check_attention_capture(model, [0, 5])
    for layer in model.model.layers:
        del layer.self_attn.layer_idx
    with pytest.raises(AttentionCaptureError, match="layer_idx"):
        check_attention_capture(model, [0, 1])
