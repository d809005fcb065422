"""Every estimator under real FSDP2 and DeepSpeed ZeRO-2/ZeRO-3 on 2 CPU processes (gloo), launched with the shipped
`recipes/accelerate/*.yaml`, and the same first step on DDP, ZeRO-2, ZeRO-3 and FSDP2.

One `accelerate launch` per engine runs all of that engine's cases in sequence (tests/scripts/engine_estimators.py;
process start and model loading dominate a case's cost); the tests read what each rank recorded. Each launched case
asserts the engine from the prepared model (`engines.assert_engine`: DTensor shards for FSDP2, ZeRO partitions for
DeepSpeed), because accelerate silently runs DDP for an FSDP config on CPU (see tests/engines.py). `PPOTrainer`'s
critic (cases `ppo_*`) is asserted to live in the policy's engine, sharded with it.
"""

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from engines import REPO, launch_engine


SCRIPT = Path(__file__).parent / "scripts" / "engine_estimators.py"
EVERY_CASE = ("grpo", "tempo", "gigpo", "vineppo", "macro_tempo", "rhythm", "entropy", "lora", "spo_chain", "spo_tree")
# vLLM samples on its own: not part of the cross-engine comparison
VLLM_CASES = ("vllm_server", "lora_vllm_server", "ppo_vllm_server")
# PPO with a learned critic (GAE), the critic in the policy's engine; `ppo_gae` also saves and resumes.
PPO_CASES = ("ppo_gae", "ppo_lora")
# ZeRO-2 shards only gradients and optimizer states (the forward is DDP's): the cross-engine cases and LoRA suffice.
RUNS = {
    "fsdp2": EVERY_CASE + PPO_CASES + VLLM_CASES,
    "zero3": EVERY_CASE + PPO_CASES + VLLM_CASES,
    "zero2": ("tempo", "vineppo", "lora") + PPO_CASES,
    "ddp": ("tempo", "vineppo", "ppo_gae"),
}
ENGINE_CASES = [
    pytest.param(engine, case, marks=[pytest.mark.vllm] if case in VLLM_CASES else [])
    for engine, cases in RUNS.items()
    for case in cases
    if engine != "ddp"
]
COMPARED_CASES = EVERY_CASE + PPO_CASES  # every case that runs on several engines with local generation
# A metric each case must log (its estimator or weighting really ran), with a check of its value.
CASE_METRICS = {
    "vineppo": ("credit/mc_rollouts", lambda v: v > 0),
    "vllm_server": ("credit/mc_rollouts", lambda v: v > 0),
    "macro_tempo": ("credit/macro_len", lambda v: v > 1),
    "rhythm": ("credit/weight_max", lambda v: v > 1),
    "entropy": ("credit/frac_high_entropy", lambda v: 0 < v < 1),
    "tempo": ("credit/branch_token_frac", lambda v: v > 0),
    "gigpo": ("credit/advantage_std", lambda v: v > 0),
    "spo_chain": ("credit/mc_rollouts", lambda v: v > 0),
    "spo_tree": ("credit/spo_tree_nonzero_adv_frac", lambda v: v > 0),
    "ppo_gae": ("value/loss", lambda v: math.isfinite(v) and v > 0),
    "ppo_lora": ("value/loss", lambda v: math.isfinite(v) and v > 0),
}


@pytest.fixture(scope="module")
def engine_run(tiny_model_dir, tmp_path_factory, request):
    """`engine_run(engine)` → `{case: [rank0 record, rank1 record]}`; one launch per engine, on first use (with the
    session's vLLM CPU server when the engine runs a vLLM case)."""
    results: dict[str, object] = {}

    def get(engine: str) -> dict[str, list[dict]]:
        if engine not in results:
            out = tmp_path_factory.mktemp(engine)
            try:
                env = {}
                if any(case in VLLM_CASES for case in RUNS[engine]):
                    env["ENGINE_TEST_VLLM_URL"] = request.getfixturevalue("vllm_cpu_server")
                launch_engine(engine, SCRIPT, engine, tiny_model_dir, out, *RUNS[engine], env=env)
                results[engine] = {
                    case: [torch.load(out / case / f"rank{r}.pt", weights_only=False) for r in range(2)]
                    for case in RUNS[engine]
                }
            except Exception as e:  # a failed launch fails every test of that engine, without relaunching
                results[engine] = e
        if isinstance(results[engine], Exception):
            raise results[engine]
        return results[engine]

    return get


def _losses(record) -> list[dict]:
    return [h for h in record["log_history"] if "loss" in h and "grad_norm" in h]


def _gradient_norm(log: dict) -> float:
    """The norm of all trained gradients: DeepSpeed clips (and reports) policy and critic together, DDP and FSDP2
    clip them separately and log the critic's as `value/grad_norm`."""
    return math.hypot(log["grad_norm"], log.get("value/grad_norm", 0.0))


