"""SPO-chain (https://huggingface.co/papers/2505.23564): cutpoint segmentation, segment TD(0) on Monte-Carlo values,
the probability mask as a loss mask (against a hand computation of TRL 1.16's `_compute_loss` for every `loss_type`),
the config, and training runs through every generation backend and two processes."""

import math
from pathlib import Path

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from reference_spo import spo_chain_reference, whiten_reference
from trl_credit.credit import (
    ADVANTAGE_ESTIMATORS,
    CreditBatch,
    compute_segment_gae,
    compute_spo_chain_advantages,
    compute_vineppo_advantages,
    cutpoint_boundaries,
    masked_whiten,
    probability_mask,
    spo_normalize,
)
from trl_credit.credit.steps import segment_ids_to_boundaries


# ── helpers ───────────────────────────────────────────────────────────────────────────────────────────────────────
def padded(rows, pad=1.0):
    """Ragged probability rows → float64 log-probs `(N, T)` (padding p = `pad`) and the right-padded mask."""
    T = max((len(r) for r in rows), default=0)
    p = torch.full((len(rows), T), pad, dtype=torch.float64)
    mask = torch.zeros(len(rows), T)
    for i, r in enumerate(rows):
        p[i, : len(r)] = torch.tensor(r, dtype=torch.float64)
        mask[i, : len(r)] = 1
    return p.log(), mask


def segment_starts(segment_ids):
    return [b[:-1] for b in segment_ids_to_boundaries(segment_ids)]


def values_at_states(seg, value_of):
    """`(N, S)` segment values: `value_of(i, start)` for the estimated states, NaN elsewhere."""
    N, S = seg.estimated_states.shape
    out = torch.full((N, S), math.nan)
    for i, starts in enumerate(segment_starts(seg.segment_ids)):
        for j, start in enumerate(starts):
            if seg.estimated_states[i, j]:
                out[i, j] = value_of(i, start)
    return out


def spo_chain(rows, rewards, value_of, *, rho=0.9, k=5, mask_on=True, norm="none", G=1):
    logps, mask = padded(rows)
    seg = cutpoint_boundaries(logps, mask, rho=rho, k=k)
    batch = CreditBatch(
        completion_ids=torch.zeros(mask.shape, dtype=torch.long), completion_mask=mask,
        rewards=torch.tensor(rewards, dtype=torch.float32), num_generations=G, segment_ids=seg.segment_ids,
        segment_values=values_at_states(seg, value_of), cutpoint_mask=seg.cutpoint_mask,
        estimated_states=seg.estimated_states,
    )  # fmt: skip
    return seg, batch, compute_spo_chain_advantages(batch, spo_prob_mask=mask_on, spo_advantage_norm=norm)


FIGURE_P = [0.99, 0.72, 1.00, 0.85, 1.00, 0.56, 0.92, 0.23, 0.98, 0.11, 1.00, 0.95]
FIGURE_V = {1: 0.5, 5: 0.25, 9: 0.75}


# ── spec test vectors (spo.md §11) ──────────────────────────────────────────────────────────────────────────────────
def test_vector_1_figure_probabilities_cut_before_every_second_cutpoint():
    seg, _, out = spo_chain([FIGURE_P], [1.0], lambda i, s: FIGURE_V[s], k=2, mask_on=False)
    assert seg.cutpoint_mask[0].nonzero().flatten().tolist() == [1, 3, 5, 7, 9]  # C
    assert segment_starts(seg.segment_ids) == [[0, 1, 5, 9]]  # boundaries [0, 1, 5, 9, 12]
    assert seg.estimated_states.tolist() == [[False, True, True, True]]  # states 1, 5, 9 (not the prompt)
    expected_off = [0, -0.25, -0.25, -0.25, -0.25, 0.5, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25]
    torch.testing.assert_close(out.advantages[0], torch.tensor(expected_off))
    assert out.loss_mask is None  # mask off: TRL's loss mask stays as it is

    _, _, on = spo_chain([FIGURE_P], [1.0], lambda i, s: FIGURE_V[s], k=2, mask_on=True)
    expected_on = [0, -0.25, 0, -0.25, 0, 0.5, 0, 0.5, 0, 0.25, 0, 0]
    torch.testing.assert_close(on.advantages[0], torch.tensor(expected_on))
    assert on.loss_mask[0].tolist() == [0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 0]

    _, _, white = spo_chain([FIGURE_P], [1.0], lambda i, s: FIGURE_V[s], k=2, mask_on=True, norm="batch")
    expected_white = [0, -1.0550, 0, -1.0550, 0, 0.9231, 0, 0.9231, 0, 0.2638, 0, 0]  # mean 0.15, std 0.37914
    torch.testing.assert_close(white.advantages[0], torch.tensor(expected_white), atol=1e-4, rtol=0)


def test_vector_2_first_token_cutpoint_estimates_the_prompt_state():
    p = [0.5, 0.95, 0.8, 0.99, 0.7, 0.6, 0.97, 0.4, 0.999, 0.3]
    seg, _, out = spo_chain([p], [0.0], lambda i, s: {0: 0.6, 5: 0.3}[s], k=3)
    assert seg.cutpoint_mask[0].nonzero().flatten().tolist() == [0, 2, 4, 5, 7, 9]
    assert segment_starts(seg.segment_ids) == [[0, 5]] and seg.estimated_states.tolist() == [[True, True]]
    expected = [-0.3, 0, -0.3, 0, -0.3, -0.3, 0, -0.3, 0, -0.3]
    torch.testing.assert_close(out.advantages[0], torch.tensor(expected))


def test_vector_3_no_cutpoint_needs_no_rollout_and_trains_no_token():
    from trl_credit.generation.rollouts import VinePlan

    seg, _, out = spo_chain([[0.95, 0.99, 0.91]], [1.0], lambda i, s: pytest.fail("no state may be estimated"))
    assert seg.estimated_states.tolist() == [[False]] and seg.segment_ids.tolist() == [[0, 0, 0]]
    assert out.advantages.tolist() == [[0, 0, 0]] and out.loss_mask.tolist() == [[0, 0, 0]]
    assert out.metrics["spo_rows_without_cutpoint"] == 1 and out.metrics["spo_cutpoints_mean"] == 0
    # the rollout plan built from this segmentation has no state: 0 rollouts
    plan = VinePlan([[7]], [[1, 2, 3]], segment_ids_to_boundaries(seg.segment_ids), seg.estimated_states,
                    torch.tensor([1.0]), [0], max_completion_length=8, num_rollouts=9)  # fmt: skip
    assert plan.num_states == 0


