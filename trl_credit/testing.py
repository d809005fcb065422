"""Local stand-ins for tests, benchmarks and recipe smoke runs: no Hugging Face Hub access needed.

`build_tiny_model(dir)` writes a randomly initialised Qwen2 (hidden 128, 2 heads of dim 64, which vLLM's CPU attention
backend accepts) and a byte-level BPE tokenizer trained on a small built-in math corpus, with a Qwen-style chat
template. `tiny_math_dataset()` gives "What is a + b?" prompts with a `solution` column, and `shaped_math_reward`
a reward with partial credit so that the groups of a random policy have non-zero reward variance. `record_batches`
keeps what reached a trainer's loss (completions, masks, advantages) for inspection.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path


EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# Trainer-config flags of every CPU smoke run: fp32 (deterministic, no bf16 autocast), no logger, no checkpoints, a log
# line per step. Spread them into a config together with the run's own sizes.
CPU_TEST_ARGS = dict(
    report_to="none",
    bf16=False,
    use_cpu=True,
    save_strategy="no",
    logging_steps=1,
    disable_tqdm=True,
    gradient_checkpointing=False,
)


def _corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        a, b, c = rng.randint(0, 99), rng.randint(0, 99), rng.randint(2, 9)
        lines += [
            f"What is {a} + {b}? The answer is {a + b}.",
            f"First, {a} + {b} = {a + b}.\nThen {a + b} * {c} = {(a + b) * c}.\n#### {(a + b) * c}",
            f"Compute ${a} \\times {c}$: so \\boxed{{{a * c}}}",
            f"She has {a} apples and buys {b} more, so she has {a + b} apples. Step by step.\n",
        ]
    return lines


def build_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer (offsets supported) trained locally, wrapped as a `PreTrainedTokenizerFast`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD_TOKEN, "<|im_start|>", EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, bos_token=None)
    hf.chat_template = CHAT_TEMPLATE
    hf.padding_side = "left"
    return hf


def build_tiny_model(
    out_dir: str | os.PathLike,
    *,
    num_hidden_layers: int = 2,
    hidden_size: int = 128,
    num_attention_heads: int = 2,
    num_key_value_heads: int = 1,
    intermediate_size: int = 256,
    seed: int = 0,
    tokenizer=None,
) -> str:
    """
    Save a random tiny `Qwen2ForCausalLM` and its tokenizer to `out_dir` and return the path (idempotent: an
    existing model directory is reused). Head dim is `hidden_size / num_attention_heads` (64 by default, ≥ 32 as
    vLLM's CPU attention requires); `num_key_value_heads < num_attention_heads` exercises GQA.
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    if (out / "config.json").exists() and (out / "tokenizer_config.json").exists():
        return str(out)
    tok = tokenizer if tokenizer is not None else build_tokenizer()
    cfg = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=1024,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def tiny_math_dataset(n: int = 32, seed: int = 0, conversational: bool = True):
    """`n` "What is a + b?" prompts with the answer in a `solution` column (a `datasets.Dataset`)."""
    from datasets import Dataset

    rng = random.Random(seed)
    rows = {"prompt": [], "solution": []}
    for _ in range(n):
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        q = f"What is {a} + {b}?"
        rows["prompt"].append([{"role": "user", "content": q}] if conversational else q)
        rows["solution"].append(str(a + b))
    return Dataset.from_dict(rows)


def _text(completion) -> str:
    return completion[-1]["content"] if isinstance(completion, list) else completion


def shaped_math_reward(completions, solution, **kwargs) -> list[float]:
    """1 if the last number equals the solution, else a small partial credit for digits (so groups vary)."""
    out = []
    for c, s in zip(completions, solution, strict=True):
        text = _text(c)
        nums = re.findall(r"-?\d+", text)
        exact = 1.0 if nums and nums[-1] == s else 0.0
        digits = sum(ch.isdigit() for ch in text) / max(len(text), 1)
        out.append(exact + 0.5 * digits)
    return out


def length_reward(completions, **kwargs) -> list[float]:
    """A dense, always-varying reward for smoke tests: completion length / 50."""
    return [len(_text(c)) / 50.0 for c in completions]


def snapshot_batch(batch: dict) -> dict:
    """The tensors of one `_generate_and_score_completions` output (completion ids and masks, advantages, the loss
    mask of estimators that return one...), detached and cloned: what the loss of that step saw."""
    import torch

    return {k: v.detach().clone() for k, v in batch.items() if isinstance(v, torch.Tensor)}


def record_batches(trainer) -> list[dict]:
    """Keep every batch that reaches `trainer`'s loss: wraps the instance's `_generate_and_score_completions` and
    returns the list that each call's `snapshot_batch` is appended to (one entry per generation batch on this
    process). For trainers built out of reach (inside `trl_credit.train.train`), wrap the class method the same way.

    Example:
        >>> batches = record_batches(trainer)
        >>> trainer.train()
        >>> batches[0]["advantages"].shape  # (B, T) for token-level estimators
    """
    batches: list[dict] = []
    inner = trainer._generate_and_score_completions

    def recorded(inputs):
        out = inner(inputs)
        batches.append(snapshot_batch(out))
        return out

    trainer._generate_and_score_completions = recorded
    return batches