@pytest.mark.parametrize("engine,case", ENGINE_CASES)
@pytest.mark.distributed
@pytest.mark.slow
def test_estimator_trains_sharded_under_the_engine(engine_run, engine, case):
    ranks = engine_run(engine)[case]
    for rank in ranks:
        # the prepared model, not the config: sharded over both processes
        assert rank["engine"]["engine"] == engine and rank["engine"]["world"] == 2, rank["engine"]
        assert rank["engine"]["local_fraction"] == pytest.approx(0.5, abs=0.05), rank["engine"]
        assert rank["global_step"] == 2
        assert rank["tied"], "the output embedding is no longer tied to the input embedding"
    rec0, rec1 = ranks
    assert rec0["digests"] == rec1["digests"]  # both ranks gather the same full weights at every step
    initial, after_first, after_second = rec0["digests"]
    assert initial != after_first and after_first != after_second, "the policy did not train at every step"
    logs = _losses(rec0)
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) and math.isfinite(h["grad_norm"]) for h in logs)
    assert logs[0]["grad_norm"] > 0
    for rank in ranks:
        assert rank["records"], "no advantages reached the loss"
        for r in rank["records"]:
            assert torch.isfinite(r["advantages"]).all()
        assert any(torch.count_nonzero(r["advantages"]) for r in rank["records"])
    if case in PPO_CASES or case == "ppo_vllm_server":
        for rank in ranks:
            # the critic lives in the policy's engine (one engine), sharded like the policy
            critic = rank["critic_engine"]
            assert critic["engine"] == engine and critic["in_policy_engine"], critic
            assert critic["local_fraction"] == pytest.approx(0.5, abs=0.05), critic
        assert rec0["critic_digests"] == rec1["critic_digests"]
        c0, c1, c2 = rec0["critic_digests"]
        assert c0 != c1 and c1 != c2, "the critic did not train at every step"
        assert all(math.isfinite(h["value/loss"]) for h in logs)
        for rank in ranks:
            for r in rank["records"]:  # rollout values (0 from the zero head at first) and GAE targets
                assert torch.isfinite(r["values"]).all() and torch.isfinite(r["returns"]).all()
            assert torch.count_nonzero(rank["records"][-1]["values"]) > 0  # the trained critic's values
    if case in CASE_METRICS:
        name, ok = CASE_METRICS[case]
        values = [h[name] for h in rec0["log_history"] if name in h]
        assert values and all(ok(v) for v in values), (name, values)
    if case == "rhythm":
        # sharded weights are gathered by hooks that expect complete forwards: the capture never stops early
        assert rec0["capture_stop_early"] is False
        assert rec0["log_history"][0]["credit/capture_piggyback"] == 0.0
    if case == "entropy":
        assert rec0["log_history"][0]["credit/capture_piggyback"] == 1.0  # rode along TRL's old-log-prob pass
    if case in ("vllm_server", "ppo_vllm_server"):
        # the server got the full policy gathered from the shards: the weights after step 1 (synced for step 2);
        # with PPO, the policy alone: the critic in the same engine is never sent (same names, sizes and values)
        assert rec0["synced_digest"] == pytest.approx(after_first, rel=1e-9)
    if case == "lora_vllm_server":
        # the adapter merged into the gathered base weights: base-model names and sizes, trained values
        base = engine_run(engine)["grpo"][0]["digests"][0]
        assert rec0["synced_digest"][2] == base[2] and rec0["synced_digest"][:2] != pytest.approx(base[:2], rel=1e-6)


@pytest.mark.parametrize("case", COMPARED_CASES)
@pytest.mark.distributed
@pytest.mark.slow
def test_first_step_is_identical_on_every_engine(engine_run, case):
    engines = [engine for engine in ("ddp", "zero2", "zero3", "fsdp2") if case in RUNS[engine]]  # DDP: reference
    runs = {engine: engine_run(engine)[case] for engine in engines}
    ref_engine, ref = engines[0], runs[engines[0]]
    ref_logs = _losses(ref[0])[0]
    for engine in engines[1:]:
        got = runs[engine]
        for rank in range(2):
            a, b = ref[rank]["records"][0], got[rank]["records"][0]
            # same seed, same weights: the same samples, then the same credit
            assert torch.equal(a["completion_ids"], b["completion_ids"]), (ref_engine, engine, rank)
            assert torch.equal(a["completion_mask"], b["completion_mask"]), (ref_engine, engine, rank)
            torch.testing.assert_close(b["advantages"], a["advantages"], rtol=1e-5, atol=1e-6)
            for key in ("values", "returns"):  # PPO: the critic's values and the GAE targets
                if key in a:
                    torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
        logs = _losses(got[0])[0]
        assert logs["loss"] == pytest.approx(ref_logs["loss"], rel=1e-5, abs=1e-6), (ref_engine, engine)
        if "value/loss" in ref_logs:
            assert logs["value/loss"] == pytest.approx(ref_logs["value/loss"], rel=1e-5, abs=1e-7)
        # the gradient each engine reduced (mean over ranks, clipped), and the update it made
        assert _gradient_norm(logs) == pytest.approx(_gradient_norm(ref_logs), rel=1e-4), (ref_engine, engine)
        assert got[0]["digests"][0] == ref[0]["digests"][0], "the engines start from different weights"
        assert got[0]["digests"][1] == pytest.approx(ref[0]["digests"][1], rel=1e-6), (ref_engine, engine)
        if ref[0]["critic_digests"]:
            assert got[0]["critic_digests"][0] == ref[0]["critic_digests"][0], "the critics start differently"
            assert got[0]["critic_digests"][1] == pytest.approx(ref[0]["critic_digests"][1], rel=1e-6), engine


