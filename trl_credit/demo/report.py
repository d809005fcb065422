"""
The demo's outputs: tables with seed statistics, the honest reading, plots and credit maps.

Every number in the report comes from `results.json` (written first), so the report can be regenerated from it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..viz import CreditRow, save_credit_map


# ── statistics over seeds ──────────────────────────────────────────────────────────────────────────────────────────
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else math.nan)


def fmt(mean: float, std: float, pct: bool = True, signed: bool = False) -> str:
    if not math.isfinite(mean):
        return "–"
    scale, unit = (100.0, "") if pct else (1.0, "")
    sign = "+" if signed else ""
    body = f"{mean * scale:{sign}.1f}" if pct else f"{mean:{sign}.2f}"
    if math.isfinite(std):
        body += f" ± {std * scale:.1f}" if pct else f" ± {std:.2f}"
    return body + unit


def run_summary(run: dict[str, Any]) -> dict[str, float]:
    """Per run: final accuracy, mean accuracy over the evaluations after step 0 (area under the curve), error rate."""
    points = run["points"]
    later = [p["accuracy"] for p in points if p["step"] > 0]
    return {
        "final": points[-1]["accuracy"],
        "auc": statistics.fmean(later) if later else math.nan,
        "final_step_error": points[-1]["step_error_rate"],
        "s_per_step": statistics.fmean(run["step_times"]) if run["step_times"] else math.nan,
        "train_time": sum(run["step_times"]),
    }


def compare(runs_a: list[dict], runs_b: list[dict], key: str) -> dict[str, Any]:
    """Paired difference a − b over the seeds both have: mean, std, n, and a verdict that says when it is noise."""
    by_seed_b = {r["seed"]: run_summary(r)[key] for r in runs_b}
    diffs = [run_summary(r)[key] - by_seed_b[r["seed"]] for r in runs_a if r["seed"] in by_seed_b]
    n = len(diffs)
    if n == 0:
        return {"n": 0, "mean": math.nan, "std": math.nan, "verdict": "no paired seeds"}
    mean = statistics.fmean(diffs)
    std = statistics.stdev(diffs) if n > 1 else math.nan
    if n == 1:
        verdict = "one seed: no noise estimate"
    else:
        half_width = t_critical(n - 1) * std / math.sqrt(n)
        # Called real only when the 95% confidence interval of the paired mean difference excludes zero.
        verdict = "clear" if abs(mean) > half_width else "within noise"
    return {"n": n, "mean": mean, "std": std, "verdict": verdict, "diffs": diffs}


# Two-sided 95% Student t quantiles by degrees of freedom (few seeds need wide intervals: 4.30 for 3 seeds).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def t_critical(dof: int) -> float:
    return _T95.get(dof, 2.228 if dof < 30 else 1.96)


# ── plots ──────────────────────────────────────────────────────────────────────────────────────────────────────────
_COLORS = ["#333333", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]
# Different dash patterns keep estimators with identical curves visible on top of each other.
_STYLES = ["-", "-", (0, (5, 3)), "-", "-", (0, (2, 2)), "-.", ":"]


def _curves(runs: list[dict], x_key: str) -> tuple[list[float], list[float], list[float]]:
    steps = sorted({p["step"] for r in runs for p in r["points"]})
    xs, means, stds = [], [], []
    for s in steps:
        pts = [p for r in runs for p in r["points"] if p["step"] == s]
        if len(pts) < len(runs):
            continue
        xs.append(statistics.fmean(p[x_key] for p in pts))
        m, sd = mean_std([p["accuracy"] for p in pts])
        means.append(m)
        stds.append(sd if math.isfinite(sd) else 0.0)
    return xs, means, stds


def accuracy_title(results: dict[str, Any]) -> str:
    """The accuracy plots' title: what was evaluated, and what the line and band are (no "± std" for one seed)."""
    samples = results["settings"]["eval_samples"]
    what = (f"held-out accuracy ({results['settings']['eval_problems']} problems × {samples} "
            f"sample{'s' if samples > 1 else ''})")  # fmt: skip
    seeds = sorted({len(info["runs"]) for info in results["estimators"].values() if info["runs"]})
    if not seeds or seeds == [1]:
        return f"{what}; one seed per estimator, no spread shown"
    if len(seeds) == 1:
        return f"{what}; mean ± std over {seeds[0]} seeds"
    return f"{what}; mean ± std over seeds (n per estimator in the legend)"


