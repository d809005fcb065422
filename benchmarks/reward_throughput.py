"""Throughput of `trl_credit.rewards.math_reward` vs TRL's `trl.rewards.accuracy_reward`, measured in the same run.

    python benchmarks/reward_throughput.py [--data-dir ../shared/data] [--problems 128] [--group-size 8]

Normal inputs, shaped like GRPO steps: MATH-500 problems, each with a group of `--group-size` conversational
completions built from its reference solution (the reasoning and LaTeX of a real solution; each completion starts with
a different sentence, so no two texts are equal), `--batch-problems` groups per reward call. Two group compositions:

- `grpo`: half the group gives the right answer, the other half two wrong answers (the right one off by 1 or 2), as
  in a policy that solves the problem half of the time (answers repeat within a group);
- `distinct`: one right answer and `group-size - 1` different wrong answers (the worst case for caches).

Every batch is scored once by each reward, the two calls back to back, so that load from other processes hits both
alike. The worker pool's start-up (once per process) is excluded and printed separately. A last line scores the real
GPT-3 GSM8K completions with `gsm8k_reward` (TRL has no GSM8K reward to compare with).

The ratio is ours/TRL throughput: > 1 means trl_credit is faster. trl_credit verifies in `--num-workers` processes and
TRL in the calling thread, so the ratio grows with free cores; on a machine shared with other busy processes both get
about one core's share. TRL also skips (returns `None` for) gold answers it cannot parse and reads plain-number golds
as numbers without `\boxed{}` wrapping, so it does less work per completion than trl_credit (see the "graded correct"
column: how many of the reference solutions each reward accepts).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path


def _wrong_answer(answer: str, k: int) -> str:
    """A wrong answer near the right one: a number off by `k`, or the LaTeX answer plus `k`."""
    try:
        return str(int(answer) + k)
    except ValueError:
        return f"{answer} + {k}"


def _math_groups(data_dir: Path, problems: int, group_size: int, composition: str) -> tuple[list, list]:
    rows = [json.loads(line) for line in (data_dir / "math" / "test.jsonl").open()]
    completions, golds = [], []
    for i in range(problems):
        row = rows[i % len(rows)]
        solution, answer = row["solution"], row["answer"]
        cut = solution.rfind("\\boxed{")
        for g in range(group_size):
            if composition == "grpo":  # first half right, then two wrong answers, each twice
                k = 0 if g < (group_size + 1) // 2 else 1 + g % 2
            else:  # one right answer, then all different wrong ones
                k = g
            text = f"Attempt {g + 1}. " + solution
            if k and cut != -1:
                text = f"Attempt {g + 1}. " + solution[:cut] + "\\boxed{" + _wrong_answer(answer, k) + "}."
            completions.append([{"role": "assistant", "content": text}])
            golds.append(answer)
    return completions, golds


def _gsm8k_groups(data_dir: Path, problems: int) -> tuple[list, list]:
    keys = ("6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification")
    path = data_dir / "completions" / "gsm8k_gpt3_example_model_solutions.jsonl"
    rows = [json.loads(line) for line in path.open()][:problems]
    completions = [[{"role": "assistant", "content": row[k]["solution"]}] for row in rows for k in keys]
    golds = [row["ground_truth"] for row in rows for _ in keys]
    return completions, golds


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    repo = Path(__file__).resolve().parent.parent
    default_data = Path(os.environ.get("TRL_CREDIT_DATA_DIR", repo.parent / "shared" / "data"))
    parser.add_argument("--data-dir", type=Path, default=default_data)
    parser.add_argument("--problems", type=int, default=128, help="MATH-500 problems (one GRPO group each)")
    parser.add_argument("--group-size", type=int, default=8, help="completions per problem (GRPO num_generations)")
    parser.add_argument("--batch-problems", type=int, default=8, help="groups per reward call (one GRPO step)")
    parser.add_argument("--num-workers", type=int, help="verification processes (default: half the cores)")
    args = parser.parse_args(argv)

    logging.getLogger("math_verify").setLevel(logging.CRITICAL)  # TRL's off-main-thread warnings
    from trl.rewards import accuracy_reward

    from trl_credit.rewards import gsm8k_reward, math_verify_reward
    from trl_credit.rewards._pool import default_num_workers

    ours = math_verify_reward("math", num_workers=args.num_workers, name="math_reward")
    start = time.perf_counter()
    ours(["\\boxed{1}"], solution=["1"])
    startup = time.perf_counter() - start

    per_call = args.batch_problems * args.group_size
    workers = args.num_workers or default_num_workers()
    print(f"MATH-500 groups: {args.problems} problems x {args.group_size} completions, {per_call} per call; "
          f"{os.cpu_count()} CPUs, {workers} verification workers, load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"{'composition':<12}{'reward':<26}{'completions/s':>14}{'seconds':>9}{'graded correct':>16}")
    totals = {"trl": 0.0, "ours": 0.0}
    n_total = 0
    for composition in ("grpo", "distinct"):
        completions, golds = _math_groups(args.data_dir, args.problems, args.group_size, composition)
        seconds = {"trl": 0.0, "ours": 0.0}
        rewards: dict[str, list] = {"trl": [], "ours": []}
        for i in range(0, len(completions), per_call):
            batch, batch_golds = completions[i : i + per_call], golds[i : i + per_call]
            for name, func in (("trl", accuracy_reward), ("ours", ours)):
                t0 = time.perf_counter()
                rewards[name] += func(batch, solution=batch_golds)
                seconds[name] += time.perf_counter() - t0
        n = len(completions)
        right_per_group = (args.group_size + 1) // 2 if composition == "grpo" else 1
        n_right = sum(1 for j in range(n) if j % args.group_size < right_per_group)
        for name, label in (("trl", "trl accuracy_reward"), ("ours", "trl_credit math_reward")):
            graded = sum(r == 1.0 for r in rewards[name])
            print(f"{composition:<12}{label:<26}{n / seconds[name]:>14.1f}{seconds[name]:>9.2f}{graded:>10}/{n_right}")
            totals[name] += seconds[name]
        n_total += n
    ratio = totals["trl"] / totals["ours"]
    print(f"throughput ratio (trl_credit / TRL), both compositions: {ratio:.2f}  "
          f"(worker pool start-up, once per process: {startup:.2f} s; load average now {os.getloadavg()[0]:.1f})")

    gsm_completions, gsm_golds = _gsm8k_groups(args.data_dir, args.problems)
    t0 = time.perf_counter()
    for i in range(0, len(gsm_completions), per_call):
        gsm8k_reward(gsm_completions[i : i + per_call], solution=gsm_golds[i : i + per_call])
    seconds = time.perf_counter() - t0
    print(f"trl_credit gsm8k_reward on {len(gsm_completions)} real GPT-3 GSM8K completions: "
          f"{len(gsm_completions) / seconds:.1f} completions/s")  # fmt: skip
    return {"ratio": ratio, "seconds": totals, "completions": n_total, "startup_s": startup}


if __name__ == "__main__":
    main()
