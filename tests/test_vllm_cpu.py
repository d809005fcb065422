"""vLLM's CPU build: the KV cache size of the colocated engine (config field, `VLLM_CPU_KVCACHE_SPACE`, automatic size
from the generation batch), chunked prefill off for seeded requests, the CPU defaults of `GRPOConfig` (importance
sampling and sleep mode off), and `trl-credit eval`'s `max_model_len` from the prompts. The engines themselves run in
`tests/test_real_model.py` (real prompt lengths) and the vLLM tests on the tiny model."""

import dataclasses
import logging

import pytest

from trl_credit import GRPOConfig, PPOConfig
from trl_credit.configs import vllm_cpu as cfg_cpu
from trl_credit.generation import vllm_cpu
from trl_credit.generation.vllm_cpu import auto_kv_cache_bytes, cpu_engine_kwargs, kv_bytes_per_token


GiB, MiB = 2**30, 2**20
SMOLLM2_PER_TOKEN = 2 * 30 * 3 * 64 * 4


def config(**kw):
    return GRPOConfig(output_dir="/tmp/trl_credit_cfg", use_cpu=True, bf16=False, report_to="none", **kw)


# ── KV cache size ──────────────────────────────────────────────────────────────────────────────────────────────────
def test_auto_kv_cache_holds_the_batch_at_full_length_within_a_quarter_of_free_memory():
    # 32 sequences × 1,024 tokens of SmolLM2 in fp32: 1.41 GiB, the size that decodes 2.8× faster than 64 MiB
    assert auto_kv_cache_bytes(SMOLLM2_PER_TOKEN, 32, 1024, available=24 * GiB) == 32 * 1024 * SMOLLM2_PER_TOKEN
    # lengths round up to vLLM-CPU's 128-token blocks
    assert auto_kv_cache_bytes(SMOLLM2_PER_TOKEN, 4, 200, available=24 * GiB) == 4 * 256 * SMOLLM2_PER_TOKEN
    # memory-bound: a quarter of what is free, in whole MiB
    assert auto_kv_cache_bytes(SMOLLM2_PER_TOKEN, 32, 1024, available=2 * GiB) == 512 * MiB
    # never below one full-length sequence, which vLLM needs to start at all
    assert auto_kv_cache_bytes(SMOLLM2_PER_TOKEN, 32, 8192, available=1 * GiB) == 8192 * SMOLLM2_PER_TOKEN


@pytest.mark.parametrize("bad", [dict(bytes_per_token=0), dict(max_num_seqs=0), dict(max_model_len=-1)])
def test_auto_kv_cache_rejects_non_positive_sizes(bad):
    kw = dict(bytes_per_token=SMOLLM2_PER_TOKEN, max_num_seqs=4, max_model_len=256, available=GiB) | bad
    with pytest.raises(ValueError, match="positive sizes"):
        auto_kv_cache_bytes(**kw)


def test_kv_bytes_per_token_reads_layers_kv_heads_and_head_dim(tiny_model_dir):
    # the tiny Qwen2: 2 layers, 1 KV head of dim 64; K and V; 4 bytes in fp32, 2 in bf16
    assert kv_bytes_per_token(tiny_model_dir) == 2 * 2 * 1 * 64 * 4
    assert kv_bytes_per_token(tiny_model_dir, "bfloat16") == 2 * 2 * 1 * 64 * 2
    with pytest.raises(ValueError, match="Unknown vLLM dtype"):
        kv_bytes_per_token(tiny_model_dir, "int3")


def test_engine_kwargs_kv_cache_precedence_explicit_then_env_then_auto(tiny_model_dir, monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.setattr(vllm_cpu, "available_memory_bytes", lambda: 24 * GiB)
    base = {"model": tiny_model_dir, "max_model_len": 256, "max_num_seqs": 8}
    auto = cpu_engine_kwargs(base)
    assert auto["kv_cache_memory_bytes"] == 8 * 256 * kv_bytes_per_token(tiny_model_dir)
    assert cpu_engine_kwargs(base, kv_cache_mib=96)["kv_cache_memory_bytes"] == 96 * MiB
    assert cpu_engine_kwargs({**base, "kv_cache_memory_bytes": 5 * MiB}, kv_cache_mib=96)["kv_cache_memory_bytes"] == (
        5 * MiB
    )
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "2")  # vLLM's own variable (GiB): left for vLLM to apply
    assert "kv_cache_memory_bytes" not in cpu_engine_kwargs(base)
    assert cpu_engine_kwargs(base, kv_cache_mib=96)["kv_cache_memory_bytes"] == 96 * MiB
    with pytest.raises(ValueError, match="kv_cache_mib must be >= 1"):
        cpu_engine_kwargs(base, kv_cache_mib=0)


