"""Macro actions (MA-RLHF) and PPO's GAE: every test vector of the MA-RLHF spec (§9, §11), invariants, hand vectors."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trl_credit.credit import CreditBatch, call_estimator, get_advantage_estimator
from trl_credit.credit.grpo import compute_grpo_advantages
from trl_credit.credit.macro import (
    ATTACH,
    RANDOM_NGRAM_LENGTHS,
    boundary_segments,
    compute_macro_tempo_advantages,
    macro_aggregate,
    macro_log_ratio,
    ngram_segments,
    num_segments,
    perplexity_segments,
    punctuation_segments,
    punctuation_token_flags,
    random_ngram_segments,
    segment_metrics,
    segments_from_starts,
    token_segments,
)
from trl_credit.credit.ppo import compute_gae_advantages, explained_variance, kl_penalty, masked_whiten
from trl_credit.credit.tempo import compute_tempo_advantages


# ── the spec's NumPy reference (ma-rlhf.md §11), used as an oracle ─────────────────────────────────────────────────
def np_fixed_segments(T, n, last_singleton=True):
    cut = T - 1 if (last_singleton and T > 1) else T
    segs = [(s, min(s + n, cut)) for s in range(0, cut, n)]
    if cut < T:
        segs.append((T - 1, T))
    return segs


def np_ma_gae(values, rewards, segs, gamma=1.0, lam=0.95, reward_agg="mean"):
    V = np.array([values[a:b].mean() for a, b in segs])
    agg = np.mean if reward_agg == "mean" else np.sum
    R = np.array([agg(rewards[a:b]) for a, b in segs])
    A = np.zeros(len(segs))
    last = 0.0
    for k in reversed(range(len(segs))):
        next_v = V[k + 1] if k + 1 < len(segs) else 0.0
        last = R[k] + gamma * next_v - V[k] + gamma * lam * last
        A[k] = last
    ret = A + V

    def expand(x):
        return np.concatenate([[x[k]] * (b - a) for k, (a, b) in enumerate(segs)])

    return A, ret, expand(A), expand(ret)


def np_official_fixed_segments(T, n):
    segs = [(s, min(s + n, T - 1)) for s in range(0, T - 1, n)]
    if (T - 1) % n == 0:
        segs.append((T - 1, T - 1))  # the official loop's zero-length macro
    segs.append((T - 1, T))
    return segs


def np_ma_gae_allow_empty(values, rewards, segs, gamma=1.0, lam=0.95):
    V = np.array([values[a:b].mean() if b > a else 0.0 for a, b in segs])
    R = np.array([rewards[a:b].mean() if b > a else 0.0 for a, b in segs])
    A = np.zeros(len(segs))
    last = 0.0
    for k in reversed(range(len(segs))):
        next_v = V[k + 1] if k + 1 < len(segs) else 0.0
        last = R[k] + gamma * next_v - V[k] + gamma * lam * last
        A[k] = last
    return np.concatenate([[A[k]] * (b - a) for k, (a, b) in enumerate(segs)])


def segs_of(seg_row):
    """[(start, end)) of each macro of one row of segment ids."""
    ids = [int(s) for s in seg_row if s >= 0]
    out, start = [], 0
    for t in range(1, len(ids) + 1):
        if t == len(ids) or ids[t] != ids[t - 1]:
            out.append((start, t))
            start = t
    return out


V6 = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6]], dtype=torch.float64)
R6 = torch.tensor([[0, 0, 0, 0, 0, 1.0]], dtype=torch.float64)
M6 = torch.ones(1, 6)
TOKEN_GAE = [0.762, 0.697, 0.628, 0.556, 0.480, 0.400]  # ma-rlhf.md §9-2


def token_gae_loop(values, rewards, mask, gamma, lam):
    """Classic token-level GAE (cleanrl's loop), written independently of the segment code."""
    N, T = values.shape
    adv = torch.zeros_like(values)
    for i in range(N):
        L = int(mask[i].sum())
        running = torch.zeros((), dtype=values.dtype)
        for t in range(L - 1, -1, -1):
            next_v = values[i, t + 1] if t + 1 < L else torch.zeros((), dtype=values.dtype)
            delta = rewards[i, t] + gamma * next_v - values[i, t]
            running = delta + gamma * lam * running
            adv[i, t] = running
    return adv, torch.where(mask > 0, adv + values, torch.zeros_like(values))


# ── §9-2, §9-4, §9-11: the vectors ─────────────────────────────────────────────────────────────────────────────────
def test_token_level_gae_matches_the_spec_vector():
    adv, ret = compute_gae_advantages(V6, R6, M6)
    torch.testing.assert_close(adv, torch.tensor([TOKEN_GAE], dtype=torch.float64), atol=5e-4, rtol=0)
    torch.testing.assert_close(ret, adv + V6)


def test_worked_example_n2_macro_values_rewards_advantages_and_returns():
    seg = ngram_segments(M6, 2)
    assert segs_of(seg[0]) == [(0, 2), (2, 4), (4, 5), (5, 6)]
    torch.testing.assert_close(macro_aggregate(V6, seg), torch.tensor([[0.15, 0.35, 0.50, 0.60]], dtype=torch.float64))
    torch.testing.assert_close(macro_aggregate(R6, seg), torch.tensor([[0.0, 0.0, 0.0, 1.0]], dtype=torch.float64))
    adv, ret = compute_gae_advantages(V6, R6, M6, seg)
    expected_adv = [0.7757, 0.7757, 0.6060, 0.6060, 0.4800, 0.4000]
    expected_ret = [0.9257, 0.9257, 0.9560, 0.9560, 0.9800, 1.0000]
    torch.testing.assert_close(adv, torch.tensor([expected_adv], dtype=torch.float64), atol=5e-5, rtol=0)
    torch.testing.assert_close(ret, torch.tensor([expected_ret], dtype=torch.float64), atol=5e-5, rtol=0)
    # And the NumPy reference of the spec, to float precision.
    _, _, np_adv, np_ret = np_ma_gae(V6[0].numpy(), R6[0].numpy(), np_fixed_segments(6, 2))
    np.testing.assert_allclose(adv[0].numpy(), np_adv, atol=1e-12)
    np.testing.assert_allclose(ret[0].numpy(), np_ret, atol=1e-12)


def test_official_empty_macro_defect_is_reproduced_by_the_oracle_and_absent_here():
    official = np_official_fixed_segments(6, 1)
    assert any(a == b for a, b in official), "the simulated official loop must contain the empty macro"
    np.testing.assert_allclose(
        np_ma_gae_allow_empty(V6[0].numpy(), R6[0].numpy(), official),
        [0.722, 0.6548, 0.584, 0.5094, 0.431, 0.4],
        atol=5e-4,
    )
    seg = ngram_segments(M6, 1)
    assert all(b > a for a, b in segs_of(seg[0]))
    adv, _ = compute_gae_advantages(V6, R6, M6, seg)
    torch.testing.assert_close(adv, torch.tensor([TOKEN_GAE], dtype=torch.float64), atol=5e-4, rtol=0)
    assert not torch.allclose(adv[0, 0], torch.tensor(0.722, dtype=torch.float64), atol=1e-2)


# ── §9-2: n = 1 is token-level PPO, bit for bit ────────────────────────────────────────────────────────────────────
@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 9), min_size=1, max_size=5),
    gamma=st.sampled_from([1.0, 0.99, 0.9]),
    lam=st.sampled_from([0.95, 1.0, 0.0, 0.5]),
    seed=st.integers(0, 10_000),
)
def test_ngram_1_is_token_level_gae_bit_for_bit(lengths, gamma, lam, seed):
    g = torch.Generator().manual_seed(seed)
    N, T = len(lengths), max(lengths) + 1
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).float()
    values = torch.randn(N, T, generator=g) * mask
    rewards = torch.randn(N, T, generator=g) * mask
    seg1 = ngram_segments(mask, 1)
    assert torch.equal(seg1, token_segments(mask))
    a1, r1 = compute_gae_advantages(values, rewards, mask, seg1, gamma, lam)
    a0, r0 = compute_gae_advantages(values, rewards, mask, None, gamma, lam)
    assert torch.equal(a1, a0) and torch.equal(r1, r0)
    loop_adv, loop_ret = token_gae_loop(values, rewards, mask, gamma, lam)
    assert torch.equal(a0, loop_adv) and torch.equal(r0, loop_ret)


