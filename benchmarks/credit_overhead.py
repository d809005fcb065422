"""TEMPO / GiGPO advantage time as a share of a GRPO training step, measured in the same run.

For each (G, T), one generation batch of `--prompts` groups is built with realistic prefix sharing (tokens drawn from
a low-entropy distribution for the first positions, so groups share prefixes and branch, then a wide one), and we time:

- `credit`: the registered estimator (`tempo`, `gigpo`) on the whole batch, exactly as the trainer calls it;
- `step`: a GRPO optimizer step of `trl_credit.GRPOTrainer` on the same batch **without generation**: TRL's loss
  forward + backward + optimizer step of a small Qwen2 (hidden 256, 4 layers, vocab 4096).

A real step also generates the completions (usually the dominant cost), so `credit / step` here is an upper bound of
the overhead. Goal: <= 1 %. Usage: `python benchmarks/credit_overhead.py [--prompts 4] [--repeats 5]`.
"""

import argparse
import os
import statistics
import tempfile
import time
import warnings


warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from trl_credit import GRPOConfig, GRPOTrainer  # noqa: E402
from trl_credit.credit import CreditBatch, call_estimator, get_advantage_estimator  # noqa: E402
from trl_credit.testing import build_tiny_model, length_reward, tiny_math_dataset  # noqa: E402


def synthetic_group_batch(prompts, G, T, vocab, generator):
    """Completions whose first tokens come from 3 choices (shared prefixes, branches), then from the full vocab."""
    ids = torch.randint(3, vocab, (prompts * G, T), generator=generator)
    head = min(T, 8)
    ids[:, :head] = torch.randint(3, 6, (prompts * G, head), generator=generator)
    lengths = torch.randint(T // 2, T + 1, (prompts * G,), generator=generator)
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    rewards = torch.randint(0, 2, (prompts * G,), generator=generator).float()
    return ids * mask, mask, rewards


def time_it(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=4, help="groups per generation batch")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--groups", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024])
    a = parser.parse_args()
    torch.manual_seed(0)
    workdir = tempfile.mkdtemp(prefix="credit_overhead_")
    vocab = 4096
    from trl_credit.testing import build_tokenizer

    model_dir = build_tiny_model(
        f"{workdir}/model", hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=512, tokenizer=build_tokenizer(vocab_size=vocab),
    )  # fmt: skip
    print(f"torch threads: {torch.get_num_threads()}; prompts per batch: {a.prompts}; model: {model_dir}")
    header = f"{'G':>3} {'T':>5} {'N':>4} | {'step (s)':>9} |"
    print(header + "".join(f" {name + ' (ms)':>10} {'ratio':>7} |" for name in ("tempo", "gigpo")))
    gen = torch.Generator().manual_seed(0)
    for G in a.groups:
        for T in a.lengths:
            N = a.prompts * G
            args = GRPOConfig(
                output_dir=f"{workdir}/out", per_device_train_batch_size=N, num_generations=G,
                max_completion_length=T, report_to="none", bf16=False, use_cpu=True, save_strategy="no",
                gradient_checkpointing=False, learning_rate=1e-5,
            )  # fmt: skip
            trainer = GRPOTrainer(
                model=model_dir, reward_funcs=length_reward, args=args, train_dataset=tiny_math_dataset(N)
            )
            trainer.create_optimizer_and_scheduler(num_training_steps=10)
            ids, mask, rewards = synthetic_group_batch(a.prompts, G, T, len(trainer.processing_class), gen)
            prompt_ids = torch.randint(3, 300, (N, 32), generator=gen)
            inputs = {
                "prompt_ids": prompt_ids,
                "prompt_mask": torch.ones_like(prompt_ids),
                "completion_ids": ids,
                "completion_mask": mask,
                "advantages": torch.randn(N),
                "num_items_in_batch": mask.sum(),
            }

            def step():
                loss = trainer.compute_loss(trainer.model, inputs)
                loss.backward()
                trainer.optimizer.step()
                trainer.optimizer.zero_grad()

            step_time = time_it(step, max(1, a.repeats // 2))
            batch = CreditBatch(completion_ids=ids, completion_mask=mask, rewards=rewards, num_generations=G)
            row = f"{G:>3} {T:>5} {N:>4} | {step_time:>9.3f} |"
            for name in ("tempo", "gigpo"):
                fn = get_advantage_estimator(name)
                t = time_it(lambda: call_estimator(fn, batch, args), a.repeats)
                row += f" {t * 1e3:>10.2f} {100 * t / step_time:>6.2f}% |"
            print(row, flush=True)
            del trainer


if __name__ == "__main__":
    main()
