"""Launch a script on several CPU processes (gloo) through `accelerate launch`, as a user would.

`accelerate launch --cpu` runs a single process unless mpirun is installed; `--multi_gpu` uses torchrun, and a
script whose Accelerator/TrainingArguments set `use_cpu=True` then runs distributed on CPU with gloo.
"""

import os
import subprocess
import sys
from pathlib import Path

from conftest import free_port


def run_accelerate(script: str | Path, *args: str, num_processes: int = 2, timeout: int = 900) -> str:
    """Run `script args` on `num_processes` CPU processes; return stdout; fail with the output tail on error."""
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), str(script), *map(str, args),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited with {proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}\n"
            f"--- stderr ---\n{proc.stderr[-6000:]}"
        )
    return proc.stdout
