"""Train several estimators in sequence under one engine (DDP, FSDP2, ZeRO-2, ZeRO-3) on CPU processes; launched
by tests/test_engines.py through `engines.launch_engine` (one launch per engine: process start and model loading
dominate, so the cases share them).

usage: engine_estimators.py ENGINE MODEL_DIR OUT_DIR CASE [CASE ...]      (cases: see CASES)

For each case, every rank writes OUT_DIR/CASE/rank{r}.pt with: the engine read from the prepared model
(`engines.engine_of`), the advantages that reached the loss with their completion ids and mask (one record per
generation batch), the trainer's log history, full-parameter digests at the start and after every optimizer step,
whether the embeddings are still tied, the attention-capture mode, and the case's wall time. PPO cases (a learned
critic) add the engine that holds the critic, the critic's digests, and the rollout values and value targets.
"""

import gc
import os
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, TrainerCallback

import engines
from trl_credit import GRPOConfig, GRPOTrainer, PPOConfig, PPOTrainer
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
    # PPO with a learned critic (GAE) and the KL penalty against a reference model in the rewards. The critic is a
    # submodule of the policy under DeepSpeed/FSDP2 (one engine); DeepSpeed clips policy and critic gradients
    # together, DDP/FSDP2 separately: max_grad_norm never binds here, so that every engine makes the same update.
    # With a checkpoint after step 1: saved (policy + `value_model`) and resumed through the engine's checkpoint.
    "ppo_gae": dict(trainer="ppo", advantage_estimator="gae", value_learning_rate=1e-3, vf_coef=0.5,
                    max_grad_norm=1e4, resume=True),  # fmt: skip
    # PPO with generation on the vLLM server: the weight sync sends the policy, never the critic inside its engine.
    # Without TRL's importance-sampling pass the critic's no-grad pass is the step's first forward (under FSDP2 the
    # policy must still become the root of the FSDP tree).
    "ppo_vllm_server": dict(trainer="ppo", advantage_estimator="gae", use_vllm=True, vllm_mode="server",
                            vllm_importance_sampling_correction=False, value_learning_rate=1e-3,
                            max_grad_norm=1e4),  # fmt: skip
    # A LoRA policy and a LoRA critic (its score head fully trained) in one engine.
    "ppo_lora": dict(trainer="ppo", advantage_estimator="gae", learning_rate=5e-2, value_learning_rate=1e-2,
                     vf_coef=0.5, max_grad_norm=1e4, value_peft_config=dict(r=4, lora_alpha=8,
                     target_modules=["q_proj", "v_proj"])),  # fmt: skip
    # SPO: Monte-Carlo values at cutpoints of a chain (transformers rollouts), and a tree of segments [2, 2] whose
    # 4 leaves are one group straddling the two ranks.
    "spo_chain": dict(advantage_estimator="spo_chain", max_completion_length=12, vine_num_rollouts=2,
                      spo_cutpoint_threshold=0.004, spo_cutpoints_per_segment=2, vine_rollout_batch_size=4,
                      num_generations=3),  # fmt: skip
    "spo_tree": dict(advantage_estimator="spo_tree", max_completion_length=12, spo_tree_shape=[2, 2],
                     spo_tree_segment_tokens=4, spo_advantage_norm="none", num_generations=4,
                     per_device_train_batch_size=2),  # fmt: skip
}
MC_ESTIMATORS = ("vineppo", "spo_chain")  # Monte-Carlo rollouts: EOS is biased so that the first step has credit


class Recording:
    def _assign_credit(self, out, ctx):
        super()._assign_credit(out, ctx)
        record = {
            "advantages": out["advantages"].detach().cpu().clone(),
            "completion_ids": out["completion_ids"].cpu().clone(),
            "completion_mask": out["completion_mask"].cpu().clone(),
        }
        for key in ("values", "returns"):  # PPO: the critic's rollout values and the GAE value targets
            if key in out:
                record[key] = out[key].detach().cpu().clone()
        self.records.append(record)


class RecordingTrainer(Recording, GRPOTrainer):
    pass


class RecordingPPOTrainer(Recording, PPOTrainer):
    pass