def test_vector_4_rho_one_k_one_is_vineppo_with_one_token_steps():
    torch.manual_seed(0)
    rows = [torch.rand(7).clamp(0.01, 0.99).tolist(), torch.rand(4).clamp(0.01, 0.99).tolist()]
    V = torch.rand(2, 7)
    seg, batch, out = spo_chain(rows, [1.0, 0.0], lambda i, s: float(V[i, s]), rho=1.0, k=1)
    assert seg.cutpoint_mask.sum() == 11 and out.loss_mask.sum() == 11  # every token is a cutpoint ...
    assert seg.estimated_states.sum() == 11  # ... and a boundary whose state is estimated
    assert seg.segment_ids[0].tolist() == list(range(7))
    vine = CreditBatch(batch.completion_ids, batch.completion_mask, batch.rewards, 1, segment_ids=torch.tensor(
        [list(range(7)), [0, 1, 2, 3, -1, -1, -1]]), segment_values=batch.segment_values)  # fmt: skip
    torch.testing.assert_close(out.advantages, compute_vineppo_advantages(vine, vine_advantage_norm="none").advantages)
    for i, r in enumerate([1.0, 0.0]):  # Σ_t A_t = r − V̂(s_0)
        assert out.advantages[i].sum().item() == pytest.approx(r - V[i, 0].item(), abs=1e-5)


def test_probability_equal_to_rho_is_not_a_cutpoint_and_is_masked():
    logps = torch.tensor([[math.log(0.5), math.log(0.4999), 0.0]], dtype=torch.float64)
    assert probability_mask(logps, torch.ones(1, 3), rho=0.5).tolist() == [[0.0, 1.0, 0.0]]
    # float32 log-probs: p and rho are compared at float32 precision, so p = rho still stays out
    assert probability_mask(torch.tensor([[0.9, 0.5]]).log(), torch.ones(1, 2), rho=0.9).tolist() == [[0.0, 1.0]]
    # rho = 1: p < 1 is a cutpoint, a certain token (log p = 0) is not
    assert probability_mask(torch.tensor([[-1e-6, 0.0]]), torch.ones(1, 2), rho=1.0).tolist() == [[1.0, 0.0]]


def test_one_segment_when_k_is_at_least_the_number_of_cutpoints():
    p = [0.99, 0.5, 0.97, 0.3, 0.2]
    seg, _, out = spo_chain([p], [1.0], lambda i, s: {1: 0.25}[s], k=3)
    assert seg.estimated_states.tolist() == [[False, True]]  # the leading segment, then one estimated state
    assert out.advantages[0].tolist() == [0, 0.75, 0, 0.75, 0.75]  # r − V̂(s_{c_0}) on every cutpoint token


def test_deterministic_policy_values_equal_reward_give_zero_advantages():
    torch.manual_seed(1)
    rows = [torch.rand(9).tolist() for _ in range(4)]
    rewards = [1.0, 0.0, 1.0, 0.0]
    _, _, out = spo_chain(rows, rewards, lambda i, s: rewards[i], rho=0.6, k=2)
    assert (out.advantages == 0).all()


# ── invariants against the slow reference ──────────────────────────────────────────────────────────────────────────
probs = st.floats(0.01, 1.0, allow_nan=False)
rows_strategy = st.lists(st.lists(probs, min_size=0, max_size=14), min_size=1, max_size=5)


@settings(max_examples=80, deadline=None)
@given(rows=rows_strategy, rho=st.sampled_from([0.3, 0.6, 0.9, 1.0]), k=st.integers(1, 4), data=st.data())
def test_matches_the_official_algorithm_loop_by_loop(rows, rho, k, data):
    rewards = [data.draw(st.sampled_from([0.0, 1.0, 0.5])) for _ in rows]
    table = {}

    def value_of(i, s):
        return table.setdefault((i, s), data.draw(st.floats(0, 1)))

    seg, batch, out = spo_chain(rows, rewards, value_of, rho=rho, k=k, mask_on=True)
    ref_adv, ref_mask, ref_states = spo_chain_reference(rows, rewards, lambda i, s: table[(i, s)], rho=rho, k=k)
    for i, row in enumerate(rows):
        estimated = [s for j, s in enumerate(segment_starts(seg.segment_ids)[i]) if seg.estimated_states[i, j]]
        assert estimated == ref_states[i]  # the same rollout states
        T = len(row)
        torch.testing.assert_close(out.advantages[i, :T].double(), torch.tensor(ref_adv[i], dtype=torch.float64),
                                   atol=1e-6, rtol=0)  # fmt: skip
        assert out.loss_mask[i, :T].tolist() == ref_mask[i] and (out.loss_mask[i, T:] == 0).all()
    # the official whitening over the masked tokens
    _, _, white = spo_chain(rows, rewards, lambda i, s: table[(i, s)], rho=rho, k=k, norm="batch")
    expected = whiten_reference(ref_adv, ref_mask)
    for i, row in enumerate(rows):
        torch.testing.assert_close(white.advantages[i, : len(row)].double(),
                                   torch.tensor(expected[i], dtype=torch.float64), atol=1e-4, rtol=1e-4)  # fmt: skip


@settings(max_examples=60, deadline=None)
@given(rows=rows_strategy, rho=st.sampled_from([0.5, 0.9, 1.0]), k=st.integers(1, 4), data=st.data())
def test_mask_off_is_segment_td0_through_compute_segment_gae_and_vineppo(rows, rho, k, data):
    assume(any(rows))  # compute_segment_gae needs T >= 1 (spo_chain itself handles T = 0)
    rewards = [data.draw(st.sampled_from([0.0, 1.0])) for _ in rows]
    seg, batch, out = spo_chain(rows, rewards, lambda i, s: data.draw(st.floats(0, 1)), rho=rho, k=k, mask_on=False)
    td0 = compute_segment_gae(batch.rewards, seg.segment_ids, batch.segment_values, gamma=1.0, lam=0.0)
    torch.testing.assert_close(out.advantages, td0.float())
    # "spo_chain" without mask and normalization == "vineppo" on the same segments and values
    vine = compute_vineppo_advantages(batch, vine_advantage_norm="none").advantages
    torch.testing.assert_close(out.advantages, vine)
    # telescoping: Σ over segments of A = r − V̂(first estimated state) (0 without cutpoint)
    for i, starts in enumerate(segment_starts(seg.segment_ids)):
        if not starts:
            continue
        total = sum(out.advantages[i, s].item() for s in starts)
        first = [j for j in range(len(starts)) if seg.estimated_states[i, j]]
        expected = rewards[i] - batch.segment_values[i, first[0]].item() if first else 0.0
        assert total == pytest.approx(expected, abs=1e-5)


