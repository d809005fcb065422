"""TEMPO, GiGPO and GRPO math: the spec's test vectors, invariants, and the slow reference loops (hypothesis)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reference import gigpo_reference, grpo_reference, tempo_reference
from trl_credit.credit import (
    compute_gigpo_advantages,
    compute_grpo_advantages,
    compute_tempo_advantages,
    prefix_tree_values,
)


def pad(comps, pad_id=0):
    """Lists of real tokens -> (ids, mask) right-padded; pad_id deliberately collides with real token ids."""
    T = max(1, max(len(c) for c in comps))
    ids = torch.full((len(comps), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(comps), T, dtype=torch.long)
    for i, c in enumerate(comps):
        ids[i, : len(c)] = torch.tensor(c, dtype=torch.long)
        mask[i, : len(c)] = 1
    return ids, mask


def rows(adv, comps):
    return [adv[i, : len(c)].tolist() for i, c in enumerate(comps)]


def assert_rows_close(got, expected, tol=1e-6):
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g == pytest.approx(e, rel=tol, abs=tol)


SPEC_COMPS = [[1, 2, 3], [1, 2, 4], [1, 5], [6]]
SPEC_R = torch.tensor([1.0, 0.0, 1.0, 0.0])


def test_tempo_spec_worked_example_matches_paper_values():
    # tempo-gigpo.md A.7 item 5 (eps 1e-6 there; TRL's 1e-4 here changes the 4th decimal only)
    ids, mask = pad(SPEC_COMPS)
    adv = compute_tempo_advantages(ids, mask, SPEC_R, 4)
    expected = [[1.1547, 0.5773, 1.7320], [-0.5773, -1.1547, -1.7320], [1.1547, 1.4434], [-1.7320]]
    for got, exp in zip(rows(adv, SPEC_COMPS), expected):
        assert got == pytest.approx(exp, abs=5e-4)
    # and exactly with scale_rewards="none": the tree values of the spec
    adv = compute_tempo_advantages(ids, mask, SPEC_R, 4, scale_rewards="none")
    expected = [[0.5 + 1 / 6, 0.5 - 1 / 6, 1.0], [-0.5 + 1 / 6, -0.5 - 1 / 6, -1.0], [0.5 + 1 / 6, 0.5 + 1 / 3], [-1.0]]
    for got, exp in zip(rows(adv, SPEC_COMPS), expected):
        assert got == pytest.approx(exp, abs=1e-6)


def test_tempo_duplicates_get_identical_rows_and_shared_terminal_token_has_no_td():
    # tempo-gigpo.md A.7 item 6
    comps = [[7, 8, 9], [7, 8, 9], [7, 3, 9], [4, 9]]
    ids, mask = pad(comps)
    adv = compute_tempo_advantages(ids, mask, torch.tensor([1.0, 1.0, 0.0, 0.0]), 4)
    expected = [[1.1547, 1.4434, 0.8660]] * 2 + [[-0.5773, -2.0207, -0.8660], [-1.7320, -0.8660]]
    for got, exp in zip(rows(adv, comps), expected):
        assert got == pytest.approx(exp, abs=5e-4)
    assert torch.equal(adv[0], adv[1])


def test_tempo_first_tokens_all_distinct_only_position_zero_differs_from_grpo():
    # The corrected oracle (A.7 item 4): the prompt itself is a branching node.
    comps = [[1, 2, 3, 4], [2, 3, 4, 5], [3, 4, 5], [4, 5]]
    r = torch.tensor([1.0, 1.0, 0.0, 0.0])
    ids, mask = pad(comps)
    adv = compute_tempo_advantages(ids, mask, r, 4)
    grpo = compute_grpo_advantages(r, 4)
    for i, c in enumerate(comps):
        assert adv[i, 0].item() == pytest.approx(2 * grpo[i].item(), rel=1e-6)
        assert torch.equal(adv[i, 1 : len(c)], grpo[i].expand(len(c) - 1))
    assert adv[0, :4].tolist() == pytest.approx([1.732, 0.866, 0.866, 0.866], abs=1e-3)


def test_tempo_non_branch_tokens_equal_grpo_bit_for_bit():
    torch.manual_seed(0)
    for scale in ("group", "batch", "none"):
        ids = torch.randint(0, 3, (32, 12))
        mask = (torch.arange(12)[None] < torch.randint(1, 13, (32, 1))).long()
        r = torch.randint(0, 2, (32,)).float()
        adv = compute_tempo_advantages(ids, mask, r, 8, scale_rewards=scale)
        tree = prefix_tree_values(ids, mask, r, 8)
        grpo = compute_grpo_advantages(r, 8, scale)
        non_branch = tree.valid & ~tree.is_branch
        assert non_branch.any() and tree.is_branch.any()
        assert torch.equal(adv[non_branch], grpo[:, None].expand_as(adv)[non_branch])


def test_tempo_td_terms_telescope_to_reward_minus_group_mean():
    # Holds when the reward is a function of the completion and completions end with EOS (so no completion is a
    # strict prefix of another): V(last state) = r_i, V(root) = mu.
    torch.manual_seed(1)
    EOS = 9
    comps = [torch.randint(0, 3, (int(n),)).tolist() + [EOS] for n in torch.randint(0, 9, (24,))]
    r = torch.tensor([(sum(c) % 7) / 7 for c in comps])
    ids, mask = pad(comps)
    adv = compute_tempo_advantages(ids, mask, r, 6, scale_rewards="none")
    grpo = compute_grpo_advantages(r, 6, "none")
    td_sum = ((adv - grpo[:, None]) * mask).sum(1)
    mu = r.view(-1, 6).mean(1).repeat_interleave(6)
    assert torch.allclose(td_sum, r - mu, atol=1e-5)


def test_tempo_all_equal_rewards_give_zero_advantages():
    ids = torch.randint(0, 3, (8, 6))
    mask = torch.ones(8, 6, dtype=torch.long)
    for scale in ("group", "batch", "none"):
        assert torch.count_nonzero(compute_tempo_advantages(ids, mask, torch.ones(8), 4, scale_rewards=scale)) == 0


def test_tempo_is_permutation_equivariant_within_a_group_and_groups_do_not_mix():
    torch.manual_seed(2)
    ids = torch.randint(0, 3, (8, 7))
    mask = (torch.arange(7)[None] < torch.randint(1, 8, (8, 1))).long()
    r = torch.randint(0, 2, (8,)).float()
    adv = compute_tempo_advantages(ids, mask, r, 4)
    perm = torch.tensor([3, 1, 0, 2, 4, 5, 6, 7])
    adv_perm = compute_tempo_advantages(ids[perm], mask[perm], r[perm], 4)
    assert torch.allclose(adv_perm, adv[perm], atol=1e-6)
    # changing the second group leaves the first untouched
    r2 = r.clone()
    r2[4:] = 1 - r2[4:]
    assert torch.equal(compute_tempo_advantages(ids, mask, r2, 4)[:4], adv[:4])


def test_tempo_and_gigpo_groups_of_one_give_zero():
    ids, mask = pad([[1, 2, 3], [4, 5]])
    r = torch.tensor([1.0, 0.0])
    assert torch.count_nonzero(compute_tempo_advantages(ids, mask, r, 1)) == 0
    assert torch.count_nonzero(compute_gigpo_advantages(ids, mask, r, 1, scale_rewards="none")) == 0


def test_padding_is_zero_and_pad_id_colliding_with_real_tokens_does_not_merge_branches():
    # Row 1 is a strict prefix of row 0 and its padding id (2) equals row 0's next real token.
    comps = [[1, 2, 2], [1]]
    ids, mask = pad(comps, pad_id=2)
    r = torch.tensor([1.0, 0.0])
    adv = compute_tempo_advantages(ids, mask, r, 2, scale_rewards="none")
    assert adv[1, 1:].tolist() == [0.0, 0.0]
    # reference: after token 1, row 0 is alone -> V(child)=1, V(parent at [1])=0.5
    assert_rows_close(rows(adv, comps), tempo_reference(comps, [1.0, 0.0], 2, "none"), 1e-6)


def test_unscorable_completion_gets_zero_and_does_not_enter_tree_values():
    comps = [[1, 2], [1, 3], [1, 2], [4]]
    r = torch.tensor([1.0, float("nan"), 0.0, 1.0])
    ids, mask = pad(comps)
    for fn in (compute_tempo_advantages, compute_gigpo_advantages):
        adv = fn(ids, mask, r, 4)
        assert torch.isfinite(adv).all()
        assert torch.count_nonzero(adv[1]) == 0
    ref = tempo_reference(comps, r.tolist(), 4)
    assert_rows_close(rows(compute_tempo_advantages(ids, mask, r, 4), comps), ref, 1e-5)


def test_gigpo_spec_worked_example_mean_norm():
    # tempo-gigpo.md B.2
    ids, mask = pad(SPEC_COMPS)
    adv = compute_gigpo_advantages(ids, mask, SPEC_R, 4, scale_rewards="none", branch_only=False)
    expected = [[1.0, 0.8333, 1.0], [-1.0, -1.1667, -1.0], [1.0, 0.8333], [-1.0]]
    for got, exp in zip(rows(adv, SPEC_COMPS), expected):
        assert got == pytest.approx(exp, abs=1e-4)


def test_gigpo_official_mean_std_norm_divides_the_step_residual_by_its_own_step_group_std():
    # Issue 12 item 2: the official `step_norm_reward` divides r − mean(D(s)) by std(D(s)), not by the episode std.
    # Spec group, r = [1, 0, 1, 0], ungated, scale_rewards="group" (the episode std of mean_std_norm).
    ids, mask = pad(SPEC_COMPS)
    adv = compute_gigpo_advantages(ids, mask, SPEC_R, 4, scale_rewards="group", branch_only=False)
    assert adv[0, 2].item() == pytest.approx(1.5731, abs=5e-4)  # was 1.7318 with the episode std
    episode = 0.5 / (math.sqrt(1 / 3) + 1e-4)  # (r − μ) / (σ + 1e-4), σ = std([1, 0, 1, 0])
    root, one, one_two = math.sqrt(1 / 3), math.sqrt(1 / 3), math.sqrt(0.5)  # std of D(root), D(1), D(1, 2)
    expected = [
        [episode + 0.5 / (root + 1e-4), episode + (1 / 3) / (one + 1e-4), episode + 0.5 / (one_two + 1e-4)],
        [-episode - 0.5 / (root + 1e-4), -episode - (2 / 3) / (one + 1e-4), -episode - 0.5 / (one_two + 1e-4)],
        [episode + 0.5 / (root + 1e-4), episode + (1 / 3) / (one + 1e-4)],
        [-episode - 0.5 / (root + 1e-4)],
    ]
    assert_rows_close(rows(adv, SPEC_COMPS), expected, 1e-6)
    # The spec's values with the official epsilon (1e-6) agree to the fourth decimal.
    official = [[1.7320, 1.4434, 1.5731], [-1.7320, -2.0207, -1.5731], [1.7320, 1.4434], [-1.7320]]
    for got, exp in zip(rows(adv, SPEC_COMPS), official):
        assert got == pytest.approx(exp, abs=5e-4)
    assert_rows_close(rows(adv, SPEC_COMPS), gigpo_reference(SPEC_COMPS, SPEC_R.tolist(), 4, "group", 1.0, False))


def test_gigpo_step_norm_auto_follows_scale_rewards_and_explicit_modes_mix():
    ids, mask = pad(SPEC_COMPS)
    for scale, mode in (("group", "std"), ("batch", "std"), ("none", "none")):
        auto = compute_gigpo_advantages(ids, mask, SPEC_R, 4, scale, branch_only=False)
        explicit = compute_gigpo_advantages(ids, mask, SPEC_R, 4, scale, branch_only=False, step_norm=mode)
        assert torch.equal(auto, explicit)
    # episode std with a raw step residual: 0.866 + (1 − 0.5) at row 0, token 2
    mixed = compute_gigpo_advantages(ids, mask, SPEC_R, 4, "group", branch_only=False, step_norm="none")
    assert mixed[0, 2].item() == pytest.approx(0.5 / (math.sqrt(1 / 3) + 1e-4) + 0.5, abs=1e-6)
    # raw episode term with the step group's std: 0.5 + 0.5 / std([1, 0])
    mixed = compute_gigpo_advantages(ids, mask, SPEC_R, 4, "none", branch_only=False, step_norm="std")
    assert mixed[0, 2].item() == pytest.approx(0.5 + 0.5 / (math.sqrt(0.5) + 1e-4), abs=1e-6)
    with pytest.raises(ValueError, match="gigpo_step_norm"):
        compute_gigpo_advantages(ids, mask, SPEC_R, 4, step_norm="group")


def test_gigpo_step_groups_of_one_or_without_spread_stay_finite_and_carry_no_step_term():
    # Row 2 and 3 share token 7 but have equal rewards: their step group has std 0 and residual 0 (no 0/0, no 1e4).
    comps = [[1, 2], [1, 3], [7, 8], [7, 9], [5]]
    r = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    ids, mask = pad(comps)
    for scale in ("group", "batch", "none"):
        adv = compute_gigpo_advantages(ids, mask, r, 5, scale, branch_only=False, step_norm="std")
        assert torch.isfinite(adv).all()
        grpo = compute_grpo_advantages(r, 5, scale)
        assert torch.equal(adv[2:4, 1], grpo[2:4])  # D((7,)) = rows 2, 3 with equal rewards: episode term only
        assert_rows_close(rows(adv, comps), gigpo_reference(comps, r.tolist(), 5, scale, 1.0, False, step_norm="std"))
    # a group of one completion: no step group to normalize against, advantage 0
    ids, mask = pad([[1, 2, 3], [4, 5]])
    assert torch.count_nonzero(compute_gigpo_advantages(ids, mask, torch.tensor([1.0, 0.0]), 1, "group")) == 0


def test_gigpo_step_norm_reaches_the_estimator_from_the_config(tmp_path):
    from trl_credit import GRPOConfig
    from trl_credit.credit import CreditBatch, call_estimator, get_advantage_estimator

    ids, mask = pad(SPEC_COMPS)
    batch = CreditBatch(completion_ids=ids, completion_mask=mask, rewards=SPEC_R, num_generations=4)
    fn = get_advantage_estimator("gigpo")
    kw = dict(output_dir=str(tmp_path), advantage_estimator="gigpo", gigpo_branch_only=False, report_to="none",
              use_cpu=True)  # fmt: skip
    args = GRPOConfig(**kw)
    assert args.gigpo_step_norm == "auto" and "gigpo_step_norm (`str`" in GRPOConfig.__doc__
    assert call_estimator(fn, batch, args).advantages[0, 2].item() == pytest.approx(1.5731, abs=5e-4)
    args = GRPOConfig(**kw, gigpo_step_norm="none")
    assert call_estimator(fn, batch, args).advantages[0, 2].item() == pytest.approx(1.3659, abs=5e-4)
    with pytest.raises(ValueError, match="gigpo_step_norm must be one of"):
        GRPOConfig(**kw, gigpo_step_norm="mean_std_norm")


def test_gigpo_branch_gate_removes_the_step_term_on_shared_non_branch_tokens():
    comps = [[7, 8, 5], [7, 8, 6], [7, 3], [7, 4]]
    r = [1.0, 0.0, 1.0, 0.0]
    ids, mask = pad(comps)
    gated = compute_gigpo_advantages(ids, mask, torch.tensor(r), 4, scale_rewards="none")
    ungated = compute_gigpo_advantages(ids, mask, torch.tensor(r), 4, scale_rewards="none", branch_only=False)
    # every completion starts with 7: token 0 is not a branch token, but its state (the root) has mixed rewards
    assert gated[0, 0].item() == pytest.approx(0.5)  # episode term only
    assert ungated[0, 0].item() == pytest.approx(0.5 + (1 - 0.5))
    assert_rows_close(rows(gated, comps), gigpo_reference(comps, r, 4, "none"))
    assert_rows_close(rows(ungated, comps), gigpo_reference(comps, r, 4, "none", branch_only=False))


def test_gigpo_step_weight_zero_is_grpo():
    ids = torch.randint(0, 3, (8, 5))
    mask = torch.ones(8, 5, dtype=torch.long)
    r = torch.tensor([1.0, 0, 1, 1, 0, 0, 1, 0])
    adv = compute_gigpo_advantages(ids, mask, r, 4, step_weight=0.0)
    assert torch.equal(adv, compute_grpo_advantages(r, 4)[:, None].expand(8, 5))


def test_grpo_matches_reference_for_every_scale_and_zeroes_unscorable_rows():
    r = torch.tensor([1.0, 0.0, 0.5, float("nan"), 2.0, 2.0, 2.0, 2.0])
    for scale in ("group", "batch", "none"):
        got = compute_grpo_advantages(r, 4, scale)
        assert got.tolist() == pytest.approx(grpo_reference(r.tolist(), 4, scale), abs=1e-6)
        assert got[3] == 0 and torch.count_nonzero(got[4:]) == 0


def test_grpo_rejects_unknown_scale():
    with pytest.raises(ValueError, match="scale_rewards must be one of"):
        compute_grpo_advantages(torch.ones(4), 2, "per_token")


comps_strategy = st.lists(st.lists(st.integers(0, 3), min_size=0, max_size=6), min_size=2, max_size=8)


@settings(max_examples=150, deadline=None)
@given(
    comps=comps_strategy,
    data=st.data(),
    scale=st.sampled_from(["group", "batch", "none"]),
    coef=st.sampled_from([1.0, 0.5]),
    step_norm=st.sampled_from(["auto", "std", "none"]),
)
def test_tempo_and_gigpo_equal_the_reference_loops_on_random_groups(comps, data, scale, coef, step_norm):
    G = len(comps)
    comps = comps + data.draw(st.lists(st.lists(st.integers(0, 3), max_size=6), min_size=G, max_size=G))
    rewards = data.draw(
        st.lists(st.sampled_from([0.0, 1.0, 0.5, math.nan]), min_size=len(comps), max_size=len(comps))
    )
    ids, mask = pad(comps, pad_id=data.draw(st.integers(0, 3)))
    r = torch.tensor(rewards)
    adv = compute_tempo_advantages(ids, mask, r, G, scale_rewards=scale, branch_td_coef=coef)
    assert_rows_close(rows(adv, comps), tempo_reference(comps, rewards, G, scale, coef), 1e-4)
    assert torch.count_nonzero(adv[mask == 0]) == 0
    for branch_only in (True, False):
        adv = compute_gigpo_advantages(ids, mask, r, G, scale, coef, branch_only, step_norm=step_norm)
        ref = gigpo_reference(comps, rewards, G, scale, coef, branch_only, step_norm=step_norm)
        assert_rows_close(rows(adv, comps), ref, 1e-4)