class Probe(TrainerCallback):
    """Reads the engine once the model is prepared, and the full-parameter digest at the start and after each step."""

    def __init__(self, expected_engine: str):
        self.expected_engine = expected_engine
        self.trainer = None
        self.engine = None
        self.critic_engine = None
        self.digests = []
        self.critic_digests = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.engine = engines.assert_engine(self.trainer, self.expected_engine)
        if getattr(self.trainer, "value_model", None) is not None:
            self.critic_engine = engines.assert_critic_engine(self.trainer, self.expected_engine)
        self._digest()

    def on_step_end(self, args, state, control, **kwargs):
        self._digest()

    def _digest(self):
        # The policy alone (under DeepSpeed/FSDP2 the critic is a submodule of the prepared policy), then the critic.
        self.digests.append(engines.parameter_digest(self.trainer.model, exclude=engines.CRITIC_PREFIX))
        if self.critic_engine is not None:
            self.critic_digests.append(engines.parameter_digest(engines.critic_module(self.trainer)))


def _file_digest(path: Path) -> list[float]:
    """`engines.parameter_digest` of a safetensors file (the weights last pushed to the vLLM server, or a saved
    model). A tied output embedding saved beside the input embedding (FSDP2's full state dict holds both) counts once,
    as in `named_parameters`; it must equal the input embedding."""
    from safetensors.torch import load_file

    state = load_file(path)
    if "lm_head.weight" in state and "model.embed_tokens.weight" in state:
        assert torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"]), "saved embeddings untied"
        del state["lm_head.weight"]
    tensors = state.values()
    t = [x.double() for x in tensors]
    return [sum(x.sum().item() for x in t), sum(x.square().sum().item() for x in t), float(sum(x.numel() for x in t))]


def _save_and_resume(trainer, build, kw: dict, case_dir: Path) -> dict:
    """Save the trained model (every rank takes part in gathering the shards), then resume a new trainer from the
    checkpoint of step 1 and train step 2 again. Returns what both wrote and what the resumed run did."""
    from trl_credit.trainers.ppo import VALUE_MODEL_DIR

    final = case_dir / "final"
    trainer.save_model(str(final))
    trainer.accelerator.wait_for_everyone()
    saved = {"saved_policy_digest": _file_digest(final / "model.safetensors")}
    if getattr(trainer, "value_model", None) is not None:
        saved["saved_critic_digest"] = _file_digest(final / VALUE_MODEL_DIR / "model.safetensors")
    resumed, probe = build(dict(kw, output_dir=str(case_dir / "resumed")))
    resumed.train(resume_from_checkpoint=str(case_dir / "checkpoint-1"))
    saved.update(resumed_log_history=resumed.state.log_history, resumed_digests=probe.digests,
                 resumed_critic_digests=probe.critic_digests, resumed_records=resumed.records)  # fmt: skip
    resumed.accelerator.wait_for_everyone()
    return saved


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
    ppo = kw.pop("trainer", None) == "ppo"
    resume = kw.pop("resume", False)
    if resume:
        kw.update(save_strategy="steps", save_steps=1)
    if kw["advantage_estimator"] in MC_ESTIMATORS:
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
    if case.startswith("lora") or case == "ppo_lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer_class, config_class = (RecordingPPOTrainer, PPOConfig) if ppo else (RecordingTrainer, GRPOConfig)

    def build(kw):
        probe = Probe(engine)
        trainer = trainer_class(
            model=model_dir, reward_funcs=shaped_math_reward, args=config_class(**kw),
            train_dataset=tiny_math_dataset(24), callbacks=[probe], peft_config=peft_config,
        )  # fmt: skip
        trainer.records = []
        probe.trainer = trainer
        return trainer, probe

    trainer, probe = build(kw)
    trainer.train()
    record = {
        "engine": probe.engine,
        "records": trainer.records,
        "log_history": trainer.state.log_history,
        "global_step": trainer.state.global_step,
        "digests": probe.digests,
        "critic_engine": probe.critic_engine,
        "critic_digests": probe.critic_digests,
        "tied": engines.embeddings_tied(trainer.accelerator.unwrap_model(trainer.model)),
        "capture_stop_early": getattr(trainer, "_tw_stop_early", None),
        "synced_digest": _file_digest(out_dir / "model.safetensors") if kw.get("use_vllm") else None,
    }
    if resume:
        record.update(_save_and_resume(trainer, build, kw, out_dir / case))
    record["seconds"] = time.perf_counter() - start
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