def test_gae_estimator_ngram_1_equals_token_level_with_kl_and_whitening():
    g = torch.Generator().manual_seed(0)
    N, T = 8, 7
    lengths = torch.tensor([7, 3, 5, 1, 7, 6, 2, 4])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    common = dict(
        completion_ids=torch.randint(0, 50, (N, T), generator=g),
        completion_mask=mask,
        rewards=torch.tensor([1.0, 0.0, float("nan"), 1.0, 0.5, 0.0, 1.0, 0.2]),
        num_generations=4,
        values=torch.randn(N, T, generator=g) * mask,
        old_logps=-torch.rand(N, T, generator=g),
        ref_logps=-torch.rand(N, T, generator=g),
    )
    est = get_advantage_estimator("gae")
    kw = dict(kl_coef=0.05, kl_estimator="k3", whiten_rewards=True, whiten_advantages=True, lam=0.9, gamma=0.99)
    token = call_estimator(est, CreditBatch(**common), **kw)
    macro = call_estimator(est, CreditBatch(**common, segment_ids=ngram_segments(mask, 1)), **kw)
    assert torch.equal(token.advantages, macro.advantages)
    assert torch.equal(token.returns.nan_to_num(-7.0), macro.returns.nan_to_num(-7.0))
    # The unscorable row (NaN reward) trains nothing and has no value target.
    assert (token.advantages[2] == 0).all() and torch.isnan(token.returns[2]).all()


# ── §9-1, §9-3: segmentation invariants and piecewise-constant credit (hypothesis) ─────────────────────────────────
def assert_valid_segmentation(seg, mask, last_singleton, max_len=None):
    valid = mask.bool()
    assert (seg[~valid] == -1).all(), "padding must have segment id -1"
    for i in range(seg.size(0)):
        row = seg[i][valid[i]]
        if row.numel() == 0:
            continue
        assert row[0] == 0
        steps = row[1:] - row[:-1]
        assert ((steps == 0) | (steps == 1)).all(), "ids must be contiguous, non-decreasing, no empty macro"
        counts = torch.bincount(row)
        assert (counts > 0).all() and counts.sum() == row.numel()
        if last_singleton and row.numel() > 1:
            assert counts[-1] == 1 and row[-2] != row[-1], "the last token must be alone"
        if max_len is not None:
            assert counts.max() <= max_len


masks = st.lists(st.integers(0, 14), min_size=1, max_size=6)


def mask_from(lengths):
    T = max(lengths) + 1
    return (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).float()


@settings(max_examples=60, deadline=None)
@given(
    lengths=masks,
    rule=st.sampled_from(["token", "ngram", "random", "punct", "ppl_code", "ppl_paper", "bounds", "starts"]),
    n=st.integers(1, 6),
    last_singleton=st.booleans(),
    max_len=st.one_of(st.none(), st.integers(1, 4)),
    seed=st.integers(0, 1000),
)
def test_every_rule_gives_contiguous_non_empty_covering_segments(lengths, rule, n, last_singleton, max_len, seed):
    g = torch.Generator().manual_seed(seed)
    mask = mask_from(lengths)
    N, T = mask.shape
    split_len = None
    if rule == "token":
        seg = token_segments(mask)
        last_singleton = True
    elif rule == "ngram":
        seg = ngram_segments(mask, n, last_singleton=last_singleton)
        split_len = n
    elif rule == "random":
        seg = random_ngram_segments(mask, generator=g, last_singleton=last_singleton)
    elif rule == "punct":
        flags = torch.randint(0, 128, (20,), generator=g)
        ids = torch.randint(0, 25, (N, T), generator=g)  # some ids outside the table
        seg = punctuation_segments(ids, mask, flags, last_singleton=last_singleton, max_len=max_len)
        split_len = max_len
    elif rule.startswith("ppl"):
        logps = -torch.rand(N, T, generator=g) * 3
        seg = perplexity_segments(logps, mask, boundary=rule[4:], last_singleton=last_singleton, max_len=max_len)
        split_len = max_len
    elif rule == "bounds":
        starts = [torch.randint(-2, T + 3, (3,), generator=g).tolist() for _ in range(N)]
        seg = boundary_segments(starts, mask, last_singleton=last_singleton, max_len=max_len)
        split_len = max_len
    else:
        starts = torch.rand(N, T, generator=g) < 0.3
        seg = segments_from_starts(starts, mask, last_singleton=last_singleton, max_len=max_len)
        split_len = max_len
    assert_valid_segmentation(seg, mask, last_singleton, split_len)

    # §9-3: advantages and returns are constant within each macro.
    values, rewards = torch.randn(N, T, generator=g), torch.randn(N, T, generator=g)
    adv, ret = compute_gae_advantages(values * mask, rewards * mask, mask, seg, 0.99, 0.95)
    for i in range(N):
        for a, b in segs_of(seg[i]):
            assert (adv[i, a:b] == adv[i, a]).all() and (ret[i, a:b] == ret[i, a]).all()
    assert (adv[mask == 0] == 0).all()


