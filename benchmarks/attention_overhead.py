"""
Cost of the attention-rhythm capture pass versus naive `output_attentions` eager capture and versus a training step.

For each (model, N) it measures, in one process and one after the other on the same batch:

- `capture`: `trl_credit.generation.attention_capture.capture_attention_stats` (SDPA for unsampled layers, chunked band
  statistics for the 5 middle-third layers, stops after the last of them);
- `naive`: the paper-style route: the model loaded with `attn_implementation="eager"`, one no-grad forward with
  `output_attentions=True` (every layer's `(B, H, N, N)` map is returned), then WAAD/FAI/distances of the sampled layers
  from the full maps with the reference functions;
- `forward`: a no-grad SDPA forward of the whole backbone (what TRL's `old_per_token_logps` pass costs, minus the head);
- `step`: forward + backward of the policy with a next-token loss (the optimisation part of a training step; a real
  GRPO step also generates, which usually dominates, so `capture / step` here is an upper bound of the share).

Time is the median of `--repeats` runs after one warm-up. Peak memory is `torch.cuda.max_memory_allocated` on CUDA and,
on CPU, the resident-set high-water mark above the level at entry (after `malloc_trim`), sampled every 2 ms, so
short transients can be missed. The naive route is skipped
(with its map size printed) when its maps alone would exceed `--naive-max-gb`.

    python benchmarks/attention_overhead.py                          # tiny + qwen-small at N = 1024, 4096 (CPU)
    python benchmarks/attention_overhead.py --models qwen2.5-0.5b    # the real 0.5B shape (GPU)
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import statistics
import threading
import time

import torch


PRESETS = {
    # The repository's test model (trl_credit.testing.build_tiny_model), 4 layers so that early stopping shows.
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=2,
                 num_key_value_heads=1, vocab_size=400),
    # Qwen2-shaped (GQA 4:1, head dim 64, SwiGLU), small enough for a CPU.
    "qwen-small": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=12, num_attention_heads=8,
                       num_key_value_heads=2, vocab_size=32000),
    # The Qwen2.5-0.5B shape, randomly initialised.
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936),
}  # fmt: skip


class PeakMemory:
    """Peak memory of a block: CUDA allocator peak, or sampled CPU RSS above the level at entry (bytes)."""

    def __init__(self, device):
        self.device = device
        self.peak = 0

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        import psutil

        try:  # hand freed heap pages back to the OS, so that RSS follows live memory
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        self.proc = psutil.Process(os.getpid())
        self.base = self.proc.memory_info().rss
        self.top = self.base
        self.running = True

        def sample():
            while self.running:
                self.top = max(self.top, self.proc.memory_info().rss)
                time.sleep(0.002)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.running = False
            self.thread.join()
            self.top = max(self.top, self.proc.memory_info().rss)
            self.peak = self.top - self.base


def timed(fn, device, repeats):
    fn()  # warm-up
    times, peaks = [], []
    for _ in range(repeats):
        with PeakMemory(device) as mem:
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        peaks.append(mem.peak)
    return statistics.median(times), max(peaks)


def build(preset, device, dtype, attn_implementation):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(**PRESETS[preset], max_position_embeddings=8192, tie_word_embeddings=True)
    cfg._attn_implementation = attn_implementation
    return Qwen2ForCausalLM(cfg).to(device=device, dtype=dtype)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "qwen-small"], choices=sorted(PRESETS))
    parser.add_argument("--lengths", nargs="+", type=int, default=[1024, 4096])
    parser.add_argument("--batch", type=int, default=1, help="sequences per forward")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens (the rest of N is the completion)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--naive-max-gb", type=float, default=4.0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--horizon", nargs=2, type=int, default=[10, 100])
    # On a shared CPU, more intra-op threads than free cores makes every op wait on spinning peers (10-50x slower).
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from trl_credit.generation.attention_capture import capture_attention_stats
    from trl_credit.credit.attention import compute_fai, compute_row_distance, compute_waad, rhythm_layer_indices

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    h_lo, h_hi = args.horizon
    rows = []
    threads = torch.get_num_threads()
    print(f"device={device} dtype={args.dtype} batch={args.batch} prompt={args.prompt} threads={threads}")
    for preset in args.models:
        model = build(preset, device, dtype, "sdpa")
        eager = build(preset, device, dtype, "eager").eval()
        eager.load_state_dict(model.state_dict())
        L, H = model.config.num_hidden_layers, model.config.num_attention_heads
        layers = rhythm_layer_indices(L)
        for N in args.lengths:
            T = N - args.prompt
            ids = torch.randint(0, model.config.vocab_size, (args.batch, N), device=device)
            mask = torch.ones_like(ids)

            def capture():
                model.eval()
                capture_attention_stats(model, ids, mask, T, layers, window=args.window, h_lo=h_lo, h_hi=h_hi)

            def forward():
                model.eval()
                with torch.no_grad():
                    model.model(input_ids=ids, attention_mask=mask, use_cache=False)

            def step():
                model.train()
                model.zero_grad(set_to_none=True)
                model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False).loss.backward()
                model.zero_grad(set_to_none=True)

            def naive():
                with torch.no_grad():
                    out = eager(input_ids=ids, attention_mask=mask, output_attentions=True, logits_to_keep=1)
                    maps = out.attentions
                    for layer in layers:
                        A = maps[layer].float()
                        compute_waad(A, args.window), compute_fai(A, args.prompt, h_lo, h_hi), compute_row_distance(A)
                    del maps

            row = {"model": preset, "N": N, "layers": f"{len(layers)}/{L}"}
            row["capture_s"], row["capture_mem"] = timed(capture, device, args.repeats)
            row["forward_s"], row["forward_mem"] = timed(forward, device, args.repeats)
            row["step_s"], row["step_mem"] = timed(step, device, args.repeats)
            naive_gb = args.batch * L * H * N * N * torch.finfo(dtype).bits / 8 / 2**30
            if naive_gb <= args.naive_max_gb:
                row["naive_s"], row["naive_mem"] = timed(naive, device, args.repeats)
            else:
                row["naive_s"], row["naive_mem"] = None, None
                row["naive_note"] = f"skipped: maps alone {naive_gb:.1f} GB"
            rows.append(row)
            print_row(row)
        del model, eager
        gc.collect()
    print()
    print_table(rows)


def fmt_mb(x):
    return "—" if x is None else f"{x / 2**20:,.0f} MB"


def fmt_s(x):
    return "—" if x is None else f"{x:.3f} s"


def print_row(r):
    print(f"  {r['model']} N={r['N']}: capture {fmt_s(r['capture_s'])}, forward {fmt_s(r['forward_s'])}, "
          f"step {fmt_s(r['step_s'])}, naive {fmt_s(r['naive_s'])} {r.get('naive_note', '')}", flush=True)  # fmt: skip


def print_table(rows):
    head = ("| model | N | sampled layers | capture | naive eager | no-grad forward | fwd+bwd step | capture/step "
            "| capture/forward | naive/capture | peak mem capture | peak mem naive | peak mem forward "
            "| peak mem step |")
    print(head)
    print("|" + "|".join("---" for _ in range(head.count("|") - 1)) + "|")
    for r in rows:
        naive_ratio = "—" if r["naive_s"] is None else f"{r['naive_s'] / r['capture_s']:.1f}×"
        print(
            f"| {r['model']} | {r['N']} | {r['layers']} | {fmt_s(r['capture_s'])} | "
            f"{fmt_s(r['naive_s']) if r['naive_s'] is not None else r.get('naive_note', '—')} | "
            f"{fmt_s(r['forward_s'])} | {fmt_s(r['step_s'])} | {100 * r['capture_s'] / r['step_s']:.1f} % | "
            f"{r['capture_s'] / r['forward_s']:.2f} | {naive_ratio} | {fmt_mb(r['capture_mem'])} | "
            f"{fmt_mb(r['naive_mem'])} | {fmt_mb(r['forward_mem'])} | {fmt_mb(r['step_mem'])} |"
        )


if __name__ == "__main__":
    main()