def test_engine_kwargs_without_max_model_len_size_for_the_model_context(tiny_model_dir, monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.setattr(vllm_cpu, "available_memory_bytes", lambda: 24 * GiB)
    out = cpu_engine_kwargs({"model": tiny_model_dir, "max_model_len": None, "max_num_seqs": 2})
    assert out["kv_cache_memory_bytes"] == 2 * 1024 * kv_bytes_per_token(tiny_model_dir)  # context 1,024
    assert out["max_num_batched_tokens"] >= 1024


def test_explicit_kv_cache_hides_the_environment_variable_only_while_building(monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "3")
    seen = []

    class FakeLLM:
        def __init__(self, **kwargs):
            import os

            seen.append(os.environ.get("VLLM_CPU_KVCACHE_SPACE"))

    vllm_cpu.build_cpu_llm(llm_cls=FakeLLM, kv_cache_memory_bytes=MiB, max_model_len=16)
    vllm_cpu.build_cpu_llm(llm_cls=FakeLLM, max_model_len=16)
    import os

    assert seen == [None, "3"] and os.environ["VLLM_CPU_KVCACHE_SPACE"] == "3"


# ── chunked prefill (seeded requests) ──────────────────────────────────────────────────────────────────────────────
def test_engine_kwargs_turn_chunked_prefill_off_with_a_budget_of_one_full_sequence(tiny_model_dir):
    out = cpu_engine_kwargs({"model": tiny_model_dir, "max_model_len": 4096, "max_num_batched_tokens": 2048})
    assert out["enable_chunked_prefill"] is False and out["max_num_batched_tokens"] == 4096
    out = cpu_engine_kwargs({"model": tiny_model_dir, "max_model_len": 256})
    assert out["max_num_batched_tokens"] == 2048 and out["dtype"] == "float32" and out["enforce_eager"] is True
    kept = cpu_engine_kwargs({"model": tiny_model_dir, "max_model_len": 256, "dtype": "bfloat16",
                              "enable_chunked_prefill": True})  # fmt: skip
    assert kept["dtype"] == "bfloat16" and kept["enable_chunked_prefill"] is True


@pytest.mark.vllm
def test_apply_colocate_wraps_trls_llm_once_and_a_second_call_replaces_the_settings(vllm_cpu_colocate, tiny_model_dir,
                                                                                     monkeypatch):  # fmt: skip
    import trl.generation.vllm_generation as tvg

    calls = []

    class FakeLLM:
        def __init__(self, **kwargs):
            calls.append(kwargs)

    monkeypatch.setattr(tvg, "LLM", FakeLLM)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    vllm_cpu.apply_colocate(kv_cache_mib=48)
    vllm_cpu.apply_colocate(kv_cache_mib=80)
    assert tvg.LLM._trl_credit_original is FakeLLM
    # TRL's call (vllm_generation.py): max_num_batched_tokens=4096 and the config's max model length
    tvg.LLM(model=tiny_model_dir, max_model_len=512, max_num_seqs=8, max_num_batched_tokens=4096)
    assert calls[-1]["kv_cache_memory_bytes"] == 80 * MiB and calls[-1]["enable_chunked_prefill"] is False
    assert calls[-1]["dtype"] == "float32" and calls[-1]["max_num_batched_tokens"] == 4096
    with pytest.raises(ValueError, match="kv_cache_mib must be >= 1"):
        vllm_cpu.apply_colocate(kv_cache_mib=-5)


def test_training_configs_get_the_cpu_patches_of_their_vllm_mode_and_gpu_builds_none(monkeypatch):
    applied = []
    monkeypatch.setattr(vllm_cpu, "apply_colocate", lambda **kw: applied.append(("colocate", kw)))
    monkeypatch.setattr(vllm_cpu, "apply_server_client", lambda: applied.append(("server", {})))
    monkeypatch.setattr(vllm_cpu, "is_vllm_cpu", lambda: True)
    assert vllm_cpu.prepare_for_training(config(use_vllm=True, vllm_cpu_kv_cache_mib=1536)) is True
    assert vllm_cpu.prepare_for_training(config(use_vllm=True, vllm_mode="server")) is True
    assert vllm_cpu.prepare_for_training(config(use_vllm=False)) is False
    monkeypatch.setattr(vllm_cpu, "is_vllm_cpu", lambda: False)  # a GPU build: untouched
    assert vllm_cpu.prepare_for_training(config(use_vllm=True)) is False
    assert applied == [("colocate", {"kv_cache_mib": 1536}), ("server", {})]


@pytest.mark.vllm
@pytest.mark.slow
def test_python_api_trainer_builds_its_cpu_engine_from_its_config_without_explicit_patches(tiny_model_dir,
                                                                                           vllm_cpu_colocate,
                                                                                           monkeypatch, tmp_path):  # fmt: skip
    """`trl_credit.GRPOTrainer(args=GRPOConfig(use_vllm=True))` on vLLM's CPU build, with no call to `apply_colocate`:
    the engine gets the config's KV cache and re-packs its kernels after each sync (before, only `trl-credit train`
    patched: the Python API got vLLM's default cache of several GiB and sampled from the initial weights)."""
    import torch
    import trl.generation.vllm_generation as tvg
    import vllm.model_executor.layers.utils as vlu
    from trl.generation.vllm_generation import VLLMGeneration

    from trl_credit import GRPOTrainer
    from trl_credit.testing import CPU_TEST_ARGS, length_reward, tiny_math_dataset

    # undo the fixture's patches (its teardown restores the originals again)
    monkeypatch.setattr(tvg, "LLM", tvg.LLM._trl_credit_original)
    monkeypatch.setattr(vlu, "dispatch_cpu_unquantized_gemm", vlu.dispatch_cpu_unquantized_gemm._trl_credit_original)
    monkeypatch.setattr(VLLMGeneration, "sync_weights", VLLMGeneration.sync_weights.__wrapped__)
    args = GRPOConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, num_generations=2,
                      max_completion_length=8, use_vllm=True, vllm_mode="colocate", vllm_max_model_length=128,
                      vllm_cpu_kv_cache_mib=48, **CPU_TEST_ARGS)  # fmt: skip
    trainer = GRPOTrainer(model=tiny_model_dir, reward_funcs=length_reward, args=args,
                          train_dataset=tiny_math_dataset(8))  # fmt: skip
    engine = trainer.vllm_generation.llm.llm_engine
    assert engine.vllm_config.cache_config.kv_cache_memory_bytes == 48 * MiB
    prefix = trainer.processing_class.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True, tokenize=True
    )
    prefix = list(prefix if isinstance(prefix, list) else prefix["input_ids"])
    torch.manual_seed(0)
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    trainer.vllm_generation.sync_weights()  # what the trainer does before each generation
    assert _logprob_gap(trainer, prefix) < 1e-4


