"""
The demo's starting policy: a tiny Qwen2 trained from scratch on demonstrations with injected step errors.

The policy learns the chain format and the additions, and also learns to slip: each addition of a demonstration is
wrong with probability `error_rate` (carried forward, so the answer is wrong). Sampled at the RL temperature, it
therefore fails a predictable share of the chains, at a step the task generator can point to, which is what RL with
each estimator then has to fix.

The trained model is cached on disk under a key of every setting that changes it, so reruns start at RL.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .task import ChainSpec, analyze, build_tokenizer, demonstration, prompt_text, sample_terms


# Bump when the data format or the training loop changes in a way the settings do not capture.
SFT_FORMAT_VERSION = 1


@dataclass(frozen=True)
class SFTSettings:
    """
    Settings of the starting policy (all part of the cache key).

    Args:
        spec ([`ChainSpec`]): problem shape.
        error_rate (`float`): probability that a demonstration's addition is wrong.
        hidden_size, num_hidden_layers, num_attention_heads, intermediate_size (`int`): Qwen2 shape; head dim is
            `hidden_size / num_attention_heads` (64 keeps vLLM's CPU backend usable).
        steps (`int`): optimizer steps. batch_size (`int`): demonstrations per step. learning_rate (`float`): peak
            AdamW learning rate (linear warmup, cosine decay to 10%). seed (`int`): data and initialization seed.
    """

    spec: ChainSpec = field(default_factory=ChainSpec)
    error_rate: float = 0.1
    hidden_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    intermediate_size: int = 512
    steps: int = 1000
    batch_size: int = 32
    learning_rate: float = 4e-3
    seed: int = 0

    def key(self) -> str:
        blob = json.dumps({"v": SFT_FORMAT_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def build_model(settings: SFTSettings, tokenizer):
    """A randomly initialized `Qwen2ForCausalLM` of the given shape, for the character vocabulary."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.num_hidden_layers,
        num_attention_heads=settings.num_attention_heads,
        num_key_value_heads=settings.num_attention_heads,
        max_position_embeddings=256,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    torch.manual_seed(settings.seed)
    model = Qwen2ForCausalLM(cfg)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def _batch(settings: SFTSettings, tokenizer, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask` and `labels` (−100 on prompt and padding)."""
    # One token per character: a dict lookup gives the tokenizer's ids without its per-call overhead.
    vocab = tokenizer.get_vocab()
    seqs, labels = [], []
    for _ in range(settings.batch_size):
        terms = sample_terms(rng, settings.spec)
        completion, _ = demonstration(terms, settings.error_rate, rng)
        p_ids = [vocab[ch] for ch in prompt_text(terms)]
        c_ids = [vocab[ch] for ch in completion] + [tokenizer.eos_token_id]
        seqs.append(p_ids + c_ids)
        labels.append([-100] * len(p_ids) + c_ids)
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
    lab = torch.full((len(seqs), width), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, l) in enumerate(zip(seqs, labels)):
        ids[i, : len(s)] = torch.tensor(s)
        lab[i, : len(l)] = torch.tensor(l)
        mask[i, : len(s)] = 1
    return ids, mask, lab


def train_sft(settings: SFTSettings, out_dir: str | Path, progress: bool = True) -> dict:
    """Train the starting policy and save it (model + tokenizer) to `out_dir`. Returns `{"loss", "time_s"}`."""
    from tqdm.auto import tqdm

    tokenizer = build_tokenizer()
    model = build_model(settings, tokenizer)
    model.train()
    rng = random.Random(settings.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, settings.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return settings.learning_rate * (step + 1) / warmup
        frac = (step - warmup) / max(1, settings.steps - warmup)
        return settings.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    start = time.perf_counter()
    ema = None
    bar = tqdm(range(settings.steps), desc="SFT (starting policy)", disable=not progress, leave=False)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        ids, mask, labels = _batch(settings, tokenizer, rng)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{ema:.3f}")
    elapsed = time.perf_counter() - start
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"loss": ema, "time_s": elapsed}


@torch.no_grad()
def sample_completions(
    model,
    tokenizer,
    problems: Sequence[Sequence[int]],
    *,
    temperature: float,
    max_new_tokens: int,
    seed: int,
    num_samples: int = 1,
    batch_size: int = 256,
) -> list[list[str]]:
    """
    `num_samples` completions (text, special tokens removed) per problem, sampled at `temperature` with a fixed seed.
    The global RNG state is saved and restored, so evaluating in the middle of training does not change training.
    """
    was_training = model.training
    model.eval()
    cpu_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    prompts = [prompt_text(t) for t in problems for _ in range(num_samples)]
    texts: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i : i + batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
            gen = model.generate(
                **enc,
                do_sample=True,
                temperature=temperature,
                top_k=0,
                top_p=1.0,
                max_new_tokens=max_new_tokens,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            texts += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        torch.random.set_rng_state(cpu_state)
        model.train(was_training)
    return [texts[i * num_samples : (i + 1) * num_samples] for i in range(len(problems))]


def policy_stats(problems: Sequence[Sequence[int]], completions: Sequence[Sequence[str]]) -> dict[str, float]:
    """Accuracy, per-step error rate (wrong addition lines / lines judged, see `Analysis`), share off the gold path."""
    n = correct = errors = judged = off_gold = 0
    for terms, samples in zip(problems, completions, strict=True):
        for text in samples:
            a = analyze(terms, text)
            n += 1
            correct += a.correct
            errors += a.step_errors
            judged += a.steps_judged
            off_gold += a.first_error_char is not None
    return {
        "accuracy": correct / max(n, 1),
        "step_error_rate": errors / max(judged, 1),
        "off_gold_rate": off_gold / max(n, 1),
        "samples": float(n),
    }


def load_or_train(settings: SFTSettings, cache_dir: str | Path, progress: bool = True) -> tuple[str, dict]:
    """
    The starting policy's directory under `cache_dir/sft-<key>`, trained first if absent. Returns `(path, info)`
    where `info` holds the training loss and time, and whether it came from the cache.
    """
    path = Path(cache_dir) / f"sft-{settings.key()}"
    meta_path = path / "demo_sft.json"
    if meta_path.exists() and (path / "config.json").exists():
        info = json.loads(meta_path.read_text())
        info["cached"] = True
        return str(path), info
    tmp = path.with_name(path.name + ".tmp")
    info = train_sft(settings, tmp, progress=progress)
    info["settings"] = {**asdict(settings), "spec": asdict(settings.spec)}
    (tmp / "demo_sft.json").write_text(json.dumps(info, indent=2))
    if path.exists():  # a concurrent run finished first: keep its model
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(path)
    info["cached"] = False
    return str(path), info