def test_ngram_with_holes_in_the_mask_counts_valid_tokens_only():
    mask = torch.tensor([[1, 0, 1, 1, 0, 1, 1, 0]])
    assert ngram_segments(mask, 2, last_singleton=False).tolist() == [[0, -1, 0, 1, -1, 1, 2, -1]]


def test_segments_from_starts_doc_example_and_max_len_split():
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    starts = torch.tensor([[0, 0, 1, 0, 0, 0]]).bool()
    assert segments_from_starts(starts, mask).tolist() == [[0, 0, 1, 1, 2, -1]]
    long = segments_from_starts(torch.zeros(1, 7, dtype=torch.bool), torch.ones(1, 7), last_singleton=False, max_len=3)
    assert long.tolist() == [[0, 0, 0, 1, 1, 1, 2]]


# ── §9-5, §9-6: λ = γ = 1 identities ───────────────────────────────────────────────────────────────────────────────
@settings(max_examples=40, deadline=None)
@given(lengths=masks, n=st.integers(1, 5), seed=st.integers(0, 1000))
def test_lambda_1_sum_rewards_gives_monte_carlo_returns_whatever_the_values(lengths, n, seed):
    g = torch.Generator().manual_seed(seed)
    mask = mask_from(lengths).double()
    seg = ngram_segments(mask, n)
    rewards = torch.randn(mask.shape, generator=g, dtype=torch.float64) * mask
    _, ret_a = compute_gae_advantages(torch.randn(mask.shape, generator=g, dtype=torch.float64), rewards, mask, seg,
                                      1.0, 1.0, reward_agg="sum")  # fmt: skip
    _, ret_b = compute_gae_advantages(torch.zeros_like(mask), rewards, mask, seg, 1.0, 1.0, reward_agg="sum")
    torch.testing.assert_close(ret_a, ret_b)
    macro_r = macro_aggregate(rewards, seg, "sum")
    reward_to_go = macro_r.flip(1).cumsum(1).flip(1)
    expected = torch.where(seg >= 0, reward_to_go.gather(1, seg.clamp(min=0)), 0.0)
    torch.testing.assert_close(ret_a, expected)


def test_n_at_least_T_is_one_macro_plus_the_last_and_reinforce_with_a_baseline():
    seg = ngram_segments(M6, 10)
    assert segs_of(seg[0]) == [(0, 5), (5, 6)]
    adv, _ = compute_gae_advantages(V6, R6, M6, seg, 1.0, 1.0, reward_agg="sum")
    # REINFORCE with a learned baseline: the first macro's advantage is the return minus its value.
    torch.testing.assert_close(adv[0, 0], R6.sum() - V6[0, :5].mean())
    assert ngram_segments(M6, 10, last_singleton=False).tolist() == [[0] * 6]


# ── §9-7, §9-8: critic-free identity and macro ratios ──────────────────────────────────────────────────────────────
@settings(max_examples=30, deadline=None)
@given(lengths=masks, n=st.integers(1, 6), seed=st.integers(0, 1000))
def test_without_critic_and_dense_rewards_every_segmentation_gives_the_outcome_advantage(lengths, n, seed):
    mask = mask_from(lengths)
    outcome = torch.rand(mask.size(0), generator=torch.Generator().manual_seed(seed))
    rewards = torch.zeros_like(mask)
    length = mask.sum(1).long()
    rows = torch.arange(mask.size(0))
    rewards[rows, (length - 1).clamp(min=0)] = outcome * (length > 0)
    for seg in (token_segments(mask), ngram_segments(mask, n), ngram_segments(mask, n, last_singleton=False)):
        adv, _ = compute_gae_advantages(torch.zeros_like(mask), rewards, mask, seg, 1.0, 1.0, reward_agg="sum")
        torch.testing.assert_close(adv, outcome[:, None].expand_as(mask) * mask)


def test_macro_ratio_n1_is_the_token_ratio_and_n_ge_T_is_the_sequence_ratio():
    g = torch.Generator().manual_seed(0)
    mask = mask_from([6, 3, 1])
    log_ratio = torch.randn(mask.shape, generator=g) * 0.1 * mask
    seg1 = ngram_segments(mask, 1)
    for level in ("token", "macro_product", "macro_geomean"):
        assert torch.equal(macro_log_ratio(log_ratio, seg1, level), torch.where(seg1 >= 0, log_ratio, 0.0))
    whole = ngram_segments(mask, 100, last_singleton=False)
    seq = macro_log_ratio(log_ratio, whole, "macro_product")
    torch.testing.assert_close(seq, log_ratio.sum(1, keepdim=True).expand_as(mask) * mask)
    geo = macro_log_ratio(log_ratio, whole, "macro_geomean")
    torch.testing.assert_close(geo, (log_ratio.sum(1) / mask.sum(1))[:, None].expand_as(mask) * mask)


