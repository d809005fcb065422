"""SPO-tree: the spec's tree vectors and invariants (replication = the official mean of children, telescoping, node
weights, the official edge filter), the tree sampler of the rollout engine, bad inputs, and training through every
generation backend."""

import math
import subprocess
import sys
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reference import spo_tree_reference
from trl_credit.credit import (
    ADVANTAGE_ESTIMATORS,
    CreditBatch,
    compute_spo_tree_advantages,
    tree_node_counts,
    tree_node_values,
    tree_paths_tensor,
    tree_segment_ids,
    tree_slot_leaves,
)
from trl_credit.generation.rollouts import (
    BernoulliChainPolicy,
    Collective,
    run_tree_rollouts,
    validate_tree_shape,
)


# ── helpers ────────────────────────────────────────────────────────────────────────────────────────────────────────
def slot_batch(shape, leaf_rewards, seg_tokens=2, last_tokens=3, cutpoint_mask=None, trained=None):
    """The `CreditBatch` of one tree (every slot trained, or the slots in `trained`): slots in lexicographic order,
    `seg_tokens` tokens per inner segment, `last_tokens` in a leaf's last segment."""
    leaves = sorted(leaf_rewards)
    slots = [leaves[i] for i in tree_slot_leaves(leaves, shape)]
    rows = slots if trained is None else [slots[k] for k in trained]
    lengths = [[seg_tokens] * (len(p) - 1) + [last_tokens] for p in rows]
    T = max(sum(x) for x in lengths) + 1
    seg = tree_segment_ids(lengths, T)
    mask = (seg >= 0).float()
    fields = dict(
        completion_ids=torch.zeros_like(seg),
        completion_mask=mask,
        rewards=torch.tensor([float(leaf_rewards[p]) for p in rows]),
        num_generations=len(rows),
        segment_ids=seg,
        tree_paths=tree_paths_tensor(rows, len(shape)),
        cutpoint_mask=cutpoint_mask if cutpoint_mask is not None else mask,
    )
    if trained is not None:  # values from every slot of the tree, as the trainer passes them
        all_paths = tree_paths_tensor(slots, len(shape))
        values = tree_node_values(torch.tensor([float(leaf_rewards[p]) for p in slots]), all_paths, len(slots))
        fields["segment_values"] = values[trained]
    return CreditBatch(**fields), rows, lengths


def segment_advantage(adv_row, lengths, d):
    return adv_row[sum(lengths[:d])].item()


PAPER_TREE = {(a, b): r for a, row in enumerate([[1, 0, 1], [1, 1, 1], [0, 0, 0]]) for b, r in enumerate(row)}


# ── the spec's vectors (§11-5, §11-6) ──────────────────────────────────────────────────────────────────────────────
def test_paper_tree_figure_gives_the_spec_values_advantages_and_node_weights():
    batch, rows, lengths = slot_batch((3, 3), PAPER_TREE)
    values = tree_node_values(batch.rewards, batch.tree_paths, 9)
    assert values[:, 0].tolist() == pytest.approx([5 / 9] * 9)
    assert values[[0, 3, 6], 1].tolist() == pytest.approx([2 / 3, 1.0, 0.0])
    out = compute_spo_tree_advantages(batch, spo_prob_mask=False, spo_advantage_norm="none",
                                      spo_tree_skip_zero_advantage=False)  # fmt: skip
    adv = out.advantages
    level0 = [segment_advantage(adv[i], lengths[i], 0) for i in (0, 3, 6)]
    assert level0 == pytest.approx([1 / 9, 4 / 9, -5 / 9], abs=1e-6)
    level1 = [segment_advantage(adv[i], lengths[i], 1) for i in range(9)]
    assert level1 == pytest.approx([1 / 3, -2 / 3, 1 / 3, 0, 0, 0, 0, 0, 0], abs=1e-6)
    # slot 1, path (0, 1): 1/9 on segment 0 with node weight 1/3, −2/3 on segment 1 with weight 1
    assert adv[1, :2].tolist() == pytest.approx([1 / 9] * 2, abs=1e-6)
    assert out.loss_mask[1, :5].tolist() == pytest.approx([1 / 3, 1 / 3, 1, 1, 1])
    # each node trained once: the weighted advantage mass is 0 (siblings sum to 0)
    assert (adv * out.loss_mask).sum().item() == pytest.approx(0.0, abs=1e-6)
    # the official edge filter keeps 6 of the 12 edges (the 6 zero-advantage leaves under nodes 1 and 2 are dropped)
    kept = compute_spo_tree_advantages(batch, spo_prob_mask=False, spo_advantage_norm="none")
    nodes = {(tuple(rows[i][: d + 1])) for i in range(9) for d in range(2)
             if kept.loss_mask[i, sum(lengths[i][:d])] > 0}  # fmt: skip
    assert len(nodes) == 6 and kept.metrics["spo_tree_nonzero_adv_frac"] == pytest.approx(6 / 12)
    _, reference = spo_tree_reference(PAPER_TREE)
    assert nodes == {node for node, a in reference.items() if a != 0}


