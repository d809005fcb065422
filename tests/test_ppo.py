"""`trl_credit.PPOTrainer` / `PPOConfig`: the critic, GAE with macro actions, checkpoints, DDP and vLLM."""

import json
import warnings
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig

from trl_credit.configs import GRPOConfig
from trl_credit.configs.ppo import PPOConfig
from trl_credit.trainers.ppo import VALUE_ADAPTER_NAME, VALUE_MODEL_DIR, PPOTrainer, ValueModel
from trl_credit.testing import shaped_math_reward, tiny_math_dataset

TINY = dict(
    max_steps=2, per_device_train_batch_size=4, num_generations=4, max_completion_length=8, learning_rate=1e-2,
    report_to="none", bf16=False, use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True,
    gradient_checkpointing=False, seed=7,
)  # fmt: skip


def make_args(tmp_path, **kw):
    return PPOConfig(output_dir=str(tmp_path), **{**TINY, **kw})


def cfg(tmp_path, cls=PPOConfig, **kw):
    return cls(output_dir=str(tmp_path), bf16=False, use_cpu=True, report_to="none", **kw)


def flat(module):
    return torch.cat([p.detach().reshape(-1).float().clone() for p in module.parameters()])


def critic_of(trainer):
    return trainer.accelerator.unwrap_model(trainer.value_model)