# ── §9-9: randomized n-grams ───────────────────────────────────────────────────────────────────────────────────────
def test_random_ngram_draws_lengths_from_the_list_then_one_leftover_macro_and_is_seedable():
    mask = torch.ones(64, 40)
    seg = random_ngram_segments(mask, generator=torch.Generator().manual_seed(1))
    pool = sorted(RANDOM_NGRAM_LENGTHS)
    for row in seg:
        lens = [b - a for a, b in segs_of(row)]
        assert lens[-1] == 1  # the last singleton
        body = lens[:-1]
        # The first five macros are a permutation of the list (1+2+3+5+10 = 21 < 39); the rest is one macro.
        assert sorted(body[:5]) == pool and len(body) == 6 and body[5] == 39 - 21
    again = random_ngram_segments(mask, generator=torch.Generator().manual_seed(1))
    other = random_ngram_segments(mask, generator=torch.Generator().manual_seed(2))
    assert torch.equal(seg, again) and not torch.equal(seg, other)
    firsts = {tuple(b - a for a, b in segs_of(row)[:5]) for row in seg}
    assert len(firsts) > 20, "rows must draw their own permutations"
    short = random_ngram_segments(torch.ones(1, 4), lengths=[3, 3], generator=torch.Generator().manual_seed(0))
    assert short.tolist() == [[0, 0, 0, 1]]
    doubled = random_ngram_segments(torch.ones(1, 60), repeat_times=2, generator=torch.Generator().manual_seed(0))
    assert sorted(b - a for a, b in segs_of(doubled[0])[:10]) == sorted(pool * 2)


# ── §9-10: perplexity boundaries ───────────────────────────────────────────────────────────────────────────────────
PPL = torch.tensor([[10, 9, 8, 8.5, 7.5, 7, 6.5, 6.8, 6, 5.5]])


@pytest.mark.parametrize("boundary, starts", [("code", [0, 2, 6]), ("paper", [0, 3, 7])])
def test_perplexity_vector_of_the_spec(boundary, starts):
    for last_singleton in (True, False):
        seg = perplexity_segments(-PPL.log(), torch.ones_like(PPL), boundary=boundary, last_singleton=last_singleton)
        got = [a for a, _ in segs_of(seg[0])]
        assert got == starts + ([9] if last_singleton else [])


@settings(max_examples=40, deadline=None)
@given(lengths=masks, seed=st.integers(0, 1000))
def test_perplexity_rule_invariants(lengths, seed):
    mask = mask_from(lengths)
    logps = -torch.rand(mask.shape, generator=torch.Generator().manual_seed(seed)) * 4
    ppl = (-logps).exp()
    paper = perplexity_segments(logps, mask, boundary="paper")
    code = perplexity_segments(logps, mask, boundary="code")
    for i in range(mask.size(0)):
        L = int(mask[i].sum())
        for a, b in segs_of(paper[i]):
            if b - a > 1:  # the forced last singleton has length 1
                assert (ppl[i, a + 1 : b] <= ppl[i, a : b - 1]).all(), "paper: PPL non-increasing inside a macro"
        for a, _ in segs_of(code[i])[1:]:
            if a < L - 1:  # every start but the first and the last singleton precedes a PPL rise
                assert ppl[i, a + 1] > ppl[i, a]


# ── punctuation rule set on a real tokenizer ───────────────────────────────────────────────────────────────────────
def test_punctuation_rules_on_decoded_tokens_of_a_real_tokenizer():
    from trl_credit.trainers.macro_actions import token_texts
    from trl_credit.testing import build_tokenizer

    tok = build_tokenizer()
    texts, special = token_texts(tok)
    assert len(texts) == len(tok) and texts[tok.eos_token_id] == tok.eos_token and special[tok.eos_token_id]
    flags = punctuation_token_flags(texts, special)
    text = "First, 3.14 is pi. Then (x + 1) and we stop.\n#### 5"
    ids = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
    seg = punctuation_segments(torch.tensor([ids]), torch.ones(1, len(ids)), flags, last_singleton=True)
    pieces = [tok.decode(ids[a:b]) for a, b in segs_of(seg[0])]
    assert "".join(pieces) == text + tok.eos_token
    # This small BPE splits " (" into " " + "(": the lone space attaches to the macro before it.
    assert pieces == ["First,", " 3.14 is pi.", " Then ", "(x + 1)", " and we stop.\n", "#### 5", tok.eos_token]


def test_punctuation_rules_on_gpt2_style_tokens():
    tokens = ["First", ",", " 3", ".", "14", " is", " pi", ".", " Then", " (", "x", " +", " 1", ")", " and", " we",
              " stop", ".\n", "####", " 5", "<eos>"]  # fmt: skip
    flags = punctuation_token_flags(tokens, special=[t == "<eos>" for t in tokens])
    ids = torch.arange(len(tokens))[None]
    seg = punctuation_segments(ids, torch.ones_like(ids), flags, last_singleton=False)
    pieces = ["".join(tokens[a:b]) for a, b in segs_of(seg[0])]
    assert pieces == ["First,", " 3.14 is pi.", " Then", " (x + 1)", " and we stop.\n", "#### 5<eos>"]
    capped = punctuation_segments(ids, torch.ones_like(ids), flags, last_singleton=False, max_len=2)
    assert ["".join(tokens[a:b]) for a, b in segs_of(capped[0])][:3] == ["First,", " 3.", "14 is"]


def test_punctuation_flags_doc_example():
    flags = punctuation_token_flags(["Hi", ".", " and", "\n", "3", ").", "(a", "\u00bb"], special=[False] * 8)
    assert flags[1] & ATTACH and flags[3] & ATTACH and flags[5] & ATTACH and flags[7] & ATTACH
    assert not flags[0] & ATTACH and not flags[6] & ATTACH


