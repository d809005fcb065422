"""Per-GPU memory of the model states of PPO with a critic under each engine, computed (not measured).

    python benchmarks/engine_memory.py                 # the table of docs/scaling.md (8 GPUs)
    python benchmarks/engine_memory.py --gpus 4        # another GPU count

Model states = parameters, gradients and optimizer states of the policy and the critic, plus the frozen weights that
ride along (the reference model of full fine-tuning, the frozen base weights under LoRA). Bytes per parameter with
the recipes' settings (weights loaded in bf16, `bf16: true`, AdamW), N = GPUs:

| | 1 GPU / DDP | ZeRO-2 | ZeRO-3 | FSDP2 |
|---|---|---|---|---|
| trainable (Ψ), full fine-tuning | 8Ψ | 2Ψ + 14Ψ/N | 16Ψ/N | 16Ψ/N |
| trainable (Ψ), LoRA adapters | 16Ψ | 16Ψ | 16Ψ/N | 16Ψ/N |
| frozen (Φ) | 2Φ | 2Φ | 2Φ/N | 2Φ/N |

- 1 GPU / DDP: bf16 weights and gradients, AdamW's two moments in the parameter's dtype (2 + 2 + 4), no fp32 master
  copy; PEFT keeps LoRA adapters in fp32 (4 + 4 + 8);
- DeepSpeed with bf16 keeps an fp32 master copy and fp32 moments of each rank's partition (the ZeRO paper's
  2 + 2 + 12, https://huggingface.co/papers/1910.02054): ZeRO-2 shards gradients and those 12 bytes, ZeRO-3 all 16;
- FSDP2: accelerate upcasts the trainable parameters to fp32 under mixed precision (fp32 shards, gradients and
  moments, 4 + 4 + 8) and casts each gathered layer to bf16 for compute.

ZeRO-3 and FSDP2 also hold the gathered layers being computed (two decoder layers in bf16 here: the current one and
the prefetched one). Not included: activations (they depend on the batch and do not shard under data parallelism;
`benchmarks/recipe_memory.py` estimates them), the CUDA context and allocator slack (≈ 1.5 GiB), and generation:
vLLM colocated holds its own bf16 copy of the policy plus its KV cache on every training GPU (tensor parallel 1), and
transformers generation under ZeRO-3 gathers the whole policy for every `generate` call
(`ds3_gather_for_generation=True`, TRL's default); a vLLM server on its own GPUs adds nothing to the training GPUs.

The critic is `AutoModelForSequenceClassification` on the policy's backbone: the policy minus its untied LM head,
plus a `hidden × 1` head. PPO's KL penalty needs reference log-probs: a frozen copy of the policy in full
fine-tuning, the policy with its adapter disabled under LoRA (no copy).
"""

from __future__ import annotations

import argparse


GIB = 1024**3
# Public config.json of the Qwen2.5 models (parameter counts from their model cards / safetensors index).
MODELS = {
    "1.5B": dict(name="Qwen2.5-1.5B", params=1.544e9, layers=28, hidden=1536, kv=256, intermediate=8960,
                 vocab=151936, tied=True),  # fmt: skip
    "7B": dict(name="Qwen2.5-7B", params=7.616e9, layers=28, hidden=3584, kv=512, intermediate=18944, vocab=152064,
               tied=False),  # fmt: skip
}
ENGINES = ("1 GPU", "DDP", "ZeRO-2", "ZeRO-3", "FSDP2")
LORA_RANK = 32  # the recipes' r, on every linear layer of the policy and of the critic


def layer_params(m: dict) -> float:
    h, kv, i = m["hidden"], m["kv"], m["intermediate"]
    return 2 * h * h + 2 * h * kv + 3 * h * i


def lora_params(m: dict, r: int = LORA_RANK) -> float:
    """LoRA on q, k, v, o, gate, up, down of every decoder layer: r·(in + out) per projection."""
    h, kv, i = m["hidden"], m["kv"], m["intermediate"]
    per_layer = r * ((h + h) + 2 * (h + kv) + (h + h) + 2 * (h + i) + (i + h))
    return per_layer * m["layers"]


def backbone_params(m: dict) -> float:
    return m["params"] - (0 if m["tied"] else m["vocab"] * m["hidden"])


def model_states(model: str, lora: bool, engine: str, gpus: int) -> float:
    """Bytes per GPU of the policy, critic and reference model states (see the module docstring)."""
    m = MODELS[model]
    policy, critic = m["params"], backbone_params(m) + m["hidden"]
    if lora:
        trainable = lora_params(m) * 2 + m["hidden"]  # two adapters and the critic's head
        frozen = policy + backbone_params(m)  # the LoRA critic holds its own frozen backbone
    else:
        trainable = policy + critic
        frozen = policy  # the reference model
    n = 1 if engine == "1 GPU" else gpus
    if engine in ("1 GPU", "DDP"):
        total = (16 if lora else 8) * trainable + 2 * frozen
    elif engine == "ZeRO-2":
        total = (16 * trainable if lora else 2 * trainable + 14 * trainable / n) + 2 * frozen
    else:  # ZeRO-3, FSDP2: everything sharded, plus two gathered bf16 decoder layers
        total = 16 * trainable / n + 2 * frozen / n + 2 * 2 * layer_params(m)
    return total


def table(gpus: int) -> str:
    """The Markdown table of docs/scaling.md: GiB of model states per GPU."""
    lines = [
        f"| PPO with a critic | {' | '.join(e if e == '1 GPU' else f'{e} ×{gpus}' for e in ENGINES)} |",
        "|---" * (len(ENGINES) + 1) + "|",
    ]
    for model in MODELS:
        for lora in (False, True):
            label = f"{MODELS[model]['name']}, {'LoRA r=' + str(LORA_RANK) if lora else 'full fine-tuning'}"
            cells = [f"{model_states(model, lora, e, gpus) / GIB:.1f}" for e in ENGINES]
            lines.append(f"| {label} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=8, help="GPUs the engines shard over (default 8)")
    print(table(parser.parse_args().gpus))


if __name__ == "__main__":
    main()