# ── configuration ──────────────────────────────────────────────────────────────────────────────────────────────────
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(advantage_estimator="vineppo", value_model_init="some/critic"), "builds no critic"),
        (dict(advantage_estimator="vineppo", value_learning_rate=1e-5), "builds no critic"),
        (dict(advantage_estimator="vineppo", kl_coef=0.05), "does not use"),
        (dict(macro_action="ngram", macro_action_n=0), "macro_action_n=0"),
        (dict(macro_action="punctuation", macro_action_max_len=0), "macro_action_max_len=0"),
        (dict(macro_action="random_ngram", macro_action_lengths=[0, 2]), "macro_action_lengths"),
        (dict(macro_action="sentences"), "macro_action must be"),
        (dict(kl_coef=0.05, beta=0.04), "configured twice"),
        (dict(advantage_estimator="grpo"), "PPOConfig supports"),
        (dict(num_ppo_epochs=2, num_iterations=3), "same setting"),
        (dict(cliprange=0.1, epsilon=0.3), "same setting"),
        (dict(cliprange_value=0.0), "cliprange_value"),
        (dict(kl_estimator="k2"), "kl_estimator"),
        (dict(lam=1.5), "lam"),
        (dict(macro_value_agg="median"), "macro_value_agg"),
    ],
)
def test_bad_ppo_configs_are_rejected_with_a_clear_error(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cfg(tmp_path, **kwargs)


def test_macro_actions_are_rejected_where_they_change_nothing(tmp_path):
    with pytest.raises(ValueError, match="has no effect"):
        cfg(tmp_path, GRPOConfig, macro_action="ngram")  # advantage_estimator="grpo"
    cfg(tmp_path, GRPOConfig, advantage_estimator="macro_tempo", macro_action="ngram")


def test_ppo_config_keeps_the_trl_1_12_names(tmp_path):
    args = cfg(tmp_path, num_ppo_epochs=3, cliprange=0.1, response_length=64)
    assert (args.num_iterations, args.epsilon, args.max_completion_length) == (3, 0.1, 64)
    assert args.advantage_estimator == "gae" and args.kl_coef == 0.05  # TRL 1.12's default KL in the rewards
    assert cfg(tmp_path, beta=0.04).kl_coef == 0.0  # TRL's KL in the loss instead
    assert cfg(tmp_path, advantage_estimator="vineppo").kl_coef == 0.0
    assert "value_peft_config" in PPOConfig._VALID_DICT_FIELDS
    lora = cfg(tmp_path, value_peft_config='{"r": 4, "target_modules": ["q_proj"]}')
    assert lora.value_peft_config == {"r": 4, "target_modules": ["q_proj"]}


def test_trainer_rejects_a_critic_with_monte_carlo_values(tiny_model_dir, tmp_path):
    args = make_args(tmp_path, advantage_estimator="vineppo")
    with pytest.raises(ValueError, match="builds no critic"):
        PPOTrainer(model=tiny_model_dir, reward_funcs=shaped_math_reward, args=args, value_model=tiny_model_dir)
    trainer = PPOTrainer(model=tiny_model_dir, reward_funcs=shaped_math_reward, args=args,
                         train_dataset=tiny_math_dataset(8))  # fmt: skip
    assert trainer.value_model is None and trainer.ref_model is None
    with pytest.raises(TypeError, match="PPOConfig"):
        PPOTrainer(model=tiny_model_dir, reward_funcs=shaped_math_reward, args=cfg(tmp_path, GRPOConfig))


# ── critic construction ────────────────────────────────────────────────────────────────────────────────────────────
def test_critic_starts_from_the_policy_backbone_with_a_zero_head_and_is_not_a_policy_submodule(
    tiny_model_dir, tmp_path
):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        policy.model.layers[0].mlp.up_proj.weight.add_(1.0)  # in-memory change: must reach the critic
    args = make_args(tmp_path, kl_coef=0.0)
    trainer = PPOTrainer(model=policy, reward_funcs=shaped_math_reward, args=args,
                         train_dataset=tiny_math_dataset(8))  # fmt: skip
    critic = critic_of(trainer).pretrained
    assert isinstance(trainer.value_model, ValueModel)
    assert torch.equal(critic.model.layers[0].mlp.up_proj.weight, policy.model.layers[0].mlp.up_proj.weight)
    assert critic.model.layers[0].mlp.up_proj.weight.data_ptr() != policy.model.layers[0].mlp.up_proj.weight.data_ptr()
    assert (critic.score.weight == 0).all()
    policy_params = {id(p) for p in trainer.model.parameters()}
    assert not any(id(p) in policy_params for p in trainer.value_model.parameters())
    assert not any("score" in n for n, _ in trainer.model.named_parameters())

    # A reward-model checkpoint keeps its head (MA-RLHF initializes the critic from the reward model).
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    torch.nn.init.constant_(rm.score.weight, 0.5)
    rm.save_pretrained(tmp_path / "rm")
    trainer = PPOTrainer(model=tiny_model_dir, reward_funcs=shaped_math_reward, train_dataset=tiny_math_dataset(8),
                         args=make_args(tmp_path, kl_coef=0.0, value_model_init=str(tmp_path / "rm")))  # fmt: skip
    assert (critic_of(trainer).pretrained.score.weight == 0.5).all()


def swapped_special_tokens_tokenizer():
    """The test tokenizer with its pad and EOS ids swapped: same size, another vocabulary."""
    from tokenizers import Tokenizer

    from trl_credit.testing import EOS_TOKEN, PAD_TOKEN, build_tokenizer

    tok = build_tokenizer()
    state = json.loads(tok.backend_tokenizer.to_str())
    for entry in state["added_tokens"]:
        entry["id"] = {0: 2, 2: 0}.get(entry["id"], entry["id"])
    vocab = state["model"]["vocab"]
    vocab[PAD_TOKEN], vocab[EOS_TOKEN] = vocab[EOS_TOKEN], vocab[PAD_TOKEN]
    backend = Tokenizer.from_str(json.dumps(state))
    swapped = type(tok)(tokenizer_object=backend, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)
    assert len(swapped) == len(tok) and swapped.get_vocab() != tok.get_vocab()
    return swapped


@pytest.mark.parametrize("critic", ["smaller_vocabulary", "same_size_other_vocabulary"])
def test_a_critic_with_another_tokenizer_is_refused_at_construction(tiny_model_dir, tmp_path, critic):
    from trl_credit.testing import build_tiny_model, build_tokenizer

    smaller = critic == "smaller_vocabulary"
    tokenizer = build_tokenizer(vocab_size=300) if smaller else swapped_special_tokens_tokenizer()
    path = build_tiny_model(tmp_path / critic, tokenizer=tokenizer)
    detail = r"300 tokens in the critic's vocabulary, 400" if smaller else r"'<\|im_end\|>': 2 for the policy, 0"
    with pytest.raises(ValueError, match=r"critic's tokenizer .*differs from the policy's.*" + detail):
        PPOTrainer(model=tiny_model_dir, reward_funcs=shaped_math_reward, args=make_args(tmp_path, kl_coef=0.0),
                   value_model=path, train_dataset=tiny_math_dataset(8))  # fmt: skip


def test_a_critic_module_without_a_tokenizer_is_checked_by_its_embeddings(tiny_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification, Qwen2Config

    small = AutoModelForSequenceClassification.from_config(
        Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=1,
                    num_key_value_heads=1, num_labels=1)
    )  # fmt: skip
    with pytest.raises(ValueError, match="embeds 300 token ids but the policy's tokenizer has 400"):
        PPOTrainer(model=tiny_model_dir, reward_funcs=shaped_math_reward, args=make_args(tmp_path, kl_coef=0.0),
                   value_model=small, train_dataset=tiny_math_dataset(8))  # fmt: skip
    # A module with enough embeddings but no tokenizer to compare: accepted, with a warning to check it.
    critic = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    critic.config._name_or_path = ""
    with pytest.warns(UserWarning, match="Could not load a tokenizer"):
        PPOTrainer(model=tiny_model_dir, reward_funcs=shaped_math_reward, args=make_args(tmp_path, kl_coef=0.0),
                   value_model=critic, train_dataset=tiny_math_dataset(8))  # fmt: skip
    # The policy's own checkpoint (with its tokenizer) passes silently.
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message="TRL currently supports vLLM")
        PPOTrainer(model=tiny_model_dir, reward_funcs=shaped_math_reward, args=make_args(tmp_path, kl_coef=0.0),
                   value_model=tiny_model_dir, train_dataset=tiny_math_dataset(8))  # fmt: skip


