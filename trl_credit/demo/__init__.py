r"""
`trl-credit demo`: where each credit-assignment estimator puts credit, and how fast it learns, on any CPU in minutes.

    trl-credit demo                   # 3 seeds; ~15 min on 2 CPU cores, the starting policy's 2 min included
    trl-credit demo --quick           # 1 seed, 24 steps; 2.5-6 min, 2-3.6 min once the starting policy is cached
    trl-credit demo --output-dir DIR  # default: demo_output/
    trl-credit demo --real --quick    # the comparison on the real SmolLM2-135M-Instruct (LoRA): `trl_credit.demo.real`

Steps (nothing is downloaded):

1. an embedded task: running-sum chains where one slip dooms the answer (`trl_credit.demo.task`);
2. a starting policy that slips: a tiny Qwen2 trained from scratch on demonstrations with injected step errors,
   cached on disk (`trl_credit.demo.sft`);
3. RL from that policy with every estimator in `trl_credit.demo.rl.PRESETS` (same prompts, budget and seeds),
   evaluated every k steps on a held-out set at the training temperature, with credit diagnostics per batch;
4. `report.md`, `accuracy_vs_step.png`, `accuracy_vs_time.png`, `credit_map.png`, `credit_map.html` and
   `results.json` in the output directory (`trl_credit.demo.report`).

`--tune` runs the validation sweep used to choose the learning rate and group size (never the evaluation set).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Mode:
    """Budget of a mode: RL steps per run, evaluation period, seeds per estimator, evaluation problems."""

    steps: int
    eval_every: int
    seeds: int
    eval_problems: int


MODES = {
    "default": Mode(steps=40, eval_every=5, seeds=3, eval_problems=256),
    "quick": Mode(steps=24, eval_every=4, seeds=1, eval_problems=128),
}
NUM_TRAIN = 2000
NUM_VALIDATION = 256
SPLIT_SEED = 0
EVAL_SAMPLING_SEED = 1234
PROBE_SEED = 7


def _parser() -> argparse.ArgumentParser:
    from .real import REAL_PRESETS, RealSettings
    from .rl import PRESETS, RLSettings
    from .sft import SFTSettings

    from ..cli import ArgumentParser, number

    rl, sft = RLSettings(), SFTSettings()
    positive = number(int, 1, what="an integer >= 1")
    p = ArgumentParser(
        prog="trl-credit demo",
        description="Train a tiny policy with every credit-assignment estimator on an embedded task and show where "
        "each puts credit and how fast it learns (CPU, no downloads).",
    )
    p.add_argument("--quick", action="store_true",
                   help="1 seed, 24 steps, 128 evaluation problems: 2.5-6 min on 2 cores, 2-3.6 min once the "
                        "starting policy is cached (docs/demo.md: what the time depends on).")  # fmt: skip
    p.add_argument("--seeds", type=positive, default=None, help="Seeds per estimator (default 3; 1 with --quick).")
    p.add_argument("--output-dir", default="demo_output", help="Where the report, plots and maps go.")
    p.add_argument("--estimators", default=None,
                   help=f"Comma-separated subset of: {', '.join(PRESETS)} (default: all). With --real: "
                        f"{', '.join(REAL_PRESETS)} (default: all; grpo,tempo with --quick).")  # fmt: skip
    p.add_argument("--steps", type=positive, default=None, help="RL steps per run (default 40; 24 with --quick).")
    p.add_argument("--eval-every", type=positive, default=None,
                   help="Evaluate every k steps (default 5; 4 with --quick).")  # fmt: skip
    p.add_argument("--eval-problems", type=positive, default=None,
                   help="Evaluation problems (default 256; 128 with --quick).")  # fmt: skip
    p.add_argument("--learning-rate", type=number(float, 0.0, low_open=True, what="a learning rate > 0"),
                   default=None, help=f"RL learning rate (AdamW, constant; default {rl.learning_rate:g}, "
                                      f"{RealSettings().learning_rate:g} with --real).")  # fmt: skip
    p.add_argument("--num-generations", type=positive, default=None,
                   help=f"Group size G (at least 2: the estimators compare a group's completions; default "
                        f"{rl.num_generations}, {RealSettings().num_generations} with --real).")  # fmt: skip
    p.add_argument("--prompts-per-step", type=positive, default=None,
                   help=f"Prompts per optimizer step (default {rl.prompts_per_step}, "
                        f"{RealSettings().prompts_per_step} with --real).")  # fmt: skip
    p.add_argument("--sft-steps", type=positive, default=sft.steps, help="SFT steps of the starting policy.")
    p.add_argument("--error-rate", type=number(float, 0.0, what="a probability in [0, 1)"), default=sft.error_rate,
                   help="Probability that a demonstration's addition is wrong (the starting slip rate).")  # fmt: skip
    p.add_argument("--cache-dir", default=None,
                   help="Where the starting policy is cached (default: $XDG_CACHE_HOME/trl_credit/demo).")  # fmt: skip
    p.add_argument("--threads", default="auto",
                   help="torch threads: a number, or 'auto' (the cores not already busy, at least 1).")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="No progress bars.")
    p.add_argument("--max-completion-length", type=positive, default=None,
                   help=f"--real only: tokens per completion (default {RealSettings().max_completion_length}).")
    p.add_argument("--real", action="store_true",
                   help="The comparison on the real SmolLM2-135M-Instruct (LoRA) and generated word problems, T = "
                        "0.7: resumable, one result file per (estimator, seed) run (docs/demo.md). Default seeds 1, "
                        "output dir demo_output_real; --quick: grpo,tempo x 2 steps of 2 x 4 short completions.")
    p.add_argument("--tune", action="store_true",
                   help="Run the validation sweep over learning rate and group size (writes tune.md).")  # fmt: skip
    return p


def _threads(value: str) -> int | None:
    """The torch thread count of `--threads`, or `None` when `value` is neither `auto` nor an integer >= 1."""
    if value != "auto":
        try:
            n = int(value)
        except ValueError:
            return None
        return n if n >= 1 else None
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    # torch's OpenMP threads spin-wait on each other: on a busy machine two threads run several times slower than one.
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(cpus, int(cpus - busy + 0.5)))


def _quiet_environment() -> None:
    # Offline by construction: the demo builds everything locally, and a stray Hub lookup must fail fast.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    os.environ.setdefault("WANDB_DISABLED", "true")
    warnings.filterwarnings("ignore")
    import transformers
    import datasets

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("trl", "transformers", "torch"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    out["python"] = sys.version.split()[0]
    return out


def _cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> int:
    """
    Entry point of `trl-credit demo`; returns the exit status: 2 when the arguments or an estimator's config are
    rejected (checked before any training), 1 if a run failed (the report is still written), else 0.
    """
    from ..cli import quiet_tested_vllm_warning

    quiet_tested_vllm_warning()
    parser = _parser()
    args = parser.parse_args(argv)
    _quiet_environment()
    if args.real:
        if args.tune:
            parser.error("argument --tune: not available with --real (the real demo is not tuned on any split).")
        from .real import main_real

        return main_real(args, parser)
    if args.max_completion_length is not None:
        parser.error("argument --max-completion-length: only with --real (the chain task fixes its length).")
    import torch

    from .rl import PRESETS, RLSettings
    from .sft import SFTSettings
    from .task import ChainSpec

    threads = _threads(args.threads)
    if threads is None:
        parser.error(f"argument --threads: expected an integer >= 1 or 'auto', got {args.threads!r}")
    mode_name = "quick" if args.quick else "default"
    mode = MODES[mode_name]
    names = list(dict.fromkeys(n.strip() for n in (args.estimators or ",".join(PRESETS)).split(",") if n.strip()))
    unknown = [n for n in names if n not in PRESETS]
    if unknown or not names:
        parser.error(f"argument --estimators: unknown or no estimator(s) {unknown}; choose from {list(PRESETS)}.")
    if not args.error_rate < 1.0:
        parser.error(f"argument --error-rate: expected a probability in [0, 1), got {args.error_rate}")
    output_dir = Path(args.output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        parser.error(f"argument --output-dir: cannot create {output_dir} ({e.strerror or e})")
    torch.set_num_threads(threads)
    spec = ChainSpec()
    sft = SFTSettings(spec=spec, steps=args.sft_steps, error_rate=args.error_rate)
    rl = RLSettings(
        steps=args.steps or mode.steps,
        eval_every=args.eval_every or mode.eval_every,
        prompts_per_step=args.prompts_per_step or RLSettings.prompts_per_step,
        num_generations=args.num_generations or RLSettings.num_generations,
        learning_rate=args.learning_rate or RLSettings.learning_rate,
    )
    cache = Path(args.cache_dir) if args.cache_dir else Path(
        os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")
    ) / "trl_credit" / "demo"  # fmt: skip
    # Every estimator's config, built with these settings before any work (the starting policy alone takes minutes).
    max_len = spec.max_completion_chars + 1  # + EOS
    runs = _tune_settings(rl) if args.tune else [rl]
    runnable, unavailable, rejected = _check_presets(names, runs, max_len)
    if rejected:
        print("trl-credit demo: error: these settings are rejected by the estimators' configs (nothing was run):",
              file=sys.stderr)  # fmt: skip
        for name, why in rejected.items():
            print(f"  {name}: {why}", file=sys.stderr)
        print("Change the settings, or leave those estimators out with --estimators.", file=sys.stderr)
        return 2
    for name, why in unavailable.items():
        print(f"skipping {name} (not available in this installation): {why}")
    if not runnable:
        print("trl-credit demo: error: none of the requested estimators can run in this installation (see above); "
              "nothing was run.", file=sys.stderr)  # fmt: skip
        return 2
    context = dict(
        mode=mode_name, spec=spec, sft=sft, rl=rl, names=runnable, seeds=args.seeds or mode.seeds,
        eval_problems=args.eval_problems or mode.eval_problems, cache=cache, threads=threads,
        progress=not args.no_progress, output_dir=output_dir,
    )  # fmt: skip
    if args.tune:
        return _tune(**context)
    return _demo(**context, requested=names, unavailable=unavailable)


# ── the demo ───────────────────────────────────────────────────────────────────────────────────────────────────────
def _start_policy(sft, cache: Path, progress: bool):
    from transformers import AutoModelForCausalLM

    from .sft import load_or_train
    from .task import load_tokenizer

    path, info = load_or_train(sft, cache, progress=progress)
    how = "cached" if info["cached"] else f"trained in {info['time_s']:.0f} s"
    print(f"starting policy: {path} ({how})")
    return path, info, load_tokenizer(path), AutoModelForCausalLM.from_pretrained(path)


def _check_presets(names, settings: list, max_len: int) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """
    Build every preset's config with every `RLSettings` of `settings`: `(runnable, unavailable, rejected)`.
    `unavailable`: the preset cannot be built even with the default settings (an estimator or trainer this
    installation lacks); `rejected`: the given settings are what its config refuses (e.g. `--num-generations 1`).
    """
    from .rl import PRESETS, RLSettings, build_config

    ok, unavailable, rejected = [], {}, {}
    with tempfile.TemporaryDirectory() as tmp:

        def error(preset, rl) -> str | None:
            try:
                build_config(preset, rl, output_dir=tmp, seed=0, max_completion_length=max_len)
            except Exception as e:  # noqa: BLE001 - reported verbatim
                return f"{type(e).__name__}: {e}"
            return None

        for name in names:
            problems = [(rl, why) for rl in settings if (why := error(PRESETS[name], rl)) is not None]
            if not problems:
                ok.append(name)
            elif (default_error := error(PRESETS[name], RLSettings())) is not None:
                unavailable[name] = default_error
            else:
                rl, why = problems[0]
                changed = {k: v for k, v in asdict(rl).items() if v != getattr(RLSettings(), k)}
                rejected[name] = f"{why} (settings that differ from the defaults: {changed})"
    return ok, unavailable, rejected


def _demo(*, mode, spec, sft, rl, names, seeds, eval_problems, cache, threads, progress, output_dir, requested=None,
          unavailable=None) -> int:  # fmt: skip
    from tqdm.auto import tqdm

    from . import report
    from .rl import PRESETS, EvalPoint, Evaluator, make_probe, run_one
    from .task import gold_completion, make_splits, prompt_text

    t0 = time.perf_counter()
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
    output_dir.mkdir(parents=True, exist_ok=True)
    max_len = spec.max_completion_chars + 1  # + EOS
    runnable, unavailable = list(names), dict(unavailable or {})
    splits = make_splits(spec, NUM_TRAIN, NUM_VALIDATION, eval_problems, seed=SPLIT_SEED)

    # ── starting policy ──
    sft_path, sft_info, tokenizer, model = _start_policy(sft, cache, progress)
    evaluator = Evaluator(tokenizer, splits.evaluation, rl.temperature, max_len, samples=1, seed=EVAL_SAMPLING_SEED)
    start = evaluator(model)
    print(f"starting policy on the evaluation set at T={rl.temperature:g}: accuracy {100 * start['accuracy']:.1f}%, "
          f"per-addition error rate {100 * start['step_error_rate']:.1f}%")  # fmt: skip
    start_point = EvalPoint(0, 0.0, start["accuracy"], start["step_error_rate"])
    probe = make_probe(model, tokenizer, splits.validation, num_generations=rl.num_generations,
                       temperature=rl.temperature, max_new_tokens=max_len, seed=PROBE_SEED)  # fmt: skip
    del model

    # ── RL with every estimator (their configs were checked before the starting policy) ──
    estimators: dict[str, dict[str, Any]] = {
        name: {"label": PRESETS[name].label, "description": PRESETS[name].description,
               "config": PRESETS[name].fields(rl), "runs": [], "probe": None}
        for name in runnable
    }  # fmt: skip
    failed: dict[str, str] = {}
    bar = tqdm(total=len(runnable) * seeds * rl.steps, desc="RL", disable=not progress, unit="step")
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(seeds):
            for name in runnable:
                if name in failed:
                    bar.update(rl.steps)
                    continue
                bar.set_description(f"RL {PRESETS[name].label} seed {seed}")
                done_before = bar.n
                try:
                    result = run_one(
                        name, PRESETS[name], rl, seed=seed, sft_path=sft_path, train_problems=splits.train,
                        evaluator=evaluator, start_point=start_point, max_completion_length=max_len,
                        run_dir=Path(tmp) / f"{name}-{seed}", probe=probe if seed == 0 else None,
                        on_step=lambda: bar.update(1),
                    )  # fmt: skip
                except Exception as e:  # noqa: BLE001 - one broken estimator must not hide the others' results
                    traceback.print_exc()
                    failed[name] = f"{type(e).__name__}: {e}"
                    bar.update(rl.steps - (bar.n - done_before))
                    continue
                run = result.as_dict()
                probe_rows = run.pop("probe")
                if run.pop("probe_error") is not None:
                    failed[f"{name} (credit map only)"] = result.probe_error
                if probe_rows is not None:
                    for row, p in zip(probe_rows, probe["prompts"]):
                        row["prompt"] = p
                    estimators[name]["probe"] = probe_rows
                estimators[name]["runs"].append(run)
                last = run["points"][-1]
                bar.write(f"{PRESETS[name].label:>26} seed {seed}: accuracy {100 * start['accuracy']:.1f}% → "
                          f"{100 * last['accuracy']:.1f}% in {rl.steps} steps, "
                          f"{sum(run['step_times']) / len(run['step_times']):.2f} s/step")  # fmt: skip
    bar.close()
    for name in failed:
        if name in estimators:  # a run that failed drops the estimator's other seeds too: no partial averages
            estimators[name]["runs"] = []

    # ── outputs ──
    example_terms = splits.validation[0]
    results = {
        "settings": {
            "mode": mode, "seeds": seeds, "spec": asdict(spec), "sft": {**asdict(sft), "spec": asdict(spec)},
            "rl": asdict(rl), "eval_problems": eval_problems, "eval_samples": 1, "num_train": NUM_TRAIN,
            "num_validation": NUM_VALIDATION, "estimators": list(requested or names),
        },
        "start": start,
        "sft": {k: v for k, v in sft_info.items() if k != "settings"},
        "example": {"prompt": prompt_text(example_terms), "completion": gold_completion(example_terms)},
        "estimators": estimators,
        "unavailable": unavailable,
        "failed": failed,
        "versions": _versions(),
        "wall_time_s": time.perf_counter() - t0,
        "machine": {
            "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "threads": threads,
            "load_start": load_start,
            "load_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan,
            # CPU seconds of this process: close to the wall time on an idle machine with one thread, whatever the
            # load was during this run.
            "cpu_time_s": _cpu_seconds(),
        },
    }  # fmt: skip
    (output_dir / "results.json").write_text(json.dumps(results, indent=1, default=float), encoding="utf-8")
    report.plot_accuracy(results, output_dir / "accuracy_vs_step.png", "step")
    report.plot_accuracy(results, output_dir / "accuracy_vs_time.png", "train_time_s")
    report.write_credit_maps(results, output_dir)
    path = report.write_report(results, output_dir)
    header, rows = report.summary_table(results)
    print()
    print(report.text_table(header, rows, columns=(0, 1, 2, 4, 5, 7, 9, 10)))
    machine = results["machine"]
    print(f"\nwall time {results['wall_time_s'] / 60:.1f} min (CPU time {machine['cpu_time_s'] / 60:.1f} min, load "
          f"average {load_start:.1f} → {machine['load_end']:.1f}); report: {path}")  # fmt: skip
    if not any(info["runs"] for info in estimators.values()):
        print("trl-credit demo: error: no estimator finished a run (see the failures above and in the report).",
              file=sys.stderr)  # fmt: skip
        return 1
    return 1 if failed else 0


# ── the validation sweep ───────────────────────────────────────────────────────────────────────────────────────────
TUNE_GRID = {"learning_rate": (1e-4, 3e-4, 1e-3), "num_generations": (4, 8)}


def _tune_settings(rl) -> list:
    """The sweep's settings: learning rate × group size at the same number of completions per step."""
    completions_per_step = rl.prompts_per_step * rl.num_generations
    return [
        replace(rl, learning_rate=lr, num_generations=g, prompts_per_step=max(1, completions_per_step // g))
        for lr in TUNE_GRID["learning_rate"] for g in TUNE_GRID["num_generations"]
    ]  # fmt: skip


def _tune(*, mode, spec, sft, rl, names, seeds, eval_problems, cache, threads, progress, output_dir) -> int:
    """Grid over learning rate × group size on the validation split (same completions per step for every G)."""
    from tqdm.auto import tqdm

    from . import report
    from .rl import PRESETS, EvalPoint, Evaluator, run_one
    from .task import make_splits

    output_dir.mkdir(parents=True, exist_ok=True)
    max_len = spec.max_completion_chars + 1
    splits = make_splits(spec, NUM_TRAIN, NUM_VALIDATION, eval_problems, seed=SPLIT_SEED)
    sft_path, _, tokenizer, model = _start_policy(sft, cache, progress)
    evaluator = Evaluator(tokenizer, splits.validation, rl.temperature, max_len, samples=1, seed=EVAL_SAMPLING_SEED)
    start = evaluator(model)
    start_point = EvalPoint(0, 0.0, start["accuracy"], start["step_error_rate"])
    completions_per_step = rl.prompts_per_step * rl.num_generations
    grid = _tune_settings(rl)
    rows = []
    bar = tqdm(total=len(grid) * len(names) * seeds * rl.steps, desc="tune", disable=not progress, unit="step")
    with tempfile.TemporaryDirectory() as tmp:
        for settings in grid:
            lr, g = settings.learning_rate, settings.num_generations
            for name in names:
                summaries = []
                for seed in range(seeds):
                    result = run_one(name, PRESETS[name], settings, seed=100 + seed, sft_path=sft_path,
                                     train_problems=splits.train, evaluator=evaluator, start_point=start_point,
                                     max_completion_length=max_len, run_dir=Path(tmp) / "run",
                                     on_step=lambda: bar.update(1))  # fmt: skip
                    summaries.append(report.run_summary(result.as_dict()))
                auc = report.mean_std([s["auc"] for s in summaries])
                final = report.mean_std([s["final"] for s in summaries])
                rows.append([f"{lr:g}", str(g), str(settings.prompts_per_step), PRESETS[name].label,
                             report.fmt(*auc), report.fmt(*final)])  # fmt: skip
                bar.write(" | ".join(rows[-1]))
    bar.close()
    header = ["learning rate", "G", "prompts/step", "estimator", "mean val. acc. over training (%)",
              "final val. acc. (%)"]  # fmt: skip
    text = [
        "# trl-credit demo: validation sweep",
        "",
        f"Validation split ({NUM_VALIDATION} problems, disjoint from the evaluation set), {rl.steps} steps, "
        f"{completions_per_step} completions per step, seeds {', '.join(str(100 + s) for s in range(seeds))} "
        f"(not the demo's). Starting policy: {100 * start['accuracy']:.1f}% validation accuracy.",
        "",
        report.markdown_table(header, rows),
        "",
    ]
    path = output_dir / "tune.md"
    path.write_text("\n".join(text), encoding="utf-8")
    print(f"\n{report.text_table(header, rows, columns=range(len(header)))}\n\nwritten: {path}")
    return 0