def test_early_leaf_is_replicated_and_weighs_like_an_expanded_sibling():
    # shape (2, 2): child 0 finishes in segment 0 with r = 1; child 1 has leaves [0, 1]
    leaves = {(0,): 1.0, (1, 0): 0.0, (1, 1): 1.0}
    assert tree_slot_leaves(sorted(leaves), (2, 2)) == [0, 0, 1, 2]
    batch, rows, lengths = slot_batch((2, 2), leaves)
    assert rows == [(0,), (0,), (1, 0), (1, 1)]  # replicated slots carry the same completion
    values = tree_node_values(batch.rewards, batch.tree_paths, 4)
    assert values[0, 0].item() == pytest.approx(0.75)  # official mean of children; the mean of leaves would be 2/3
    out = compute_spo_tree_advantages(batch, spo_prob_mask=False, spo_advantage_norm="none")
    got = [[segment_advantage(out.advantages[i], lengths[i], d) for d in range(len(rows[i]))] for i in range(4)]
    assert got == [pytest.approx([0.25])] * 2 + [pytest.approx([-0.25, -0.5]), pytest.approx([-0.25, 0.5])]
    # the two replicas of the early leaf share its node: weight 1/2 each
    assert out.loss_mask[0, 0].item() == pytest.approx(0.5) and out.loss_mask[2, 0].item() == pytest.approx(0.5)
    assert out.metrics["spo_tree_early_leaf_frac"] == pytest.approx(0.5)


def test_depth_one_tree_is_dr_grpo():
    rewards = {(i,): r for i, r in enumerate([1.0, 0.0, 0.0, 1.0, 1.0])}
    batch, rows, lengths = slot_batch((5,), rewards)
    out = compute_spo_tree_advantages(batch, spo_prob_mask=False, spo_advantage_norm="none",
                                      spo_tree_skip_zero_advantage=False)  # fmt: skip
    for i in range(5):
        assert out.advantages[i, : lengths[i][0]].tolist() == pytest.approx([rewards[rows[i]] - 0.6] * 3)
    assert (out.loss_mask[:, :3] == 1).all()


# ── invariants on random trees ─────────────────────────────────────────────────────────────────────────────────────
@st.composite
def random_trees(draw):
    """A tree shape and a random set of leaves (expanded or early-stopped nodes) with rewards, NaN sometimes."""
    D = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(1, 3), min_size=D, max_size=D)))
    leaves = {}

    def grow(path):
        d = len(path)
        for c in range(shape[d]):
            child = path + (c,)
            if d + 1 == D or draw(st.booleans()) and draw(st.booleans()):
                leaves[child] = draw(st.sampled_from([0.0, 1.0, 0.5, 0.25, float("nan")]))
            else:
                grow(child)

    grow(())
    return shape, leaves


@settings(max_examples=150, deadline=None)
@given(random_trees())
def test_replicated_slot_means_equal_the_official_recursive_mean_of_children(tree):
    shape, leaves = tree
    if any(math.isnan(r) for r in leaves.values()):  # the official tree has no unscorable leaves
        leaves = {p: (0.0 if math.isnan(r) else r) for p, r in leaves.items()}
    batch, rows, lengths = slot_batch(shape, leaves)
    values = tree_node_values(batch.rewards, batch.tree_paths, batch.num_generations)
    ref_values, ref_adv = spo_tree_reference(leaves)
    for i, path in enumerate(rows):
        for d in range(len(path)):
            assert values[i, d].item() == pytest.approx(ref_values[path[:d]], abs=1e-9)
    out = compute_spo_tree_advantages(batch, spo_prob_mask=False, spo_advantage_norm="none",
                                      spo_tree_skip_zero_advantage=False)  # fmt: skip
    for i, path in enumerate(rows):
        for d in range(len(path)):
            assert segment_advantage(out.advantages[i], lengths[i], d) == pytest.approx(ref_adv[path[: d + 1]],
                                                                                        abs=1e-6)  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(random_trees())