def test_missing_eos_penalty_lowers_the_reward_of_truncated_completions(tiny_model_dir, tmp_path):
    trainer = PPOTrainer(model=tiny_model_dir, reward_funcs=shaped_math_reward, train_dataset=tiny_math_dataset(8),
                         args=make_args(tmp_path, kl_coef=0.0, missing_eos_penalty=1.0))  # fmt: skip
    eos, pad = trainer.eos_token_ids[0], trainer._tokenizer.pad_token_id
    out = {
        "completion_ids": torch.tensor([[5, 6, eos, pad], [5, 6, 7, 8], [5, eos, pad, pad], [9, 9, 9, 9]]),
        "completion_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]]),
    }
    ctx = {
        "rewards_per_func": torch.tensor([[0.5], [0.5], [float("nan")], [0.0]]),
        "completion_ids_list": [[5, 6, eos], [5, 6, 7, 8], [5, eos], [9, 9, 9, 9]],
    }
    fields = trainer._credit_batch_fields(out, ctx)
    torch.testing.assert_close(fields["rewards"], torch.tensor([0.5, -0.5, float("nan"), -1.0]), equal_nan=True)


# ── training ───────────────────────────────────────────────────────────────────────────────────────────────────────
def run(model_dir, tmp_path, dataset=None, reward_funcs=shaped_math_reward, trainer_kwargs=None, **kw):
    trainer = PPOTrainer(model=model_dir, reward_funcs=reward_funcs, args=make_args(tmp_path, **kw),
                         train_dataset=dataset if dataset is not None else tiny_math_dataset(16),
                         **(trainer_kwargs or {}))  # fmt: skip
    trainer.train()
    return trainer


def train_logs(trainer):
    return [h for h in trainer.state.log_history if "value/loss" in h]


