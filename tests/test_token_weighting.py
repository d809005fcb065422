"""Token weights composed with estimators: the pure composition, entropy weights, config validation, training runs."""

import math
import os
import tempfile

import pytest
import torch

from trl_credit.credit.weights import apply_token_weights, entropy_threshold, entropy_token_weights


# ── composition ────────────────────────────────────────────────────────────────────────────────────────────────────
def test_composition_order_sign_gating_then_renormalization_then_multiply():
    adv = torch.tensor([[1.0, -2.0, 3.0, 0.5], [-1.0, -1.0, 2.0, 0.0]])  # per-token signs vary (e.g. TEMPO)
    w = torch.tensor([[1.5, 1.5, 1.0, 9.0], [1.0, 1.5, 1.5, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]])
    out, eff = apply_token_weights(adv, w, mask, sign="nonneg", renormalize=True)
    gated = torch.tensor([[1.5, 1.0, 1.0], [1.0, 1.0, 1.5]])  # negative tokens keep 1, then mean 1 per row
    want = gated / gated.mean(-1, keepdim=True)
    torch.testing.assert_close(eff[:, :3], want)
    assert torch.equal(eff[:, 3], torch.ones(2))  # padding weights are exactly 1
    torch.testing.assert_close(out, adv * eff)
    out_both, eff_both = apply_token_weights(adv, w, mask, sign="both")
    assert torch.equal(eff_both[:, :3], w[:, :3]) and torch.equal(out_both[:, :3], adv[:, :3] * w[:, :3])


def test_sequence_advantages_broadcast_and_renormalization_preserves_advantage_mass():
    adv = torch.tensor([2.0, -1.0, 0.5])
    w = torch.rand(3, 6) + 1.0
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] + [0] * 5])
    out, eff = apply_token_weights(adv, w, mask, renormalize=True)
    assert out.shape == (3, 6)
    lengths = mask.sum(-1).float()
    torch.testing.assert_close((out * mask).sum(-1), adv * lengths)  # Σ_t A·w = T_i·A_i under every loss_type
    assert (eff > 0).all()


def test_all_ones_weights_leave_advantages_bit_identical():
    adv = torch.randn(4, 7)
    out, _ = apply_token_weights(adv, torch.ones(4, 7), torch.ones(4, 7), renormalize=True)
    assert torch.equal(out, adv)


def test_weights_carry_no_gradient():
    adv = torch.randn(3, 5, requires_grad=True)
    w = (torch.rand(3, 5) + 1).requires_grad_()
    out, eff = apply_token_weights(adv, w, torch.ones(3, 5), renormalize=True)
    assert not out.requires_grad and not eff.requires_grad
    raw, _ = entropy_token_weights(torch.rand(3, 5, requires_grad=True), torch.ones(3, 5))
    assert not raw.requires_grad


# ── entropy weights ────────────────────────────────────────────────────────────────────────────────────────────────
def test_entropy_boost_selects_the_top_rho_of_the_batch_and_is_strictly_positive():
    g = torch.Generator().manual_seed(0)
    H = torch.rand(8, 50, generator=g) * 3
    mask = torch.ones(8, 50, dtype=torch.bool)
    mask[3, 20:] = False
    H[3, 20:] = 100.0  # padding must never be selected, whatever its value
    w, sel = entropy_token_weights(H, mask, rho=0.2, mode="boost", boost=1.5)
    assert (w > 0).all() and set(torch.unique(w).tolist()) == {1.0, 1.5}
    assert not sel[~mask].any() and (w[~mask] == 1).all()
    assert sel.sum().item() == pytest.approx(0.2 * mask.sum().item(), abs=1)
    assert H[sel].min() >= H[mask & ~sel].max()  # every selected token beats every unselected one
    tau = entropy_threshold(H, mask, 0.2)
    assert torch.equal(sel, (H >= tau) & mask)  # TRL's rule: quantile(1 − ρ), keep >= τ


def test_entropy_sequence_scope_selects_ceil_rho_T_per_completion():
    H = torch.rand(4, 15)
    mask = torch.ones(4, 15)
    mask[1, 10:] = 0
    _, sel = entropy_token_weights(H, mask, rho=0.2, scope="sequence")
    assert sel.sum(-1).tolist() == [3, 2, 3, 3]