def test_tree_advantages_telescope_and_every_node_is_trained_once(tree):
    shape, leaves = tree
    batch, rows, lengths = slot_batch(shape, leaves)
    out = compute_spo_tree_advantages(batch, spo_prob_mask=False, spo_advantage_norm="none",
                                      spo_tree_skip_zero_advantage=False)  # fmt: skip
    root = tree_node_values(batch.rewards, batch.tree_paths, batch.num_generations)[0, 0].item()
    for i, path in enumerate(rows):
        r = batch.rewards[i].item()
        total = sum(segment_advantage(out.advantages[i], lengths[i], d) for d in range(len(path)))
        if math.isnan(r) or math.isnan(root):  # unscorable rows train nothing
            assert (out.advantages[i] == 0).all() and (out.loss_mask[i] == 0).all()
        else:
            assert total == pytest.approx(r - root, abs=1e-6)  # path sum r − V(root)
    # node weights: the loss mask sums to the unique tokens of the tree's scorable trained nodes
    unique = {}
    for i, path in enumerate(rows):
        if not math.isnan(batch.rewards[i].item()) and not math.isnan(root):
            for d in range(len(path)):
                unique[path[: d + 1]] = lengths[i][d]
    assert out.loss_mask.sum().item() == pytest.approx(sum(unique.values()), abs=1e-4)
    if not any(math.isnan(r) for r in leaves.values()):  # siblings sum to 0: Σ_rows Σ_segments A / n = 0
        starts = [(i, sum(lengths[i][:d])) for i, path in enumerate(rows) for d in range(len(path))]
        mass = sum(out.advantages[i, t].item() * out.loss_mask[i, t].item() for i, t in starts)
        assert mass == pytest.approx(0.0, abs=1e-5)


def test_node_counts_of_a_balanced_tree_are_the_subtree_sizes():
    paths = tree_paths_tensor([(a, b, c) for a in range(2) for b in range(3) for c in range(2)], 3)
    counts = tree_node_counts(paths, 12)
    assert (counts == torch.tensor([6, 2, 1])).all()  # Π_{j>d} b_j


def test_skip_zero_advantage_and_the_probability_mask_shape_the_loss_mask():
    leaves = {(0, 0): 1.0, (0, 1): 1.0, (1, 0): 1.0, (1, 1): 0.0}
    batch, rows, lengths = slot_batch((2, 2), leaves)
    cut = batch.completion_mask.clone()
    cut[:, 1] = 0  # the second token of every row has p ≥ ρ
    batch, _, _ = slot_batch((2, 2), leaves, cutpoint_mask=cut)
    out = compute_spo_tree_advantages(batch, spo_advantage_norm="none")
    # node (0,) has A = 1 − 0.75 = 0.25; its leaves have A = 0 and leave the loss
    assert out.loss_mask[0, :2].tolist() == pytest.approx([0.5, 0.0])  # shared by 2 rows; token 1 masked by p ≥ ρ
    assert (out.loss_mask[0, 2:] == 0).all() and (out.advantages[0, 2:] == 0).all()
    assert out.loss_mask[3, 2].item() == 1.0 and out.advantages[3, 2].item() == pytest.approx(-0.5)
    off = compute_spo_tree_advantages(batch, spo_prob_mask=False, spo_advantage_norm="none",
                                      spo_tree_skip_zero_advantage=False, spo_tree_node_weighting=False)  # fmt: skip
    assert torch.equal(off.loss_mask, batch.completion_mask)


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_whitening_uses_the_loss_mask_weights_so_each_node_counts_once(norm):
    leaves = {(a, b): float((a + b) % 2 or a == 2) for a in range(3) for b in range(2)}
    batch, rows, lengths = slot_batch((3, 2), leaves)
    raw = compute_spo_tree_advantages(batch, spo_prob_mask=False, spo_advantage_norm="none")
    out = compute_spo_tree_advantages(batch, spo_prob_mask=False, spo_advantage_norm=norm)
    w = out.loss_mask.double()
    a = out.advantages.double()
    mean = (a * w).sum() / w.sum()
    var = (((a - mean) ** 2) * w).sum() / (w.sum() - 1)
    assert mean.item() == pytest.approx(0.0, abs=1e-6) and var.item() == pytest.approx(1.0, abs=1e-4)
    assert torch.equal(out.loss_mask, raw.loss_mask) and ((out.advantages != 0) <= (w > 0)).all()


def test_value_only_slots_enter_the_node_values():
    # shape (2, 2), slots 0 and 3 trained; slots 1 and 2 only serve as values
    leaves = {(0, 0): 1.0, (0, 1): 0.0, (1, 0): 0.0, (1, 1): 1.0}
    batch, rows, lengths = slot_batch((2, 2), leaves, trained=[0, 3])
    assert rows == [(0, 0), (1, 1)]
    out = compute_spo_tree_advantages(batch, spo_prob_mask=False, spo_advantage_norm="none")
    # V(root) = 0.5, V(0,) = 0.5, V(1,) = 0.5 from all four slots: segment 0 has A = 0, leaves +0.5
    assert [segment_advantage(out.advantages[i], lengths[i], 1) for i in range(2)] == pytest.approx([0.5, 0.5])
    assert (out.loss_mask[:, :2] == 0).all()  # zero-advantage inner segments leave the loss
    # without the value-only slots the trained pair alone would give V(root) = 1 and different advantages
    alone = compute_spo_tree_advantages(CreditBatch(**{**batch.__dict__, "segment_values": None}),
                                        spo_prob_mask=False, spo_advantage_norm="none")  # fmt: skip
    assert not torch.allclose(alone.advantages, out.advantages)


