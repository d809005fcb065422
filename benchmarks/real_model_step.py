"""
Step time and peak memory of real-model RL steps on CPU: SmolLM2-135M-Instruct (`trl_credit.models`), LoRA r = 16 on
every linear layer, vLLM colocate on vLLM's CPU build, generated word problems, with the **old** and the **new** CPU
defaults (issue 16), for GRPO, TEMPO and VinePPO (K = 4).

- `old`: the colocated engine's KV cache fixed at 64 MiB, TRL's importance-sampling correction on (an extra no-grad
  forward over the batch), and vLLM's linear layers run through `F.linear` on the live weights (the first version of
  `keep_live_linear_weights`, before commit 553e57c);
- `new`: the current defaults: KV cache sized for the generation batch (`vllm_cpu_kv_cache_mib=None`), the
  importance-sampling correction off (`vllm_importance_sampling_correction=None` on a CPU build), vLLM's packed GEMM
  kernels kept and re-packed after each weight sync;
- `hf` (optional): no vLLM, transformers' `generate` (what `trl-credit demo --real` uses), IS correction off.

Each (estimator, defaults) run is a subprocess of its own (so that its peak RSS, `ru_maxrss`, is its own; the colocated
vLLM engine runs in the trainer's process), runs `--steps` steps of `--prompts` prompts × `--generations` completions
of ≤ `--max-tokens` tokens at T = 0.7 from the same seed, and reports every step's wall time, the mean completion
length and the 1-minute load average sampled during the run. The summary compares the mean of the steps after the
first (vLLM and the allocator warm up in step 1) and prints the new/old ratios measured in this one invocation.

Every finished run is appended to `--out` (JSON lines) at once, with the tail of its log next to it on failure; a
later invocation with the same `--out` and settings skips the runs already there and summarises them all, so an
interrupted matrix can be finished:

    flock /tmp/realmodel.lock python benchmarks/real_model_step.py --out benchmarks/results/real_model_step.jsonl
    flock /tmp/realmodel.lock python benchmarks/real_model_step.py --estimators grpo --steps 2 --max-tokens 32 \
        --prompts 2 --generations 4 --out /tmp/smoke.jsonl                                           # smoke run

Torch threads default to 1 (`--threads auto`: the cores not already busy). torch's OpenMP threads spin-wait on each
other: on a shared machine 2 threads can run several times slower than 1, so compare only runs with the same count.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


SETTING_KEYS = ("steps", "prompts", "generations", "max_tokens", "vine_k", "threads")


def _threads(value: str) -> int:
    if value != "auto":
        return max(1, int(value))
    cpus = len(os.sched_getaffinity(0))
    return max(1, min(cpus, int(cpus - os.getloadavg()[0] + 0.5)))


def _old_live_weights() -> None:
    """The first `keep_live_linear_weights` (trl_credit/generation/vllm_cpu.py before 553e57c), verbatim: every 2-D
    vLLM linear layer through `F.linear` on its live weight, no packed kernel. Marked as trl_credit's patch, so that
    the current `keep_live_linear_weights()` leaves it in place and `refresh_packed_linear_weights` finds nothing to
    re-pack (no layer carries `_trl_credit_packed`)."""
    import torch.nn.functional as F
    import vllm.model_executor.layers.utils as vlu

    orig = vlu.dispatch_cpu_unquantized_gemm

    def dispatch(layer, remove_weight):
        weight = getattr(layer, "weight", None)
        if weight is None or weight.ndim != 2:
            return orig(layer, remove_weight)
        layer.cpu_linear = lambda x, w, b: F.linear(x, w, b)

    dispatch._trl_credit_patch = True
    vlu.dispatch_cpu_unquantized_gemm = dispatch


class _LoadSampler:
    """The 1-minute load average every `period` seconds in a daemon thread."""

    def __init__(self, period: float = 10.0):
        import threading

        self.samples = [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period,), daemon=True)
        self._thread.start()

    def _run(self, period):
        while not self._stop.wait(period):
            self.samples.append(os.getloadavg()[0])

    def stop(self) -> dict:
        self._stop.set()
        self.samples.append(os.getloadavg()[0])
        s = self.samples
        return {"load_avg_mean": round(sum(s) / len(s), 2), "load_avg_min": round(min(s), 2),
                "load_avg_max": round(max(s), 2)}  # fmt: skip


def run_one(a) -> dict:
    """One (estimator, defaults) run in this process; returns its measurements."""
    import resource
    import tempfile

    import torch
    from peft import LoraConfig
    from transformers import TrainerCallback

    from trl_credit import GRPOConfig, GRPOTrainer
    from trl_credit.data import load_math_dataset, write_word_problems
    from trl_credit.generation import vllm_cpu
    from trl_credit.models import smollm2_checkpoint
    from trl_credit.rewards import gsm8k_reward

    load = _LoadSampler()
    torch.set_num_threads(a.threads)
    use_vllm = a.defaults != "hf"
    if a.defaults == "old":
        _old_live_weights()
    if use_vllm:
        vllm_cpu.apply_colocate(kv_cache_mib=64 if a.defaults == "old" else None)
    model = smollm2_checkpoint()
    out = tempfile.mkdtemp(prefix="real_model_step_")
    data = load_math_dataset("gsm8k", "train", write_word_problems(os.path.join(out, "data"), {"train": 256}))

    def cpu_time() -> float:  # user + system seconds of every thread of this process (vLLM's engine included)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    class Timer(TrainerCallback):
        """Wall and CPU seconds per optimizer step (CPU time hardly depends on the other users' load)."""

        def __init__(self):
            self.start, self.cpu_start, self.steps, self.cpu_steps = 0.0, 0.0, [], []

        def on_step_begin(self, *args, **kwargs):
            self.start, self.cpu_start = time.perf_counter(), cpu_time()

        def on_step_end(self, *args, **kwargs):
            self.steps.append(time.perf_counter() - self.start)
            self.cpu_steps.append(cpu_time() - self.cpu_start)

    extra = {"vine_num_rollouts": a.vine_k, "step_split": "newline"} if a.estimator == "vineppo" else {}
    args = GRPOConfig(
        output_dir=out, advantage_estimator=a.estimator, max_steps=a.steps, per_device_train_batch_size=a.prompts *
        a.generations, num_generations=a.generations, max_completion_length=a.max_tokens, temperature=0.7,
        learning_rate=1e-4, use_vllm=use_vllm, vllm_mode="colocate", vllm_max_model_length=a.max_tokens + 256,
        vllm_importance_sampling_correction=True if a.defaults == "old" else None, bf16=False, use_cpu=True,
        report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, gradient_checkpointing=False,
        seed=0, **extra,
    )  # fmt: skip
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    timer = Timer()
    t0 = time.perf_counter()
    trainer = GRPOTrainer(model=model, reward_funcs=gsm8k_reward, args=args, train_dataset=data, peft_config=lora,
                          callbacks=[timer])  # fmt: skip
    init_s = time.perf_counter() - t0
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    kv = packed = None
    if use_vllm:
        engine = trainer.vllm_generation.llm.llm_engine
        kv = engine.vllm_config.cache_config.kv_cache_memory_bytes
        vllm_model = engine.model_executor.driver_worker.model_runner.model
        packed = sum(bool(getattr(m, "_trl_credit_packed", False)) for m in vllm_model.modules())
    return {
        "estimator": a.estimator, "defaults": a.defaults, "steps_s": [round(s, 1) for s in timer.steps],
        "cpu_steps_s": [round(s, 1) for s in timer.cpu_steps],
        "init_s": round(init_s, 1), "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "kv_cache_mib": None if kv is None else kv // 2**20, "packed_linear_layers": packed,
        "threads": torch.get_num_threads(),
        "mean_completion_tokens": round(sum(h["completions/mean_length"] for h in logs) / len(logs), 1),
        "completion_tokens_per_step": [round(h["completions/mean_length"], 1) for h in logs],
        "reward_per_step": [round(h.get("reward", float("nan")), 3) for h in logs],
        "importance_sampling": args.vllm_importance_sampling_correction if use_vllm else None,
        **{k: getattr(a, k) for k in SETTING_KEYS}, **load.stop(),
    }  # fmt: skip


def _mean_after_first(r: dict) -> float:
    later = r["steps_s"][1:] or r["steps_s"]
    return sum(later) / len(later)


def _cpu_after_first(r: dict) -> float:
    """Mean CPU seconds of the steps after the first (NaN for runs recorded before the benchmark measured it)."""
    steps = r.get("cpu_steps_s") or []
    later = steps[1:] or steps
    return sum(later) / len(later) if later else float("nan")


def summary(results: list[dict], a) -> str:
    lines = [f"{a.prompts} prompts x {a.generations} completions of <= {a.max_tokens} tokens, T = 0.7, LoRA r16, "
             f"{a.threads} torch thread(s), VinePPO K = {a.vine_k}; s/step, CPU s = mean wall / CPU seconds of steps "
             f"2..{a.steps}",
             f"{'estimator':<10}{'defaults':<9}{'s/step':>8}{'CPU s':>7}{'steps (s)':>24}{'tokens':>8}{'init s':>8}"
             f"{'peak RSS GB':>12}{'KV MiB':>8}{'load avg':>16}"]  # fmt: skip
    mean = {}
    for r in results:
        mean[r["estimator"], r["defaults"]] = m = _mean_after_first(r)
        load = f"{r['load_avg_mean']:.1f} ({r['load_avg_min']:.1f}-{r['load_avg_max']:.1f})"
        lines.append(f"{r['estimator']:<10}{r['defaults']:<9}{m:>8.1f}{_cpu_after_first(r):>7.1f}"
                     f"{str(r['steps_s']):>24}"
                     f"{r['mean_completion_tokens']:>8.1f}{r['init_s']:>8.1f}{r['peak_rss_gb']:>12.2f}"
                     f"{str(r['kv_cache_mib']):>8}{load:>16}")  # fmt: skip
    rss = {(r["estimator"], r["defaults"]): r["peak_rss_gb"] for r in results}
    for estimator in dict.fromkeys(r["estimator"] for r in results):
        for other in ("new", "hf"):
            if (estimator, "old") in mean and (estimator, other) in mean:
                lines.append(f"{estimator}: {other}/old step time = "
                             f"{mean[estimator, other] / mean[estimator, 'old']:.2f}, peak RSS "
                             f"{rss[estimator, other] / rss[estimator, 'old']:.2f}")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--estimators", default="grpo,tempo,vineppo")
    p.add_argument("--defaults", default="old,new", help="comma-separated subset of old, new, hf (see the docstring)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--vine-k", type=int, default=4)
    p.add_argument("--threads", default="1", help="torch threads, or auto (the cores not busy at the start)")
    p.add_argument("--out", default="benchmarks/results/real_model_step.jsonl",
                   help="JSON lines, appended per run; runs of the same settings already there are skipped")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # internal: run one config, print JSON
    p.add_argument("--estimator", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        a.threads = int(a.threads)
        print("RESULT " + json.dumps(run_one(a)), flush=True)
        return 0
    bad = set(a.defaults.split(",")) - {"old", "new", "hf"}
    if bad or a.steps < 1:
        p.error(f"--defaults: unknown {sorted(bad)} (choose from old, new, hf)" if bad else "--steps must be >= 1")
    a.threads = _threads(a.threads)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: getattr(a, k) for k in SETTING_KEYS}
    done = []
    if out.exists():
        done = [r for r in map(json.loads, out.read_text().splitlines()) if all(r.get(k) == v
                                                                               for k, v in settings.items())]
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}  # "new" = the automatic size
    results, failed = [], []
    for estimator in a.estimators.split(","):
        for defaults in a.defaults.split(","):
            prev = [r for r in done if r["estimator"] == estimator and r["defaults"] == defaults]
            if prev:
                results.append(prev[-1])
                print(f"{estimator}/{defaults}: already in {out}, skipped", flush=True)
                continue
            cmd = [sys.executable, __file__, "--one", "--estimator", estimator, "--defaults", defaults, "--steps",
                   str(a.steps), "--prompts", str(a.prompts), "--generations", str(a.generations), "--max-tokens",
                   str(a.max_tokens), "--vine-k", str(a.vine_k), "--threads", str(a.threads)]  # fmt: skip
            t0, load0 = time.time(), os.getloadavg()[0]
            print(f"{estimator}/{defaults}: running (load average {load0:.2f}) ...", flush=True)
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not lines:
                log = out.with_name(f"{out.stem}-{estimator}-{defaults}-failed.log")
                log.write_text(proc.stdout[-20000:] + "\n--- stderr ---\n" + proc.stderr[-20000:])
                print(f"{estimator}/{defaults} failed (exit {proc.returncode}); log: {log}\n{proc.stderr[-2000:]}",
                      file=sys.stderr, flush=True)  # fmt: skip
                failed.append((estimator, defaults))
                continue
            r = json.loads(lines[-1][7:])
            r.update(load_avg_at_start=round(load0, 2), wall_s=round(time.time() - t0, 1),
                     started=time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t0)))
            with out.open("a") as f:
                f.write(json.dumps(r) + "\n")
            results.append(r)
            print(json.dumps(r), flush=True)
    if results:
        print("\n" + summary(results, a))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