def test_entropy_mask_mode_is_the_80_20_indicator_and_rho_one_is_identity():
    H = torch.rand(4, 10)
    mask = torch.ones(4, 10)
    mask[0, 7:] = 0
    w, sel = entropy_token_weights(H, mask, rho=0.2, mode="mask")
    assert torch.equal(w[mask.bool()], sel[mask.bool()].float())
    assert (w[~mask.bool()] == 1).all()
    w_all, _ = entropy_token_weights(H, mask, rho=1.0, mode="mask")
    assert torch.equal(w_all, torch.ones_like(w_all))  # ρ = 1 keeps every token: the baseline


# ── config validation ──────────────────────────────────────────────────────────────────────────────────────────────
def make_config(**kwargs):
    from trl_credit import GRPOConfig

    base = dict(output_dir=os.path.join(tempfile.gettempdir(), "trl_credit_tw"), report_to="none", use_cpu=True,
                bf16=False)  # fmt: skip
    return GRPOConfig(**{**base, **kwargs})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(token_weighting="attention"), "token_weighting must be one of"),
        (dict(token_weighting="rhythm", token_weight_sign="positive"), "token_weight_sign"),
        (dict(token_weighting="rhythm", rhythm_horizon_lo=20, rhythm_horizon_hi=10), "exceeds rhythm_horizon_hi"),
        (dict(token_weighting="rhythm", rhythm_quantile=0.0), r"rhythm_quantile must be in \(0, 1\]"),
        (dict(token_weighting="rhythm", rhythm_head_frac=0.6), "do not overlap"),
        (dict(token_weighting="rhythm", rhythm_gamma_amp=0.2), "non-positive token weights"),
        (dict(token_weighting="rhythm", rhythm_waad_row_shift=1), "rhythm_waad_row_shift"),
        (dict(token_weighting="rhythm", rhythm_layers=[]), "rhythm_layers"),
        (dict(token_weighting="rhythm", rhythm_window=0), "rhythm_window must be a positive integer"),
        (dict(token_weighting="entropy", entropy_mode="mask", top_entropy_quantile=0.2), "two high-entropy masks"),
        (dict(token_weighting="entropy", entropy_mode="mask", token_weight_renormalize=True), "renormaliz"),
        (dict(token_weighting="entropy", use_liger_kernel=True), "use_liger_kernel"),
        (dict(token_weighting="rhythm", importance_sampling_level="sequence"), "importance_sampling_level"),
    ],
)
def test_bad_configs_fail_with_a_clear_message(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_config(**kwargs)


def test_token_weighting_makes_credit_token_level_and_defaults_follow_the_papers():
    cfg = make_config(token_weighting="rhythm")
    assert cfg.credit_is_token_level and cfg.uses_attention_weighting
    assert (cfg.rhythm_window, cfg.rhythm_horizon_lo, cfg.rhythm_horizon_hi, cfg.rhythm_quantile) == (10, 10, 100, 0.4)
    assert (cfg.rhythm_gamma_amp, cfg.rhythm_alpha, cfg.rhythm_k, cfg.rhythm_head_frac) == (1.5, 0.5, 2, 0.3)
    assert (cfg.token_weight_sign, cfg.token_weight_renormalize, cfg.entropy_rho) == ("both", False, 0.2)
    assert not make_config().credit_is_token_level
    assert "Parameters that control token weighting" in type(cfg).__doc__


# ── training runs ──────────────────────────────────────────────────────────────────────────────────────────────────
def rhythm_gamma_set(gamma_amp=1.5, alpha=0.5):
    b = gamma_amp - 1
    return {round(1 + p + i * alpha * b, 5) for p in (0.0, b, (1 - alpha) * b) for i in (0, 1)}


def train(model_dir, steps=2, trainer_cls=None, model=None, peft_config=None, **config):
    from transformers import AutoTokenizer

    from trl_credit import GRPOTrainer
    from trl_credit.testing import shaped_math_reward, tiny_math_dataset

    config = {"gradient_checkpointing": False, **config}
    args = make_config(
        per_device_train_batch_size=4, num_generations=4, max_completion_length=16, max_steps=steps,
        learning_rate=1e-3, save_strategy="no", logging_steps=1, disable_tqdm=True,
        rhythm_window=4, rhythm_horizon_lo=2, rhythm_horizon_hi=8, **config,
    )  # fmt: skip
    trainer = (trainer_cls or GRPOTrainer)(
        model=model if model is not None else model_dir,
        reward_funcs=shaped_math_reward,
        args=args,
        train_dataset=tiny_math_dataset(16),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        peft_config=peft_config,
    )
    if steps:
        trainer.train()
    return trainer


def recording_trainer():
    from trl_credit import GRPOTrainer

    class Recording(GRPOTrainer):
        """Keeps what the estimator produced and what the loss received."""

        records = []

        def _credit_local_postprocess(self, advantages, out, ctx):
            weighted = super()._credit_local_postprocess(advantages, out, ctx)
            mask = out["completion_mask"].bool()
            adv = advantages if advantages.dim() == 2 else advantages[:, None].expand_as(mask)
            self.records.append((adv.clone(), weighted.clone(), mask))
            return weighted

    Recording.records = []
    return Recording


def weight_ratios(records):
    ratios = []
    for adv, weighted, mask in records:
        live = mask & (adv != 0)
        ratios += (weighted[live] / adv[live]).tolist()
    return ratios


@pytest.mark.slow
def test_tempo_with_rhythm_trains_and_multiplies_per_token_advantages_by_gamma(tiny_model_dir):
    cls = recording_trainer()
    trainer = train(tiny_model_dir, trainer_cls=cls, advantage_estimator="tempo", token_weighting="rhythm",
                    rhythm_head_groups="sequence")  # fmt: skip
    assert len(cls.records) == 2 and all(r[0].dim() == 2 for r in cls.records)
    ratios = weight_ratios(cls.records)
    assert ratios and {round(r, 5) for r in ratios} <= rhythm_gamma_set()
    assert any(r > 1 for r in ratios)
    logs = trainer.state.log_history[0]
    assert logs["credit/capture_piggyback"] == 0.0  # no old-logp pass ran: the capture had its own early-stopped pass
    assert 1.0 < logs["credit/gamma_mean"] <= 1.2 + 1e-6
    for name in ("frac_preplan", "frac_anchor", "frac_dominated", "frac_intro", "waad_mean", "fai_mean",
                 "head_distance_local", "head_distance_global", "capture_time_s", "weight_time_s"):  # fmt: skip
        assert f"credit/{name}" in logs, name
    assert trainer.state.log_history[1]["credit/weight_time_share"] > 0
    assert math.isfinite(logs["loss"])


@pytest.mark.slow
def test_vineppo_with_entropy_boost_weights_the_monte_carlo_step_advantages(tiny_model_dir):
    cls = recording_trainer()
    trainer = train(tiny_model_dir, trainer_cls=cls, advantage_estimator="vineppo", token_weighting="entropy",
                    vine_num_rollouts=2, step_split="token_chunks", vine_chunk_tokens=4,
                    vine_advantage_norm="none")  # fmt: skip
    assert len(cls.records) == 2 and all(adv.dim() == 2 for adv, _, _ in cls.records)
    # VinePPO's per-token advantages vary along a completion, and the weights act on them token by token
    assert any((adv[mask].unique().numel() > 2) for adv, _, mask in cls.records)
    ratios = weight_ratios(cls.records)
    assert ratios and {round(r, 5) for r in ratios} == {1.0, 1.5}
    logs = trainer.state.log_history[0]
    assert logs["credit/mc_rollouts"] > 0 and 0 < logs["credit/frac_high_entropy"] < 1
    assert math.isfinite(logs["loss"])


@pytest.mark.slow
def test_grpo_with_entropy_boost_rides_along_the_old_logp_pass(tiny_model_dir):
    cls = recording_trainer()
    # num_iterations=2 makes TRL compute old_per_token_logps, whose pass also yields the entropies.
    trainer = train(tiny_model_dir, trainer_cls=cls, advantage_estimator="grpo", token_weighting="entropy",
                    num_iterations=2)  # fmt: skip
    ratios = weight_ratios(cls.records)
    assert ratios and {round(r, 5) for r in ratios} == {1.0, 1.5}
    logs = trainer.state.log_history[0]
    assert logs["credit/capture_piggyback"] == 1.0
    assert logs["credit/frac_high_entropy"] == pytest.approx(0.2, abs=0.1)


@pytest.mark.slow
def test_rhythm_riding_along_the_old_logp_pass_gives_the_weights_of_its_own_pass(tiny_model_dir):
    runs = {}
    for num_iterations in (1, 2):  # 2: TRL computes old_per_token_logps and the capture rides along
        cls = recording_trainer()
        trainer = train(tiny_model_dir, steps=1, trainer_cls=cls, token_weighting="rhythm", rhythm_head_groups="static",
                        num_iterations=num_iterations)  # fmt: skip
        assert trainer.state.log_history[0]["credit/capture_piggyback"] == float(num_iterations == 2)
        runs[num_iterations] = cls.records[0]
    (adv1, w1, m1), (adv2, w2, m2) = runs[1], runs[2]
    assert torch.equal(adv1, adv2) and torch.equal(m1, m2)  # same first batch
    torch.testing.assert_close(w1, w2)


@pytest.mark.slow
def test_rhythm_with_gamma_amp_one_trains_exactly_like_the_unweighted_estimator(tiny_model_dir):
    baseline = train(tiny_model_dir, steps=1, advantage_estimator="tempo")
    weighted = train(tiny_model_dir, steps=1, advantage_estimator="tempo", token_weighting="rhythm",
                     rhythm_gamma_amp=1.0)  # fmt: skip
    assert weighted.state.log_history[0]["loss"] == baseline.state.log_history[0]["loss"]
    for p, q in zip(baseline.model.parameters(), weighted.model.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.slow
def test_rhythm_trains_with_lora_gradient_checkpointing_and_bf16(tiny_model_dir):
    from peft import LoraConfig

    cls = recording_trainer()
    trainer = train(tiny_model_dir, steps=1, trainer_cls=cls, token_weighting="rhythm", bf16=True,
                    gradient_checkpointing=True, peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert trainer.model.is_gradient_checkpointing  # disabled only during the capture pass
    ratios = weight_ratios(cls.records)
    assert ratios and {round(r, 5) for r in ratios} <= rhythm_gamma_set() and any(r > 1 for r in ratios)
    assert math.isfinite(trainer.state.log_history[0]["loss"])


def test_trainer_rejects_a_model_whose_attention_cannot_be_captured_at_construction(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for layer in model.model.layers:
        del layer.self_attn.layer_idx
    with pytest.raises(ValueError, match="layer_idx.*token_weighting='entropy'"):
        train(tiny_model_dir, steps=0, model=model, token_weighting="rhythm")
    with pytest.raises(ValueError, match="out of range"):
        train(tiny_model_dir, steps=0, token_weighting="anchor", rhythm_layers=[0, 7])


DIST_SCRIPT = '''
import json, os, sys
import torch
from transformers import AutoTokenizer
from trl_credit import GRPOConfig, GRPOTrainer
from trl_credit.testing import shaped_math_reward, tiny_math_dataset

model_dir, out_dir = sys.argv[1], sys.argv[2]


class Recording(GRPOTrainer):
    def _tw_head_groups(self, stats, completion_mask):
        groups = super()._tw_head_groups(stats, completion_mask)
        self.groups = [g.int().tolist() for g in groups]
        return groups


results = {}
for weighting in ("rhythm", "entropy"):
    # 2 completions per process and groups of 4: every group straddles the two processes.
    args = GRPOConfig(output_dir=out_dir, per_device_train_batch_size=2, num_generations=4, max_completion_length=12,
                      max_steps=1, bf16=False, gradient_checkpointing=False, use_cpu=True, report_to="none",
                      save_strategy="no", logging_steps=1, disable_tqdm=True, advantage_estimator="tempo",
                      token_weighting=weighting, rhythm_window=3, rhythm_horizon_lo=2, rhythm_horizon_hi=6)
    trainer = Recording(model=model_dir, reward_funcs=shaped_math_reward, args=args,
                        train_dataset=tiny_math_dataset(16), processing_class=AutoTokenizer.from_pretrained(model_dir))
    trainer.train()
    logs = trainer.state.log_history[0]
    results[weighting] = {"groups": getattr(trainer, "groups", None), "logs": {k: v for k, v in logs.items()
                                                                              if k.startswith("credit/")}}
rank = int(os.environ.get("RANK", 0))
with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
    json.dump(results, f)
'''


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_rank_heads_identically_and_log_global_weight_statistics(tiny_model_dir, tmp_path):
    import json

    from dist_utils import run_accelerate

    script = tmp_path / "token_weighting_dist.py"
    script.write_text(DIST_SCRIPT)
    run_accelerate(script, tiny_model_dir, tmp_path, num_processes=2, timeout=600)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["rhythm"]["groups"] == ranks[1]["rhythm"]["groups"]  # pooled head distances, all-reduced
    for weighting in ("rhythm", "entropy"):
        logs = ranks[0][weighting]["logs"]
        assert 1.0 <= logs["credit/weight_mean"] <= logs["credit/weight_max"]
    assert 0.0 < ranks[0]["entropy"]["logs"]["credit/frac_high_entropy"] < 0.5
