"""Real FSDP2 and DeepSpeed ZeRO-2/3 on CPU processes (gloo), and a check of which engine really holds the model.

Used on both sides of a multi-process test: `launch_engine` (pytest side) runs a script under one of the shipped
`recipes/accelerate/*.yaml` files; the launched script calls `enable_fsdp_on_cpu()` before building its trainer,
`assert_engine(trainer, engine)` once the trainer has prepared its model, and `finish()` at the end.

Why the patch. accelerate 1.16 picks FSDP only when the processes run on a GPU-like device: `AcceleratorState`
switches `distributed_type` to `FSDP` inside a branch for `MULTI_GPU`/`MULTI_NPU`/…, and CPU processes stay
`MULTI_CPU`. An FSDP config launched on CPU therefore trains with plain DDP, without an error or a warning.
`enable_fsdp_on_cpu()` wraps `AcceleratorState.__init__`: when an FSDP plugin was given (the launcher's FSDP
environment makes the Trainer pass one) and the state came out `MULTI_CPU`, it sets what the GPU branch sets
(`distributed_type = FSDP`, `fsdp_plugin`, and the distributed type shared with `PartialState`). Nothing else
differs: `Accelerator.prepare` then runs accelerate's own FSDP2 code (`fully_shard`, `cpu_ram_efficient_loading`
broadcast, tied-weight handling) on gloo. DeepSpeed needs no patch (it runs on CPU with gloo, see `ENGINE_ARGS`).

Why the engine check. A config that silently falls back to DDP would make every test here pass while testing
nothing, so `engine_of` reads the prepared objects, never the config: FSDP2 = every parameter a `DTensor` sharded
over the 2 processes; ZeRO-3 = DeepSpeed parameters whose local partition is a fraction of the full tensor;
ZeRO-2 = a DeepSpeed engine whose optimizer keeps only this rank's partition of the fp32 master weights; DDP =
`DistributedDataParallel`.
"""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent
# The shipped launch configs, used as they are apart from `--num_processes 2 --mixed_precision no` (fp32 on CPU).
CONFIGS = {
    "ddp": REPO / "recipes/accelerate/multi_gpu.yaml",
    "fsdp2": REPO / "recipes/accelerate/fsdp2.yaml",
    "zero2": REPO / "recipes/accelerate/zero2.yaml",
    "zero3": REPO / "recipes/accelerate/zero3.yaml",
}
# Where the launched processes train: "cpu" (CI) or "cuda" (one process per GPU, NCCL; docs/scaling.md).
DEVICE = os.environ.get("TRL_CREDIT_ENGINE_DEVICE", "cpu")
# Trainer arguments of every engine run on CPU: `use_cpu=True` and gloo (without it DeepSpeed leaves each process
# believing it is rank 0 of its own group). The accelerate YAML keeps `use_cpu: false`: with `use_cpu: true`
# `accelerate launch` starts one plain process (its simple launcher) and drops the DeepSpeed/FSDP settings.
ENGINE_ARGS = {"ddp_backend": "gloo", "use_cpu": True} if DEVICE == "cpu" else {"use_cpu": False}
# Under DeepSpeed/FSDP2 `PPOTrainer`'s critic is the submodule `trl_credit_critic` of the prepared policy.
CRITIC_PREFIX = "trl_credit_critic."