# ── aggregation, metrics, KL, whitening ────────────────────────────────────────────────────────────────────────────
def test_value_aggregations_by_hand():
    seg = ngram_segments(M6, 2)
    v = V6.float()
    expected = {
        "mean": [0.15, 0.35, 0.5, 0.6],
        "first": [0.1, 0.3, 0.5, 0.6],
        "last": [0.2, 0.4, 0.5, 0.6],
        "position": [(0.1 + 0.2 / 2) / 1.5, (0.3 + 0.4 / 2) / 1.5, 0.5, 0.6],
        "sum": [0.3, 0.7, 0.5, 0.6],
    }
    for how, want in expected.items():
        torch.testing.assert_close(macro_aggregate(v, seg, how), torch.tensor([want]))
    # "first" = the value of the macro's start state (semi-MDP): macro GAE with the start values.
    adv, _ = compute_gae_advantages(V6, R6, M6, seg, value_agg="first")
    Vm, Rm = [0.1, 0.3, 0.5, 0.6], [0, 0, 0, 1.0]
    A, last = [0.0] * 4, 0.0
    for k in reversed(range(4)):
        last = Rm[k] + (Vm[k + 1] if k < 3 else 0.0) - Vm[k] + 0.95 * last
        A[k] = last
    torch.testing.assert_close(adv[0], torch.tensor([A[0], A[0], A[1], A[1], A[2], A[3]], dtype=torch.float64))


def test_segment_metrics_and_counts():
    seg = ngram_segments(mask_from([6, 1, 0]), 2)
    assert num_segments(seg).tolist() == [4, 1, 0]
    assert segment_metrics(seg) == pytest.approx({"macro_count": 2.5, "macro_len": 7 / 5})


def test_kl_penalties_and_whitening_by_hand():
    old, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]])
    torch.testing.assert_close(kl_penalty(old, ref, "k1"), torch.tensor([[0.5, -1.0]]))
    d = ref - old  # log(pi_ref / pi_old)
    torch.testing.assert_close(kl_penalty(old, ref, "k3"), d.exp() - 1 - d)
    with pytest.raises(ValueError, match="kl_estimator"):
        kl_penalty(old, ref, "k2")
    x, m = torch.tensor([[1.0, 2.0, 3.0, 100.0]]), torch.tensor([[1, 1, 1, 0]])
    w = masked_whiten(x, m)
    torch.testing.assert_close(w[0, :3], torch.tensor([-1.0, 0.0, 1.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(masked_whiten(x, m, shift_mean=False)[0, :3], torch.tensor([1.0, 2.0, 3.0]), atol=1e-6,
                               rtol=0)  # fmt: skip


def test_gae_estimator_puts_the_kl_penalty_on_every_token_and_the_outcome_on_the_last():
    mask = torch.tensor([[1.0, 1.0, 1.0]])
    batch = CreditBatch(
        completion_ids=torch.zeros(1, 3, dtype=torch.long), completion_mask=mask, rewards=torch.tensor([1.0]),
        num_generations=1, values=torch.zeros(1, 3), old_logps=torch.tensor([[-1.0, -1.0, -1.0]]),
        ref_logps=torch.tensor([[-2.0, -1.0, -0.5]]),
    )  # fmt: skip
    out = call_estimator(get_advantage_estimator("gae"), batch, gamma=1.0, lam=1.0, kl_coef=0.1)
    # r = -0.1 * (old - ref) + [0, 0, 1] = [-0.1, 0, 1.05]; with V = 0 and λ = γ = 1, A_t = reward-to-go.
    torch.testing.assert_close(out.advantages, torch.tensor([[0.95, 1.05, 1.05]]))
    torch.testing.assert_close(out.returns, out.advantages)
    assert math.isclose(out.metrics["kl"], (1.0 + 0.0 - 0.5) / 3, rel_tol=1e-6)


def test_explained_variance_is_one_for_perfect_values_and_zero_for_constant_ones():
    ret = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert explained_variance(ret, ret, mask) == pytest.approx(1.0)
    assert explained_variance(torch.full_like(ret, 5.0), ret, mask) == pytest.approx(0.0)


# ── TEMPO at macro granularity ─────────────────────────────────────────────────────────────────────────────────────
IDS = torch.tensor([[1, 2, 3], [1, 2, 4], [1, 5, 0], [6, 0, 0]])
MASK = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 1, 0], [1, 0, 0]])
R4 = torch.tensor([1.0, 0.0, 1.0, 0.0])