# ── bad inputs ─────────────────────────────────────────────────────────────────────────────────────────────────────
@pytest.mark.parametrize(
    "leaves, match",
    [
        ([(0,), (0, 1), (1, 0), (1, 1)], "overlap"),
        ([(0, 0), (1, 0), (1, 1)], "do not cover"),
        ([(0, 0), (0, 1), (2, 0)], "does not fit"),
        ([(0, 0, 0)], "does not fit"),
        ([()], "does not fit"),
    ],
)
def test_leaves_that_do_not_partition_the_tree_are_rejected(leaves, match):
    with pytest.raises(ValueError, match=match):
        tree_slot_leaves(leaves, (2, 2))


def test_malformed_tree_inputs_fail_with_a_clear_error():
    batch, _, _ = slot_batch((2, 2), {(0, 0): 1.0, (0, 1): 0.0, (1, 0): 1.0, (1, 1): 1.0})
    bad_paths = batch.tree_paths.clone()
    bad_paths[0] = torch.tensor([-1, 0])
    with pytest.raises(ValueError, match="one child index"):
        compute_spo_tree_advantages(CreditBatch(**{**batch.__dict__, "tree_paths": bad_paths}))
    with pytest.raises(ValueError, match="needs batch.segment_ids"):
        compute_spo_tree_advantages(CreditBatch(**{**batch.__dict__, "tree_paths": None}))
    with pytest.raises(ValueError, match="cutpoint_mask"):
        compute_spo_tree_advantages(CreditBatch(**{**batch.__dict__, "cutpoint_mask": None}))
    with pytest.raises(ValueError, match="spo_advantage_norm"):
        compute_spo_tree_advantages(batch, spo_advantage_norm="rows")
    flat = torch.where(batch.segment_ids >= 0, torch.zeros_like(batch.segment_ids), batch.segment_ids)
    flat[0, :3] = torch.tensor([0, 1, 2])  # three segments on a two-level path
    with pytest.raises(ValueError, match="disagree"):
        compute_spo_tree_advantages(CreditBatch(**{**batch.__dict__, "segment_ids": flat}))
    with pytest.raises(ValueError, match="tree_paths has shape"):
        CreditBatch(**{**batch.__dict__, "tree_paths": batch.tree_paths[:2]})
    with pytest.raises(ValueError, match="whole groups"):
        tree_node_values(batch.rewards, batch.tree_paths, 3)


def test_importing_the_credit_package_registers_spo_tree():
    code = "import trl_credit.credit as c; print('spo_tree' in c.ADVANTAGE_ESTIMATORS)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True" and ADVANTAGE_ESTIMATORS["spo_tree"] is compute_spo_tree_advantages


# ── the tree sampler (`run_tree_rollouts`) on the synthetic policy ─────────────────────────────────────────────────
EOS = BernoulliChainPolicy.EOS


def test_tree_rollouts_sample_level_by_level_within_the_budgets():
    policy = BernoulliChainPolicy([0.5, 0.3], horizon=11, threshold=5, seed=1)
    tree = run_tree_rollouts([policy.prompt(0), policy.prompt(1)], (2, 3, 2), 4, 12, policy, eos_token_ids=[EOS])
    for p in range(2):
        assert sorted(len(path) for path in tree.nodes[p]) == [1] * 2 + [2] * 6 + [3] * 12
        slots = tree.slot_paths(p)
        assert slots == sorted(slots) and len(slots) == 12 == len(set(slots))
        for path in slots:
            ids, logps, lengths = tree.completion(p, path)
            assert lengths == [4, 4, 4] and ids[-1] == EOS and logps is None  # last level: the rest of the horizon
            # every segment continues its parent's prefix: siblings share the parent's tokens
            assert ids[:4] == tree.nodes[p][path[:1]].token_ids
    # cost: M·Σ_{d<D−1} Π_{j≤d} b_j + Π b·(L − (D−1)M) per tree
    assert tree.generated_tokens == 2 * (4 * (2 + 6) + 12 * 4)
    assert tree.backend_calls == 3