@pytest.mark.slow
def test_ngram_1_trains_exactly_like_token_level_ppo(tiny_model_dir, tmp_path):
    token = run(tiny_model_dir, tmp_path / "token", macro_action=None)
    ngram = run(tiny_model_dir, tmp_path / "ngram", macro_action="ngram", macro_action_n=1)
    keys = ("loss", "value/loss", "value/clipfrac", "credit/advantage_mean", "credit/advantage_std", "credit/kl")
    for a, b in zip(train_logs(token), train_logs(ngram), strict=True):
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}
    assert train_logs(token)[1]["credit/kl"] != 0.0  # the KL penalty in the rewards was live
    assert torch.equal(flat(token.model), flat(ngram.model))
    assert torch.equal(flat(critic_of(token)), flat(critic_of(ngram)))


def label_reward(completions, label, **kwargs):
    return [float(x) for x in label]


@pytest.mark.slow
def test_the_critic_learns_predictable_values(tiny_model_dir, tmp_path):
    # The reward depends only on which of two prompts was asked: a critic that reads the prompt predicts it exactly.
    prompts = ["She has apples.", "What is 2 + 2?"]
    ds = Dataset.from_dict({
        "prompt": [[{"role": "user", "content": prompts[i % 2]}] for i in range(64)],
        "label": [i % 2 for i in range(64)],
    })  # fmt: skip
    trainer = run(
        tiny_model_dir, tmp_path, dataset=ds, reward_funcs=label_reward, max_steps=8, per_device_train_batch_size=8,
        max_completion_length=6, learning_rate=0.0, value_learning_rate=1e-3, kl_coef=0.0, lam=1.0, vf_coef=1.0,
        cliprange_value=10.0, lr_scheduler_type="constant", shuffle_dataset=False, seed=0,
    )  # fmt: skip
    logs = train_logs(trainer)
    ev = [h["value/explained_variance"] for h in logs]
    assert ev[0] == 0.0  # zero head: every value is 0
    assert min(ev[-2:]) > 0.5, ev
    assert logs[-1]["value/loss"] < logs[0]["value/loss"] / 4