def test_macro_tempo_by_hand_nodes_only_at_macro_boundaries():
    seg = ngram_segments(MASK, 2, last_singleton=False)
    adv = compute_macro_tempo_advantages(IDS, MASK, R4, 4, seg, scale_rewards="none")
    # outcome r - mu = ±0.5; macro TD = V(after) - V(before), e.g. completion 0: V(1,2) - V(root) = 0, then
    # V(1,2,3) - V(1,2) = 0.5
    expected = torch.tensor([[0.5, 0.5, 1.0], [-0.5, -0.5, -1.0], [1.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])
    torch.testing.assert_close(adv, expected)


@settings(max_examples=30, deadline=None)
@given(
    G=st.sampled_from([2, 3, 4]),
    groups=st.integers(1, 3),
    T=st.integers(1, 6),
    vocab=st.integers(2, 4),
    scale=st.sampled_from(["group", "batch", "none"]),
    seed=st.integers(0, 1000),
)
def test_macro_tempo_with_single_token_macros_is_token_tempo_bit_for_bit(G, groups, T, vocab, scale, seed):
    g = torch.Generator().manual_seed(seed)
    N = G * groups
    ids = torch.randint(0, vocab, (N, T), generator=g)
    lengths = torch.randint(1, T + 1, (N,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    rewards = torch.randint(0, 2, (N,), generator=g).float()
    rewards[torch.rand(N, generator=g) < 0.15] = float("nan")
    token = compute_tempo_advantages(ids, mask, rewards, G, scale, 0.7)
    for seg in (None, ngram_segments(mask, 1), token_segments(mask)):
        assert torch.equal(compute_macro_tempo_advantages(ids, mask, rewards, G, seg, scale, 0.7), token)
    # Coarser macros keep the outcome term; each macro carries the sum of its tokens' TD terms on every token.
    seg = ngram_segments(mask, 3)
    macro = compute_macro_tempo_advantages(ids, mask, rewards, G, seg, scale, 0.7)
    outcome = compute_grpo_advantages(rewards, G, scale)
    for i in range(N):
        for a, b in segs_of(seg[i]):
            td_sum = (token[i, a:b] - outcome[i]).sum()
            torch.testing.assert_close(macro[i, a:b], (outcome[i] + td_sum).expand(b - a))


# ── the "segments" requirement inside the trainer ──────────────────────────────────────────────────────────────────
def _trainer(model_dir, tmp_path, **kw):
    from trl_credit import GRPOConfig, GRPOTrainer
    from trl_credit.testing import shaped_math_reward, tiny_math_dataset

    args = GRPOConfig(
        output_dir=str(tmp_path), advantage_estimator="macro_tempo", macro_action="ngram", max_steps=1,
        per_device_train_batch_size=4, num_generations=4, max_completion_length=12, learning_rate=1e-2,
        report_to="none", bf16=False, use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True,
        gradient_checkpointing=False, seed=1, **kw,
    )  # fmt: skip
    return GRPOTrainer(model=model_dir, reward_funcs=shaped_math_reward, args=args, train_dataset=tiny_math_dataset(8))


def test_trainer_segments_every_rule_on_real_completions(tiny_model_dir, tmp_path):
    trainer = _trainer(tiny_model_dir, tmp_path, step_split="newline")
    tok = trainer.processing_class
    texts = ["First, 2 + 3 = 5.\nThen 5 * 2 = 10.\n#### 10", "She has 3 apples (and 2 pears).", "42"]
    rows = [tok.encode(t, add_special_tokens=False) + [tok.eos_token_id] for t in texts]
    T = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_token_id] * (T - len(r)) for r in rows])
    mask = (torch.arange(T)[None, :] < torch.tensor([len(r) for r in rows])[:, None]).long()
    prompt = torch.tensor([tok.encode("What is 2 + 3?", add_special_tokens=False)] * 3)
    out = {"prompt_ids": prompt, "prompt_mask": torch.ones_like(prompt), "completion_ids": ids, "completion_mask": mask}
    fields = {"completion_ids": ids, "completion_mask": mask}
    trainer._step, trainer.state.global_step = 0, 0
    segs = {}
    for rule in ("token", "ngram", "random_ngram", "punctuation", "perplexity", "step"):
        trainer.args.macro_action = rule
        segs[rule] = trainer._credit_requirement("segments", out, {}, fields)["segment_ids"]
        assert_valid_segmentation(segs[rule], mask, last_singleton=True)
    pieces = [tok.decode(ids[0, a:b]) for a, b in segs_of(segs["step"][0])]
    assert pieces == ["First, 2 + 3 = 5.", "\nThen 5 * 2 = 10.\n#### 10", tok.eos_token]
    punct = [tok.decode(ids[1, a:b]) for a, b in segs_of(segs["punctuation"][1])]
    assert punct[0] == "She has 3 apples " and punct[1].startswith("(and 2 pears)")
    # Perplexity from the policy's own log-probs (no reference model, no old log-probs in this configuration).
    logps = trainer._policy_logps(out)
    assert torch.equal(segs["perplexity"], perplexity_segments(logps, mask))
    # The random draw depends on the step only: reproducible, and different at the next step.
    trainer.args.macro_action = "random_ngram"
    assert torch.equal(trainer._credit_requirement("segments", out, {}, fields)["segment_ids"], segs["random_ngram"])
    trainer.state.global_step = 1
    assert not torch.equal(trainer._macro_segment_ids(out, {}, fields), segs["random_ngram"])
    trainer.args.macro_action = None  # the estimator's native granularity: no segmentation handed over
    assert trainer._credit_requirement("segments", out, {}, fields) == {}
    with pytest.raises(ValueError, match="does not provide"):
        trainer._credit_requirement("telepathy", out, {}, fields)


@pytest.mark.slow
def test_macro_tempo_trains_with_punctuation_macros_and_macro_ratios(tiny_model_dir, tmp_path):
    trainer = _trainer(tiny_model_dir, tmp_path, macro_action_last_singleton=False, macro_ratio_level="macro_geomean")
    trainer.args.macro_action = "punctuation"
    seen = {}
    inner_segments, inner_credit, inner_loss = trainer._macro_segment_ids, trainer._assign_credit, trainer._compute_loss

    def loss(model, inputs):
        seen["loss_seg"] = inputs["macro_segment_ids"]  # this rank's rows reached the loss
        return inner_loss(model, inputs)

    def segments(out, ctx, fields):
        seen["seg"] = inner_segments(out, ctx, fields)
        return seen["seg"]

    def credit(out, ctx):
        inner_credit(out, ctx)
        seen["adv"] = out["advantages"].clone()

    trainer._macro_segment_ids, trainer._assign_credit, trainer._compute_loss = segments, credit, loss
    trainer.train()
    assert seen["loss_seg"].shape == seen["adv"].shape
    log = trainer.state.log_history[0]
    assert log["credit/macro_count"] >= 1 and "credit/branch_token_frac" in log
    adv, seg = seen["adv"], seen["seg"]
    for i in range(adv.size(0)):
        for a, b in segs_of(seg[i]):
            assert (adv[i, a:b] == adv[i, a]).all()


def _loss_inputs(trainer, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, P, T = 4, 5, 9
    lengths = torch.tensor([9, 6, 3, 1])
    completion_mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    inputs = {
        "prompt_ids": torch.randint(3, 300, (B, P), generator=g),
        "prompt_mask": torch.ones(B, P, dtype=torch.long),
        "completion_ids": torch.randint(3, 300, (B, T), generator=g),
        "completion_mask": completion_mask,
        "advantages": torch.randn(B, T, generator=g) * completion_mask,
        "num_items_in_batch": completion_mask.sum(),
    }
    with torch.no_grad():
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        am = torch.cat([inputs["prompt_mask"], completion_mask], 1)
        logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, am, T)
    # An older policy: ratios away from 1, some beyond the clip range.
    inputs["old_per_token_logps"] = logps + torch.randn(B, T, generator=g) * 0.3
    return inputs


def _loss(trainer, inputs, level, seg=None):
    trainer.args.macro_ratio_level = level
    inputs = dict(inputs)
    if seg is not None:
        inputs["macro_segment_ids"] = seg
    trainer.model.zero_grad()
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    grads = torch.cat([p.grad.reshape(-1) for p in trainer.model.parameters() if p.grad is not None])
    return loss.detach(), grads