def test_early_leaves_end_the_branch_and_fill_their_subtree():
    # completions are 5 tokens (4 bits + EOS) but the horizon allows 12: level 1 ends every branch with EOS
    policy = BernoulliChainPolicy([0.5], horizon=4, threshold=2, seed=2)
    tree = run_tree_rollouts([policy.prompt(0)], (2, 2, 3), 3, 12, policy, eos_token_ids=[EOS])
    leaves = tree.leaves(0)
    assert all(len(path) == 2 for path in leaves) and len(leaves) == 4 and len(tree.nodes[0]) == 6
    assert all(tree.nodes[0][path].token_ids[-1] == EOS and not tree.nodes[0][path].truncated for path in leaves)
    slots = tree.slot_paths(0)
    assert len(slots) == 12 and all(slots.count(path) == 3 for path in leaves)  # each fills its 3 slots


def test_leaves_at_the_horizon_are_truncated_leaves():
    policy = BernoulliChainPolicy([0.5], horizon=20, threshold=5, seed=3)
    tree = run_tree_rollouts([policy.prompt(0)], (2, 2), 4, 9, policy, eos_token_ids=[EOS])
    for path in tree.leaves(0):
        node = tree.nodes[0][path]
        assert len(path) == 2 and len(node.token_ids) == 5 and node.truncated and EOS not in node.token_ids


class LogprobPolicy(BernoulliChainPolicy):
    """The synthetic policy reporting its exact sampling log-probs (like vLLM)."""

    def generate_with_logprobs(self, prefixes, budgets, call_budget):
        conts = self.generate(prefixes, budgets, call_budget)
        lp = []
        for prefix, cont in zip(prefixes, conts):
            p = self.ps[prefix[0] - 3]
            lp.append([math.log(p) if t == 1 else math.log(1 - p) if t == 0 else 0.0 for t in cont])
        return conts, lp


def test_tree_log_probs_follow_their_tokens_and_are_required_when_asked():
    policy = LogprobPolicy([0.7], horizon=6, threshold=3, seed=4)
    tree = run_tree_rollouts([policy.prompt(0)], (2, 2), 3, 7, policy, eos_token_ids=[EOS], logprobs=True)
    for path in tree.slot_paths(0):
        ids, logps, _ = tree.completion(0, path)
        assert len(logps) == len(ids)
        for t, lp in zip(ids, logps):
            assert lp == pytest.approx({1: math.log(0.7), 0: math.log(0.3), EOS: 0.0}[t])
    with pytest.raises(RuntimeError, match="no sampling log-probs"):
        run_tree_rollouts([[3]], (2, 2), 3, 7, BernoulliChainPolicy([0.7], 6, 3), eos_token_ids=[EOS], logprobs=True)


@pytest.mark.parametrize(
    "shape, M, L, match",
    [
        ((4, 4, 4), 5, 10, "no budget for the last level"),
        ((2, 2), 8, 8, "no budget for the last level"),
        ((), 4, 10, "non-empty list"),
        ((2, 0), 4, 10, "non-empty list"),
        ((2, 2), 0, 10, "spo_tree_segment_tokens"),
    ],
)
def test_tree_shapes_that_cannot_fit_are_rejected(shape, M, L, match):
    with pytest.raises(ValueError, match=match):
        validate_tree_shape(shape, M, L)


class ThreadCollective(Collective):
    """`world` threads standing for processes, with a real gather (like `tests/test_rollouts.py`)."""

    def __init__(self, rank, world, shared):
        self.rank, self.world, self.is_main, self.shared = rank, world, rank == 0, shared

    def gather(self, tensor):
        self.shared["slots"][self.rank] = tensor
        self.shared["barrier"].wait()
        out = torch.stack(self.shared["slots"])
        self.shared["barrier"].wait()
        return out


class CountingPolicy(BernoulliChainPolicy):
    per_request_budgets = False
    max_rows_per_call = 2

    def generate(self, prefixes, budgets, call_budget):
        self.lengths.append(len(prefixes))
        return super().generate(prefixes, budgets, call_budget)


@pytest.mark.parametrize("world", [2, 3])
def test_every_process_makes_the_same_calls_and_ends_with_the_same_trees(world):
    shared = {"slots": [None] * world, "barrier": threading.Barrier(world)}
    results, policies = [None] * world, [None] * world

    def worker(rank):
        policy = CountingPolicy([0.5, 0.4, 0.6], horizon=10, threshold=5, seed=100 + rank)
        policy.lengths = []
        policies[rank] = policy
        prompts = [policy.prompt(i) for i in range(3)]
        results[rank] = run_tree_rollouts(prompts, (3, 2), 4, 11, policy, eos_token_ids=[EOS],
                                          collective=ThreadCollective(rank, world, shared))  # fmt: skip

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert all(p.lengths == policies[0].lengths for p in policies) and len(policies[0].lengths) >= 2
    for other in results[1:]:
        assert other.nodes == results[0].nodes and other.generated_tokens == results[0].generated_tokens
    assert results[0].generated_tokens == 3 * (4 * 3 + 6 * 7)