def test_whitening_uses_loss_weights_as_frequency_weights():
    a = torch.tensor([0.3, -0.1, 0.7, 0.2])
    w = torch.tensor([2.0, 1.0, 0.0, 3.0])
    repeated = torch.tensor([0.3, 0.3, -0.1, 0.2, 0.2, 0.2])
    expected = (a - repeated.mean()) / torch.sqrt(repeated.var(unbiased=True) + 1e-8)
    torch.testing.assert_close(masked_whiten(a, w), expected)
    assert masked_whiten(a, torch.zeros(4)).tolist() == pytest.approx(a.tolist())  # nothing masked in: unchanged
    assert spo_normalize(a[None], w[None], "batch", 1)[0, 2] == 0  # zero outside the mask


def test_group_whitening_normalizes_each_group_over_its_masked_tokens():
    torch.manual_seed(2)
    rows = [torch.rand(8).tolist() for _ in range(4)]
    _, batch, out = spo_chain(rows, [1, 0, 0, 1], lambda i, s: torch.rand(()).item(), rho=0.7, k=2, norm="group", G=2)
    _, _, raw = spo_chain(rows, [1, 0, 0, 1], lambda i, s: batch.segment_values[i][
        segment_starts(batch.segment_ids)[i].index(s)].item(), rho=0.7, k=2, G=2)  # fmt: skip
    for g in range(2):
        m = out.loss_mask[2 * g : 2 * g + 2] > 0
        vals = out.advantages[2 * g : 2 * g + 2][m]
        if m.sum() > 1 and raw.advantages[2 * g : 2 * g + 2][m].std() > 1e-3:
            assert vals.mean().item() == pytest.approx(0.0, abs=1e-5)
            assert vals.std().item() == pytest.approx(1.0, abs=1e-3)


def test_unscorable_rows_get_zero_advantage_and_are_left_out_of_the_statistics():
    rows = [[0.5, 0.4, 0.3], [0.5, 0.2, 0.1], [0.3, 0.3, 0.3]]
    _, batch, out = spo_chain(rows, [1.0, float("nan"), 0.0], lambda i, s: 0.5, rho=0.9, k=1, norm="batch")
    assert (out.advantages[1] == 0).all()
    _, _, two = spo_chain([rows[0], rows[2]], [1.0, 0.0], lambda i, s: 0.5, rho=0.9, k=1, norm="batch")
    torch.testing.assert_close(out.advantages[[0, 2]], two.advantages)


def test_empty_rows_and_empty_batches():
    seg = cutpoint_boundaries(torch.zeros(2, 0), torch.zeros(2, 0), rho=0.9, k=2)
    assert seg.segment_ids.shape == (2, 0) and seg.estimated_states.tolist() == [[False], [False]]
    seg = cutpoint_boundaries(torch.zeros(0, 4), torch.zeros(0, 4))
    assert seg.segment_ids.shape == (0, 4) and seg.estimated_states.shape == (0, 1)
    _, _, out = spo_chain([[], [0.5, 0.5]], [1.0, 1.0], lambda i, s: 0.0, k=1)
    assert out.advantages[0].abs().sum() == 0 and out.metrics["spo_cutpoints_mean"] == 2


def test_spo_chain_is_registered_with_segments_and_mc_values():
    fn = ADVANTAGE_ESTIMATORS["spo_chain"]
    assert fn is compute_spo_chain_advantages
    assert fn.credit_requires == {"segments", "mc_values"} and not fn.credit_sequence_level
    assert fn.credit_segmentation == "cutpoints"


