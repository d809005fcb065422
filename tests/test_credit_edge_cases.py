"""
Every public function of `trl_credit.credit` on the degenerate batches a trainer can hand it: no completion token at
all (`T = 0` columns), no row (`N = 0`), every completion empty (completion mask all 0, segment ids all `-1`), every
token outside the loss mask, every reward unscorable (`NaN`).

Each must return finite zeros of the right shape where there is nothing to credit (or its documented neutral value),
or raise a `ValueError` that names the problem: never an `IndexError` from a reduction over an empty dimension, never
NaN/inf in an advantage or a loss mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import pytest
import torch

from trl_credit import credit as C
from trl_credit.credit import CreditBatch, CreditOutput, call_estimator, compute_segment_gae
from trl_credit.credit.segment_gae import segment_counts


G = 2  # group size of every case
D = 2  # tree levels of the SPO-tree cases


@dataclass(frozen=True)
class Case:
    """One degenerate bundle, with every field an estimator or helper may need, consistent with its masks."""

    name: str
    ids: torch.Tensor  # (N, T)
    mask: torch.Tensor  # (N, T) completion mask
    loss_mask: torch.Tensor  # (N, T)
    rewards: torch.Tensor  # (N,)
    segment_ids: torch.Tensor  # (N, T), -1 on padding
    segment_values: torch.Tensor  # (N, S)
    tree_paths: torch.Tensor  # (N, D)

    @property
    def N(self) -> int:
        return self.ids.size(0)

    @property
    def T(self) -> int:
        return self.ids.size(1)

    def batch(self, **extra) -> CreditBatch:
        N, T = self.N, self.T
        fields = dict(
            completion_ids=self.ids, completion_mask=self.mask, rewards=self.rewards, num_generations=G,
            loss_mask=self.loss_mask, segment_ids=self.segment_ids, segment_values=self.segment_values,
            values=torch.zeros(N, T), token_rewards=torch.zeros(N, T), old_logps=torch.full((N, T), -0.5),
            ref_logps=torch.full((N, T), -0.5), entropies=torch.ones(N, T),
            estimated_states=torch.zeros(self.segment_values.shape, dtype=torch.bool),
            cutpoint_mask=self.mask.clone(), tree_paths=self.tree_paths,
        )  # fmt: skip
        fields.update(extra)
        return CreditBatch(**fields)


def _paths(N: int) -> torch.Tensor:
    return torch.tensor([[(i // 2) % 2, i % 2] for i in range(N)], dtype=torch.long).reshape(N, D)


def _case(name: str) -> Case:
    if name == "no_columns":  # T = 0: a batch of empty completions, padded to width 0
        N, T, S = 4, 0, 1
        mask = torch.zeros(N, T)
        seg = torch.zeros(N, T, dtype=torch.long)
    elif name == "no_rows":  # N = 0
        N, T, S = 0, 5, 2
        mask = torch.zeros(N, T)
        seg = torch.zeros(N, T, dtype=torch.long)
    elif name in ("all_padding", "all_padding_no_segment_columns"):  # every completion empty, width 5
        N, T = 4, 5
        S = 0 if name == "all_padding_no_segment_columns" else 2
        mask = torch.zeros(N, T)
        seg = torch.full((N, T), -1, dtype=torch.long)
    elif name in ("loss_mask_all_zero", "all_unscorable"):  # real tokens, none trained / no reward
        N, T, S = 4, 5, 2
        mask = torch.ones(N, T)
        seg = torch.tensor([[0, 0, 1, 1, 1]] * N)
    else:
        raise KeyError(name)
    loss_mask = torch.zeros(N, T) if name == "loss_mask_all_zero" else mask.clone()
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0][:N]) if N else torch.zeros(0)
    if name == "all_unscorable":
        rewards = torch.full((N,), math.nan)
    values = torch.full((N, S), 0.5)
    return Case(name, torch.zeros(N, T, dtype=torch.long), mask, loss_mask, rewards, seg, values, _paths(N))


CASES = ["no_columns", "no_rows", "all_padding", "all_padding_no_segment_columns", "loss_mask_all_zero",
         "all_unscorable"]  # fmt: skip


def _assert_finite_zero_outside(x: torch.Tensor, shape: tuple[int, ...], keep: torch.Tensor | None = None) -> None:
    assert tuple(x.shape) == shape, f"shape {tuple(x.shape)} != {shape}"
    assert x.is_floating_point()
    assert torch.isfinite(x).all(), "non-finite values"
    if keep is not None:
        assert (x[~keep.bool()] == 0).all(), "non-zero outside the mask"


# ── compute_segment_gae: the reported crash ────────────────────────────────────────────────────────────────────────
@pytest.mark.parametrize("S", [0, 1, 3])
@pytest.mark.parametrize("N", [0, 3])
def test_segment_gae_of_a_batch_without_completion_tokens_is_all_zero_not_an_index_error(N, S):
    # T = 0 columns used to raise "max(): Expected reduction dim 1 to have non-zero size"
    rewards = torch.tensor([1.0, 0.0, math.nan])[:N]
    adv, ret = compute_segment_gae(rewards, torch.zeros(N, 0, dtype=torch.long), torch.zeros(N, S), 1.0, 0.95,
                                   return_returns=True)  # fmt: skip
    _assert_finite_zero_outside(adv, (N, 0))
    _assert_finite_zero_outside(ret, (N, 0))


@pytest.mark.parametrize("S", [0, 2])
def test_segment_gae_of_all_padding_rows_is_all_zero_even_without_segment_columns(S):
    # every segment id -1 with S = 0 value columns used to raise "index is out of bounds for dimension with size 0"
    seg = torch.full((3, 4), -1, dtype=torch.long)
    adv, ret = compute_segment_gae(torch.tensor([1.0, 0.0, 1.0]), seg, torch.zeros(3, S), return_returns=True)
    assert torch.equal(adv, torch.zeros(3, 4)) and torch.equal(ret, torch.zeros(3, 4))


def test_segment_gae_still_refuses_segments_without_value_columns():
    with pytest.raises(ValueError, match="one value per segment is needed"):
        compute_segment_gae(torch.tensor([1.0]), torch.tensor([[0, 0, 1]]), torch.zeros(1, 0))


def test_segment_gae_mixed_empty_and_real_rows_match_the_real_rows_alone():
    seg = torch.tensor([[0, 1, 1, -1], [-1, -1, -1, -1]])
    values = torch.tensor([[0.25, 0.5], [math.nan, math.nan]])
    adv = compute_segment_gae(torch.tensor([1.0, 0.0]), seg, values)
    alone = compute_segment_gae(torch.tensor([1.0]), seg[:1], values[:1])
    torch.testing.assert_close(adv[:1], alone)
    assert torch.equal(adv[1], torch.zeros(4))


# ── every registered estimator through call_estimator (the trainer's path, with the output checks) ─────────────────
ESTIMATORS = ["grpo", "tempo", "gigpo", "macro_tempo", "gae", "vineppo", "spo_chain", "spo_tree"]
NORMS = {
    "vineppo": [{"vine_advantage_norm": n} for n in ("batch", "group", "none")],
    "spo_chain": [{"spo_advantage_norm": n, "spo_prob_mask": m} for n in ("batch", "group", "none")
                  for m in (True, False)],  # fmt: skip
    "spo_tree": [{"spo_advantage_norm": n, "spo_prob_mask": m} for n in ("batch", "group", "none")
                 for m in (True, False)],  # fmt: skip
    "gae": [{}, {"whiten_advantages": True, "whiten_rewards": True}],
}


def test_every_registered_estimator_is_covered():
    assert sorted(C.ADVANTAGE_ESTIMATORS) == sorted(ESTIMATORS)


def _estimator_batches(name: str, c: Case) -> list[CreditBatch]:
    if name == "spo_tree":  # one value per tree level (the trainer's node values), or none (from the rewards)
        return [c.batch(segment_values=torch.full((c.N, D), 0.5)), c.batch(segment_values=None)]
    return [c.batch()]


def _check_estimator_output(fn, c: Case, out: CreditOutput) -> None:
    assert isinstance(out, CreditOutput)
    unscorable = bool(torch.isnan(c.rewards).all())
    if getattr(fn, "credit_sequence_level", False):
        _assert_finite_zero_outside(out.advantages, (c.N,))
    else:
        keep = c.loss_mask if out.loss_mask is None else c.loss_mask * out.loss_mask
        _assert_finite_zero_outside(out.advantages, (c.N, c.T), keep)
    if unscorable:
        assert (out.advantages == 0).all(), "an unscorable completion must get advantage 0"
    if out.loss_mask is not None:
        _assert_finite_zero_outside(out.loss_mask, (c.N, c.T))
        assert (out.loss_mask >= 0).all()
    if out.returns is not None:
        assert tuple(out.returns.shape) == (c.N, c.T) and not torch.isinf(out.returns).any()
    for key, value in out.metrics.items():
        assert not math.isinf(float(value)), (key, value)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", ESTIMATORS)
def test_every_estimator_gives_finite_zero_credit_outside_the_loss_mask_on_degenerate_batches(name, case):
    c = _case(case)
    fn = C.get_advantage_estimator(name)
    for kwargs in NORMS.get(name, [{}]):
        for batch in _estimator_batches(name, c):
            _check_estimator_output(fn, c, call_estimator(fn, batch, **kwargs))  # validate_credit_output inside


# ── the helpers an estimator or a trainer calls on the same batches ────────────────────────────────────────────────
def _helpers(c: Case):
    """name → (call, expected shape or None for a non-tensor result)."""
    N, T = c.N, c.T
    logps = torch.full((N, T), -0.5)
    adv = torch.zeros(N, T)
    token_flags = torch.zeros(8, dtype=torch.bool)
    return {
        "cutpoint_boundaries": (lambda: C.cutpoint_boundaries(logps, c.mask, 0.9, 2).segment_ids, (N, T)),
        "cutpoint_boundaries.estimated": (lambda: C.cutpoint_boundaries(logps, c.mask, 0.9, 2).estimated_states,
                                          None),  # fmt: skip
        "probability_mask": (lambda: C.probability_mask(logps, c.mask, 0.9), (N, T)),
        "masked_whiten": (lambda: C.masked_whiten(adv, c.loss_mask), (N, T)),
        "spo_normalize.batch": (lambda: C.spo_normalize(adv, c.loss_mask, "batch", G), (N, T)),
        "spo_normalize.group": (lambda: C.spo_normalize(adv, c.loss_mask, "group", G), (N, T)),
        "tree_node_values": (lambda: C.tree_node_values(c.rewards, c.tree_paths, G), None),
        "tree_node_counts": (lambda: C.tree_node_counts(c.tree_paths, G, c.loss_mask.sum(1) > 0), None),
        "tree_segment_ids": (lambda: C.tree_segment_ids([[] for _ in range(N)], T), None),
        "interpolate_state_values": (
            lambda: C.interpolate_state_values(c.segment_ids, c.segment_values, c.rewards,
                                               torch.zeros(c.segment_values.shape, dtype=torch.bool)),
            None,
        ),  # fmt: skip
        "estimated_state_mask": (lambda: C.estimated_state_mask(segment_counts(c.segment_ids),
                                                                c.segment_values.size(1)), None),  # fmt: skip
        "segment_counts": (lambda: segment_counts(c.segment_ids), (N,)),
        "compute_tempo_advantages": (lambda: C.compute_tempo_advantages(c.ids, c.mask, c.rewards, G,
                                                                        loss_mask=c.loss_mask), (N, T)),  # fmt: skip
        "compute_gigpo_advantages": (lambda: C.compute_gigpo_advantages(c.ids, c.mask, c.rewards, G), (N, T)),
        "compute_macro_tempo_advantages": (lambda: C.compute_macro_tempo_advantages(
            c.ids, c.mask, c.rewards, G, c.segment_ids, loss_mask=c.loss_mask), (N, T)),  # fmt: skip
        "prefix_tree_values": (lambda: C.prefix_tree_values(c.ids, c.mask, c.rewards, G), None),
        "compute_grpo_advantages": (lambda: C.compute_grpo_advantages(c.rewards, G), (N,)),
        "compute_gae_advantages": (lambda: C.compute_gae_advantages(torch.zeros(N, T), torch.zeros(N, T), c.mask),
                                   None),  # fmt: skip
        "compute_gae_advantages.macro": (lambda: C.compute_gae_advantages(
            torch.zeros(N, T), torch.zeros(N, T), c.mask, c.segment_ids), None),  # fmt: skip
        "kl_penalty": (lambda: C.kl_penalty(logps, logps), (N, T)),
        "explained_variance": (lambda: C.explained_variance(torch.zeros(N, T), torch.zeros(N, T), c.mask), None),
        "apply_token_weights": (lambda: C.apply_token_weights(adv, torch.ones(N, T), c.loss_mask)[0], (N, T)),
        "entropy_threshold": (lambda: C.entropy_threshold(torch.ones(N, T), c.loss_mask, 0.2), None),
        "entropy_token_weights": (lambda: C.entropy_token_weights(torch.ones(N, T), c.loss_mask)[0], (N, T)),
        "entropy_token_weights.sequence": (lambda: C.entropy_token_weights(torch.ones(N, T), c.loss_mask,
                                                                           scope="sequence")[0], (N, T)),  # fmt: skip
        "token_segments": (lambda: C.token_segments(c.mask), (N, T)),
        "ngram_segments": (lambda: C.ngram_segments(c.mask, 3), (N, T)),
        "random_ngram_segments": (lambda: C.random_ngram_segments(c.mask, generator=torch.Generator().manual_seed(0)),
                                  (N, T)),  # fmt: skip
        "perplexity_segments": (lambda: C.perplexity_segments(logps, c.mask), (N, T)),
        "punctuation_segments": (lambda: C.punctuation_segments(c.ids, c.mask, token_flags), (N, T)),
        "segments_from_starts": (lambda: C.segments_from_starts(torch.zeros(N, T, dtype=torch.bool), c.mask),
                                 (N, T)),  # fmt: skip
        "boundary_segments": (lambda: C.boundary_segments([[] for _ in range(N)], c.mask), (N, T)),
        "macro_aggregate": (lambda: C.macro_aggregate(torch.zeros(N, T), c.segment_ids), None),
        "macro_log_ratio": (lambda: C.macro_log_ratio(torch.zeros(N, T), c.segment_ids, "macro_geomean"), (N, T)),
        "segment_completions": (lambda: C.segment_completions([[] for _ in range(N)], T, step_split="newline",
                                                              batch_decode=lambda xs: ["" for _ in xs]), None),
        "top_q_mask": (lambda: C.top_q_mask(torch.ones(N, T), c.loss_mask, 0.4), (N, T)),
        "waad_delta": (lambda: C.waad_delta(torch.ones(N, T), c.loss_mask), (N, T)),
        "rhythm_gammas": (lambda: C.rhythm_gammas(torch.ones(N, T), torch.ones(N, T), c.loss_mask)[0], (N, T)),
    }  # fmt: skip


HELPER_NAMES = sorted(_helpers(_case("all_padding")))


# Documented neutral values that are not finite: a threshold above every entropy selects no token.
INFINITE_OK = {"entropy_threshold"}


def _finite(x) -> None:
    if isinstance(x, torch.Tensor):
        if x.is_floating_point():
            assert not torch.isinf(x).any(), "inf in the output"
    elif isinstance(x, tuple):
        for y in x:
            _finite(y)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("helper", HELPER_NAMES)
def test_every_credit_helper_handles_empty_and_all_masked_batches(helper, case):
    c = _case(case)
    call, shape = _helpers(c)[helper]
    out = call()
    if helper in INFINITE_OK:
        assert out.numel() == 1 and (torch.isfinite(out) or out == math.inf)
        return
    _finite(out)
    if shape is not None:
        assert tuple(out.shape) == shape, f"{helper}: shape {tuple(out.shape)} != {shape}"
        if out.is_floating_point() and helper not in ("kl_penalty", "compute_grpo_advantages"):
            # weights are 1 (neutral) or 0; advantages 0; nothing NaN outside the tokens it may describe
            assert torch.isfinite(out).all(), helper
        if out.dtype == torch.long and helper.endswith("segments") and case != "loss_mask_all_zero":
            assert (out[c.mask == 0] == -1).all(), "padding must have segment id -1"


@pytest.mark.parametrize("shape", [(2, 2, 0, 0), (0, 2, 5, 5)])
def test_attention_statistics_of_an_empty_attention_map_are_empty_not_errors(shape):
    attn = torch.zeros(shape)
    B, H, L, _ = shape
    assert tuple(C.compute_waad(attn, 4).shape) == (B, H, L)
    assert tuple(C.compute_fai(attn, 0, 1, 4).shape) == (B, H, L)
    assert tuple(C.compute_row_distance(attn.reshape(B * H, L, L)).shape) == (B * H, L)


def test_segment_counts_of_rows_without_tokens_are_zero():
    assert segment_counts(torch.tensor([[0, 0, 1, -1], [-1, -1, -1, -1]])).tolist() == [2, 0]
    assert segment_counts(torch.zeros(3, 0, dtype=torch.long)).tolist() == [0, 0, 0]