# ── config ─────────────────────────────────────────────────────────────────────────────────────────────────────────
def _config(**kw):
    from trl_credit import GRPOConfig
    from trl_credit.testing import CPU_TEST_ARGS

    base = dict(output_dir="/tmp/spo_tree_cfg", advantage_estimator="spo_tree", per_device_train_batch_size=4,
                num_generations=4, max_completion_length=12, spo_tree_shape=[2, 2],
                spo_tree_segment_tokens=4)  # fmt: skip
    return GRPOConfig(**{**CPU_TEST_ARGS, **base, **kw})


def test_num_generations_that_does_not_divide_the_tree_slots_fails_at_construction():
    with pytest.raises(ValueError, match="must divide the tree's 8 leaf slots"):
        _config(spo_tree_shape=[2, 2, 2], spo_tree_segment_tokens=3, num_generations=3, per_device_train_batch_size=3)
    assert _config(spo_tree_shape=[2, 2, 2], spo_tree_segment_tokens=3, num_generations=2).num_generations == 2


def test_tree_shape_larger_than_the_completion_budget_fails_at_construction():
    with pytest.raises(ValueError, match="max_completion_length"):
        _config(spo_tree_shape=[2, 2, 2], spo_tree_segment_tokens=6)
    with pytest.raises(ValueError, match="max_completion_length"):
        _config(spo_tree_shape=[2, 2], spo_tree_segment_tokens=12)
    assert _config(spo_tree_shape=[2, 2], spo_tree_segment_tokens=11).spo_tree_segment_tokens == 11


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(macro_action="ngram"), "uses the tree's levels as segments"),
        (dict(generation_kwargs={"max_tokens": 5}), "derives each level's budget"),
        (dict(generation_kwargs={"n": 2}), "derives each level's budget"),
        (dict(spo_tree_shape=[2, 0]), "spo_tree_shape must be a non-empty list"),
        (dict(spo_tree_shape=[]), "spo_tree_shape must be a non-empty list"),
        (dict(spo_tree_shape="22"), "spo_tree_shape must be a non-empty list"),
        (dict(spo_tree_segment_tokens=0), "spo_tree_segment_tokens must be an integer"),
        (dict(spo_cutpoint_logps="sampling"), "use_vllm=False"),
    ],
)
def test_spo_tree_configs_that_cannot_work_fail_at_construction(overrides, match):
    with pytest.raises(ValueError, match=match):
        _config(**overrides)


# ── training runs on the tiny model ────────────────────────────────────────────────────────────────────────────────
def _trainer_class():
    from trl_credit import GRPOTrainer

    class RecordingTreeTrainer(GRPOTrainer):
        """Keeps, per generation batch, the tree, what the estimator got, and what reached the loss."""

        def __init__(self, *args, **kwargs):
            self.tree_records = []
            super().__init__(*args, **kwargs)

        def _spo_tree_fields(self, out, ctx, batch_fields):
            state = self._spo_tree_batch
            fields = super()._spo_tree_fields(out, ctx, batch_fields)
            self.tree_records.append(dict(fields, state=state, rewards=batch_fields["rewards"].clone(),
                                          completion_mask=batch_fields["completion_mask"].clone(),
                                          local_ids=[list(c) for c in ctx["completion_ids_list"]]))  # fmt: skip
            return fields

        def _assign_credit(self, out, ctx):
            super()._assign_credit(out, ctx)
            rec = self.tree_records[-1]
            rec["advantages"] = out["advantages"].detach().clone()
            rec["tool_mask"] = out["tool_mask"].detach().clone()

    return RecordingTreeTrainer


def _train(model_dir, tmp_path, *, peft_config=None, **overrides):
    from trl_credit import GRPOConfig
    from trl_credit.testing import CPU_TEST_ARGS, shaped_math_reward, tiny_math_dataset

    kw = dict(output_dir=str(tmp_path), advantage_estimator="spo_tree", max_steps=2, per_device_train_batch_size=8,
              num_generations=4, max_completion_length=12, learning_rate=5e-2, seed=3, spo_tree_shape=[2, 2],
              spo_tree_segment_tokens=4, spo_advantage_norm="none", **CPU_TEST_ARGS)  # fmt: skip
    kw.update(overrides)
    trainer = _trainer_class()(model=model_dir, reward_funcs=shaped_math_reward, args=GRPOConfig(**kw),
                               train_dataset=tiny_math_dataset(24), peft_config=peft_config)  # fmt: skip
    trainer.train()
    return trainer