def test_macro_ratio_levels_in_the_loss(tiny_model_dir, tmp_path):
    trainer = _trainer(tiny_model_dir, tmp_path, macro_ratio_level="macro_geomean")
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    inputs = _loss_inputs(trainer)
    mask = inputs["completion_mask"]
    token_loss, token_grad = _loss(trainer, inputs, "token")
    # §9-7: with one token per macro, both macro ratios give TRL's token-level loss and gradient bit for bit.
    for level in ("macro_product", "macro_geomean"):
        loss, grad = _loss(trainer, inputs, level, ngram_segments(mask, 1))
        assert torch.equal(loss, token_loss) and torch.equal(grad, token_grad)
    # One macro per completion: the geometric mean is TRL's sequence-level (GSPO) ratio.
    whole = ngram_segments(mask, 100, last_singleton=False)
    geo_loss, geo_grad = _loss(trainer, inputs, "macro_geomean", whole)
    trainer.importance_sampling_level = "sequence"
    seq_loss, seq_grad = _loss(trainer, inputs, "token")
    trainer.importance_sampling_level = "token"
    torch.testing.assert_close(geo_loss, seq_loss)
    torch.testing.assert_close(geo_grad, seq_grad, rtol=1e-4, atol=1e-7)
    # §9-8: the product ratio of one macro is exp(Σ log-ratio), which the loss clips far more often.
    prod_loss, _ = _loss(trainer, inputs, "macro_product", whole)
    clip = trainer._metrics["train"]["clip_ratio/region_mean"]
    assert clip[-1] > clip[-2] and not torch.equal(prod_loss, geo_loss)
    with pytest.raises(ValueError, match="beta"):
        from trl_credit import GRPOConfig

        GRPOConfig(output_dir=str(tmp_path), bf16=False, use_cpu=True, advantage_estimator="macro_tempo",
                   macro_action="ngram", macro_ratio_level="macro_product", beta=0.04)  # fmt: skip


# ── issue 12: "step" with Monte-Carlo values, perplexity source in PPO, last_singleton warning ────────────────────────
TEXTS = ["First, 2 + 3 = 5.\nThen 5 * 2 = 10.\n#### 10", "She has 3 apples (and 2 pears).", "42"]


def _texts_batch(tok):
    rows = [tok.encode(t, add_special_tokens=False) + [tok.eos_token_id] for t in TEXTS]
    T = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_token_id] * (T - len(r)) for r in rows])
    mask = (torch.arange(T)[None, :] < torch.tensor([len(r) for r in rows])[:, None]).long()
    prompt = torch.tensor([tok.encode("What is 2 + 3?", add_special_tokens=False)] * 3)
    out = {"prompt_ids": prompt, "prompt_mask": torch.ones_like(prompt), "completion_ids": ids, "completion_mask": mask}
    return rows, out, {"completion_ids": ids, "completion_mask": mask}


def test_step_macros_with_monte_carlo_values_are_exactly_the_native_steps(tiny_model_dir, tmp_path):
    from trl_credit import GRPOConfig, GRPOTrainer
    from trl_credit.credit.steps import segment_completions
    from trl_credit.testing import CPU_TEST_ARGS, shaped_math_reward, tiny_math_dataset

    args = GRPOConfig(output_dir=str(tmp_path), advantage_estimator="vineppo", macro_action="step",
                      step_split="newline", num_generations=3, per_device_train_batch_size=3, **CPU_TEST_ARGS)
    trainer = GRPOTrainer(model=tiny_model_dir, reward_funcs=shaped_math_reward, args=args,
                          train_dataset=tiny_math_dataset(6))  # fmt: skip
    assert args.macro_action_last_singleton  # the default stays on; "step" ignores it for Monte-Carlo values
    tok = trainer.processing_class
    rows, out, fields = _texts_batch(tok)
    seg = trainer._credit_requirement("segments", out, {}, fields)["segment_ids"]
    native, _, _ = segment_completions(
        rows, seg.size(1), step_split="newline", chunk_tokens=args.vine_chunk_tokens,
        batch_decode=lambda s: tok.batch_decode(s, skip_special_tokens=True, clean_up_tokenization_spaces=False),
        special_token_ids=set(tok.all_special_ids) | set(trainer.eos_token_ids),
    )  # fmt: skip
    assert torch.equal(seg, native)
    # EOS joins the last step: no one-token last macro, hence no extra Monte-Carlo state before it
    pieces = [tok.decode(out["completion_ids"][0, a:b]) for a, b in segs_of(seg[0])]
    assert pieces == ["First, 2 + 3 = 5.", "\nThen 5 * 2 = 10.\n#### 10" + tok.eos_token]
    assert num_segments(seg).tolist() == [2, 1, 1]


@pytest.mark.slow
def test_vineppo_with_step_macros_trains_exactly_like_native_steps(tiny_model_dir, tmp_path):
    from trl_credit import GRPOConfig, GRPOTrainer
    from trl_credit.testing import CPU_TEST_ARGS, shaped_math_reward, tiny_math_dataset

    def run(name, **kw):
        records = []

        class Recording(GRPOTrainer):
            def _vine_mc_values(self, out, ctx, batch_fields):
                result = super()._vine_mc_values(out, ctx, batch_fields)
                records.append(result["segment_ids"].clone())
                return result

        args = GRPOConfig(
            output_dir=str(tmp_path / name), advantage_estimator="vineppo", max_steps=1, per_device_train_batch_size=4,
            num_generations=2, max_completion_length=8, learning_rate=5e-2, seed=5, vine_num_rollouts=2,
            step_split="token_chunks", vine_chunk_tokens=3, **CPU_TEST_ARGS, **kw,
        )  # fmt: skip
        trainer = Recording(model=tiny_model_dir, reward_funcs=shaped_math_reward, args=args,
                            train_dataset=tiny_math_dataset(8))  # fmt: skip
        trainer.train()
        log = trainer.state.log_history[0]
        return records, log, torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters()])

    native_seg, native_log, native_params = run("native")
    step_seg, step_log, step_params = run("step", macro_action="step")
    assert all(torch.equal(a, b) for a, b in zip(native_seg, step_seg, strict=True))
    for key in ("credit/mc_unique_states", "credit/mc_rollouts", "credit/vine_steps_mean", "loss"):
        assert step_log[key] == native_log[key], key
    assert torch.equal(step_params, native_params)