# ── bad inputs ─────────────────────────────────────────────────────────────────────────────────────────────────────
@pytest.mark.parametrize(
    "logps,mask,kwargs,match",
    [
        (torch.zeros(2, 3), torch.ones(2, 4), {}, "shape"),
        (torch.zeros(3), torch.ones(3), {}, "shape"),
        (torch.tensor([[float("nan"), -1.0]]), torch.ones(1, 2), {}, "NaN log-probability"),
        (torch.zeros(1, 2), torch.tensor([[0.0, 1.0]]), {}, "right-padded"),
        (torch.zeros(1, 2), torch.ones(1, 2), {"rho": 0.0}, r"\(0, 1\]"),
        (torch.zeros(1, 2), torch.ones(1, 2), {"rho": 1.5}, r"\(0, 1\]"),
        (torch.zeros(1, 2), torch.ones(1, 2), {"rho": float("nan")}, r"\(0, 1\]"),
        (torch.zeros(1, 2), torch.ones(1, 2), {"rho": True}, r"\(0, 1\]"),
        (torch.zeros(1, 2), torch.ones(1, 2), {"k": 0}, "integer >= 1"),
        (torch.zeros(1, 2), torch.ones(1, 2), {"k": 2.5}, "integer >= 1"),
        (torch.zeros(1, 2), torch.ones(1, 2), {"k": True}, "integer >= 1"),
    ],
)
def test_cutpoint_boundaries_rejects_bad_inputs(logps, mask, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cutpoint_boundaries(logps, mask, **kwargs)


def test_nan_log_probs_on_padding_are_ignored():
    seg = cutpoint_boundaries(torch.tensor([[-1.0, float("nan")]]), torch.tensor([[1.0, 0.0]]), k=1)
    assert seg.segment_ids.tolist() == [[0, -1]] and seg.cutpoint_mask.tolist() == [[1.0, 0.0]]


def test_estimator_rejects_missing_fields_and_bad_norms():
    base = dict(completion_ids=torch.zeros(1, 3, dtype=torch.long), completion_mask=torch.ones(1, 3),
                rewards=torch.tensor([1.0]), num_generations=1)  # fmt: skip
    with pytest.raises(ValueError, match="segment_ids"):
        compute_spo_chain_advantages(CreditBatch(**base))
    seg = dict(segment_ids=torch.zeros(1, 3, dtype=torch.long), segment_values=torch.tensor([[0.5]]))
    with pytest.raises(ValueError, match="cutpoint_mask"):
        compute_spo_chain_advantages(CreditBatch(**base, **seg))
    assert compute_spo_chain_advantages(CreditBatch(**base, **seg), spo_prob_mask=False).loss_mask is None
    with pytest.raises(ValueError, match="spo_advantage_norm"):
        compute_spo_chain_advantages(CreditBatch(**base, **seg), spo_prob_mask=False, spo_advantage_norm="std")
    with pytest.raises(ValueError, match="cutpoint_mask has shape"):
        CreditBatch(**base, cutpoint_mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match="estimated_states has shape"):
        CreditBatch(**base, estimated_states=torch.ones(2, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="shape"):
        masked_whiten(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="whole groups"):
        spo_normalize(torch.zeros(3, 2), torch.ones(3, 2), "group", 2)


# ── config ─────────────────────────────────────────────────────────────────────────────────────────────────────────
def make_config(**kwargs):
    from trl_credit import GRPOConfig

    base = dict(output_dir="/tmp/spo-config", advantage_estimator="spo_chain", use_cpu=True, report_to="none")
    base.update(kwargs)
    return GRPOConfig(**base)


def test_config_defaults_are_the_official_ones_and_documented():
    from trl_credit import GRPOConfig
    from trl_credit.configs import SPOArguments

    cfg = make_config()
    assert cfg.spo_cutpoint_threshold == 0.9 and cfg.spo_cutpoints_per_segment == 5 and cfg.spo_prob_mask is True
    assert cfg.spo_cutpoint_logps == "policy" and cfg.spo_advantage_norm == "batch"
    assert cfg.spo_tree_shape == [6, 6, 6] and cfg.spo_tree_segment_tokens == 100
    assert cfg.spo_tree_node_weighting is True and cfg.spo_tree_skip_zero_advantage is True
    assert cfg.needs_mc_values and cfg.uses_spo_cutpoints and cfg.credit_is_token_level
    fields = [f for f in SPOArguments.__dataclass_fields__]
    assert len(fields) == 9
    for name in fields:
        assert f"{name} (`" in SPOArguments.__doc__ and f"{name} (`" in GRPOConfig.__doc__
        assert SPOArguments.__dataclass_fields__[name].metadata["help"]
    assert make_config(advantage_estimator="grpo").uses_spo_cutpoints is False


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"spo_cutpoint_threshold": 0.0}, r"\(0, 1\]"),
        ({"spo_cutpoint_threshold": 1.01}, r"\(0, 1\]"),
        ({"spo_cutpoint_threshold": float("inf")}, r"\(0, 1\]"),
        ({"spo_cutpoint_threshold": float("nan")}, r"\(0, 1\]"),
        ({"spo_cutpoints_per_segment": 0}, "spo_cutpoints_per_segment must be an integer >= 1"),
        ({"spo_cutpoints_per_segment": 2.5}, "spo_cutpoints_per_segment must be an integer >= 1"),
        ({"spo_tree_segment_tokens": 0}, "spo_tree_segment_tokens must be an integer >= 1"),
        ({"spo_prob_mask": "yes"}, "spo_prob_mask must be True or False"),
        ({"spo_tree_node_weighting": 1}, "spo_tree_node_weighting must be True or False"),
        ({"spo_cutpoint_logps": "old"}, "spo_cutpoint_logps must be one of"),
        ({"spo_advantage_norm": "std"}, "spo_advantage_norm must be one of"),
        ({"spo_tree_shape": []}, "spo_tree_shape must be a non-empty list"),
        ({"spo_tree_shape": [6, 0]}, "spo_tree_shape must be a non-empty list"),
        ({"spo_tree_shape": [6, 2.5]}, "spo_tree_shape must be a non-empty list"),
        ({"spo_tree_shape": "6,6,6"}, "spo_tree_shape must be a non-empty list"),
        ({"spo_cutpoint_logps": "sampling"}, "use_vllm=False"),
        ({"macro_action": "ngram"}, "macro_action='ngram'"),
        ({"vine_boundary_stride": 2}, "spo_cutpoints_per_segment"),
        ({"importance_sampling_level": "sequence"}, "importance_sampling_level='sequence'"),
        ({"use_liger_kernel": True}, "use_liger_kernel"),
    ],
)
def test_config_rejects_bad_spo_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_config(**kwargs)


def test_spo_fields_are_validated_whatever_the_estimator():
    with pytest.raises(ValueError, match="spo_cutpoint_threshold"):
        make_config(advantage_estimator="grpo", spo_cutpoint_threshold=2.0)
    make_config(advantage_estimator="grpo", spo_cutpoint_logps="sampling")  # unused without SPO: no error


def test_tree_shape_checks_that_need_only_the_config():
    cfg = make_config(num_generations=8, max_completion_length=256)
    cfg.spo_tree_shape, cfg.spo_tree_segment_tokens = [6, 6, 6], 100
    cfg._validate_spo_tree_shape()  # 216 slots, 8 | 216; 2·100 < 256
    cfg.num_generations = 5
    with pytest.raises(ValueError, match="num_generations=5 must divide the tree's 216 leaf slots"):
        cfg._validate_spo_tree_shape()
    cfg.num_generations, cfg.spo_tree_segment_tokens = 8, 128
    with pytest.raises(ValueError, match=r"\(levels - 1\) \* spo_tree_segment_tokens must be < max_completion_length"):
        cfg._validate_spo_tree_shape()
    cfg.spo_tree_shape = [8]  # one level: the whole completion is the last level
    cfg._validate_spo_tree_shape()


def test_tree_shape_parses_from_the_command_line():
    from trl_credit.train import parse_args

    argv = ["--output_dir", "/tmp/spo-cli", "--use_cpu", "true", "--advantage_estimator", "spo_chain",
            "--spo_tree_shape", "4", "4", "2", "--spo_cutpoint_threshold", "0.8"]  # fmt: skip
    _, args, _ = parse_args(argv)
    assert args.spo_tree_shape == [4, 4, 2] and args.spo_cutpoint_threshold == 0.8


# ── the probability mask as a loss mask: TRL 1.16's `_compute_loss`, by hand, for every loss_type ─────────────────
LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "vespo", "luspo"]


