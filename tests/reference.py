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


def gigpo_reference(comps, rewards, G, scale_rewards="group", weight=1.0, branch_only=True, eps=1e-4):
    """GiGPO single-turn: episode advantage + weight · (r − V(s_t)) / denom (at branch tokens if branch_only)."""
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
                gate = members[child] < members[parent] if branch_only else True
                extra = 0.0
                if gate and not math.isnan(r):
                    extra = weight * (r - V[parent]) / denom
                    extra = 0.0 if math.isnan(extra) or math.isinf(extra) else extra
                row.append(grpo[g + i] + extra)
            out.append(row)
    return out