def _check_tree_training(trainer):
    """Invariants any backend must satisfy on the recorded generation batches."""
    args = trainer.args
    G, shape, M = args.num_generations, tuple(args.spo_tree_shape), args.spo_tree_segment_tokens
    slots = math.prod(shape)
    assert trainer.state.global_step == args.max_steps and len(trainer.tree_records) >= 1
    logs = [h for h in trainer.state.log_history if "loss" in h]
    for h in logs:
        assert h["credit/spo_tree_slots"] == slots and h["credit/spo_tree_trained_slots"] == G
        assert 0 < h["credit/spo_tree_tokens_per_trained_token"] <= slots / G
        assert 0 <= h["credit/spo_tree_nonzero_adv_frac"] <= 1 and h["credit/spo_tree_nodes"] >= shape[0]
    for rec in trainer.tree_records:
        tree, state = rec["state"]["tree"], rec["state"]
        paths, seg, values = rec["tree_paths"], rec["segment_ids"], rec["segment_values"]
        N = paths.size(0)
        ids = state["completion_ids"]
        for i in range(N):
            p, k = divmod(i, G)
            path = state["slot_paths"][p][state["trained"][p][k]]
            assert tuple(x for x in paths[i].tolist() if x >= 0) == path
            # the row is the tree's path: inner segments of exactly M tokens, the leaf's segment last
            lengths = state["segment_lengths"][i]
            assert lengths[:-1] == [M] * (len(path) - 1) and sum(lengths) == len(ids[i]) <= args.max_completion_length
            assert (seg[i, : len(ids[i])] == torch.repeat_interleave(torch.arange(len(lengths)),
                                                                     torch.tensor(lengths))).all()  # fmt: skip
            for j in range(N):  # rows through the same node share its tokens
                q, l2 = divmod(j, G)
                other = state["slot_paths"][q][state["trained"][q][l2]]
                if q == p and other[:1] == path[:1] and len(path) > 1 and len(other) > 1:
                    assert ids[i][:M] == ids[j][:M]
            assert values[i, 0] == values[p * G, 0]  # one root value per tree
        # this process's completions are its slice of the trained slots
        B = len(rec["local_ids"])
        rank = trainer.accelerator.process_index
        assert rec["local_ids"] == ids[rank * B : (rank + 1) * B]
        # what reached the loss is the estimator's output on the recorded batch
        batch = CreditBatch(torch.zeros_like(seg), rec["completion_mask"], rec["rewards"], G, segment_ids=seg,
                            segment_values=values, tree_paths=paths,
                            cutpoint_mask=rec.get("cutpoint_mask"))  # fmt: skip
        from trl_credit.credit import call_estimator

        expected = call_estimator(compute_spo_tree_advantages, batch, args)
        T = rec["advantages"].size(1)
        torch.testing.assert_close(rec["advantages"], expected.advantages[rank * B : (rank + 1) * B, :T])
        torch.testing.assert_close(rec["tool_mask"], expected.loss_mask[rank * B : (rank + 1) * B, :T])
    return logs