def _ppo_perplexity_trainer(model_dir, tmp_path, **kw):
    from trl_credit import PPOConfig, PPOTrainer
    from trl_credit.testing import CPU_TEST_ARGS, shaped_math_reward, tiny_math_dataset

    args = PPOConfig(output_dir=str(tmp_path), macro_action="perplexity", num_generations=3,
                     per_device_train_batch_size=3, **CPU_TEST_ARGS, **kw)  # fmt: skip
    return PPOTrainer(model=model_dir, reward_funcs=shaped_math_reward, args=args, train_dataset=tiny_math_dataset(6))


def _assign_credit_counting_forwards(trainer, out):
    """Run the trainer's credit assignment on `out`; return the segment ids and the models of every log-prob pass."""
    seen, forwards = {}, []
    inner_segments, inner_logps = trainer._macro_segment_ids, trainer._get_per_token_logps_and_entropies

    def segments(out, ctx, fields):
        seen["seg"] = inner_segments(out, ctx, fields)
        return seen["seg"]

    def logps(model, *args, **kwargs):
        forwards.append(model)
        return inner_logps(model, *args, **kwargs)

    trainer._macro_segment_ids, trainer._get_per_token_logps_and_entropies = segments, logps
    out = dict(out, advantages=torch.zeros(out["completion_ids"].size(0)))
    ids = [row[m.bool()].tolist() for row, m in zip(out["completion_ids"], out["completion_mask"])]
    ctx = {  # what the trainer's `_calculate_rewards` seam keeps
        "inputs": [{"prompt": "What is 2 + 3?", "solution": "5"}] * 3, "prompts": ["What is 2 + 3?"] * 3,
        "completions": TEXTS, "completion_ids_list": ids, "rewards_per_func": torch.tensor([[1.0], [0.0], [0.5]]),
    }  # fmt: skip
    trainer._assign_credit(out, ctx)
    trainer._macro_segment_ids, trainer._get_per_token_logps_and_entropies = inner_segments, inner_logps
    return seen["seg"], forwards, out


def test_ppo_perplexity_macros_read_the_reference_log_probs_of_the_kl_penalty_without_an_extra_pass(
    tiny_model_dir, tmp_path
):
    trainer = _ppo_perplexity_trainer(tiny_model_dir, tmp_path)
    assert trainer.args.kl_coef == 0.05 and trainer.ref_model is not None  # a KL penalty, hence a reference model
    torch.manual_seed(0)
    with torch.no_grad():  # a policy that has moved away from the reference
        for p in trainer.model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    _, out, _ = _texts_batch(trainer.processing_class)
    seg, forwards, out = _assign_credit_counting_forwards(trainer, out)
    # one reference pass, shared by the segmentation and the KL penalty; no policy pass for the perplexity
    assert forwards == [trainer.ref_model, trainer.model]  # reference (perplexity + KL), policy (π_old of the KL)
    ref = trainer._get_per_token_logps_and_entropies(
        trainer.ref_model, torch.cat([out["prompt_ids"], out["completion_ids"]], 1),
        torch.cat([out["prompt_mask"], out["completion_mask"]], 1), out["completion_ids"].size(1),
    )[0]  # fmt: skip
    assert torch.equal(seg, perplexity_segments(ref, out["completion_mask"]))
    assert not torch.equal(seg, perplexity_segments(trainer._policy_logps(out), out["completion_mask"]))
    assert trainer._metrics["train"]["credit/macro_ppl_reference"] == [1.0]


def test_ppo_perplexity_macros_without_a_reference_read_the_sampling_log_probs(tiny_model_dir, tmp_path):
    trainer = _ppo_perplexity_trainer(tiny_model_dir, tmp_path, kl_coef=0.0)
    assert trainer.ref_model is None
    _, out, _ = _texts_batch(trainer.processing_class)
    # TRL's old log-probs (sampling policy) when it computed them: no forward pass at all
    old = torch.randn(out["completion_ids"].shape)
    seg, forwards, _ = _assign_credit_counting_forwards(trainer, dict(out, old_per_token_logps=old))
    assert forwards == [] and torch.equal(seg, perplexity_segments(old, out["completion_mask"]))
    # on-policy without them: one no-grad pass of the policy, which is the sampling policy
    seg, forwards, _ = _assign_credit_counting_forwards(trainer, out)
    assert forwards == [trainer.model]
    assert torch.equal(seg, perplexity_segments(trainer._policy_logps(out), out["completion_mask"]))
    assert trainer._metrics["train"]["credit/macro_ppl_reference"] == [0.0, 0.0]


@pytest.mark.parametrize(
    "kwargs, warns",
    [
        (dict(macro_action="ngram", macro_action_last_singleton=False), True),
        (dict(macro_action="punctuation", macro_action_last_singleton=False), True),
        (dict(macro_action="ngram"), False),  # last singleton (default): the outcome stays whole
        (dict(macro_action="ngram", macro_action_last_singleton=False, macro_reward_agg="sum"), False),
        (dict(macro_action="ngram", macro_action_n=1, macro_action_last_singleton=False), False),  # one token each
        (dict(macro_action="token", macro_action_last_singleton=False), False),
        (dict(advantage_estimator="vineppo", kl_coef=0.0, macro_action="ngram", macro_action_last_singleton=False),
         False),  # Monte-Carlo values: no macro rewards
    ],
)
def test_last_singleton_off_with_mean_macro_rewards_warns_at_construction(tmp_path, kwargs, warns):
    import warnings

    from trl_credit import PPOConfig

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PPOConfig(output_dir=str(tmp_path), bf16=False, use_cpu=True, report_to="none", **kwargs)
    messages = [str(w.message) for w in caught if "macro_action_last_singleton=False" in str(w.message)]
    assert len(messages) == (1 if warns else 0)
    if warns:
        assert "divided by the length of the last macro" in messages[0] and "macro_reward_agg='sum'" in messages[0]