def _hand_loss(trainer, loss_type, lp, old, ref, adv, M):
    """TRL 1.16's `_compute_loss` restated on the per-token log-probs `lp`, with `M = completion_mask * loss_mask`."""
    eps_lo, eps_hi, beta = trainer.epsilon_low, trainer.epsilon_high, trainer.beta
    log_ratio = lp - old
    if loss_type == "luspo":  # sequence-level ratio: the mean log-ratio over the tokens in the loss
        log_ratio = ((log_ratio * M).sum(-1) / M.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    ratio = torch.exp(log_ratio)
    if loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
        per_token = -torch.min(ratio * adv, ratio.clamp(1 - eps_lo, 1 + eps_hi) * adv)
    elif loss_type == "cispo":
        per_token = -ratio.clamp(max=eps_hi).detach() * adv * lp
    elif loss_type == "sapo":
        tau = torch.where(adv > 0, trainer.args.sapo_temperature_pos, trainer.args.sapo_temperature_neg)
        per_token = -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * adv
    elif loss_type == "vespo":
        a = trainer.args
        seq = (torch.clamp(lp - old, -20, 20) * M).sum(-1, keepdim=True)
        log_w = seq.clamp(math.log(1e-8), 20.0)
        k = torch.where(adv >= 0, a.vespo_k_pos, a.vespo_k_neg)
        lam = torch.where(adv >= 0, a.vespo_lambda_pos, a.vespo_lambda_neg).clamp(min=1e-4)
        phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(0.0, 0.0, 0.0).detach()
        per_token = -phi * adv * lp
    kl = torch.exp(ref - lp) - (ref - lp) - 1
    if trainer.args.use_bias_correction_kl:  # TRL 1.16's default: the KL is importance-weighted by the ratio
        kl = kl * ratio
    per_token = per_token + beta * kl
    if loss_type in ("grpo", "sapo"):
        return ((per_token * M).sum(-1) / M.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return (per_token * M).sum() / M.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return (per_token * M).sum() / (M.size(0) * trainer.max_completion_length)
    if loss_type == "luspo":
        return (per_token * M).sum(-1).mean()
    return (per_token * M).sum() / M.sum()  # dapo, cispo, vespo: num_items_in_batch (one process, no accumulation)


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_mask_leaves_the_loss_its_normalizer_and_the_kl_for_every_loss_type(tiny_model_dir, tmp_path, loss_type):
    from trl_credit import GRPOConfig, GRPOTrainer
    from trl_credit.testing import CPU_TEST_ARGS, length_reward, tiny_math_dataset

    extra = {"epsilon_high": 4.0} if loss_type == "cispo" else {}
    if loss_type == "luspo":  # sequence-level ratios exclude token-level credit: the mechanism is estimator-agnostic
        extra.update(advantage_estimator="grpo", importance_sampling_level="sequence")
    args = GRPOConfig(output_dir=str(tmp_path), loss_type=loss_type, beta=0.05, max_completion_length=8,
                      per_device_train_batch_size=3, num_generations=3, **{"advantage_estimator": "spo_chain",
                      **CPU_TEST_ARGS, **extra})  # fmt: skip
    trainer = GRPOTrainer(model=tiny_model_dir, reward_funcs=length_reward, args=args,
                          train_dataset=tiny_math_dataset(6))
    model = trainer.model
    model.train()
    trainer.current_gradient_accumulation_steps = 1
    g = torch.Generator().manual_seed(0)
    B, P, T = 3, 4, 6
    vocab = model.config.vocab_size
    out = {
        "prompt_ids": torch.randint(3, vocab, (B, P), generator=g), "prompt_mask": torch.ones(B, P, dtype=torch.long),
        "completion_ids": torch.randint(3, vocab, (B, T), generator=g),
        "completion_mask": torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 5 + [0]]),
        "advantages": torch.randn(B, T, generator=g),
    }  # fmt: skip
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    am = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
    with torch.no_grad():
        lp0 = trainer._get_per_token_logps_and_entropies(model, ids, am, T)[0]
    out["old_per_token_logps"] = lp0 + 0.3 * torch.randn(B, T, generator=g)  # ratios away from 1: some clipped
    out["ref_per_token_logps"] = lp0 + 0.5 * torch.randn(B, T, generator=g)
    out["num_items_in_batch"] = out["completion_mask"].sum()
    weights = torch.tensor([[1, 0, 1, 1, 0, 1], [0, 1, 0.5, 0, 1, 1], [0, 0, 1, 0, 0, 1.0]])  # 0.5: a loss weight
    trainer._apply_credit_loss_mask(out, weights)
    M = out["completion_mask"] * weights
    assert out["num_items_in_batch"].item() == pytest.approx(M.sum().item())  # the recomputed dapo normalizer
    assert torch.equal(out["completion_mask"] * out["tool_mask"], M)

    def loss_and_grads(fn):
        model.zero_grad()
        loss = fn()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    trl_loss, trl_grads = loss_and_grads(lambda: trainer._compute_loss(model, out))
    hand_loss, hand_grads = loss_and_grads(lambda: _hand_loss(
        trainer, loss_type, trainer._get_per_token_logps_and_entropies(model, ids, am, T)[0],
        out["old_per_token_logps"], out["ref_per_token_logps"], out["advantages"], M))  # fmt: skip
    torch.testing.assert_close(trl_loss, hand_loss, atol=1e-6, rtol=1e-5)
    assert trl_grads.keys() == hand_grads.keys() and trl_grads
    for name in trl_grads:
        torch.testing.assert_close(trl_grads[name], hand_grads[name], atol=1e-6, rtol=1e-4)
    assert trainer._metrics["train"]["kl"]  # the KL term ran (beta > 0) ...

    # ... and the masked tokens are out of it all: changing their advantages, old and reference log-probs (policy
    # loss, ratio, KL) leaves the loss unchanged, while the same change on a trained token moves it
    out_masked = dict(out, advantages=out["advantages"].clone(), old_per_token_logps=out["old_per_token_logps"].clone(),
                      ref_per_token_logps=out["ref_per_token_logps"].clone())  # fmt: skip
    off = M == 0
    out_masked["advantages"][off] += 3.0
    out_masked["old_per_token_logps"][off] -= 2.0
    out_masked["ref_per_token_logps"][off] += 2.0
    with torch.no_grad():
        assert trainer._compute_loss(model, out_masked).item() == pytest.approx(trl_loss.item(), abs=1e-6)
        out_masked["ref_per_token_logps"][0, 0] += 2.0  # a trained token
        assert trainer._compute_loss(model, out_masked).item() != pytest.approx(trl_loss.item(), abs=1e-6)


