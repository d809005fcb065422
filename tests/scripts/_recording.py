"""What the recording scripts share: parse `MODEL_DIR OUT_DIR [POSITIONAL ...] [key=value ...]`, train a recording
trainer a few steps on the tiny math task, save each rank's records to `OUT_DIR/rank{r}.pt`, and print the world size
and the step count from the main process (the launching test reads that line).

Defaults: 2 steps, 3 prompts per device with groups of 2 (with 2 ranks, the middle group straddles the ranks), learning
rate 1e-2, seed 11, the CPU test flags; a script's own settings and then the command line's `key=value` overrides
(values parsed as Python literals) replace them.
"""

import ast
import sys

import torch

from trl_credit import GRPOConfig
from trl_credit.testing import CPU_TEST_ARGS, tiny_math_dataset


def run_recording(trainer_cls, reward_func, positional=(), trainer_kwargs=None, **settings):
    """Train `trainer_cls` (whose class attribute `records` it fills) and save the records per rank.

    `positional` names the config fields given as positional arguments after OUT_DIR (e.g. `("advantage_estimator",)`);
    `trainer_kwargs` are passed to the trainer (e.g. a `rollout_func`).
    """
    model_dir, out_dir, *rest = sys.argv[1:]
    values, extra = rest[: len(positional)], rest[len(positional) :]
    if len(values) < len(positional):
        raise SystemExit(f"usage: {sys.argv[0]} MODEL_DIR OUT_DIR {' '.join(p.upper() for p in positional)} [k=v ...]")
    kw = dict(output_dir=out_dir, max_steps=2, per_device_train_batch_size=3, num_generations=2, learning_rate=1e-2,
              **CPU_TEST_ARGS, seed=11)  # fmt: skip
    kw.update(settings)
    kw.update(zip(positional, values, strict=True))
    kw.update({k: ast.literal_eval(v) for k, v in (e.split("=", 1) for e in extra)})
    trainer = trainer_cls(model=model_dir, reward_funcs=reward_func, args=GRPOConfig(**kw),
                          train_dataset=tiny_math_dataset(24), **(trainer_kwargs or {}))  # fmt: skip
    trainer.train()
    torch.save(trainer.records, f"{out_dir}/rank{trainer.accelerator.process_index}.pt")
    if trainer.accelerator.is_main_process:
        print("world_size", trainer.accelerator.num_processes, "steps", trainer.state.global_step, flush=True)
    return trainer