# ── GRPOConfig defaults on a CPU build ─────────────────────────────────────────────────────────────────────────────
def test_cpu_build_turns_importance_sampling_off_with_one_log_line(monkeypatch, caplog):
    monkeypatch.setattr(cfg_cpu, "vllm_cpu_build_installed", lambda: True)
    with caplog.at_level(logging.WARNING, logger="trl_credit.configs.vllm_cpu"):
        args = config(use_vllm=True)
    assert args.vllm_importance_sampling_correction is False
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "vllm_importance_sampling_correction defaults to False" in caplog.records[0].message
    assert config(use_vllm=True, vllm_importance_sampling_correction=True).vllm_importance_sampling_correction is True
    assert PPOConfig(output_dir="/tmp/x", use_cpu=True, bf16=False, use_vllm=True).vllm_importance_sampling_correction \
        is False  # fmt: skip


def test_importance_sampling_keeps_trls_default_on_gpu_builds_and_without_vllm(monkeypatch):
    monkeypatch.setattr(cfg_cpu, "vllm_cpu_build_installed", lambda: False)
    assert config(use_vllm=True).vllm_importance_sampling_correction is True
    monkeypatch.setattr(cfg_cpu, "vllm_cpu_build_installed", lambda: True)
    assert config(use_vllm=False).vllm_importance_sampling_correction is True
    # TRL's own check still sees the resolved value
    with pytest.raises(ValueError, match="vllm_importance_sampling_clip_min"):
        config(use_vllm=False, vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_clip_min=None,
               vllm_importance_sampling_clip_max=None)  # fmt: skip