@pytest.mark.parametrize("engine", [engine for engine, cases in RUNS.items() if "ppo_gae" in cases])
@pytest.mark.distributed
@pytest.mark.slow
def test_ppo_critic_saves_and_resumes_exactly_under_the_engine(engine_run, engine):
    ranks = engine_run(engine)["ppo_gae"]
    for rank in ranks:
        # the saved policy and `value_model` hold the weights after the last step, gathered from the shards
        assert rank["saved_policy_digest"] == pytest.approx(rank["digests"][-1], rel=1e-9)
        assert rank["saved_critic_digest"] == pytest.approx(rank["critic_digests"][-1], rel=1e-9)
        # resumed from the checkpoint of step 1 (the engine's own checkpoint): the same step 2
        step2 = _losses(rank)[1]
        again = _losses({"log_history": rank["resumed_log_history"]})[-1]
        assert again["step"] == step2["step"] == 2
        for key in ("loss", "value/loss", "value/explained_variance", "credit/advantage_mean"):
            assert again[key] == pytest.approx(step2[key], rel=1e-6, abs=1e-9), key
        torch.testing.assert_close(rank["resumed_records"][-1]["advantages"], rank["records"][-1]["advantages"])
        assert rank["resumed_digests"][-1] == pytest.approx(rank["digests"][-1], rel=1e-9)
        assert rank["resumed_critic_digests"][-1] == pytest.approx(rank["critic_digests"][-1], rel=1e-9)


# ── the computed memory table of docs/scaling.md ───────────────────────────────────────────────────────────────────
def _engine_memory():
    spec = importlib.util.spec_from_file_location("engine_memory", REPO / "benchmarks" / "engine_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_scaling_guide_shows_the_computed_memory_table():
    assert _engine_memory().table(8) in (REPO / "docs" / "scaling.md").read_text()


def test_memory_formula_shards_only_what_each_engine_shards():
    m = _engine_memory()
    gib = m.GIB
    for model in m.MODELS:
        for lora in (False, True):
            one = m.model_states(model, lora, "1 GPU", 8)
            assert m.model_states(model, lora, "DDP", 8) == one  # DDP replicates everything
            # over one process ZeRO-2 and ZeRO-3 hold the same 16 bytes per trained weight; ZeRO-3 adds its gathers
            gathered = m.model_states(model, lora, "ZeRO-3", 1) - m.model_states(model, lora, "ZeRO-2", 1)
            assert gathered == pytest.approx(4 * m.layer_params(m.MODELS[model]))
            zero3 = [m.model_states(model, lora, "ZeRO-3", n) for n in (1, 2, 4, 8)]
            assert all(a > b for a, b in zip(zero3, zero3[1:]))
            assert m.model_states(model, lora, "FSDP2", 8) == zero3[-1]
            if not lora:  # ZeRO-2 shards gradients and optimizer states of the trained weights
                assert m.model_states(model, lora, "ZeRO-2", 8) < one
    # 7B full fine-tuning on one GPU: 14.7 B trained weights (policy + critic) × 8 bytes + the bf16 reference model
    trainable = m.MODELS["7B"]["params"] + m.backbone_params(m.MODELS["7B"]) + m.MODELS["7B"]["hidden"]
    expected = (8 * trainable + 2 * m.MODELS["7B"]["params"]) / gib
    assert m.model_states("7B", False, "DDP", 8) / gib == pytest.approx(expected)


# ── FSDP setups the critic cannot use: refused at construction ─────────────────────────────────────────────────────
@pytest.mark.parametrize(
    "plugin_kwargs, match",
    [
        (dict(fsdp_version=1, auto_wrap_policy="transformer_based_wrap"), "not FSDP1"),
        (dict(fsdp_version=2, auto_wrap_policy="size_based_wrap"), "TRANSFORMER_BASED_WRAP.*size_based_auto_wrap"),
        (dict(fsdp_version=2, auto_wrap_policy="no_wrap"), "TRANSFORMER_BASED_WRAP.*uses None"),
    ],
)
def test_fsdp_setups_the_critic_cannot_use_are_refused_with_a_clear_error(plugin_kwargs, match):
    import yaml
    from accelerate.utils import FullyShardedDataParallelPlugin

    from trl_credit.trainers.ppo import check_fsdp_plugin_for_critic

    with pytest.raises(ValueError, match=match):
        check_fsdp_plugin_for_critic(FullyShardedDataParallelPlugin(**plugin_kwargs))
    # the shipped FSDP2 launch config is accepted
    shipped = yaml.safe_load((REPO / "recipes/accelerate/fsdp2.yaml").read_text())["fsdp_config"]
    assert (shipped["fsdp_version"], shipped["fsdp_auto_wrap_policy"]) == (2, "TRANSFORMER_BASED_WRAP")
    recipe = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
    check_fsdp_plugin_for_critic(recipe)