# ── training runs ──────────────────────────────────────────────────────────────────────────────────────────────────
def build_eos_prone_model(out_dir, scale=2.5):
    """The tiny random model with its EOS embedding turned towards the mean final hidden state, so that completions
    often end before the horizon (a random model almost never samples EOS, and a truncated completion scores the
    truncation penalty, which would leave every SPO advantage at 0)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_credit.testing import build_tiny_model

    out = Path(out_dir)
    if (out / "config.json").exists():
        return str(out)
    src = build_tiny_model(out.parent / "tiny_base")
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src)
    ids = torch.randint(3, len(tok), (64, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h = model.model(ids).last_hidden_state.reshape(-1, model.config.hidden_size)
        m = h.mean(0)
        direction = m / m.norm()
        model.model.embed_tokens.weight[tok.eos_token_id] = direction * scale / (h @ direction).mean()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def eos_model_dir(tmp_path_factory):
    return build_eos_prone_model(tmp_path_factory.mktemp("spo") / "eos_model")


def recording_trainer_class():
    from trl_credit import GRPOTrainer

    class RecordingSPOTrainer(GRPOTrainer):
        """Keeps, per generation batch, the log-probs the cutpoints came from, the segmentation, the MC values, the
        prefixes the rollouts continued, and what reached TRL's loss."""

        def __init__(self, *args, **kwargs):
            self.spo_records, self.rollout_prefixes = [], []
            super().__init__(*args, **kwargs)

        def _spo_segments(self, out, batch_fields):
            result = super()._spo_segments(out, batch_fields)
            logps, source = self._spo_local_logps(out)
            self.spo_records.append(dict(result, logps=logps.detach().clone(), source=source,
                                         mask=batch_fields["completion_mask"].clone(),
                                         batch={k: out[k].clone() for k in ("prompt_ids", "prompt_mask",
                                                "completion_ids", "completion_mask")}))  # fmt: skip
            return result

        def _vine_mc_values(self, out, ctx, batch_fields):
            result = super()._vine_mc_values(out, ctx, batch_fields)
            prompt_ids = [ids[m.bool()].tolist() for ids, m in zip(out["prompt_ids"], out["prompt_mask"])]
            self.spo_records[-1].update(values=result["segment_values"].clone(), rewards=result["rewards"].clone(),
                                        prompt_ids=prompt_ids, completion_ids=[list(c) for c in
                                        ctx["completion_ids_list"]], prefixes=self.rollout_prefixes)  # fmt: skip
            self.rollout_prefixes = []
            return result

        def _assign_credit(self, out, ctx):
            super()._assign_credit(out, ctx)
            rec = self.spo_records[-1]
            rec.update({k: out[k].detach().clone() for k in ("advantages", "tool_mask", "completion_mask") if k in out})
            rec["num_items_in_batch"] = float(out["num_items_in_batch"])

        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
            result = super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations)
            if num_generations == 1 and self.model.training:  # the group generation uses num_generations = G > 1
                self.rollout_prefixes.extend(map(tuple, prompt_ids))
            return result

    return RecordingSPOTrainer


def spo_train(model_dir, tmp_path, *, peft_config=None, **overrides):
    from trl_credit import GRPOConfig
    from trl_credit.testing import CPU_TEST_ARGS, shaped_math_reward, tiny_math_dataset

    kw = dict(output_dir=str(tmp_path), advantage_estimator="spo_chain", max_steps=2, per_device_train_batch_size=6,
              num_generations=3, max_completion_length=12, learning_rate=5e-2, **CPU_TEST_ARGS, seed=5,
              vine_num_rollouts=2, spo_cutpoint_threshold=0.004, spo_cutpoints_per_segment=2,
              vine_rollout_batch_size=64)  # fmt: skip
    kw.update(overrides)
    trainer = recording_trainer_class()(model=model_dir, reward_funcs=shaped_math_reward, args=GRPOConfig(**kw),
                                        train_dataset=tiny_math_dataset(24), peft_config=peft_config)  # fmt: skip
    trainer.train()
    return trainer


def check_spo_training(trainer, *, check_prefixes=True, expect_signal=True):
    """What every backend must satisfy on the recorded generation batches."""
    args = trainer.args
    batches = math.ceil(args.max_steps / args.num_iterations)  # one generation batch per num_iterations steps
    assert trainer.state.global_step == args.max_steps and len(trainer.spo_records) == batches
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len([h for h in logs if "credit/spo_mask_frac" in h]) == batches
    for h in logs:
        assert math.isfinite(h["loss"])
        if "credit/spo_mask_frac" not in h:
            continue
        for name in ("spo_cutpoints_mean", "spo_boundaries_mean", "spo_mask_frac", "spo_rows_without_cutpoint",
                     "spo_logps_extra_pass", "mc_unique_states", "mc_rollouts", "mc_tokens_ratio"):  # fmt: skip
            assert f"credit/{name}" in h, name
    trained_tokens, real_tokens, nonzero = 0.0, 0.0, 0
    for rec in trainer.spo_records:
        # the segmentation is cutpoint_boundaries of the recorded log-probs (one process: local = global rows)
        seg = cutpoint_boundaries(rec["logps"].float(), rec["mask"], args.spo_cutpoint_threshold,
                                  args.spo_cutpoints_per_segment)  # fmt: skip
        assert torch.equal(seg.cutpoint_mask, rec["cutpoint_mask"])
        assert torch.equal(seg.estimated_states, rec["estimated_states"])
        # the probability mask reached TRL's loss mask and its normalizer
        cut = rec["cutpoint_mask"][:, : rec["tool_mask"].size(1)]
        trained = rec["completion_mask"] * rec["tool_mask"]
        assert torch.equal(trained, rec["completion_mask"] * cut)
        assert rec["num_items_in_batch"] == pytest.approx(float(trained.sum()))
        assert (rec["advantages"][trained == 0] == 0).all()
        trained_tokens += float(trained.sum())
        real_tokens += float(rec["completion_mask"].sum())
        nonzero += int((rec["advantages"] != 0).sum())
        # Monte-Carlo values exactly at the boundary states, NaN at the others (back-filled: advantage 0)
        starts = segment_starts(rec["segment_ids"])
        for i, comp in enumerate(rec["completion_ids"]):
            if torch.isnan(rec["rewards"][i]):
                continue
            for j, s in enumerate(starts[i]):
                assert torch.isnan(rec["values"][i, j]).item() != bool(rec["estimated_states"][i, j]), (i, j)
        if check_prefixes:
            wanted = {tuple(rec["prompt_ids"][i] + rec["completion_ids"][i][:s]) for i in range(len(starts))
                      for j, s in enumerate(starts[i]) if rec["estimated_states"][i, j]}  # fmt: skip
            # every rollout continued a boundary state, every boundary state got rollouts (dedup: K per state)
            assert set(rec["prefixes"]) == wanted
            assert len(rec["prefixes"]) == args.vine_num_rollouts * len(wanted)
    if expect_signal:
        assert 0 < trained_tokens < real_tokens  # the mask is doing something in these runs
        assert nonzero > 0  # and the advantages are not all zero