def test_cpu_build_turns_sleep_mode_off_with_a_warning_naming_the_flag(monkeypatch, caplog):
    monkeypatch.setattr(cfg_cpu, "vllm_cpu_build_installed", lambda: True)
    with caplog.at_level(logging.WARNING, logger="trl_credit.configs.vllm_cpu"):
        args = config(use_vllm=True, vllm_mode="colocate", vllm_enable_sleep_mode=True)
    assert args.vllm_enable_sleep_mode is False
    assert any("vllm_enable_sleep_mode=True is a GPU feature" in r.message for r in caplog.records)
    monkeypatch.setattr(cfg_cpu, "vllm_cpu_build_installed", lambda: False)
    assert config(use_vllm=True, vllm_enable_sleep_mode=True).vllm_enable_sleep_mode is True


@pytest.mark.parametrize("bad", [0, -64])
def test_kv_cache_field_rejects_non_positive_sizes(bad):
    with pytest.raises(ValueError, match="vllm_cpu_kv_cache_mib must be a positive number of MiB"):
        config(vllm_cpu_kv_cache_mib=bad)


def test_new_fields_have_help_docstring_and_cli_flags():
    from transformers import HfArgumentParser

    for f in dataclasses.fields(cfg_cpu.VLLMCPUArguments):
        assert f.metadata.get("help") and f"{f.name} (`" in GRPOConfig.__doc__, f.name
    (args,) = HfArgumentParser(GRPOConfig).parse_args_into_dataclasses(
        ["--output_dir", "/tmp/x", "--use_cpu", "--bf16", "false", "--vllm_cpu_kv_cache_mib", "1536",
         "--vllm_importance_sampling_correction", "true"]
    )  # fmt: skip
    assert args.vllm_cpu_kv_cache_mib == 1536 and args.vllm_importance_sampling_correction is True


def test_cpu_build_detection_reads_package_metadata(monkeypatch):
    import importlib.metadata as md

    def fake(dists):
        def distribution(name):
            if name not in dists:
                raise md.PackageNotFoundError(name)
            return name

        return distribution

    monkeypatch.setattr(md, "distribution", fake({"vllm-cpu"}))
    assert cfg_cpu.vllm_cpu_build_installed()
    monkeypatch.setattr(md, "distribution", fake(set()))
    monkeypatch.setattr(md, "version", lambda name: "0.11.0+cpu")
    assert cfg_cpu.vllm_cpu_build_installed()
    monkeypatch.setattr(md, "version", lambda name: "0.11.0")
    assert not cfg_cpu.vllm_cpu_build_installed()


# ── trl-credit eval ────────────────────────────────────────────────────────────────────────────────────────────────
def test_eval_max_model_len_is_the_longest_prompt_plus_the_budget_within_the_context(tiny_model_dir):
    from trl_credit.evaluation import _eval_max_model_len

    assert _eval_max_model_len(tiny_model_dir, [[1] * 30, [1] * 50], 100) == 150
    assert _eval_max_model_len(tiny_model_dir, [[1] * 30], 5000) == 1024  # the tiny model's context


# ── weight sync into the packed CPU kernels ────────────────────────────────────────────────────────────────────────
def _logprob_gap(trainer, prefix):
    """max |log p_trainer − log p_vLLM| over continuations vLLM samples from a token-id prefix."""
    import torch

    _, completions, logprobs, _ = trainer.vllm_generation.generate(prompts=[prefix] * 2, images=None, num_generations=2)
    model = trainer.model.eval()
    gap = 0.0
    with torch.no_grad():
        for c, lp in zip(completions, logprobs, strict=True):
            ref = model(input_ids=torch.tensor([prefix + list(c)])).logits[0, len(prefix) - 1 : -1].log_softmax(-1)
            ref = ref.gather(-1, torch.tensor(list(c))[:, None])[:, 0]
            gap = max(gap, (ref - torch.tensor([x[0] for x in lp])).abs().max().item())
    return gap


