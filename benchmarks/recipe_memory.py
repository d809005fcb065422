"""Estimated peak GPU memory of every recipe under `recipes/`, from a documented formula (no GPU needed).

    python benchmarks/recipe_memory.py            # print the table
    python benchmarks/recipe_memory.py --write    # also refresh the "# Memory (estimated ...)" line of each recipe

The estimate is the larger of the two phases of a colocated-vLLM step on one GPU (every figure in GiB):

- **generation**: policy weights `W` + vLLM's reservation `u · M_gpu` (`vllm_gpu_memory_utilization`; it holds vLLM's
  own copy of the weights and its KV cache) + trainable states `S` + overhead `O`;
- **training**: `W + S + A + C + O + R`, where `R` is what a sleeping vLLM keeps (≈ 0.5 GiB with
  `vllm_enable_sleep_mode`, else its whole reservation `u · M_gpu`).

with
- `W` = parameters × 2 bytes (bf16), or × 0.56 for the quantized linear layers of QLoRA (4-bit NF4 + double-quant
  constants) plus the bf16 embeddings;
- `S` = trainable parameters × 16 bytes (bf16 weight and gradient, fp32 AdamW moments and master copy) for full
  fine-tuning, × 16 for LoRA adapters (kept in fp32 by PEFT);
- `A` = activations of one micro-batch with gradient checkpointing: `b·N·h·2·L` (checkpointed layer inputs) +
  `b·N·(16h + 2·I)·2` (one layer recomputed) + `b·N·V·4/32` (TRL's tiled fused LM head), `N` = prompt + completion;
- `C` = the critic of PPO recipes: a second copy of the backbone (`W`) plus its trainable states (`S` of a LoRA critic);
- `O` = 1.5 GiB of CUDA context, allocator fragmentation and NCCL buffers.

These are estimates, not measurements: this project has not had a GPU to measure them on yet.
"""

import argparse
import re
from pathlib import Path

import yaml


GIB = 1024**3
ROOT = Path(__file__).resolve().parent.parent / "recipes"
GPU_MEMORY_GIB = 24.0
PROMPT_TOKENS = 256  # typical GSM8K/MATH chat prompt with the system message

# Architectures of the recipe models (from their public config.json files).
MODELS = {
    "Qwen/Qwen2.5-0.5B-Instruct": dict(params=0.494e9, layers=24, hidden=896, intermediate=4864, vocab=151936),
    "Qwen/Qwen2.5-1.5B-Instruct": dict(params=1.544e9, layers=28, hidden=1536, intermediate=8960, vocab=151936),
    "Qwen/Qwen2.5-Math-1.5B": dict(params=1.544e9, layers=28, hidden=1536, intermediate=8960, vocab=151936),
}


def lora_params(m, r):
    """LoRA on every linear layer of a Qwen2 block: r·(in + out) per projection."""
    h, i, kv = m["hidden"], m["intermediate"], m["hidden"] // 6  # Qwen2.5 1.5B/0.5B: 2 KV heads of 128/64 dims
    per_layer = r * ((h + h) + 2 * (h + kv) + (h + h) + 2 * (h + i) + (i + h))
    return per_layer * m["layers"]


def estimate(cfg: dict) -> dict:
    m = MODELS[cfg["model_name_or_path"]]
    P, L, h, I, V = m["params"], m["layers"], m["hidden"], m["intermediate"], m["vocab"]
    qlora = bool(cfg.get("load_in_4bit"))
    embed = V * h  # tied embeddings stay bf16
    W = (P - embed) * 0.56 + embed * 2 if qlora else P * 2
    if cfg.get("use_peft"):
        S = lora_params(m, cfg.get("lora_r", 16)) * 16
    else:
        S = P * 16
    b = cfg.get("per_device_train_batch_size", 8)
    N = PROMPT_TOKENS + cfg.get("max_completion_length", 512)
    A = b * N * h * 2 * L + b * N * (16 * h + 2 * I) * 2 + b * N * V * 4 / 32
    C = 0.0
    if cfg.get("trainer") == "ppo":
        C = P * 2 + (lora_params(m, cfg["value_peft_config"]["r"]) * 16 if cfg.get("value_peft_config") else P * 16)
    O = 1.5 * GIB
    vllm = cfg.get("vllm_gpu_memory_utilization", 0.3) * GPU_MEMORY_GIB * GIB if cfg.get("use_vllm") else 0.0
    R = min(0.5 * GIB, vllm) if cfg.get("vllm_enable_sleep_mode") else vllm
    generation = W + vllm + S + C + O
    training = W + S + A + C + O + R
    return {k: v / GIB for k, v in dict(W=W, S=S, A=A, C=C, vllm=vllm, generation=generation, training=training,
                                        peak=max(generation, training)).items()}  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="refresh the memory line in each recipe")
    args = parser.parse_args()
    rows = []
    for path in sorted(ROOT.glob("*/*/*.yaml")):
        cfg = yaml.safe_load(path.read_text())
        e = estimate(cfg)
        rows.append((path.relative_to(ROOT.parent), e))
        if args.write:
            line = (f"# Memory (estimated by benchmarks/recipe_memory.py, not measured): peak ≈ {e['peak']:.1f} GiB "
                    f"on a {GPU_MEMORY_GIB:.0f} GB GPU (training phase {e['training']:.1f}, generation phase "
                    f"{e['generation']:.1f}).")  # fmt: skip
            text = re.sub(r"^# Memory \(estimated.*$", line, path.read_text(), count=1, flags=re.M)
            path.write_text(text)
    print("| recipe | weights | trainable states | activations | critic | vLLM | peak (GiB) "
          f"| fits {GPU_MEMORY_GIB:.0f} GB |")
    print("|---|---|---|---|---|---|---|---|")
    for path, e in rows:
        fits = "yes" if e["peak"] <= GPU_MEMORY_GIB * 0.95 else "no"
        print(f"| `{path}` | {e['W']:.1f} | {e['S']:.2f} | {e['A']:.1f} | {e['C']:.1f} | {e['vllm']:.1f} | "
              f"{e['peak']:.1f} | {fits} |")  # fmt: skip


if __name__ == "__main__":
    main()