@pytest.mark.slow
def test_spo_chain_trains_with_transformers_generation_and_lora(eos_model_dir, tmp_path):
    from peft import LoraConfig

    from trl_credit.generation.rollouts import TransformersRolloutBackend

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = spo_train(eos_model_dir, tmp_path, peft_config=lora)
    assert isinstance(trainer._vine_backend, TransformersRolloutBackend)
    check_spo_training(trainer)
    # aligned generation and optimizer steps: TRL computed no old log-probs, so the cutpoints took one no-grad pass
    assert all(rec["source"] == "policy_pass" for rec in trainer.spo_records)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all(h["credit/spo_logps_extra_pass"] == 1.0 for h in logs)
    lora_b = [p for n, p in trainer.model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # LoRA B starts at zero: the adapter trained


@pytest.mark.slow
def test_cutpoints_reuse_trls_old_log_probs_without_an_extra_pass(eos_model_dir, tmp_path):
    # num_iterations=2: TRL computes old_per_token_logps itself; SPO reads them (the official pi_old) for free
    trainer = spo_train(eos_model_dir, tmp_path, num_iterations=2, max_steps=4, spo_advantage_norm="group")
    check_spo_training(trainer)
    assert all(rec["source"] == "old_per_token_logps" for rec in trainer.spo_records)
    logs = [h for h in trainer.state.log_history if "credit/spo_logps_extra_pass" in h]
    assert len(logs) == 2 and all(h["credit/spo_logps_extra_pass"] == 0.0 for h in logs)


@pytest.mark.slow
def test_prob_mask_off_trains_every_token_with_its_segment_advantage(eos_model_dir, tmp_path):
    trainer = spo_train(eos_model_dir, tmp_path, max_steps=1, spo_prob_mask=False, spo_advantage_norm="none")
    rec = trainer.spo_records[0]
    assert "tool_mask" not in rec  # TRL's loss mask is left as it is
    adv = rec["advantages"]
    seg = rec["segment_ids"][:, : adv.size(1)]
    off_cut = (rec["cutpoint_mask"][:, : adv.size(1)] == 0) & (rec["completion_mask"] > 0)
    assert off_cut.any() and (adv[off_cut] != 0).any()  # tokens with p >= rho are trained too
    for i in range(adv.size(0)):  # one advantage per segment, on every token of it
        for j in range(int(seg[i].max()) + 1):
            assert adv[i][seg[i] == j].unique().numel() == 1


@pytest.mark.slow
def test_policy_pass_is_at_the_sampling_temperature_and_vine_max_steps_caps_the_states(eos_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    trainer = spo_train(eos_model_dir, tmp_path, max_steps=1, temperature=1.5, vine_max_steps=1,
                        max_completion_length=16, spo_cutpoint_threshold=0.01, spo_cutpoints_per_segment=1)
    rec = trainer.spo_records[0]
    assert rec["source"] == "policy_pass"
    # the log-probs of the first batch are those of the initial model, logits divided by the sampling temperature
    model = AutoModelForCausalLM.from_pretrained(eos_model_dir).eval()
    b = rec["batch"]
    ids = torch.cat([b["prompt_ids"], b["completion_ids"]], 1)
    with torch.no_grad():
        logits = model(ids, attention_mask=torch.cat([b["prompt_mask"], b["completion_mask"]], 1)).logits
    P, T = b["prompt_ids"].size(1), b["completion_ids"].size(1)
    expected = torch.log_softmax(logits[:, P - 1 : -1] / 1.5, -1).gather(-1, b["completion_ids"][..., None])[..., 0]
    real = b["completion_mask"].bool()
    torch.testing.assert_close(rec["logps"][real], expected[real], atol=1e-4, rtol=1e-4)
    # vine_max_steps=1: only the states of segments 0 and 1 are estimated, later segments are back-filled (NaN)
    starts = segment_starts(rec["segment_ids"])
    assert max(len(s) for s in starts) > 2  # the cap has something to cut
    for i, st_ in enumerate(starts):
        if torch.isnan(rec["rewards"][i]):
            continue
        for j in range(len(st_)):
            assert bool(torch.isnan(rec["values"][i, j])) == (j > 1 or not bool(rec["estimated_states"][i, j]))
    wanted = {tuple(rec["prompt_ids"][i] + rec["completion_ids"][i][:s]) for i, st_ in enumerate(starts)
              for j, s in enumerate(st_) if j <= 1 and rec["estimated_states"][i, j]}  # fmt: skip
    assert set(rec["prefixes"]) == wanted


def estimator_with_loss_mask(batch):
    """A custom estimator (tests): GRPO-like centered rewards on every token, its first token out of the loss."""
    centered = (batch.rewards - batch.rewards.nanmean()).nan_to_num(0.0)
    loss_mask = batch.mask.clone()
    loss_mask[:, 0] = 0
    from trl_credit.credit import CreditOutput

    return CreditOutput(advantages=centered[:, None] * loss_mask, loss_mask=loss_mask)


@pytest.mark.slow
def test_any_estimator_can_return_a_loss_mask(tiny_model_dir, tmp_path):
    from trl_credit import GRPOConfig, GRPOTrainer
    from trl_credit.testing import CPU_TEST_ARGS, length_reward, tiny_math_dataset

    seen = []

    class Recording(GRPOTrainer):
        def _assign_credit(self, out, ctx):
            super()._assign_credit(out, ctx)
            seen.append({k: out[k].clone() for k in ("tool_mask", "completion_mask", "num_items_in_batch")})

    args = GRPOConfig(output_dir=str(tmp_path), advantage_estimator="test_spo.estimator_with_loss_mask",
                      max_steps=1, per_device_train_batch_size=4, num_generations=4, max_completion_length=8,
                      **CPU_TEST_ARGS)  # fmt: skip
    trainer = Recording(model=tiny_model_dir, reward_funcs=length_reward, args=args, train_dataset=tiny_math_dataset(8))
    trainer.train()
    rec = seen[0]
    assert (rec["tool_mask"][:, 0] == 0).all() and (rec["tool_mask"][:, 1:] == 1).all()
    assert rec["num_items_in_batch"].item() == rec["completion_mask"][:, 1:].sum().item()


@pytest.mark.slow
def test_entropy_token_weights_compose_over_the_probability_mask(eos_model_dir, tmp_path):
    # 80/20 entropy mask on top of SPO: the top-rho entropy tokens are chosen among the tokens in the loss (the
    # cutpoints), and the weights multiply SPO's advantages
    trainer = spo_train(eos_model_dir, tmp_path, max_steps=1, token_weighting="entropy", entropy_mode="mask",
                        entropy_rho=0.5, spo_advantage_norm="none")  # fmt: skip
    rec = trainer.spo_records[0]
    trained = rec["completion_mask"] * rec["tool_mask"]
    assert torch.equal(trained, rec["completion_mask"] * rec["cutpoint_mask"][:, : trained.size(1)])
    nonzero = rec["advantages"] != 0
    assert (trained[nonzero] > 0).all()
    log = next(h for h in trainer.state.log_history if "loss" in h)
    assert 0.3 <= log["credit/frac_high_entropy"] <= 0.7  # about rho of the masked (in-loss) tokens
    assert nonzero.sum() < (trained > 0).sum()  # the entropy mask zeroed some cutpoint tokens


@pytest.mark.vllm
@pytest.mark.slow
def test_spo_chain_trains_with_vllm_colocate_on_sampling_log_probs(eos_model_dir, vllm_cpu_colocate, tmp_path):
    from peft import LoraConfig

    from trl_credit.generation.rollouts import VLLMColocateRolloutBackend

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = spo_train(eos_model_dir, tmp_path, peft_config=lora, use_vllm=True, vllm_mode="colocate",
                        vllm_max_model_length=256, spo_cutpoint_logps="sampling",
                        vllm_importance_sampling_correction=True)  # fmt: skip
    assert isinstance(trainer._vine_backend, VLLMColocateRolloutBackend)
    check_spo_training(trainer, check_prefixes=False)  # the direct vLLM path bypasses _generate_single_turn
    assert all(rec["source"] == "sampling_per_token_logps" for rec in trainer.spo_records)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all(h["credit/spo_logps_extra_pass"] == 0.0 and h["credit/spo_logps_nan"] == 0.0 for h in logs)
    # vLLM holds the synced weights: its sampling log-probs (the cutpoints' source) are the policy's
    assert all(h["sampling/sampling_logp_difference/max"] < 1e-3 for h in logs)


@pytest.mark.vllm
@pytest.mark.slow
def test_spo_chain_trains_with_vllm_server_on_trls_old_log_probs(tiny_model_dir, vllm_cpu_server,
                                                                 vllm_cpu_server_client, tmp_path):  # fmt: skip
    from trl_credit.generation.rollouts import TRLVLLMRolloutBackend

    # The session's server serves the tiny model, so the trainer trains that one; it almost never samples EOS, so
    # every completion is truncated and scored like its truncated rollouts (advantages 0): this run checks the plumbing
    # (segmentation, rollouts at the boundary states through the server, the loss mask), not the signal.
    trainer = spo_train(tiny_model_dir, tmp_path, use_vllm=True, vllm_mode="server",
                        vllm_server_base_url=vllm_cpu_server, vllm_importance_sampling_correction=True)  # fmt: skip
    assert isinstance(trainer._vine_backend, TRLVLLMRolloutBackend)
    check_spo_training(trainer, expect_signal=False)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    # the server samples from the trainer's weights at every step (the file sync reaches its packed kernels)
    assert all(h["sampling/sampling_logp_difference/max"] < 1e-3 for h in logs)
    # vLLM importance-sampling correction makes TRL compute old log-probs: SPO reads them, no extra pass
    assert all(rec["source"] == "old_per_token_logps" for rec in trainer.spo_records)


@pytest.mark.distributed
@pytest.mark.slow
def test_spo_chain_on_two_processes_with_a_group_straddling_the_ranks(eos_model_dir, tmp_path):
    from dist_utils import run_accelerate

    script = Path(__file__).parent / "scripts" / "spo_record.py"
    stdout = run_accelerate(script, eos_model_dir, tmp_path, num_processes=2)
    assert "world_size 2 steps 2" in stdout
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 2
    nonzero = 0
    for rec0, rec1 in zip(*ranks):
        # both ranks cut the same gathered batch and estimated the same values
        for key in ("logps", "segment_ids", "estimated_states", "cutpoint_mask", "rewards", "loss_mask"):
            assert torch.equal(rec0[key], rec1[key]), key
        assert torch.allclose(rec0["segment_values"], rec1["segment_values"], equal_nan=True)
        assert rec0["segment_ids"].size(0) == 6  # B = 3 per rank, G = 2: rows 2 and 3 straddle the ranks
        seg = cutpoint_boundaries(rec0["logps"], rec0["completion_mask_global"], 0.004, 2)
        assert torch.equal(seg.cutpoint_mask, rec0["cutpoint_mask"])
        # the estimator on the gathered batch gives what the two ranks trained on
        batch = CreditBatch(torch.zeros_like(rec0["vine_segment_ids"]), rec0["completion_mask_global"],
                            rec0["rewards"], 2, loss_mask=rec0["loss_mask"], segment_ids=rec0["vine_segment_ids"],
                            segment_values=rec0["segment_values"], cutpoint_mask=rec0["cutpoint_mask"])  # fmt: skip
        expected = compute_spo_chain_advantages(batch)
        T = rec0["segment_ids"].size(1)
        pad = lambda x: torch.nn.functional.pad(x, (0, T - x.size(1)))  # noqa: E731
        got = torch.cat([pad(rec0["advantages"]), pad(rec1["advantages"])])
        torch.testing.assert_close(got, expected.advantages, atol=1e-5, rtol=1e-5)
        nonzero += int(torch.count_nonzero(got))
        trained = torch.cat([pad(r["completion_mask"] * r["tool_mask"]) for r in (rec0, rec1)])
        assert torch.equal(trained, rec0["loss_mask"] * expected.loss_mask)
        # num_items_in_batch is the global count of trained tokens, the same on both ranks
        assert rec0["num_items_in_batch"] == rec1["num_items_in_batch"] == pytest.approx(float(trained.sum()))
    assert nonzero > 0  # the comparison is not between zeros