def accuracy_figure(results: dict[str, Any], x_key: str):
    """The accuracy curves as a matplotlib figure, the legend outside the axes so that it hides no point."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.5, 4.6), layout="constrained")
    for i, (name, info) in enumerate(results["estimators"].items()):
        runs = info["runs"]
        if not runs:
            continue
        xs, means, stds = _curves(runs, x_key)
        color = _COLORS[i % len(_COLORS)]
        ax.plot(xs, [100 * m for m in means], marker="o", ms=3, color=color, linestyle=_STYLES[i % len(_STYLES)],
                label=f"{info['label']} (n={len(runs)})")  # fmt: skip
        if len(runs) > 1:
            lo = [100 * (m - s) for m, s in zip(means, stds)]
            hi = [100 * (m + s) for m, s in zip(means, stds)]
            ax.fill_between(xs, lo, hi, color=color, alpha=0.12, linewidth=0)
    ax.set_xlabel("optimizer step" if x_key == "step" else "training wall time (s, evaluation excluded)")
    ax.set_ylabel(f"accuracy at T = {results['settings']['rl']['temperature']:g} (%)")
    ax.set_title(accuracy_title(results), fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        fig.legend(fontsize=8, loc="outside right upper")
    return fig


def plot_accuracy(results: dict[str, Any], path: str | Path, x_key: str) -> Path:
    import matplotlib.pyplot as plt

    fig = accuracy_figure(results, x_key)
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ── credit maps ────────────────────────────────────────────────────────────────────────────────────────────────────
def _visible_prompt(prompt: str) -> str:
    return prompt.rstrip("\n")


def probe_rows_to_select(probe: list[dict[str, Any]], max_rows: int = 8) -> list[int]:
    """Rows of the probe to show: per prompt, one right completion per distinct text, then its wrong ones."""
    chosen, seen = [], set()
    for prompt in dict.fromkeys(r["prompt"] for r in probe):
        rows = [i for i, r in enumerate(probe) if r["prompt"] == prompt]
        right = [i for i in rows if probe[i]["reward"] == 1.0]
        wrong = sorted((i for i in rows if probe[i]["reward"] != 1.0),
                       key=lambda i: (probe[i]["analysis"]["first_error_step"] or 0, i))  # fmt: skip
        for i in right[:1] + wrong:
            if (prompt, probe[i]["text"]) not in seen:
                seen.add((prompt, probe[i]["text"]))
                chosen.append(i)
    return chosen[:max_rows]


NOT_TRAINED_NOTE = "grey = not trained (outside the loss mask), not zero credit"


def credit_panels(results: dict[str, Any]) -> tuple[dict[str, list[CreditRow]], dict[str, str]]:
    """
    One panel of rows per estimator. A token outside the estimator's loss mask (SPO's probability mask, a zero-weight
    tree node) gets `NaN`, drawn grey as "not trained": it receives no update, which a white "0" would misstate. An
    estimator that scored its own samples of the probe prompts (SPO-tree's tree) shows its own rows, and says so.
    """
    panels, notes = {}, {}
    selected, reference = None, None
    for name, info in results["estimators"].items():
        probe = info.get("probe")
        if not probe:
            continue
        own = any(r.get("own_samples") for r in probe)
        if selected is None and not own:
            selected, reference = probe_rows_to_select(probe), [r["text"] for r in probe]
        same = not own and reference is not None and [r["text"] for r in probe] == reference
        rows_of = selected if same else probe_rows_to_select(probe)
        rows = []
        masked = False
        for i in rows_of:
            r = probe[i]
            tokens = list(r["text"]) + ["⟨eos⟩"]
            trained = r.get("trained") or [1] * len(r["advantages"])
            adv = [a if t else math.nan for a, t in zip(r["advantages"], trained)]
            masked |= not all(trained)
            tokens = tokens[: len(adv)]
            if r["reward"] == 1.0:
                label = "✓ right"
            else:
                label = f"✗ slip, line {r['analysis']['first_error_step'] + 1}"
            rows.append(CreditRow(tokens=tokens, advantages=adv, label=label, marker=r["first_error_token"],
                                  prompt=_visible_prompt(r["prompt"])))  # fmt: skip
        panels[info["label"]] = rows
        share, _ = mean_std([r["credit"]["neg_share_after_first_error_step"] for r in info["runs"]])
        parts = [f"training: {100 * share:.0f}% of failed completions' negative credit from their first wrong line on"
                 if math.isfinite(share) else ""]  # fmt: skip
        if own:
            parts.append("its own tree samples of the same prompts (SPO-tree samples the group as a tree)")
        if masked:
            parts.append(NOT_TRAINED_NOTE)
        notes[info["label"]] = "; ".join(p for p in parts if p)
    return panels, notes


def write_credit_maps(results: dict[str, Any], out_dir: Path) -> list[Path]:
    panels, notes = credit_panels(results)
    if not panels:
        return []
    title = "Credit on the same sampled completions (starting policy) under each trained estimator"
    return [
        save_credit_map(panels, out_dir / "credit_map.html", title=title, notes=notes),
        save_credit_map(panels, out_dir / "credit_map.png", title=title, notes=notes),
    ]


# ── tables and the reading ─────────────────────────────────────────────────────────────────────────────────────────
def summary_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = [
        "estimator", "seeds", "final acc. (%)", "Δ final vs GRPO", "mean acc. over training (%)", "Δ mean vs GRPO",
        "final step-error rate (%)", "s / step", "neg. credit at/after 1st wrong token", "… at/after 1st wrong line",
        "tokens with extra credit", "mean abs(A) per token", "trained tokens",
    ]  # fmt: skip
    rows = []
    base = results["estimators"].get("grpo", {}).get("runs", [])
    for name, info in results["estimators"].items():
        runs = info["runs"]
        if not runs:
            continue
        sums = [run_summary(r) for r in runs]
        credit = [r["credit"] for r in runs]
        d_final = compare(runs, base, "final") if name != "grpo" and base else None
        d_auc = compare(runs, base, "auc") if name != "grpo" and base else None

        def delta(d):
            if d is None:
                return "–"
            return f"{fmt(d['mean'], d['std'], signed=True)} ({d['verdict']})"

        rows.append([
            info["label"], str(len(runs)),
            fmt(*mean_std([s["final"] for s in sums])), delta(d_final),
            fmt(*mean_std([s["auc"] for s in sums])), delta(d_auc),
            fmt(*mean_std([s["final_step_error"] for s in sums])),
            fmt(*mean_std([s["s_per_step"] for s in sums]), pct=False),
            fmt(*mean_std([c["neg_share_after_first_error_token"] for c in credit])),
            fmt(*mean_std([c["neg_share_after_first_error_step"] for c in credit])),
            fmt(*mean_std([c["extra_credit_token_frac"] for c in credit])),
            fmt(*mean_std([c.get("mean_abs_advantage", math.nan) for c in credit]), pct=False),
            fmt(*mean_std([c.get("trained_token_frac", 1.0) for c in credit])),
        ])  # fmt: skip
    return header, rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def text_table(header: list[str], rows: list[list[str]], columns: Sequence[int]) -> str:
    cols = [[header[c]] + [r[c] for r in rows] for c in columns]
    widths = [max(len(x) for x in col) for col in cols]
    lines = []
    for i in range(len(rows) + 1):
        lines.append("  ".join(col[i].ljust(w) for col, w in zip(cols, widths)))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def reading(results: dict[str, Any]) -> list[str]:
    """Plain sentences generated from the numbers: who learned faster, by how much, and what is noise."""
    est = {k: v for k, v in results["estimators"].items() if v["runs"]}
    if not est:
        return ["No estimator finished a run."]
    n_seeds = max(len(v["runs"]) for v in est.values())
    lines = []
    ranked = sorted(est.items(), key=lambda kv: -mean_std([run_summary(r)["auc"] for r in kv[1]["runs"]])[0])
    order = ", ".join(
        f"{v['label']} {fmt(*mean_std([run_summary(r)['auc'] for r in v['runs']]))}" for _, v in ranked
    )
    lines.append(
        f"**Learning speed** (mean held-out accuracy over the evaluations after step 0, i.e. the area under the curve; "
        f"mean ± std over {n_seeds} seed{'s' if n_seeds > 1 else ''}): {order}."
    )
    if "grpo" in est:
        base = est["grpo"]["runs"]
        clear, noise = [], []
        for name, info in est.items():
            if name == "grpo":
                continue
            d = compare(info["runs"], base, "auc")
            f = compare(info["runs"], base, "final")
            text = (
                f"{info['label']}: {100 * d['mean']:+.1f} points of mean accuracy vs GRPO"
                + (f" (paired std {100 * d['std']:.1f} over {d['n']} seeds)" if math.isfinite(d["std"]) else "")
                + f", {100 * f['mean']:+.1f} points at the last step"
            )
            (clear if d["verdict"] == "clear" else noise).append(text + ".")
        if clear:
            lines.append("**Differences larger than the seed noise** (the 95% confidence interval of the paired "
                         "difference excludes 0): " + " ".join(clear))  # fmt: skip
        if noise:
            label = "one seed, so no noise estimate" if n_seeds == 1 else "within noise"
            lines.append(f"**Differences {label}**: " + " ".join(noise))
        if n_seeds == 1:
            lines.append("With one seed nothing here separates signal from noise; run the default mode (3 seeds) or "
                         "`--seeds 5` before concluding.")  # fmt: skip
    for twins in _identical_curves(est):
        infos = [v for v in est.values() if v["label"] in twins]
        same_credit = all(
            [r["credit"] for r in sorted(i["runs"], key=lambda r: r["seed"])]
            == [r["credit"] for r in sorted(infos[0]["runs"], key=lambda r: r["seed"])]
            for i in infos
        )
        lines.append(
            f"**Identical curves**: {' and '.join(twins)} gave the same held-out accuracy at every evaluation on "
            "every seed. "
            + ("Their credit statistics are identical too: check that these settings really differ."
               if same_credit else
               "Their credit statistics differ (table), so their updates differed: either too little to change "
               "the sampled answers under the shared sampling seeds, or by a coincidence of counts (each accuracy "
               f"is a count out of {results['settings'].get('eval_problems', '?')} evaluation problems; the answers "
               "themselves are not compared).")
        )  # fmt: skip
    times = {v["label"]: mean_std([run_summary(r)["s_per_step"] for r in v["runs"]])[0] for v in est.values()}
    if "grpo" in est and math.isfinite(times.get(est["grpo"]["label"], math.nan)):
        g = times[est["grpo"]["label"]]
        costs = ", ".join(f"{k} ×{t / g:.1f}" for k, t in times.items() if k != est["grpo"]["label"])
        lines.append(f"**Cost per optimizer step** relative to GRPO ({g:.2f} s/step on this machine): {costs}. "
                     "`accuracy_vs_time.png` compares the estimators at equal wall time.")  # fmt: skip
    credit = []
    for v in est.values():
        tok, _ = mean_std([r["credit"]["neg_share_after_first_error_token"] for r in v["runs"]])
        line, _ = mean_std([r["credit"]["neg_share_after_first_error_step"] for r in v["runs"]])
        credit.append(f"{v['label']} {100 * tok:.0f}% / {100 * line:.0f}%")
    lines.append(
        "**Where the negative credit of failed completions falls** (share at/after the first wrong token / at/after "
        "the start of the first wrong line; the rest lands on correct steps before the slip): " + ", ".join(credit)
        + ". GRPO spreads one advantage over every token, so its share is just the fraction of tokens after the slip."
    )
    scale = []
    for v in est.values():
        a, _ = mean_std([r["credit"].get("mean_abs_advantage", math.nan) for r in v["runs"]])
        z, _ = mean_std([r["credit"].get("zero_advantage_token_frac", math.nan) for r in v["runs"]])
        if math.isfinite(a):
            scale.append(f"{v['label']} {a:.2f} ({100 * z:.0f}% zeros)")
    if scale:
        lines.append(
            "**Not only credit differs**: at one shared learning rate the estimators also ask for updates of "
            "different sizes. Mean |A| per trained token (share of trained tokens with A = 0): " + ", ".join(scale)
            + ". GRPO-family "
            "advantages are 0 for every group whose completions all got the same reward; a critic or Monte-Carlo "
            "baseline still moves those tokens. A faster curve can come from either."
        )
    return lines


def _identical_curves(est: dict[str, Any]) -> list[list[str]]:
    def key(info):
        runs = sorted(info["runs"], key=lambda r: r["seed"])
        return tuple((r["seed"], tuple(round(p["accuracy"], 6) for p in r["points"])) for r in runs)

    groups: dict[tuple, list[str]] = {}
    for info in est.values():
        groups.setdefault(key(info), []).append(info["label"])
    return [labels for labels in groups.values() if len(labels) > 1]


def write_report(results: dict[str, Any], out_dir: Path) -> Path:
    s = results["settings"]
    start = results["start"]
    header, rows = summary_table(results)
    lines = [
        "# trl-credit demo: where each estimator puts credit, and how fast it learns",
        "",
        f"Mode `{s['mode']}`, {s['seeds']} seed(s), {len(results['estimators'])} estimator(s). Total wall time "
        f"{results['wall_time_s'] / 60:.1f} min on {results['machine']['cpus']} CPU core(s) with "
        f"{results['machine']['threads']} torch thread(s); 1-minute load average "
        f"{results['machine']['load_start']:.1f} "
        f"at the start and {results['machine']['load_end']:.1f} at the end (other processes share the machine when "
        f"it is above 0); CPU time of the demo process {results['machine']['cpu_time_s'] / 60:.1f} min. "
        "Versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items()) + ".",
        "",
        "## The task",
        "",
        "Running sums written one addition per line; the reward is 1 iff the last line `#<n>` has the right sum. An "
        "arithmetic slip carried forward consistently dooms the answer, although every later line is right given "
        "the wrong one, so a failed completion holds correct steps before *and* after its one bad token.",
        "",
        "```",
        f"prompt      {results['example']['prompt']!r}",
        f"completion  {results['example']['completion']!r}",
        "```",
        "",
        f"Problems: {s['spec']['min_terms']}–{s['spec']['max_terms']} terms in 1…{s['spec']['max_term']}. Disjoint "
        f"splits: {s['num_train']} RL training prompts, {s['num_validation']} validation problems (tuning and the "
        f"credit-map probe only), {s['eval_problems']} evaluation problems (every reported accuracy).",
        "",
        "## Starting policy",
        "",
        f"A Qwen2 ({s['sft']['num_hidden_layers']} layers, hidden {s['sft']['hidden_size']}, head dim "
        f"{s['sft']['hidden_size'] // s['sft']['num_attention_heads']}) with a character-level tokenizer, trained from "
        f"scratch for {s['sft']['steps']} steps on demonstrations whose additions are wrong with probability "
        f"{s['sft']['error_rate']:g} (the slip is carried forward). "
        + ("Loaded from the cache" if results["sft"]["cached"] else f"Trained in {results['sft']['time_s']:.0f} s")
        + ".",
        "",
        f"On the evaluation set at T = {s['rl']['temperature']:g}: accuracy **{100 * start['accuracy']:.1f}%**, "
        f"per-addition error rate **{100 * start['step_error_rate']:.1f}%**, completions off the gold path "
        f"{100 * start['off_gold_rate']:.1f}%.",
        "",
        "## Results",
        "",
        markdown_table(header, rows),
        "",
        "Δ columns are paired differences with GRPO on the same seed (mean ± std over seeds; 'clear' = the 95% "
        "confidence interval of the paired mean excludes 0, Student t with n − 1 degrees of freedom). 'Tokens with "
        "extra credit' = share of trained tokens whose advantage differs from the GRPO advantage of the same "
        "completion. 'Trained tokens' = share of the completions' tokens inside the loss mask (below 100% only for "
        "estimators that return one, e.g. SPO's probability mask); the credit columns count trained tokens only.",
        "",
        "![accuracy vs step](accuracy_vs_step.png)",
        "",
        "![accuracy vs time](accuracy_vs_time.png)",
        "",
        "## Reading",
        "",
    ]
    lines += [f"- {t}" for t in reading(results)]
    lines += [
        f"- Evaluation noise: one evaluation samples {s['eval_problems'] * s['eval_samples']} completions, a binomial "
        f"standard error of about {100 * math.sqrt(0.25 / (s['eval_problems'] * s['eval_samples'])):.1f} points; every "
        "run samples them with the same seed, which makes paired differences less noisy than that.",
        "",
        "## Where the credit goes",
        "",
        "Same completions (sampled once from the starting policy for a validation problem), scored by each trained "
        "estimator's own trainer (rewards, Monte-Carlo rollouts or critic, estimator, token weights). Red = pushed "
        "down, blue = pushed up, grey = not trained (outside the estimator's loss mask, e.g. SPO's probability "
        "mask); a black box marks the first wrong token. Colours are scaled per estimator. SPO-tree samples its "
        "group as a tree, so it shows its own samples of the same prompts.",
        "",
        "![credit map](credit_map.png)",
        "",
        "Interactive version (hover a token for its value): [credit_map.html](credit_map.html).",
        "",
        "## Settings",
        "",
        "| setting | value |",
        "|---|---|",
    ]
    rl = s["rl"]
    for k, v in [
        ("RL steps per run", rl["steps"]), ("evaluate every", f"{rl['eval_every']} steps"),
        ("prompts per step × group size G", f"{rl['prompts_per_step']} × {rl['num_generations']}"),
        ("learning rate (AdamW, constant)", rl["learning_rate"]), ("temperature (training and evaluation)",
        rl["temperature"]), ("KL (beta, kl_coef)", "0 for every run"), ("loss", "TRL default (`dapo`), one "
        "update per generation batch"), ("scale_rewards", "`group` for every estimator"),
        ("evaluation", f"{s['eval_problems']} problems × {s['eval_samples']} sample(s), one sampling seed for all"),
        ("SFT", f"{s['sft']['steps']} steps × {s['sft']['batch_size']} demos, lr {s['sft']['learning_rate']}, "
                f"error rate {s['sft']['error_rate']}"),
    ]:  # fmt: skip
        lines.append(f"| {k} | {v} |")
    lines += ["", "| estimator | what it does | config |", "|---|---|---|"]
    for name, info in results["estimators"].items():
        cfg = ", ".join(f"`{k}={v!r}`" for k, v in info["config"].items())
        lines.append(f"| {info['label']} | {info['description']} | {cfg} |")
    if results.get("unavailable"):
        lines += ["", "## Estimators not run", ""]
        lines += [f"- `{k}`: {v}" for k, v in results["unavailable"].items()]
    if results.get("failed"):
        lines += ["", "## Runs that failed", ""]
        lines += [f"- `{k}`: {v}" for k, v in results["failed"].items()]
    lines.append("")
    path = out_dir / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
