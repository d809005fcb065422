"""Slow, obviously correct reference loops for the estimators (test oracles only; Python floats, no tensors)."""

import math
from collections import defaultdict


def _mean(xs):
    xs = [x for x in xs if not math.isnan(x)]
    return sum(xs) / len(xs) if xs else math.nan


def _std(xs):
    xs = [x for x in xs if not math.isnan(x)]
    if len(xs) < 2:
        return math.nan
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def grpo_reference(rewards, G, scale_rewards="group", eps=1e-4):
    """TRL's GRPO advantage, one group at a time."""
    out = []
    batch_std = _std(rewards)
    for g in range(0, len(rewards), G):
        grp = rewards[g : g + G]
        mu = _mean(grp)
        sd = _std(grp) if scale_rewards == "group" else batch_std
        for r in grp:
            a = r - mu
            if scale_rewards != "none":
                a = a / (sd + eps)
            out.append(0.0 if math.isnan(a) else a)
    return out


def _tree_stats(comps, rewards):
    """V(prefix) = mean reward of the completions through the prefix; members(prefix) = how many pass through it."""
    members, values = defaultdict(int), defaultdict(list)
    for c, r in zip(comps, rewards):
        for t in range(len(c) + 1):
            members[tuple(c[:t])] += 1
            values[tuple(c[:t])].append(r)
    return members, {k: _mean(v) for k, v in values.items()}


def tempo_reference(comps, rewards, G, scale_rewards="group", coef=1.0, eps=1e-4):
    """TEMPO per token: GRPO + coef · (V(child) − V(parent)) / denom at branch tokens. comps: lists of real tokens."""
    grpo = grpo_reference(rewards, G, scale_rewards, eps)
    batch_std = _std(rewards)
    out = []
    for g in range(0, len(comps), G):
        gc, gr = comps[g : g + G], rewards[g : g + G]
        members, V = _tree_stats(gc, gr)
        sd = _std(gr) if scale_rewards == "group" else batch_std
        denom = 1.0 if scale_rewards == "none" else sd + eps
        for i, (c, r) in enumerate(zip(gc, gr)):
            row = []
            for t in range(len(c)):
                parent, child = tuple(c[:t]), tuple(c[: t + 1])
                extra = 0.0
                if members[child] < members[parent] and not math.isnan(r):
                    td = V[child] - V[parent]
                    extra = coef * td / denom
                    extra = 0.0 if math.isnan(extra) or math.isinf(extra) else extra
                row.append(grpo[g + i] + extra)
            out.append(row)
    return out


def gigpo_reference(
    comps, rewards, G, scale_rewards="group", weight=1.0, branch_only=True, eps=1e-4, step_norm="auto"
):
    """
    GiGPO single-turn: episode advantage + weight · (r − V(s_t)) / F(s_t) (at branch tokens if branch_only).

    The step group of token t is the list of completions whose first t tokens equal those of the row (built here by
    comparing token lists, not from the implementation's tree), and F(s_t) is its own reward std + eps ("std",
    official mean_std_norm; 1 for a group of fewer than two scored members) or 1 ("none", official mean_norm).
    "auto" is "none" with scale_rewards="none", else "std".
    """
    if step_norm == "auto":
        step_norm = "none" if scale_rewards == "none" else "std"
    grpo = grpo_reference(rewards, G, scale_rewards, eps)
    out = []
    for g in range(0, len(comps), G):
        gc, gr = comps[g : g + G], rewards[g : g + G]
        for i, (c, r) in enumerate(zip(gc, gr)):
            row = []
            for t in range(len(c)):
                # D(s_t) and D(s_{t+1}): the completions sharing the first t (t + 1) tokens of c, scanned directly.
                group = [j for j, d in enumerate(gc) if len(d) >= t and d[:t] == c[:t]]
                child = [j for j in group if len(gc[j]) >= t + 1 and gc[j][: t + 1] == c[: t + 1]]
                gate = len(child) < len(group) if branch_only else True
                extra = 0.0
                if gate and not math.isnan(r):
                    scored = [gr[j] for j in group if not math.isnan(gr[j])]
                    residual = r - sum(scored) / len(scored)
                    denom = 1.0
                    if step_norm == "std" and len(scored) > 1:
                        m = sum(scored) / len(scored)
                        denom = math.sqrt(sum((x - m) ** 2 for x in scored) / (len(scored) - 1)) + eps
                    extra = weight * residual / denom
                row.append(grpo[g + i] + extra)
            out.append(row)
    return out


def spo_tree_reference(leaf_rewards):
    """
    SPO-tree the official way (`_construct_tree`, `compute_advantage`, `extract_edges_from_tree`), on a nested tree:
    `leaf_rewards` maps each leaf's path (a tuple of child indices; an early leaf is a shorter path) to its reward.
    A node's value is the mean of its children's values (a leaf's is its reward); every non-root node's advantage is
    V(node) − V(parent). Returns `(values, advantages)`: dicts from node paths (root = ()) to floats.
    """
    children = defaultdict(set)
    for path in leaf_rewards:
        for d in range(len(path)):
            children[tuple(path[:d])].add(tuple(path[: d + 1]))
    values = {}

    def value(node):
        if node in leaf_rewards:
            values[node] = leaf_rewards[node]
        else:
            values[node] = sum(value(c) for c in sorted(children[node])) / len(children[node])
        return values[node]

    value(())
    advantages = {node: values[node] - values[node[:-1]] for node in values if node}
    return values, advantages