@pytest.mark.slow
def test_spo_tree_trains_with_transformers_generate_and_lora(tiny_model_dir, tmp_path):
    from peft import LoraConfig

    from trl_credit.generation.rollouts import TransformersRolloutBackend
    from trl_credit.testing import tiny_math_dataset

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = _train(tiny_model_dir, tmp_path, peft_config=lora)
    assert isinstance(trainer._spo_tree_backend, TransformersRolloutBackend)
    logs = _check_tree_training(trainer)
    assert all(h["credit/spo_tree_value_only_leaves"] == 0 for h in logs)  # every slot trained
    assert trainer.generation_config.max_new_tokens == trainer.args.max_completion_length  # budget restored
    lora_b = [p for n, p in trainer.model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # LoRA B starts at zero: the adapter trained
    # evaluation keeps TRL's generation: num_generations_eval independent completions, no tree
    trainer.eval_dataset = tiny_math_dataset(4)
    trainer.args.per_device_eval_batch_size = 4
    before = len(trainer.tree_records)
    metrics = trainer.evaluate()
    assert "eval_loss" in metrics and len(trainer.tree_records) == before


@pytest.mark.slow
def test_spo_tree_trains_a_subset_of_the_slots_with_value_only_leaves(tiny_model_dir, tmp_path):
    with pytest.warns(UserWarning, match="trains num_generations=2"):
        trainer = _train(tiny_model_dir, tmp_path, spo_tree_shape=[2, 2, 2], spo_tree_segment_tokens=3,
                         num_generations=2, per_device_train_batch_size=4, spo_advantage_norm="batch")  # fmt: skip
    logs = _check_tree_training(trainer)
    assert all(h["credit/spo_tree_value_only_leaves"] > 0 for h in logs)
    for rec in trainer.tree_records:
        trained = rec["state"]["trained"]
        assert all(len(t) == 2 and t == sorted(set(t)) for t in trained)
        assert len({tuple(t) for t in trained}) > 1 or len(trained) == 1  # a seeded subset per tree


@pytest.mark.vllm
@pytest.mark.slow
def test_spo_tree_trains_with_vllm_colocate_and_its_sampling_logprobs(tiny_model_dir, vllm_cpu_colocate, tmp_path):
    from trl_credit.generation.rollouts import VLLMColocateRolloutBackend

    trainer = _train(tiny_model_dir, tmp_path, use_vllm=True, vllm_mode="colocate", vllm_max_model_length=256,
                     spo_cutpoint_logps="sampling", vllm_importance_sampling_correction=True)  # fmt: skip
    assert isinstance(trainer._spo_tree_backend, VLLMColocateRolloutBackend)
    logs = _check_tree_training(trainer)
    # the trained rows carry vLLM's sampling log-probs of the tree's tokens: importance ratios ~1 (synced weights)
    assert all(h["sampling/sampling_logp_difference/max"] < 1e-3 for h in logs)


@pytest.mark.vllm
@pytest.mark.slow
def test_spo_tree_trains_with_vllm_server(tiny_model_dir, vllm_cpu_server, vllm_cpu_server_client, tmp_path):
    from trl_credit.generation.rollouts import TRLVLLMRolloutBackend

    trainer = _train(tiny_model_dir, tmp_path, use_vllm=True, vllm_mode="server", vllm_server_base_url=vllm_cpu_server,
                     spo_tree_shape=[2, 2, 2], spo_tree_segment_tokens=3, num_generations=4,
                     vllm_importance_sampling_correction=True)  # fmt: skip
    assert isinstance(trainer._spo_tree_backend, TRLVLLMRolloutBackend)
    logs = _check_tree_training(trainer)
    # the server's log-probs belong to the tree's tokens: before any update, trainer and server agree. (Later steps
    # are not compared: on CPU the file-based server weight sync leaves a gap for plain GRPO too.)
    assert logs[0]["sampling/sampling_logp_difference/max"] < 1e-3
    assert trainer.vllm_generation.max_completion_length == trainer.args.max_completion_length


@pytest.mark.distributed
@pytest.mark.slow
def test_spo_tree_on_two_processes_with_a_group_straddling_the_ranks(tiny_model_dir, tmp_path):
    from pathlib import Path

    from dist_utils import run_accelerate

    script = Path(__file__).parent / "scripts" / "spo_tree_record.py"
    stdout = run_accelerate(script, tiny_model_dir, tmp_path, num_processes=2)
    assert "world_size 2 steps 2" in stdout
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) >= 1
    for rec0, rec1 in zip(*ranks):
        # both processes sampled (in shares) and gathered the same trees, and computed the same global credit
        assert rec0["completion_ids"] == rec1["completion_ids"] and rec0["trained"] == rec1["trained"]
        assert torch.equal(rec0["segment_values"], rec1["segment_values"]) and torch.equal(rec0["rewards"],
                                                                                             rec1["rewards"])
        N = len(rec0["completion_ids"])
        assert N == 6 and rec0["B"] == 3  # G = 2: rows 2 and 3 form a group split across the processes
        assert rec0["local_ids"] + rec1["local_ids"] == rec0["completion_ids"]
        assert rec0["segment_values"][2, 0] == rec0["segment_values"][3, 0]  # one tree, one root value
        assert rec0["value_only_leaves"] > 0
        batch = CreditBatch(torch.zeros_like(rec0["segment_ids"]), rec0["completion_mask"], rec0["rewards"], 2,
                            segment_ids=rec0["segment_ids"], segment_values=rec0["segment_values"],
                            tree_paths=rec0["tree_paths"], cutpoint_mask=rec0["cutpoint_mask"])  # fmt: skip
        expected = compute_spo_tree_advantages(batch)
        T = max(rec0["advantages"].size(1), rec1["advantages"].size(1))
        got = torch.cat([torch.nn.functional.pad(r["advantages"], (0, T - r["advantages"].size(1))) for r in
                         (rec0, rec1)])  # fmt: skip
        torch.testing.assert_close(got, expected.advantages[:, :T], atol=1e-5, rtol=1e-5)


def test_tools_and_rollout_func_are_rejected_with_spo_tree(tiny_model_dir, tmp_path):
    from trl_credit import GRPOTrainer
    from trl_credit.testing import shaped_math_reward, tiny_math_dataset

    def rollout_func(prompts, trainer):
        raise AssertionError("never called")

    with pytest.raises(ValueError, match="cannot replay tool calls"):
        GRPOTrainer(model=tiny_model_dir, reward_funcs=shaped_math_reward, args=_config(output_dir=str(tmp_path)),
                    train_dataset=tiny_math_dataset(8), rollout_func=rollout_func)  # fmt: skip