@pytest.mark.vllm
@pytest.mark.slow
def test_colocated_cpu_engine_repacks_its_kernels_after_each_weight_sync(tiny_model_dir, vllm_cpu_colocate, tmp_path):
    """vLLM-CPU computes with packed copies of the weights (oneDNN in fp32); TRL's sync writes `layer.weight`. Without
    the re-pack the engine keeps sampling from the old weights (tied lm_head included)."""
    import torch
    from trl.generation.vllm_generation import VLLMGeneration

    from trl_credit import GRPOTrainer
    from trl_credit.testing import CPU_TEST_ARGS, length_reward, tiny_math_dataset

    args = GRPOConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, num_generations=2,
                      max_completion_length=8, use_vllm=True, vllm_mode="colocate", vllm_max_model_length=128,
                      **{**CPU_TEST_ARGS, "use_cpu": True})  # fmt: skip
    trainer = GRPOTrainer(model=tiny_model_dir, reward_funcs=length_reward, args=args,
                          train_dataset=tiny_math_dataset(8))  # fmt: skip
    prefix = trainer.processing_class.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True, tokenize=True
    )
    prefix = list(prefix if isinstance(prefix, list) else prefix["input_ids"])
    vg = trainer.vllm_generation
    vg.sync_weights()
    assert _logprob_gap(trainer, prefix) < 1e-4
    torch.manual_seed(0)
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    VLLMGeneration.sync_weights.__wrapped__(vg)  # TRL's own sync: loads layer.weight only
    stale = _logprob_gap(trainer, prefix)
    vg.sync_weights()  # TRL's sync, then the re-pack
    assert stale > 1e-2 and _logprob_gap(trainer, prefix) < 1e-4, stale


def _server_logprob_gap(generation, model, sequences):
    """max |log p_model − log p_server| over every token of `sequences` after the first (the server's prompt logprobs,
    which the sampling processors do not touch)."""
    import torch

    server = generation.vllm_client.get_sequence_logprobs(sequences, [1] * len(sequences), top_logprobs=1)
    gap = 0.0
    with torch.no_grad():
        for seq, lp in zip(sequences, server["actual_logprobs"], strict=True):
            ref = model(input_ids=torch.tensor([seq])).logits[0, :-1].log_softmax(-1)
            ref = ref.gather(-1, torch.tensor(seq[1:])[:, None])[:, 0]
            gap = max(gap, (ref - torch.tensor([x[0] for x in lp])).abs().max().item())
    return gap


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.parametrize("policy", ["full", "lora"])
def test_server_weight_sync_serves_the_trainers_weights_after_every_sync(tiny_model_dir, vllm_cpu_server,
                                                                          vllm_cpu_server_client, policy):  # fmt: skip
    """Server mode on CPU: after each of two syncs with different weights the server scores tokens like the trainer.
    vLLM's own `reload_weights` left the tied lm_head packed from the initial embeddings (gap > 1 from the first
    update on). With LoRA, TRL merges the adapter and syncs it under the base model's names."""
    import torch
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.generation.vllm_generation import VLLMGeneration

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    if policy == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    trained = [p for name, p in model.named_parameters() if policy == "full" or "lora_" in name]
    generation = VLLMGeneration(model, Accelerator(cpu=True), AutoTokenizer.from_pretrained(tiny_model_dir),
                                mode="server", server_base_url=vllm_cpu_server)  # fmt: skip
    sequences = [list(range(5, 45)), list(range(100, 130)), [7, 300, 12, 399, 0, 54, 54, 54]]
    gaps, moved = [], []
    try:
        for seed in (1, 2):
            torch.manual_seed(seed)
            with torch.no_grad():
                for p in trained:
                    p.add_(torch.randn_like(p) * (0.05 if policy == "full" else 0.3))
            before = _server_logprob_gap(generation, model, sequences)
            generation.sync_weights()
            moved.append(before)
            gaps.append(_server_logprob_gap(generation, model, sequences))
    finally:  # the server is shared by the session: put the checkpoint's weights back
        base = model.get_base_model() if policy == "lora" else model
        if policy == "lora":
            model.unload()
        with torch.no_grad():
            for name, p in base.named_parameters():
                p.copy_(initial[name])
        generation.model = base
        generation.sync_weights()
    assert min(moved) > 0.1, moved  # each update changes the policy visibly...
    assert max(gaps) < 1e-4, gaps  # ...and the server follows it exactly
    assert _server_logprob_gap(generation, base, sequences) < 1e-4