# ── inside the launched processes ──────────────────────────────────────────────────────────────────────────────────
def enable_fsdp_on_cpu() -> None:
    """Make accelerate use FSDP for an FSDP launch on CPU processes (see the module docstring). Idempotent; a no-op
    for every other launch, and on GPUs, where accelerate selects FSDP itself."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__
    if getattr(original, "_fsdp_on_cpu", False):
        return

    @functools.wraps(original)
    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            # What accelerate's GPU branch does (accelerate/state.py, AcceleratorState.__init__).
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    __init__._fsdp_on_cpu = True
    AcceleratorState.__init__ = __init__


def engine_of(model) -> dict:
    """
    The engine that holds `model` (the trainer's `model_wrapped`), read from the prepared objects.

    Returns `{"engine": "fsdp2" | "zero3" | "zero2" | "zero1" | "ddp" | "none", "world": processes,
    "local_fraction": parameters held by this process / all parameters}` (≈ 1/world when sharded).
    """
    import torch

    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if type(model).__name__ == "DeepSpeedEngine":
        stage = model.zero_optimization_stage()
        params = [p for p in model.module.parameters()]
        full = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in params)
        if stage == 3:
            local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
        else:
            # ZeRO-1/2: this rank's slice of the flat fp32 master weights (what the optimizer updates).
            partitions = getattr(model.optimizer, "single_partition_of_fp32_groups", None)
            trainable = sum(p.numel() for p in params if p.requires_grad)
            local = sum(t.numel() for t in partitions) * full / max(trainable, 1) if partitions else full
        return {"engine": f"zero{stage}", "world": world, "local_fraction": local / full}
    from torch.distributed.tensor import DTensor

    params = list(model.parameters())
    if params and all(isinstance(p, DTensor) for p in params):
        local = sum(p.to_local().numel() for p in params)
        return {"engine": "fsdp2", "world": world, "local_fraction": local / sum(p.numel() for p in params)}
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return {"engine": "ddp", "world": world, "local_fraction": 1.0}
    return {"engine": "none", "world": world, "local_fraction": 1.0}


def assert_engine(trainer, expected: str) -> dict:
    """Fail unless `trainer`'s prepared model runs under `expected` ("ddp", "fsdp2", "zero2", "zero3") across 2 or
    more processes, sharded where the engine shards. Call it once the model is prepared (after the first step)."""
    info = engine_of(trainer.model_wrapped)
    if info["engine"] != expected or info["world"] < 2:
        raise AssertionError(f"expected {expected} over several processes, the model runs under {info}")
    if expected != "ddp" and not info["local_fraction"] < 0.75:
        raise AssertionError(f"{expected} does not shard: this process holds {info['local_fraction']:.0%}")
    return info


def critic_module(trainer):
    """`PPOTrainer`'s critic (`ValueModel`), unwrapped from DDP; under DeepSpeed/FSDP2 a submodule of the policy."""
    return trainer.accelerator.unwrap_model(trainer.value_model)


def assert_critic_engine(trainer, expected: str) -> dict:
    """
    Fail unless `PPOTrainer`'s critic is held by the same engine as the policy, sharded where the engine shards:
    FSDP2 = every critic parameter a DTensor sharded over the processes; ZeRO-3 = every critic parameter partitioned;
    ZeRO-2 = every trainable critic parameter among those the engine's ZeRO optimizer partitions (the policy's
    engine: one engine, not a second one); DDP = a `DistributedDataParallel` critic of its own.
    """
    import torch

    critic = critic_module(trainer)
    params = list(critic.parameters())
    full = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in params)
    model = trainer.model_wrapped
    policy_ids = {id(p) for p in trainer.accelerator.unwrap_model(model).parameters()}
    inside = all(id(p) in policy_ids for p in params)
    if expected == "ddp":
        info = {"engine": "ddp" if isinstance(trainer.value_model, torch.nn.parallel.DistributedDataParallel)
                else "none", "local_fraction": 1.0, "in_policy_engine": inside}  # fmt: skip
    elif expected == "fsdp2":
        from torch.distributed.tensor import DTensor

        sharded = all(isinstance(p, DTensor) for p in params)
        local = sum(p.to_local().numel() for p in params) if sharded else full
        info = {"engine": "fsdp2" if sharded else "none", "local_fraction": local / full, "in_policy_engine": inside}
    elif expected == "zero3":
        partitioned = all(hasattr(p, "ds_tensor") for p in params)
        local = sum(p.ds_tensor.numel() for p in params) if partitioned else full
        info = {"engine": "zero3" if partitioned else "none", "local_fraction": local / full,
                "in_policy_engine": inside}  # fmt: skip
    else:
        groups = getattr(getattr(model, "optimizer", None), "bit16_groups", None) or []
        held = {id(p) for group in groups for p in group}
        trainable = [p for p in params if p.requires_grad]
        managed = bool(trainable) and all(id(p) in held for p in trainable)
        info = {"engine": expected if managed else "none", "local_fraction": engine_of(model)["local_fraction"],
                "in_policy_engine": inside}  # fmt: skip
    ok = info["engine"] == expected and (expected == "ddp") != info["in_policy_engine"]
    if not ok or (expected != "ddp" and not info["local_fraction"] < 0.75):
        raise AssertionError(f"expected the critic under {expected} (sharded with the policy), got {info}")
    return info


def full_parameters(model, exclude: str | None = None):
    """Yield `(name, full tensor)` for every parameter of the (unwrapped) `model` whose name does not start with
    `exclude`, gathered from the shards on every process: a collective, call it on all processes. Tied parameters
    appear once (`named_parameters`)."""
    from torch.distributed.tensor import DTensor

    for name, p in model.named_parameters():
        if exclude is not None and name.startswith(exclude):
            continue
        if isinstance(p, DTensor):
            yield name, p.full_tensor().detach()
        elif hasattr(p, "ds_id"):  # ZeRO-3 partitioned
            import deepspeed

            with deepspeed.zero.GatheredParameters([p]):
                yield name, p.data.detach().clone()
        else:
            yield name, p.detach()


def parameter_digest(model, exclude: str | None = None) -> list[float]:
    """`[Σ p, Σ p², numel]` over the full parameters (float64) whose names do not start with `exclude`: equal digests
    ⇔ (practically) equal weights."""
    import torch

    total, square, count = 0.0, 0.0, 0
    for _, t in full_parameters(model, exclude):
        t = t.double()
        total += t.sum().item()
        square += t.square().sum().item()
        count += t.numel()
    return [total, square, float(count)]


def embeddings_tied(model) -> bool:
    """Whether the output embedding still is the input embedding (FSDP/ZeRO must keep tied weights tied)."""
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    return out is not None and out.weight is inp.weight


def finish() -> None:
    """End a launched script: wait for every process, then tear the process group down (without it gloo
    occasionally aborts at interpreter exit)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# ── on the pytest side ─────────────────────────────────────────────────────────────────────────────────────────────
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(engine: str, script: str | Path, *args: str, num_processes: int = 2) -> list[str]:
    """`accelerate launch` of `script` with the shipped config of `engine`, on `num_processes` CPU processes in fp32."""
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS[engine]),
        "--num_processes", str(num_processes), "--num_machines", "1", "--mixed_precision", "no",
        "--main_process_port", str(_free_port()), str(script), *map(str, args),
    ]  # fmt: skip


def launch_engine(
    engine: str, script: str | Path, *args: str, num_processes: int = 2, timeout: int = 1500, env: dict | None = None
) -> str:
    """Run `script args` under `engine` on CPU processes (with `env` added to the environment); return stdout; fail
    with the root-cause traceback and the output tail on error."""
    cmd = launch_command(engine, script, *args, num_processes=num_processes)
    path = os.pathsep.join([str(REPO), str(REPO / "tests")])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path, **(env or {}))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        first = proc.stderr.find("Traceback")  # the root cause comes first; the launcher's own traceback last
        cause = proc.stderr[first : first + 6000] if first >= 0 else ""
        raise AssertionError(
            f"{' '.join(cmd)} exited with {proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}\n"
            f"--- first traceback ---\n{cause}\n--- stderr tail ---\n{proc.stderr[-4000:]}"
        )
    return proc.stdout
