r"""
Memory and step time of the critic: policy only vs policy + separate critic vs policy + LoRA critic.

Three configurations of the same run (same model, batch, completions length, seed), each in its own subprocess so
that the peak memory of one does not leak into the next; the ratios are printed at the end of one invocation:

- `policy`: `trl_credit.GRPOTrainer` (no critic: GRPO's group baseline);
- `critic`: `trl_credit.PPOTrainer` with a full critic initialized from the policy checkpoint;
- `lora_critic`: `trl_credit.PPOTrainer` with a LoRA critic (`r=16` on every linear layer, score head trained).

`--lora-policy` trains the policy as a LoRA adapter in all three. The KL penalty is off (`kl_coef=0`, `beta=0`) so
that only the critic differs. Measured per configuration:

- **state**: exact bytes of model weights, gradients and optimizer states (summed over the tensors after training);
  on a real model this is what dominates and what the ratios are about;
- **peak**: on CUDA `torch.cuda.max_memory_allocated`; on CPU the resident-set high-water mark above the level after
  imports (`ru_maxrss`); with the tiny model the CPU number is mostly allocator noise around a few MB;
- **step**: wall time of an optimizer step (generation + critic pass + loss + backward), and **train**: the same
  without generation (what the critic adds to); the minimum over the steps after the first, the least noisy
  estimate on a shared machine.

The second table is the documented estimate for **Qwen2.5-1.5B on one 24 GB GPU**, from the formula below with the
model's published shape (28 layers, hidden 1536, intermediate 8960, 12 query / 2 KV heads, vocabulary 151936, tied
embeddings: P ≈ 1.54 B parameters, of which the critic backbone is the same 1.54 B and its score head 1536):

$$M \approx \underbrace{b_w P_\pi + (b_g + b_o) P^{\mathrm{train}}_\pi}_{\text{policy}}
+ \underbrace{b_w P_V + (b_g + b_o) P^{\mathrm{train}}_V}_{\text{critic}} + M_{\mathrm{ref}} + M_{\mathrm{vLLM}}
+ A_\pi + A_V$$

- `b_w` bytes per weight (2 in bf16), `b_g` per gradient (the weight's dtype), `b_o` optimizer state per trained
  parameter (AdamW: 2 states in the parameter's dtype; LoRA adapters are kept in fp32 by PEFT: `b_w = b_g = 4`,
  `b_o = 8`);
- a LoRA critic keeps its own frozen bf16 copy of the backbone (`b_w P_V`, never shared with the policy, whose weights
  vLLM syncs), plus `P^train_V` = LoRA (r = 16 on q, k, v, o, gate, up, down: `r·Σ(d_in + d_out)` per layer) + head;
- `M_ref`: 0 with PEFT (adapter disabled), `b_w P_π` otherwise, when `kl_coef` or `beta` is on;
- `M_vLLM`: colocated vLLM with `vllm_gpu_memory_utilization=u`: `u × 24 GB` (weights + KV cache);
- `1.5 GB` for the CUDA context, fragmentation and temporary buffers; "fits" means ≤ 22 GB, "tight" ≤ 24 GB;
- activations with gradient checkpointing: `A ≈ L_layers · B · S · h · 2` bytes of layer inputs plus one layer's
  recompute `≈ B · S · (4h + 2·d_ff) · 2` bytes (attention is O(S) with SDPA; TRL's fused LM head never materializes
  the `B × S × V` logits; the critic has no LM head). The policy and critic graphs are alive together (one backward for
  `policy_loss + vf_coef · value_loss`), so `A_π + A_V ≈ 2A`.

    python benchmarks/ppo_memory.py                   # tiny model, CPU (the test model of the repository)
    python benchmarks/ppo_memory.py --lora-policy     # same with a LoRA policy
    python benchmarks/ppo_memory.py --preset small    # a larger random Qwen2 shape (CPU minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

CONFIGS = ("policy", "critic", "lora_critic")
PRESETS = {
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1),
    "small": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=2),
}  # fmt: skip
LORA = dict(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                 "down_proj"])  # fmt: skip
QWEN25_1_5B = dict(layers=28, hidden=1536, ffn=8960, heads=12, kv_heads=2, vocab=151936)
GB = 1024**3
OVERHEAD_GB = 1.5  # CUDA context, allocator fragmentation, temporary buffers (a rule of thumb)


# ── one configuration (child process) ──────────────────────────────────────────────────────────────────────────────
def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def run_config(config: str, model_dir: str, a) -> dict:
    import torch
    from peft import LoraConfig
    from transformers import TrainerCallback

    from trl_credit.configs import GRPOConfig
    from trl_credit.configs.ppo import PPOConfig
    from trl_credit.trainers.ppo import PPOTrainer
    from trl_credit.testing import shaped_math_reward, tiny_math_dataset
    from trl_credit.trainers.grpo import GRPOTrainer

    cuda = torch.cuda.is_available()
    baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    common = dict(
        output_dir=tempfile.mkdtemp(prefix="ppo_memory_"), max_steps=a.steps, per_device_train_batch_size=a.batch,
        num_generations=4, max_completion_length=a.length, learning_rate=1e-5, report_to="none", bf16=False,
        use_cpu=not cuda, save_strategy="no", logging_steps=1, disable_tqdm=True, gradient_checkpointing=False, seed=0,
    )  # fmt: skip
    peft_config = LoraConfig(task_type="CAUSAL_LM", **LORA) if a.lora_policy else None
    dataset = tiny_math_dataset(a.batch * a.steps)
    if config == "policy":
        trainer = GRPOTrainer(model=model_dir, reward_funcs=shaped_math_reward, args=GRPOConfig(**common),
                              train_dataset=dataset, peft_config=peft_config)  # fmt: skip
    else:
        args = PPOConfig(**common, kl_coef=0.0)
        value_peft = LoraConfig(**LORA) if config == "lora_critic" else None
        trainer = PPOTrainer(model=model_dir, reward_funcs=shaped_math_reward, args=args, train_dataset=dataset,
                             peft_config=peft_config, value_peft_config=value_peft)  # fmt: skip

    times: list[float] = []
    generation: list[float] = []
    generate = trainer._generate

    def timed_generate(prompts):
        start = time.perf_counter()
        try:
            return generate(prompts)
        finally:
            generation[-1] += time.perf_counter() - start

    trainer._generate = timed_generate

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            generation.append(0.0)
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.start)

    trainer.add_callback(Timer())
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    modules = [trainer.model] + ([trainer.value_model] if getattr(trainer, "value_model", None) is not None else [])
    params = [p for m in modules for p in m.parameters()]
    trained = [p for p in params if p.requires_grad]
    optimizer_state = [v for s in trainer.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    critic = [p for p in trainer.value_model.parameters()] if len(modules) > 1 else []
    # The first step pays one-off costs (imports inside TRL, allocator warm-up): skipped when there are others.
    pairs = list(zip(times, generation, strict=True))
    pairs = pairs[1:] or pairs
    steps, train = [t for t, _ in pairs], [t - g for t, g in pairs]
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline_rss
    peak = torch.cuda.max_memory_allocated() if cuda else rss_peak
    return {
        "config": config,
        "weights": tensor_bytes(params),
        "grads": tensor_bytes(trained),  # gradients have their parameter's dtype and shape
        "optimizer": tensor_bytes(optimizer_state),
        "critic_params": sum(p.numel() for p in critic),
        "critic_trained": sum(p.numel() for p in critic if p.requires_grad),
        "peak": peak,
        "device": "cuda" if cuda else "cpu",
        "step_s": min(steps),
        "train_s": min(train),
    }


# ── the 24 GB estimate ────────────────────────────────────────────────────────────────────────────────────────────
def qwen_estimate(lora_policy: bool, config: str, micro_batch=8, seq=1024, vllm_util=0.3, gpu_gb=24, kl=False):
    """Bytes of the formula in the module docstring for Qwen2.5-1.5B (bf16 weights, AdamW)."""
    q = QWEN25_1_5B
    head_dim = q["hidden"] // q["heads"]
    attn = q["hidden"] * q["hidden"] * 2 + q["hidden"] * q["kv_heads"] * head_dim * 2
    mlp = 3 * q["hidden"] * q["ffn"]
    P = q["layers"] * (attn + mlp) + q["vocab"] * q["hidden"]  # tied LM head; norms and biases are negligible
    lora_per_layer = LORA["r"] * (
        4 * q["hidden"] + 2 * (q["hidden"] + q["kv_heads"] * head_dim) + 3 * (q["hidden"] + q["ffn"])
    )
    P_lora = q["layers"] * lora_per_layer
    full, adapter = 2 + 2 + 4, 4 + 4 + 8  # bf16 weight+grad+2 AdamW states; fp32 LoRA weight+grad+states
    policy = 2 * P + adapter * P_lora if lora_policy else full * P
    critic = 0.0
    if config == "critic":
        critic = full * P
    elif config == "lora_critic":
        critic = 2 * P + adapter * (P_lora + q["hidden"])
    ref = 0 if (lora_policy or not kl) else 2 * P
    layer_inputs = q["layers"] * micro_batch * seq * q["hidden"] * 2
    act_one = layer_inputs + micro_batch * seq * (4 * q["hidden"] + 2 * q["ffn"]) * 2  # + one layer's recompute
    activations = act_one * (2 if config != "policy" else 1)
    vllm = vllm_util * gpu_gb * GB
    other = OVERHEAD_GB * GB
    return {"P": P, "P_lora": P_lora, "policy": policy, "critic": critic, "ref": ref, "vllm": vllm,
            "activations": activations, "other": other,
            "total": policy + critic + ref + vllm + activations + other}  # fmt: skip


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=32)
    p.add_argument("--lora-policy", action="store_true")
    p.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print("RESULT " + json.dumps(run_config(a.child, a.model_dir, a)), flush=True)
        return

    from trl_credit.testing import build_tiny_model

    model_dir = build_tiny_model(tempfile.mkdtemp(prefix="ppo_memory_model_") + "/model", **PRESETS[a.preset])
    results = {}
    for config in CONFIGS:
        cmd = [sys.executable, __file__, "--child", config, "--model-dir", model_dir, "--steps", str(a.steps),
               "--batch", str(a.batch), "--length", str(a.length)]  # fmt: skip
        cmd += ["--lora-policy"] if a.lora_policy else []
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"{config} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
        results[config] = json.loads(line[len("RESULT ") :])

    base = results["policy"]
    device = base["device"]
    state = {c: r["weights"] + r["grads"] + r["optimizer"] for c, r in results.items()}
    print(f"\npreset={a.preset} lora_policy={a.lora_policy} batch={a.batch} completion_length={a.length} "
          f"steps={a.steps} device={device}")  # fmt: skip
    print(f"{'config':<12} | {'weights':>9} {'grads':>9} {'optim':>9} {'state':>9} {'x':>5} | "
          f"{'peak':>9} {'x':>5} | {'step s':>7} {'x':>5} | {'train s':>7} {'x':>5} | "
          "critic params (trained)")  # fmt: skip
    for c, r in results.items():
        mb = lambda b: f"{b / 2**20:8.2f}M"  # noqa: E731
        print(f"{c:<12} | {mb(r['weights'])} {mb(r['grads'])} {mb(r['optimizer'])} {mb(state[c])} "
              f"{state[c] / state['policy']:5.2f} | {mb(r['peak'])} {r['peak'] / max(base['peak'], 1):5.2f} | "
              f"{r['step_s']:7.3f} {r['step_s'] / base['step_s']:5.2f} | "
              f"{r['train_s']:7.3f} {r['train_s'] / base['train_s']:5.2f} | "
              f"{r['critic_params']} ({r['critic_trained']})")  # fmt: skip

    print("\nEstimate, Qwen2.5-1.5B on one 24 GB GPU (bf16 weights, AdamW, micro-batch 8 x 1024 tokens, gradient "
          "checkpointing, colocated vLLM at 0.3, no KL reference):")  # fmt: skip
    print(f"{'policy':<6} {'config':<12} | {'policy':>7} {'critic':>7} {'ref':>5} {'vLLM':>6} {'activ':>6} "
          f"{'other':>6} | {'total GB':>8} | fits")  # fmt: skip
    for lora_policy in (False, True):
        for c in CONFIGS:
            e = qwen_estimate(lora_policy, c)
            g = {k: v / GB for k, v in e.items()}
            fits = "yes" if g["total"] <= 22 else "tight" if g["total"] <= 24 else "no"
            print(f"{'LoRA' if lora_policy else 'full':<6} {c:<12} | {g['policy']:7.1f} {g['critic']:7.1f} "
                  f"{g['ref']:5.1f} {g['vllm']:6.1f} {g['activations']:6.1f} {g['other']:6.1f} | "
                  f"{g['total']:8.1f} | {fits}")  # fmt: skip
    e = qwen_estimate(True, "lora_critic")
    print(f"(P = {e['P'] / 1e9:.2f} B parameters, LoRA r=16 on all linear layers = {e['P_lora'] / 1e6:.1f} M)")


if __name__ == "__main__":
    main()