@pytest.mark.vllm
def test_server_weight_sync_names_server_parameters_the_file_left_unset(tiny_model_dir, vllm_cpu_server, tmp_path):
    import requests
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    state = {n: p.detach().clone() for n, p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters()}
    save_file({n: t for n, t in state.items() if n != "model.layers.1.post_attention_layernorm.weight"},
              tmp_path / "model.safetensors")  # fmt: skip
    with pytest.raises(RuntimeError, match=r"did not set 1 server parameter\(s\).*layers.1.post_attention_layernorm"):
        vllm_cpu.post_weights_file(requests.Session(), vllm_cpu_server, str(tmp_path))
    save_file(state, tmp_path / "model.safetensors")  # the whole checkpoint: nothing missing, every kernel re-packed
    (result,) = vllm_cpu.post_weights_file(requests.Session(), vllm_cpu_server, str(tmp_path))
    assert result["missing"] == [] and result["tensors"] == len(state) and result["repacked"] >= 2 * 4 + 1
    with pytest.raises(RuntimeError, match="No weights file at"):
        vllm_cpu.post_weights_file(requests.Session(), vllm_cpu_server, str(tmp_path / "nowhere"))


def test_serve_adds_the_weight_sync_extension_and_refuses_a_foreign_one():
    ours = "trl_credit.generation.vllm_cpu_worker.FileWeightSyncExtension"
    assert vllm_cpu._with_sync_extension(["--model", "m"]) == ["--model", "m", "--worker-extension-cls", ours]
    assert vllm_cpu._with_sync_extension(["--worker-extension-cls", ours]) == ["--worker-extension-cls", ours]
    assert vllm_cpu._with_sync_extension([f"--worker-extension-cls={ours}"]) == [f"--worker-extension-cls={ours}"]
    with pytest.raises(SystemExit, match="make collections.OrderedDict a subclass of it"):
        vllm_cpu._with_sync_extension(["--worker-extension-cls", "collections.OrderedDict"])
    with pytest.raises(SystemExit, match="cannot import it"):
        vllm_cpu._with_sync_extension(["--worker-extension-cls=no_such_module_xyz.Ext"])


@pytest.mark.vllm
@pytest.mark.slow
def test_a_second_colocated_trainer_is_refused_while_the_first_lives_and_builds_once_it_is_deleted(tiny_model_dir,
                                                                                                   vllm_cpu_colocate,
                                                                                                   tmp_path):  # fmt: skip
    """Before: the second trainer was built, and when the first was collected (a notebook reassigning `trainer`), its
    engine's shutdown destroyed the process group: "Default process group has not been initialized" at the next
    step."""
    import gc

    from trl_credit import GRPOTrainer
    from trl_credit.testing import CPU_TEST_ARGS, length_reward, tiny_math_dataset

    def build(name, **kw):
        args = GRPOConfig(output_dir=str(tmp_path / name), max_steps=1, per_device_train_batch_size=4,
                          num_generations=2, max_completion_length=6, vllm_max_model_length=128, **CPU_TEST_ARGS,
                          **kw)  # fmt: skip
        return GRPOTrainer(model=tiny_model_dir, reward_funcs=length_reward, args=args,
                           train_dataset=tiny_math_dataset(8))  # fmt: skip

    first = build("first", use_vllm=True, vllm_mode="colocate")
    first.train()
    with pytest.raises(RuntimeError, match=r"colocated vLLM engine already exists.*del trainer"):
        build("second", use_vllm=True, vllm_mode="colocate")
    build("no_vllm")  # trainers without a colocated engine are not concerned
    del first
    gc.collect()
    second = build("second", use_vllm=True, vllm_mode="colocate")
    second.train()
    assert second.state.global_step == 1