@pytest.mark.slow
def test_lora_policy_and_lora_critic_train_save_and_reload(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    lora = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    trainer = PPOTrainer(
        model=tiny_model_dir, reward_funcs=shaped_math_reward, train_dataset=tiny_math_dataset(16),
        args=make_args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2, macro_action="ngram",
                       macro_action_n=3, value_learning_rate=5e-2),
        peft_config=LoraConfig(task_type="CAUSAL_LM", **lora), value_peft_config=LoraConfig(**lora),
    )  # fmt: skip
    critic = critic_of(trainer).model
    assert critic.peft_config[VALUE_ADAPTER_NAME].modules_to_save == ["score"]
    named = dict(critic.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    assert any("lora_B" in n for n in trainable) and any("score" in n for n in trainable)
    assert not any("base_layer" in n or "embed_tokens" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in named.items()}
    policy_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert len(trainer.optimizer.param_groups if trainer.optimizer else []) == 0  # built in train()
    trainer.train()
    assert len(trainer.optimizer.param_groups) >= 3  # policy groups + the critic's
    changed = {n for n, p in critic.named_parameters() if not torch.equal(p, before[n])}
    assert any("lora_B" in n for n in changed) and any("score" in n for n in changed)
    assert not any("base_layer" in n for n in changed)
    assert all(not torch.equal(p, policy_before[n]) for n, p in trainer.model.named_parameters() if "lora_B" in n)
    logs = train_logs(trainer)
    assert logs[-1]["credit/kl"] != 0.0  # reference = the policy with its adapter disabled

    trainer.save_model(str(tmp_path / "final"))
    adapter_dir = tmp_path / "final" / VALUE_MODEL_DIR / VALUE_ADAPTER_NAME
    assert (tmp_path / "final" / "adapter_model.safetensors").is_file()
    assert (adapter_dir / "adapter_model.safetensors").is_file()
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    reloaded = PeftModel.from_pretrained(base, str(adapter_dir), adapter_name=VALUE_ADAPTER_NAME)
    reloaded_values = ValueModel(reloaded).eval()
    ids = torch.tensor([[3, 5, 7, 9]])
    with torch.no_grad():
        expected = critic_of(trainer).eval()(ids, torch.ones_like(ids))
        torch.testing.assert_close(reloaded_values(ids, torch.ones_like(ids)), expected)

    # Resuming a PEFT policy: the critic's adapter folder must not be taken for a second policy adapter.
    fresh = PPOTrainer(
        model=tiny_model_dir, reward_funcs=shaped_math_reward, train_dataset=tiny_math_dataset(16),
        args=make_args(tmp_path / "fresh"), peft_config=LoraConfig(task_type="CAUSAL_LM", **lora),
        value_peft_config=LoraConfig(**lora),
    )  # fmt: skip
    fresh._load_from_checkpoint(str(tmp_path / "final"))
    assert list(fresh.model.peft_config) == ["default"]
    assert torch.equal(flat(critic_of(fresh)), flat(critic_of(trainer)))
    assert torch.equal(flat(fresh.model), flat(trainer.model))


@pytest.mark.slow
def test_save_then_resume_reproduces_the_next_step(tiny_model_dir, tmp_path):
    kw = dict(
        max_steps=2, save_strategy="steps", save_steps=1, macro_action="random_ngram", macro_action_lengths=[2, 3]
    )
    full = run(tiny_model_dir, tmp_path / "a", **kw)
    checkpoint = tmp_path / "a" / "checkpoint-1"
    assert (checkpoint / VALUE_MODEL_DIR / "model.safetensors").is_file()
    state = torch.load(checkpoint / "optimizer.pt", weights_only=False)
    assert len(state["param_groups"]) == 4  # policy decay / no decay, critic decay / no decay

    resumed = PPOTrainer(model=tiny_model_dir, reward_funcs=shaped_math_reward, train_dataset=tiny_math_dataset(16),
                         args=make_args(tmp_path / "b", **kw))  # fmt: skip
    resumed.train(resume_from_checkpoint=str(checkpoint))
    step2 = train_logs(full)[1]
    again = train_logs(resumed)[-1]  # the history before the checkpoint is restored with it
    assert again["step"] == step2["step"] == 2
    keys = ("loss", "value/loss", "value/explained_variance", "credit/advantage_mean", "credit/macro_count")
    assert {k: again[k] for k in keys} == {k: step2[k] for k in keys}
    assert torch.equal(flat(critic_of(resumed)), flat(critic_of(full)))
    assert torch.equal(flat(resumed.model), flat(full.model))


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_ddp_with_a_critic_and_5gram_macros(tiny_model_dir, tmp_path):
    from dist_utils import run_accelerate

    script = Path(__file__).parent / "scripts" / "ppo_ddp.py"
    stdout = run_accelerate(script, tiny_model_dir, str(tmp_path / "out"))
    assert "PPO_DDP_OK" in stdout, stdout[-2000:]


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_colocate_trains_with_the_critic_and_never_syncs_it(tiny_model_dir, vllm_cpu_colocate, tmp_path):
    # The importance-sampling correction (off by default on vLLM's CPU build) logs the vLLM/trainer log-prob gap.
    args = make_args(tmp_path, use_vllm=True, vllm_mode="colocate", vllm_max_model_length=256, macro_action="ngram",
                     macro_action_n=5, max_steps=2, vllm_importance_sampling_correction=True)  # fmt: skip
    trainer = PPOTrainer(model=tiny_model_dir, reward_funcs=shaped_math_reward, args=args,
                         train_dataset=tiny_math_dataset(16))  # fmt: skip
    synced: list[str] = []
    inner = trainer.vllm_generation._iter_named_params

    def recording():
        for name, param in inner():
            synced.append(name)
            yield name, param

    trainer.vllm_generation._iter_named_params = recording
    critic_before = flat(critic_of(trainer))
    trainer.train()
    policy_names = {n for n, _ in trainer.model.named_parameters()}
    assert synced and set(synced) <= policy_names | {"lm_head.weight"}
    assert not any("score" in n or n.startswith("model.model.") for n in synced)
    logs = train_logs(trainer)
    assert len(logs) == 2 and all(h["sampling/sampling_logp_difference/max"] < 1e-3 for h in logs)
    assert not torch.equal(critic_before, flat(critic_of(trainer)))
