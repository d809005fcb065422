"""The "vineppo" estimator: the spec's invariants on step advantages, interpolation of strided states, normalization,
registration and config validation."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trl_credit.credit import CreditBatch, get_advantage_estimator
from trl_credit.credit.steps import boundaries_to_segment_ids
from trl_credit.credit.vineppo import compute_vineppo_advantages, interpolate_state_values, segment_starts


NAN = float("nan")


def make_batch(rewards, boundaries, values, num_generations=1, width=None, loss_mask=None):
    width = width or max(b[-1] for b in boundaries)
    seg = boundaries_to_segment_ids(boundaries, width)
    mask = (seg >= 0).float()
    S = max(len(v) for v in values)
    sv = torch.tensor([list(v) + [NAN] * (S - len(v)) for v in values], dtype=torch.float32)
    return CreditBatch(
        completion_ids=torch.zeros_like(seg),
        completion_mask=mask,
        rewards=torch.tensor(rewards, dtype=torch.float32),
        num_generations=num_generations,
        loss_mask=loss_mask,
        segment_ids=seg,
        segment_values=sv,
    )


def step_advantages(adv_row, bounds):
    return [adv_row[a].item() for a in bounds[:-1]]


def test_telescoping_example_from_the_spec():
    batch = make_batch([1.0], [[0, 1, 2, 3, 4, 5]], [[0.4, 0.6, 0.2, 0.9, 0.7]])
    adv = compute_vineppo_advantages(batch, vine_advantage_norm="none").advantages
    assert adv[0].tolist() == pytest.approx([0.2, -0.4, 0.7, -0.2, 0.3], abs=1e-6)
    assert adv[0].sum().item() == pytest.approx(1 - 0.4, abs=1e-6)


def test_cap_back_fills_with_the_reward_to_go():
    # cap = 2: states s_0..s_2 estimated; the step ending at the cap gets r - V(s_2), later steps 0
    batch = make_batch([0.0], [[0, 2, 4, 6, 8, 10]], [[0.4, 0.6, 0.2, NAN, NAN]])
    adv = compute_vineppo_advantages(batch, vine_advantage_norm="none").advantages
    assert step_advantages(adv[0], [0, 2, 4, 6, 8, 10]) == pytest.approx([0.2, -0.4, -0.2, 0.0, 0.0], abs=1e-6)
    assert adv[0].sum().item() / 2 == pytest.approx(0.0 - 0.4, abs=1e-6)  # two tokens per step


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.integers(1, 4), min_size=1, max_size=8),
    st.floats(0, 1),
    st.data(),
)
def test_step_advantages_telescope_and_the_last_step_uses_the_reward(lengths, reward, data):
    S = len(lengths)
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    values = data.draw(st.lists(st.floats(0, 1), min_size=S, max_size=S))
    cap = data.draw(st.one_of(st.none(), st.integers(0, S)))
    if cap is not None:
        values = [v if k <= cap else NAN for k, v in enumerate(values)]
    batch = make_batch([reward], [bounds], [values], width=bounds[-1] + 2)
    adv = compute_vineppo_advantages(batch, vine_advantage_norm="none").advantages[0]
    a = step_advantages(adv, bounds)
    assert sum(a) == pytest.approx(reward - values[0], abs=1e-5)
    last_estimated = max(k for k, v in enumerate(values) if not math.isnan(v))
    # the last step, or the step ending at the cap (back-filled V = r after it), gets r - V
    assert a[last_estimated] == pytest.approx(reward - values[last_estimated], abs=1e-5)
    assert all(x == pytest.approx(0.0, abs=1e-6) for x in a[last_estimated + 1 :])
    # every token of a step shares its advantage; padding is 0
    for k, (s, e) in enumerate(zip(bounds, bounds[1:])):
        assert torch.allclose(adv[s:e], torch.full((e - s,), a[k]))
    assert (adv[bounds[-1] :] == 0).all()


def test_single_step_completion_gets_reward_minus_root_value():
    batch = make_batch([1.0, 0.0], [[0, 3], [0, 2]], [[0.25], [0.25]], num_generations=2, width=4)
    adv = compute_vineppo_advantages(batch, vine_advantage_norm="none").advantages
    torch.testing.assert_close(adv, torch.tensor([[0.75, 0.75, 0.75, 0.0], [-0.25, -0.25, 0.0, 0.0]]))


def test_identical_rewards_and_exact_values_give_zero_before_normalization():
    # a trivially easy prompt: every rollout and every completion succeeds, so every V = r = 1
    bounds = [[0, 2, 5], [0, 3, 4, 6]]
    batch = make_batch([1.0, 1.0], bounds, [[1.0, 1.0], [1.0, 1.0, 1.0]], num_generations=2)
    out = compute_vineppo_advantages(batch, vine_advantage_norm="none")
    assert (out.advantages == 0).all() and out.metrics["vine_nonzero_frac"] == 0.0
    # whitening keeps all-zero advantages at 0 (no spread to amplify)
    assert (compute_vineppo_advantages(batch, vine_advantage_norm="batch").advantages == 0).all()


def test_batch_whitening_has_zero_mean_unit_std_and_keeps_padding_and_unscorable_rows_at_zero():
    bounds = [[0, 2, 5], [0, 3, 4, 6], [0, 1, 4], [0, 4]]
    values = [[0.5, 0.9], [0.2, 0.6, 0.1], [0.7, 0.3], [0.4]]
    batch = make_batch([1.0, 0.0, 1.0, NAN], bounds, values, num_generations=2, width=8)
    adv = compute_vineppo_advantages(batch, vine_advantage_norm="batch").advantages
    valid = (batch.segment_ids >= 0) & ~torch.isnan(batch.rewards)[:, None]
    assert adv[valid].mean().item() == pytest.approx(0.0, abs=1e-6)
    assert adv[valid].std().item() == pytest.approx(1.0, abs=1e-4)
    assert (adv[~valid] == 0).all() and (adv[3] == 0).all()


def test_group_whitening_normalizes_each_group_and_respects_the_loss_mask():
    bounds = [[0, 2, 5], [0, 3, 4, 6], [0, 1, 4], [0, 4]]
    values = [[0.5, 0.9], [0.2, 0.6, 0.1], [0.7, 0.3], [0.4]]
    loss_mask = (boundaries_to_segment_ids(bounds, 6) >= 0).float()
    loss_mask[1, 5] = 0  # e.g. a tool token
    batch = make_batch([1.0, 0.0, 1.0, 0.0], bounds, values, num_generations=2, width=6, loss_mask=loss_mask)
    adv = compute_vineppo_advantages(batch, vine_advantage_norm="group").advantages
    for g in range(2):
        m = loss_mask[2 * g : 2 * g + 2] > 0
        a = adv[2 * g : 2 * g + 2][m]
        assert a.mean().item() == pytest.approx(0.0, abs=1e-6) and a.std().item() == pytest.approx(1.0, abs=1e-4)
    assert adv[1, 5] == 0


def test_interpolation_of_strided_states_is_linear_in_tokens_and_keeps_telescoping():
    bounds = [0, 1, 4, 6, 7, 10]  # 5 steps of uneven length
    seg = boundaries_to_segment_ids([bounds], 10)
    values = torch.tensor([[0.2, NAN, 0.8, NAN, NAN]])
    filled = interpolate_state_values(seg, values, torch.tensor([0.0]), torch.tensor([[0, 1, 0, 1, 1]]).bool())
    # s_1 at token 1 between s_0 (token 0, 0.2) and s_2 (token 4, 0.8); s_3, s_4 between s_2 and the end (token 10, r=0)
    assert filled[0].tolist() == pytest.approx([0.2, 0.35, 0.8, 0.8 * 4 / 6, 0.8 * 3 / 6])
    batch = make_batch([0.0], [bounds], [filled[0].tolist()])
    a = step_advantages(compute_vineppo_advantages(batch, vine_advantage_norm="none").advantages[0], bounds)
    assert sum(a) == pytest.approx(0.0 - 0.2, abs=1e-6)


def test_interpolation_stops_at_the_cap_anchor():
    # stride 2, cap 2: s_0, s_2 estimated, s_1 interpolated, s_3 back-filled (its position anchors with value r)
    bounds = [0, 2, 4, 6, 8]
    seg = boundaries_to_segment_ids([bounds], 8)
    values = torch.tensor([[0.0, NAN, 1.0, NAN]])
    filled = interpolate_state_values(seg, values, torch.tensor([1.0]), torch.tensor([[0, 1, 0, 0]]).bool())
    assert filled[0, :3].tolist() == pytest.approx([0.0, 0.5, 1.0]) and math.isnan(filled[0, 3])
    assert segment_starts(seg, 4)[0].tolist() == [0, 2, 4, 6]


def test_vineppo_is_registered_and_needs_mc_values_at_segment_boundaries():
    fn = get_advantage_estimator("vineppo")
    assert fn is compute_vineppo_advantages
    # "segments": macro_action, when set, chooses the states (prepared before the Monte-Carlo values)
    assert fn.credit_requires == {"segments", "mc_values"} and not fn.credit_sequence_level
    batch = make_batch([1.0], [[0, 2]], [[0.5]])
    with pytest.raises(ValueError, match="mc_values"):
        fn(CreditBatch(batch.completion_ids, batch.completion_mask, batch.rewards, 1))
    with pytest.raises(ValueError, match="vine_advantage_norm"):
        fn(batch, vine_advantage_norm="whiten")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"vine_num_rollouts": 0}, "vine_num_rollouts"),
        ({"step_split": "sentences"}, "step_split"),
        ({"vine_advantage_norm": "std"}, "vine_advantage_norm"),
        ({"vine_max_steps": -1}, "vine_max_steps"),
        ({"vine_boundary_stride": 0}, "vine_boundary_stride"),
        ({"vine_adaptive_k": True, "vine_adaptive_k_min": 9}, "vine_adaptive_k_min"),
        ({"vine_truncation_penalty": float("inf")}, "vine_truncation_penalty"),
        ({"generation_kwargs": {"max_tokens": 5}}, "budget"),
    ],
)
def test_config_rejects_invalid_vineppo_settings(tmp_path, kwargs, message):
    from trl_credit import GRPOConfig

    with pytest.raises(ValueError, match=message):
        GRPOConfig(output_dir=str(tmp_path), advantage_estimator="vineppo", use_cpu=True, report_to="none", **kwargs)


def test_config_defaults_are_the_papers_and_documented(tmp_path):
    from trl_credit import GRPOConfig

    args = GRPOConfig(output_dir=str(tmp_path), advantage_estimator="vineppo", use_cpu=True, report_to="none")
    assert (args.vine_num_rollouts, args.vine_max_steps, args.vine_boundary_stride) == (9, None, 1)
    assert not args.vine_tree_reuse and not args.vine_adaptive_k and args.vine_advantage_norm == "batch"
    assert args.needs_mc_values and "> Parameters that control VinePPO" in GRPOConfig.__doc__
    assert not GRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none").needs_mc_values


# ── truncation: one rule for training completions and Monte-Carlo rollouts (issue 12, item 3) ─────────────────────
def test_a_truncated_completion_gets_the_truncation_penalty_as_a_truncated_rollout_does():
    from trl_credit.credit.vineppo import apply_truncation_penalty

    comps = [[5, 6, 2], [5, 6, 7], [5, 2], [], [5, 6, 7], [5, 6, 7, 8]]
    rewards = torch.tensor([1.0, 1.0, 0.3, 0.7, NAN, 0.2])
    out, truncated = apply_truncation_penalty(rewards, comps, 3, [2], truncation_penalty=-0.5)
    # ends in EOS at the horizon: finished; no EOS at the horizon (or beyond): truncated; shorter: finished
    assert truncated.tolist() == [False, True, False, False, True, True]
    assert out[[0, 1, 2, 3, 5]].tolist() == [1.0, -0.5, pytest.approx(0.3), pytest.approx(0.7), -0.5]
    assert math.isnan(out[4])  # unscorable stays unscorable (advantage 0)
    # the same rule VinePlan applies to a completion used as a free sample of a state's value (tree reuse)
    from trl_credit.generation.rollouts import VinePlan

    plan = VinePlan([[1]] * 6, comps, [[0]] * 6, torch.zeros(6, 1, dtype=torch.bool), rewards, [0] * 6,
                    max_completion_length=3, num_rollouts=1, tree_reuse=True, truncation_penalty=-0.5,
                    eos_token_ids=[2])  # fmt: skip
    assert plan.sample_values[:4] == pytest.approx(out[:4].tolist()) and plan.sample_values[5] == -0.5
    with pytest.raises(ValueError, match="completions for"):
        apply_truncation_penalty(rewards, comps[:2], 3, [2])


@pytest.mark.slow
def test_constant_reward_with_truncated_completions_and_rollouts_gives_zero_advantages(tiny_model_dir, tmp_path):
    # EOS suppressed: every completion and every rollout hits the horizon. The reward function says 1 for all of them,
    # but a truncated rollout is worth vine_truncation_penalty (0); the training completion must be too, or
    # A_{S-1} = 1 − V̂ = 1 and whitening spreads |A| up to ~2 over a policy that should not move.
    from trl_credit import GRPOConfig, GRPOTrainer
    from trl_credit.testing import CPU_TEST_ARGS, build_tokenizer, tiny_math_dataset

    seen = []

    class Recording(GRPOTrainer):
        def _assign_credit(self, out, ctx):
            super()._assign_credit(out, ctx)
            seen.append((out["advantages"].clone(), [len(c) for c in ctx["completion_ids_list"]]))

    eos = build_tokenizer().eos_token_id
    args = GRPOConfig(
        output_dir=str(tmp_path), advantage_estimator="vineppo", max_steps=2, per_device_train_batch_size=4,
        num_generations=2, max_completion_length=8, learning_rate=5e-2, seed=0, vine_num_rollouts=2,
        step_split="token_chunks", vine_chunk_tokens=3, generation_kwargs={"suppress_tokens": [eos]}, **CPU_TEST_ARGS,
    )  # fmt: skip
    trainer = Recording(model=tiny_model_dir, reward_funcs=lambda completions, **kw: [1.0] * len(completions),
                        args=args, train_dataset=tiny_math_dataset(8))  # fmt: skip
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    assert len(seen) == 2
    for advantages, lengths in seen:
        assert lengths and all(n == 8 for n in lengths)  # every completion truncated
        assert torch.count_nonzero(advantages) == 0
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all(h["credit/mc_truncation_rate"] == 1.0 and h["credit/vine_truncated_completions"] == 1.0 for h in logs)
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, trainer.model.parameters()))  # the policy stayed
