"""
Accuracy of VinePPO's Monte-Carlo step values against their rollout cost, for the paper's setting (K = 9 at every
step boundary) and each cost-cutting option of `trl_credit` (fewer rollouts, tree reuse, adaptive K, sparse
boundaries), on a fixed policy whose state values are known exactly.

Policy (`trl_credit.generation.rollouts.BernoulliChainPolicy`, the VinePPO spec's oracle): a completion is `--horizon` i.i.d.
tokens, 1 with probability `p` and 0 otherwise, then EOS; reward 1 when at least half the tokens are 1. One `p` per
prompt: `--regime mixed` draws it uniformly in [0.35, 0.65] (pass rates spread over (0, 1)); `--regime polarized` in
[0.25, 0.4] or [0.6, 0.75] (most prompts nearly always or nearly never solved, as for a model far from or close to a
task). After `t` tokens with `j` ones, `V = P[Bin(horizon − t, p) ≥ horizon/2 − j]` exactly,
a stricter ground truth than the paper's 256-rollout estimates (whose own sd is up to 0.031). Steps are chunks of
`--step` tokens. Every setting runs the trainer's pipeline (`VinePlan` → `run_mc_rollouts` → per-row values →
interpolation), only the generation backend is the synthetic policy.

Two measurements, as in the paper's analysis (Kazemnejad et al., https://huggingface.co/papers/2410.01679, §6):

- **value error**: RMSE of `V̂(s_k)` against the exact `V(s_k)` over every step state of `--prompts × --group`
  sampled completions (interpolated states included for sparse boundaries);
- **ranking accuracy**: from `--ranking-states` states on sampled trajectories, 5 alternative next steps (at least 3
  distinct), each completed by the policy; the 5 completions form one group and the estimator values the state after
  each alternative step. Pairwise accuracy over the pairs whose exact values differ by at least `--min-gap` (0.05:
  smaller differences are below what any K ≤ 16 can resolve and below the paper's 256-rollout ground truth's own
  noise): correct when `(V_i − V_j)(V̂_i − V̂_j) > 0` (the official analyzer's rule, ties count as wrong; K = 9
  estimates of near-certain states tie often, so the table also gives the accuracy with ties counted as ½). Chance
  is 50 %.

Cost = tokens decoded by the rollouts, per completion of the training batch, also as a multiple of the batch's own
generated tokens. Goal: the paper's K = 9 accuracy at ≤ ⅓ of its rollout tokens.

    python benchmarks/vine_value_accuracy.py                       # table + outputs/vine_value_accuracy.png (~4 min)
    python benchmarks/vine_value_accuracy.py --regime polarized    # pass rates near 0 or 1
    python benchmarks/vine_value_accuracy.py --seeds 1 --prompts 16 --ranking-states 60   # quick look
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time
from dataclasses import dataclass

import torch

from trl_credit.credit.steps import completion_boundaries, estimated_state_mask
from trl_credit.credit.vineppo import interpolate_state_values
from trl_credit.generation.rollouts import BernoulliChainPolicy, VinePlan, run_mc_rollouts


@dataclass(frozen=True)
class Setting:
    name: str
    K: int = 9
    tree_reuse: bool = False
    adaptive_k_min: int | None = None
    stride: int = 1


SETTINGS = [
    Setting("paper K=9"),
    Setting("K=3", K=3),
    Setting("K=1", K=1),
    Setting("tree reuse", tree_reuse=True),
    Setting("adaptive k=3", adaptive_k_min=3),
    Setting("adaptive k=2", adaptive_k_min=2),
    Setting("stride 2", stride=2),
    Setting("stride 3", stride=3),
    Setting("adaptive k=3 + stride 2", adaptive_k_min=3, stride=2),
    Setting("adaptive k=2 + stride 2", adaptive_k_min=2, stride=2),
    Setting("adaptive k=2 + stride 3", adaptive_k_min=2, stride=3),
    Setting("stride 3 + tree reuse", tree_reuse=True, stride=3),
    Setting("K=6 + stride 2", K=6, stride=2),
    Setting("all: tree + adaptive k=2 + stride 2", tree_reuse=True, adaptive_k_min=2, stride=2),
]


def estimate(policy, prompts, completions, rewards, G, setting: Setting, step: int):
    """The trainer's pipeline on one batch: per-row state values `(N, S)` and the rollout statistics."""
    bounds = [
        completion_boundaries(c, step_split="token_chunks", chunk_tokens=step, special_token_ids={policy.EOS})[0]
        for c in completions
    ]
    num_segments = torch.tensor([len(b) - 1 for b in bounds])
    S = int(num_segments.max())
    estimated, interpolated = estimated_state_mask(num_segments, S, None, setting.stride)
    rewards_t = torch.tensor(rewards, dtype=torch.float64)
    plan = VinePlan(prompts, completions, bounds, estimated, rewards_t, [i // G for i in range(len(completions))],
                    max_completion_length=policy.horizon + 1, num_rollouts=setting.K, tree_reuse=setting.tree_reuse,
                    eos_token_ids=[policy.EOS])  # fmt: skip
    stats = run_mc_rollouts(plan, policy, policy.score, eos_token_ids=[policy.EOS],
                            adaptive_k_min=setting.adaptive_k_min)  # fmt: skip
    values = plan.row_values(stats.value_sum, stats.count)
    seg = torch.full((len(completions), max(len(c) for c in completions)), -1, dtype=torch.long)
    for i, b in enumerate(bounds):
        for k, (s, e) in enumerate(zip(b, b[1:])):
            seg[i, s:e] = k
    values = interpolate_state_values(seg, values, rewards_t, interpolated)
    return values, bounds, stats


def draw_p(rng: random.Random, regime: str) -> float:
    """`mixed`: pass rates spread over (0, 1); `polarized`: most prompts nearly always or nearly never solved."""
    if regime == "mixed":
        return rng.uniform(0.35, 0.65)
    return rng.uniform(0.25, 0.4) if rng.random() < 0.5 else rng.uniform(0.6, 0.75)


def value_error(args, setting: Setting, seed: int):
    rng = random.Random(seed)
    ps = [draw_p(rng, args.regime) for _ in range(args.prompts)]
    sampler = BernoulliChainPolicy(ps, args.horizon, args.horizon // 2, seed=seed)
    prompts, completions = [], []
    for i in range(args.prompts):
        prompts += [sampler.prompt(i)] * args.group
        completions += sampler.sample(i, args.group)
    rewards = [sampler.reward(c) for c in completions]
    policy = BernoulliChainPolicy(ps, args.horizon, args.horizon // 2, seed=seed + 1000)
    values, bounds, stats = estimate(policy, prompts, completions, rewards, args.group, setting, args.step)
    errors = []
    for i, (c, b) in enumerate(zip(completions, bounds)):
        for k in range(len(b) - 1):
            errors.append(values[i, k].item() - sampler.value(i // args.group, c[: b[k]]))
    main_tokens = sum(len(c) for c in completions)
    tokens = stats.generated_tokens.sum().item()
    return math.sqrt(statistics.fmean(e * e for e in errors)), tokens / len(completions), tokens / main_tokens


def ranking_accuracy(args, setting: Setting, seed: int):
    rng = random.Random(seed)
    ps = [draw_p(rng, args.regime) for _ in range(args.ranking_states)]
    sampler = BernoulliChainPolicy(ps, args.horizon, args.horizon // 2, seed=seed)
    policy = BernoulliChainPolicy(ps, args.horizon, args.horizon // 2, seed=seed + 1000)
    steps_per_completion = args.horizon // args.step
    correct = half = total = 0
    for i in range(args.ranking_states):
        base = sampler.sample(i, 1)[0]
        k = rng.randrange(0, steps_per_completion - 1)
        prefix = base[: k * args.step]
        while True:  # 5 alternative next steps, at least 3 distinct (as the paper's analysis)
            alternatives = [sampler._bits(ps[i], args.step) for _ in range(5)]
            if len({tuple(a) for a in alternatives}) >= 3:
                break
        completions = [
            prefix + a + sampler._bits(ps[i], args.horizon - len(prefix) - args.step) + [sampler.EOS]
            for a in alternatives
        ]
        rewards = [sampler.reward(c) for c in completions]
        values, _, _ = estimate(policy, [sampler.prompt(i)] * 5, completions, rewards, 5, setting, args.step)
        truth = [sampler.value(i, prefix + a) for a in alternatives]
        pred = values[:, k + 1].tolist()
        for a in range(5):
            for b in range(a + 1, 5):
                if abs(truth[a] - truth[b]) < args.min_gap:
                    continue
                total += 1
                correct += (truth[a] - truth[b]) * (pred[a] - pred[b]) > 0
                half += pred[a] == pred[b]
    return correct / max(total, 1), (correct + half / 2) / max(total, 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--horizon", type=int, default=64)
    parser.add_argument("--step", type=int, default=8)
    parser.add_argument("--ranking-states", type=int, default=200)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--min-gap", type=float, default=0.05, help="smallest exact-value gap of a ranked pair")
    parser.add_argument("--regime", choices=("mixed", "polarized"), default="mixed",
                        help="pass rates: 'mixed' p ~ U(0.35, 0.65); 'polarized' p ~ U(0.25, 0.4) or U(0.6, 0.75)")
    parser.add_argument("--png", default="outputs/vine_value_accuracy.png")
    args = parser.parse_args()

    start = time.perf_counter()
    rows = []
    for setting in SETTINGS:
        runs = [value_error(args, setting, seed) for seed in range(args.seeds)]
        ranks = [ranking_accuracy(args, setting, 100 + seed) for seed in range(args.seeds)]
        rows.append(
            (
                setting,
                statistics.fmean(r[0] for r in runs),
                statistics.fmean(r[1] for r in runs),
                statistics.fmean(r[2] for r in runs),
                statistics.fmean(r[0] for r in ranks),
                statistics.stdev([r[0] for r in ranks]) if len(ranks) > 1 else 0.0,
                statistics.fmean(r[1] for r in ranks),
            )
        )
    paper = rows[0]
    print(
        f"Bernoulli chain ({args.regime}): horizon {args.horizon}, steps of {args.step} tokens, {args.prompts} prompts"
        f" x {args.group} completions, {args.ranking_states} ranking states (pairs >= {args.min_gap} apart),"
        f" {args.seeds} seeds\n"
    )
    print("| setting | value RMSE | ranking acc. (ties wrong) | ranking acc. (ties ½) | rollout tokens / completion "
          "| × batch tokens | × paper tokens |")  # fmt: skip
    print("|" + "---|" * 7)
    for setting, rmse, tokens, ratio, acc, acc_sd, acc_half in rows:
        print(
            f"| {setting.name} | {rmse:.3f} | {100 * acc:.1f} % ± {100 * acc_sd:.1f} | {100 * acc_half:.1f} % | "
            f"{tokens:,.0f} | {ratio:.1f} | {tokens / paper[2]:.2f} |"
        )
    cheap = [r for r in rows[1:] if r[2] <= paper[2] / 3]
    rmse_ok = [r[0].name for r in cheap if r[1] <= paper[1] * 1.05]
    rank_ok = [r[0].name for r in cheap if r[6] >= paper[6] - 0.01]
    both = [name for name in rmse_ok if name in rank_ok]
    print(
        f"\nat <= 1/3 of the paper's rollout tokens: RMSE within 5 %: {', '.join(rmse_ok) or 'none'}; "
        f"ranking (ties ½) within 1 point: {', '.join(rank_ok) or 'none'}; both: {', '.join(both) or 'none'}"
    )
    print(f"({time.perf_counter() - start:.0f} s)")

    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for setting, rmse, tokens, _, _, _, acc_half in rows:
        for ax, y in zip(axes, (rmse, 100 * acc_half)):
            ax.scatter(tokens, y, s=30)
            ax.annotate(setting.name, (tokens, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    titles = ("value RMSE vs exact V (lower is better)", "pairwise ranking accuracy, ties ½, % (higher)")
    for ax, label in zip(axes, titles):
        ax.set_xscale("log")
        ax.set_xlabel("rollout tokens per training completion")
        ax.set_title(label, fontsize=10)
        ax.axvline(paper[2] / 3, color="grey", ls="--", lw=0.8)
        ax.grid(alpha=0.3)
    axes[0].axhline(paper[1], color="grey", ls=":", lw=0.8)
    axes[1].axhline(100 * paper[6], color="grey", ls=":", lw=0.8)
    fig.suptitle("VinePPO MC values: accuracy vs cost (dashed: 1/3 of the paper's K=9 tokens)", fontsize=11)
    fig.tight_layout()
    os.makedirs(os.path.dirname(args.png) or ".", exist_ok=True)
    fig.savefig(args.png, dpi=120)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
