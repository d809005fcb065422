"""Train several estimators in sequence under one engine (DDP, FSDP2, ZeRO-2, ZeRO-3) on CPU processes; launched
by tests/test_engines.py through `engines.launch_engine` (one launch per engine: process start and model loading
dominate, so the cases share them).

usage: engine_estimators.py ENGINE MODEL_DIR OUT_DIR CASE [CASE ...]      (cases: see CASES)

For each case, every rank writes OUT_DIR/CASE/rank{r}.pt with: the engine read from the prepared model
(`engines.engine_of`), the advantages that reached the loss with their completion ids and mask (one record per
generation batch), the trainer's log history, full-parameter digests at the start and after every optimizer step,
whether the embeddings are still tied, the attention-capture mode, and the case's wall time.
"""

import gc
import os
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, TrainerCallback

import engines
from trl_credit import GRPOConfig, GRPOTrainer
from trl_credit.testing import CPU_TEST_ARGS, shaped_math_reward, tiny_math_dataset


RHYTHM = dict(rhythm_window=4, rhythm_horizon_lo=2, rhythm_horizon_hi=8, rhythm_head_groups="sequence")
VINE = dict(max_completion_length=10, vine_num_rollouts=3, step_split="token_chunks", vine_chunk_tokens=3,
            vine_rollout_batch_size=4)  # fmt: skip
CASES = {
    "grpo": dict(advantage_estimator="grpo"),
    "tempo": dict(advantage_estimator="tempo"),
    "gigpo": dict(advantage_estimator="gigpo"),
    # Monte-Carlo rollouts through TRL's transformers generation (ZeRO-3/FSDP2 gather the weights for it).
    "vineppo": dict(advantage_estimator="vineppo", **VINE),
    # Macro actions with the macro-level importance ratio (its own `_compute_loss` path).
    "macro_tempo": dict(advantage_estimator="macro_tempo", macro_action="ngram", macro_action_n=3,
                        macro_ratio_level="macro_geomean"),  # fmt: skip
    # Attention rhythm from its own no-grad capture pass (complete forwards under sharded engines).
    "rhythm": dict(advantage_estimator="tempo", token_weighting="rhythm", **RHYTHM),
    # Entropy weights riding along TRL's old-log-prob pass (num_iterations=2 makes TRL run it).
    "entropy": dict(advantage_estimator="gigpo", token_weighting="entropy", num_iterations=2),
    # A LoRA policy (PEFT) under the engine.
    "lora": dict(advantage_estimator="tempo", learning_rate=5e-2),
    # VinePPO with generation and rollouts on a vLLM server (CPU build): the weight sync gathers the sharded policy.
    "vllm_server": dict(advantage_estimator="vineppo", use_vllm=True, vllm_mode="server", **VINE),
    # A LoRA policy on the vLLM server: TRL gathers the whole model, merges the adapter, pushes, unmerges.
    "lora_vllm_server": dict(advantage_estimator="tempo", use_vllm=True, vllm_mode="server", learning_rate=5e-2),
}


class RecordingTrainer(GRPOTrainer):
    def _assign_credit(self, out, ctx):
        super()._assign_credit(out, ctx)
        self.records.append(
            {
                "advantages": out["advantages"].detach().cpu().clone(),
                "completion_ids": out["completion_ids"].cpu().clone(),
                "completion_mask": out["completion_mask"].cpu().clone(),
            }
        )


class Probe(TrainerCallback):
    """Reads the engine once the model is prepared, and the full-parameter digest at the start and after each step."""

    def __init__(self, expected_engine: str):
        self.expected_engine = expected_engine
        self.trainer = None
        self.engine = None
        self.digests = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.engine = engines.assert_engine(self.trainer, self.expected_engine)
        self.digests.append(engines.parameter_digest(self.trainer.model))

    def on_step_end(self, args, state, control, **kwargs):
        self.digests.append(engines.parameter_digest(self.trainer.model))


def _file_digest(path: Path) -> list[float]:
    """`engines.parameter_digest` of a safetensors file (the weights last pushed to the vLLM server)."""
    from safetensors.torch import load_file

    tensors = load_file(path).values()
    t = [x.double() for x in tensors]
    return [sum(x.sum().item() for x in t), sum(x.square().sum().item() for x in t), float(sum(x.numel() for x in t))]


def run_case(engine: str, model_dir: str, out_dir: Path, case: str) -> None:
    start = time.perf_counter()
    kw = dict(
        output_dir=str(out_dir / case),
        max_steps=2,
        per_device_train_batch_size=3,  # with num_generations=2 and 2 ranks, the middle group straddles the ranks
        num_generations=2,
        max_completion_length=8,
        learning_rate=1e-2,
        **{**CPU_TEST_ARGS, **engines.ENGINE_ARGS},
        seed=11,
    )
    kw.update(CASES[case])
    if kw["advantage_estimator"] == "vineppo":
        # The random tiny model almost never samples EOS, so every rollout would be truncated and every Monte-Carlo
        # value 0: bias EOS while sampling (completions and rollouts alike) so that the first step has credit.
        eos = AutoTokenizer.from_pretrained(model_dir).eos_token_id
        bias = {"logit_bias": {eos: 4.0}} if kw.get("use_vllm") else {"sequence_bias": [[[eos], 4.0]]}
        kw["generation_kwargs"] = bias
    if kw.get("use_vllm"):
        from trl_credit.generation import vllm_cpu

        vllm_cpu.apply_server_client(sync_dir=str(out_dir))  # the last synced weights stay in OUT_DIR
        kw["vllm_server_base_url"] = os.environ["ENGINE_TEST_VLLM_URL"]  # a server the test started
    peft_config = None
    if case.startswith("lora"):
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    probe = Probe(engine)
    trainer = RecordingTrainer(
        model=model_dir, reward_funcs=shaped_math_reward, args=GRPOConfig(**kw), train_dataset=tiny_math_dataset(24),
        callbacks=[probe], peft_config=peft_config,
    )  # fmt: skip
    trainer.records = []
    probe.trainer = trainer
    trainer.train()
    record = {
        "engine": probe.engine,
        "records": trainer.records,
        "log_history": trainer.state.log_history,
        "global_step": trainer.state.global_step,
        "digests": probe.digests,
        "tied": engines.embeddings_tied(trainer.accelerator.unwrap_model(trainer.model)),
        "capture_stop_early": getattr(trainer, "_tw_stop_early", None),
        "synced_digest": _file_digest(out_dir / "model.safetensors") if kw.get("use_vllm") else None,
        "seconds": time.perf_counter() - start,
    }
    rank = trainer.accelerator.process_index
    (out_dir / case).mkdir(parents=True, exist_ok=True)
    torch.save(record, out_dir / case / f"rank{rank}.pt")
    if trainer.accelerator.is_main_process:
        print(f"ENGINE_CASE_OK {engine} {case} {probe.engine} {record['seconds']:.1f}s", flush=True)
    trainer.accelerator.wait_for_everyone()
    del trainer, probe
    gc.collect()


def main():
    engine, model_dir, out_dir, *cases = sys.argv[1:]
    unknown = [c for c in cases if c not in CASES]
    if unknown or not cases:
        raise SystemExit(f"unknown or missing cases {unknown}; choose from {sorted(CASES)}")
    engines.enable_fsdp_on_cpu()
    for case in cases:
        run_case(engine, model_dir, Path(out_dir), case)
    engines.finish()


if __name__ == "__main__":
    main()
