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

**SPO** ([SPO](https://huggingface.co/papers/2505.23564)) on the same policy, through the trainer's code:

- **SPO-chain**: `trl_credit.credit.spo.cutpoint_boundaries` on the policy's exact token log-probs (`p` or `1 − p`,
  EOS certain), then the same Monte-Carlo engine with the chain's estimated states (K = 9). Every token of this
  policy has `p < 0.9`, so every token is a cutpoint and the chain's segments are `k` tokens (`k = 5`, official):
  SPO-chain is VinePPO K = 9 on `k`-token steps here; its ranking test uses alternatives of `k` tokens.
- **SPO-tree**: the group is sampled as a tree (`trl_credit.generation.rollouts.run_tree_rollouts`, every slot
  trained) and the values are the tree's own node means (`trl_credit.credit.spo_tree.tree_node_values`). No
  rollouts: its cost is every token the tree decoded, per trained completion (the trained completions included),
  compared with VinePPO K = 9's rollout tokens per completion measured in the same run. Its accuracy is measured on
  its own states, each against **K = 9 Monte-Carlo values of the very same states** (matched): value RMSE over the
  inner nodes on each trained completion's path (root included), and pairwise ranking accuracy of sibling nodes
  (alternative next segments sampled by the policy, the tree's own "alternative steps"), pairs ≥ `--min-gap` apart.
  The tree reaches VinePPO K = 9 accuracy when its RMSE is within 5 % of the matched K = 9 RMSE and its ranking
  accuracy (ties ½) within 1 point of the matched K = 9 accuracy, at ≤ ⅓ of VinePPO K = 9's tokens.

    python benchmarks/vine_value_accuracy.py                       # table + outputs/vine_value_accuracy.png (~4 min)
    python benchmarks/vine_value_accuracy.py --regime polarized    # pass rates near 0 or 1
    python benchmarks/vine_value_accuracy.py --seeds 1 --prompts 16 --ranking-states 60   # quick look
    python benchmarks/vine_value_accuracy.py --only-spo             # VinePPO K=9, SPO-chain and SPO-tree rows only
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time
from dataclasses import dataclass

import torch

from trl_credit.credit.spo import cutpoint_boundaries
from trl_credit.credit.spo_tree import tree_node_values, tree_paths_tensor
from trl_credit.credit.steps import completion_boundaries, estimated_state_mask, segment_ids_to_boundaries
from trl_credit.credit.vineppo import interpolate_state_values
from trl_credit.generation.rollouts import BernoulliChainPolicy, VinePlan, run_mc_rollouts, run_tree_rollouts


@dataclass(frozen=True)
class Setting:
    name: str
    K: int = 9
    tree_reuse: bool = False
    adaptive_k_min: int | None = None
    stride: int = 1
    spo_chain_k: int | None = None  # SPO-chain: cutpoints per segment (None: VinePPO's token-chunk steps)


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
    Setting("SPO-chain k=5 (official), K=9", spo_chain_k=5),
    Setting("SPO-chain k=10, K=9", spo_chain_k=10),
]


@dataclass(frozen=True)
class TreeSetting:
    shape: tuple[int, ...]
    M: int  # tokens per non-final segment

    @property
    def name(self) -> str:
        return f"SPO-tree {'-'.join(map(str, self.shape))}, M={self.M}"


TREE_SETTINGS = [
    TreeSetting((4,), 16),  # one level: Dr. GRPO's group mean
    TreeSetting((8, 8), 32),
    TreeSetting((9, 9), 32),
    TreeSetting((16, 8), 32),
    TreeSetting((4, 4, 4), 21),
    TreeSetting((6, 6, 6), 21),  # the official shape
    TreeSetting((3, 3, 3, 3), 16),
    TreeSetting((2, 2, 2, 2, 2, 2), 10),
]


def token_logps(policy: BernoulliChainPolicy, prompts, completions) -> torch.Tensor:
    """`(N, T)` exact log-probabilities of the sampled tokens (`log p` for 1, `log(1 − p)` for 0, 0 for the EOS)."""
    T = max(len(c) for c in completions)
    out = torch.zeros(len(completions), T, dtype=torch.float64)
    for i, (prompt, c) in enumerate(zip(prompts, completions)):
        p = policy.ps[prompt[0] - 3]
        out[i, : len(c)] = torch.tensor([math.log(p) if t == 1 else math.log(1 - p) if t == 0 else 0.0 for t in c])
    return out


def estimate(policy, prompts, completions, rewards, G, setting: Setting, step: int):
    """The trainer's pipeline on one batch: per-row state values `(N, S)` and the rollout statistics."""
    if setting.spo_chain_k is not None:  # SPO-chain: cutpoint segments, their own estimated states
        T = max(len(c) for c in completions)
        mask = torch.tensor([[1.0] * len(c) + [0.0] * (T - len(c)) for c in completions])
        seg = cutpoint_boundaries(token_logps(policy, prompts, completions), mask, rho=0.9, k=setting.spo_chain_k)
        bounds = segment_ids_to_boundaries(seg.segment_ids)
        estimated = seg.estimated_states
        interpolated = torch.zeros_like(estimated)
    else:
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
            if not math.isnan(values[i, k].item()):  # SPO-chain: a leading segment without cutpoint has no value
                errors.append(values[i, k].item() - sampler.value(i // args.group, c[: b[k]]))
    main_tokens = sum(len(c) for c in completions)
    tokens = stats.generated_tokens.sum().item()
    return math.sqrt(statistics.fmean(e * e for e in errors)), tokens / len(completions), tokens / main_tokens


def ranking_accuracy(args, setting: Setting, seed: int):
    rng = random.Random(seed)
    ps = [draw_p(rng, args.regime) for _ in range(args.ranking_states)]
    sampler = BernoulliChainPolicy(ps, args.horizon, args.horizon // 2, seed=seed)
    policy = BernoulliChainPolicy(ps, args.horizon, args.horizon // 2, seed=seed + 1000)
    # SPO-chain's segments are k tokens here (every token is a cutpoint): alternatives of k tokens at its boundaries
    step = setting.spo_chain_k or args.step
    steps_per_completion = args.horizon // step
    correct = half = total = 0
    for i in range(args.ranking_states):
        base = sampler.sample(i, 1)[0]
        k = rng.randrange(0, steps_per_completion - 1)
        prefix = base[: k * step]
        while True:  # 5 alternative next steps, at least 3 distinct (as the paper's analysis)
            alternatives = [sampler._bits(ps[i], step) for _ in range(5)]
            if len({tuple(a) for a in alternatives}) >= 3:
                break
        completions = [
            prefix + a + sampler._bits(ps[i], args.horizon - len(prefix) - step) + [sampler.EOS]
            for a in alternatives
        ]
        rewards = [sampler.reward(c) for c in completions]
        values, bounds, _ = estimate(policy, [sampler.prompt(i)] * 5, completions, rewards, 5, setting, step)
        assert all(b[k + 1] == len(prefix) + step for b in bounds)  # the state after the alternative is a boundary
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


def tree_accuracy(args, ts: TreeSetting, seed: int) -> dict:
    """
    One batch of trees (`--prompts` prompts, every slot trained): the tree's values and K = 9 Monte-Carlo values of
    the same states, their RMSE against the exact values, sibling ranking accuracy, and the tree's token cost.
    """
    rng = random.Random(seed)
    ps = [draw_p(rng, args.regime) for _ in range(args.tree_prompts)]  # value_error(seed)'s prompts come first
    sampler = BernoulliChainPolicy(ps, args.horizon, args.horizon // 2, seed=seed)  # exact values only
    policy = BernoulliChainPolicy(ps, args.horizon, args.horizon // 2, seed=seed + 1000)
    L = args.horizon + 1
    heads = [sampler.prompt(i) for i in range(args.tree_prompts)]
    tree = run_tree_rollouts(heads, ts.shape, ts.M, L, policy, eos_token_ids=[policy.EOS])
    D, slots = len(ts.shape), tree.num_slots
    rows = []  # (prompt, path, completion, segment starts)
    for p in range(args.tree_prompts):
        for path in tree.slot_paths(p):
            ids, _, lengths = tree.completion(p, path)
            starts = [sum(lengths[:d]) for d in range(len(lengths))]
            rows.append((p, path, ids, starts))
    rewards = torch.tensor([policy.reward(r[2]) for r in rows], dtype=torch.float64)
    values = tree_node_values(rewards, tree_paths_tensor([r[1] for r in rows], D), slots)

    # K = 9 Monte-Carlo values of the same states (the trainer's engine; identical prefixes estimated once)
    mc_policy = BernoulliChainPolicy(ps, args.horizon, args.horizon // 2, seed=seed + 2000)
    bounds = [starts + [len(ids)] for _, _, ids, starts in rows]
    estimated = torch.tensor([[d < len(r[3]) for d in range(D)] for r in rows])
    plan = VinePlan([heads[r[0]] for r in rows], [r[2] for r in rows], bounds, estimated, rewards,
                    [r[0] for r in rows], max_completion_length=L, num_rollouts=9,
                    eos_token_ids=[policy.EOS])  # fmt: skip
    stats = run_mc_rollouts(plan, mc_policy, mc_policy.score, eos_token_ids=[policy.EOS])
    mc_values = plan.row_values(stats.value_sum, stats.count)

    tree_err, mc_err, nodes = [], [], {}
    for i, (p, path, ids, starts) in enumerate(rows):
        for d, start in enumerate(starts):
            exact = sampler.value(p, ids[:start])
            tree_err.append(values[i, d].item() - exact)
            mc_err.append(mc_values[i, d].item() - exact)
            if d > 0:  # an inner node below the root: a ranked alternative among its siblings
                nodes[(p, path[:d])] = (exact, values[i, d].item(), mc_values[i, d].item())
    siblings: dict = {}
    for (p, path), v in nodes.items():
        siblings.setdefault((p, path[:-1]), []).append(v)
    counts = {"tree": [0, 0], "mc": [0, 0]}  # correct, ties
    total = 0
    for group in siblings.values():
        for a in range(len(group)):
            for b in range(a + 1, len(group)):
                (ta, va, ma), (tb, vb, mb) = group[a], group[b]
                if abs(ta - tb) < args.min_gap:
                    continue
                total += 1
                for key, x, y in (("tree", va, vb), ("mc", ma, mb)):
                    counts[key][0] += (ta - tb) * (x - y) > 0
                    counts[key][1] += x == y

    def rmse(errors):
        return math.sqrt(statistics.fmean(e * e for e in errors))

    def acc(key, ties_half):
        c, t = counts[key]
        return (c + (t / 2 if ties_half else 0)) / total if total else math.nan

    return {
        "rmse": rmse(tree_err),
        "rmse_mc": rmse(mc_err),
        "rank": acc("tree", False),
        "rank_half": acc("tree", True),
        "rank_mc_half": acc("mc", True),
        "pairs": total,
        "tokens": tree.generated_tokens / len(rows),  # per trained completion, the trained completions included
    }


def mean_sd(xs):
    xs = [x for x in xs if x == x]
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


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
    parser.add_argument("--tree-prompts", type=int, default=64, help="SPO-tree: trees (prompts) per seed")
    parser.add_argument("--only-spo", action="store_true", help="VinePPO K=9, SPO-chain and SPO-tree rows only")
    args = parser.parse_args()

    start = time.perf_counter()
    settings = [s for s in SETTINGS if not args.only_spo or s.name == "paper K=9" or s.spo_chain_k is not None]
    rows = []
    for setting in settings:
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
                statistics.stdev([r[0] for r in runs]) if len(runs) > 1 else 0.0,
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
    for setting, rmse, tokens, ratio, acc, acc_sd, acc_half, rmse_sd in rows:
        print(
            f"| {setting.name} | {rmse:.3f} ± {rmse_sd:.3f} | {100 * acc:.1f} % ± {100 * acc_sd:.1f} | "
            f"{100 * acc_half:.1f} % | {tokens:,.0f} | {ratio:.1f} | {tokens / paper[2]:.2f} |"
        )
    cheap = [r for r in rows[1:] if r[2] <= paper[2] / 3]
    rmse_ok = [r[0].name for r in cheap if r[1] <= paper[1] * 1.05]
    rank_ok = [r[0].name for r in cheap if r[6] >= paper[6] - 0.01]
    both = [name for name in rmse_ok if name in rank_ok]
    print(
        f"\nat <= 1/3 of the paper's rollout tokens: RMSE within 5 %: {', '.join(rmse_ok) or 'none'}; "
        f"ranking (ties ½) within 1 point: {', '.join(rank_ok) or 'none'}; both: {', '.join(both) or 'none'}"
    )

    # ── SPO-tree: the group's own samples are the values ──
    tree_rows = []
    for ts in TREE_SETTINGS:
        runs = [tree_accuracy(args, ts, seed) for seed in range(args.seeds)]
        tree_rows.append((ts, {key: mean_sd([r[key] for r in runs]) for key in runs[0]}))
    vine_total = paper[2] + args.horizon + 1  # VinePPO K=9: rollouts + the trained completion itself
    print(
        f"\nSPO-tree, every slot trained, {args.tree_prompts} trees per seed; accuracy against K = 9 Monte-Carlo "
        f"values of the same states (matched); tokens: everything the tree decoded per trained completion, against "
        f"VinePPO K=9's {paper[2]:,.0f} rollout tokens per completion ({vine_total:,.0f} with the completion itself)"
        "\n"
    )
    print("| tree | slots | value RMSE | matched K=9 RMSE | sibling ranking (ties wrong) | (ties ½) | matched K=9 "
          "(ties ½) | pairs / seed | tokens / trained completion | × VinePPO K=9 rollout tokens | goal |")  # fmt: skip
    print("|" + "---|" * 11)
    verdicts = []
    for ts, m in tree_rows:
        ok_cost = m["tokens"][0] <= paper[2] / 3
        ok_rmse = m["rmse"][0] <= 1.05 * m["rmse_mc"][0]
        ok_rank = m["rank_half"][0] >= m["rank_mc_half"][0] - 0.01 if m["pairs"][0] else False
        verdict = "yes" if ok_cost and ok_rmse and ok_rank else "no (" + ", ".join(
            n for n, ok in (("tokens", ok_cost), ("RMSE", ok_rmse), ("ranking", ok_rank)) if not ok
        ) + ")"  # fmt: skip
        verdicts.append((ts.name, verdict))

        def pct(key):
            mean, sd = m[key]
            return "n/a" if mean != mean else f"{100 * mean:.1f} % ± {100 * sd:.1f}"

        print(
            f"| {'-'.join(map(str, ts.shape))}, M={ts.M} | {math.prod(ts.shape)} | {m['rmse'][0]:.3f} ± "
            f"{m['rmse'][1]:.3f} | {m['rmse_mc'][0]:.3f} ± {m['rmse_mc'][1]:.3f} | {pct('rank')} | "
            f"{pct('rank_half')} | {pct('rank_mc_half')} | {m['pairs'][0]:,.0f} | {m['tokens'][0]:.1f} | "
            f"{m['tokens'][0] / paper[2]:.3f} | {verdict} |"
        )
    reached = [name for name, v in verdicts if v == "yes"]
    print(f"\nSPO-tree at VinePPO K=9 accuracy (matched) and <= 1/3 of its tokens: {', '.join(reached) or 'none'}")
    print(f"({time.perf_counter() - start:.0f} s)")

    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    for setting, rmse, tokens, _, _, _, acc_half, _ in rows:
        for ax, y in zip(axes, (rmse, 100 * acc_half)):
            ax.scatter(tokens, y, s=30)
            ax.annotate(setting.name, (tokens, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    titles = ("value RMSE vs exact V (lower is better)", "pairwise ranking accuracy, ties ½, % (higher)")
    for ax, label in zip(axes[:2], titles):
        ax.set_xscale("log")
        ax.set_xlabel("rollout tokens per training completion")
        ax.set_title(label, fontsize=10)
        ax.axvline(paper[2] / 3, color="grey", ls="--", lw=0.8)
        ax.grid(alpha=0.3)
    axes[0].axhline(paper[1], color="grey", ls=":", lw=0.8)
    axes[1].axhline(100 * paper[6], color="grey", ls=":", lw=0.8)
    ax = axes[2]
    for ts, m in tree_rows:
        ratio = m["rmse"][0] / m["rmse_mc"][0]
        ax.scatter(m["tokens"][0], ratio, s=30, marker="s")
        ax.annotate(ts.name.removeprefix("SPO-tree "), (m["tokens"][0], ratio), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")  # fmt: skip
    ax.axhline(1.05, color="grey", ls=":", lw=0.8)
    ax.set_xlabel("tree tokens per trained completion")
    ax.set_title("SPO-tree RMSE / K=9 RMSE at the same states (lower is better)", fontsize=10)
    ax.grid(alpha=0.3)
    fig.suptitle("MC values: accuracy vs cost (dashed: 1/3 of the paper's K=9 tokens)", fontsize=11)
    fig.tight_layout()
    os.makedirs(os.path.dirname(args.png) or ".", exist_ok=True)
    fig.savefig(args.png, dpi=120)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
