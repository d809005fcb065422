"""TEMPO trains with real vLLM generation (colocate mode, vLLM's CPU backend), and vLLM holds the trained weights."""

import pytest
import torch

from trl_credit import GRPOConfig, GRPOTrainer
from trl_credit.testing import shaped_math_reward, tiny_math_dataset


pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def _logprob_gap(trainer, prefix):
    """max |log p_trainer − log p_vLLM| over continuations vLLM samples from a token-id prefix."""
    _, completions, logprobs, _ = trainer.vllm_generation.generate(prompts=[prefix] * 2, images=None, num_generations=2)
    model = trainer.model.eval()
    gap = 0.0
    with torch.no_grad():
        for c, lp in zip(completions, logprobs):
            ids = torch.tensor([prefix + list(c)])
            ref = model(input_ids=ids).logits[0, len(prefix) - 1 : -1].log_softmax(-1)
            ref = ref.gather(-1, torch.tensor(list(c))[:, None])[:, 0]
            gap = max(gap, (ref - torch.tensor([x[0] for x in lp])).abs().max().item())
    return gap


def test_tempo_trains_with_vllm_colocate(tiny_model_dir, vllm_cpu_colocate, tmp_path):
    args = GRPOConfig(
        output_dir=str(tmp_path), advantage_estimator="tempo", max_steps=3, per_device_train_batch_size=8,
        num_generations=4, max_completion_length=12, learning_rate=1e-2, report_to="none", bf16=False,
        use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True, gradient_checkpointing=False,
        use_vllm=True, vllm_mode="colocate", vllm_max_model_length=256,
        vllm_importance_sampling_correction=True,  # off by default on vLLM-CPU; on here to log the sampling gap
    )  # fmt: skip
    trainer = GRPOTrainer(model=tiny_model_dir, reward_funcs=shaped_math_reward, args=args,
                          train_dataset=tiny_math_dataset(32))  # fmt: skip
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert trainer.state.global_step == 3
    # vLLM sampled from the trainer's weights (fp32 on both sides): importance ratios are ~1
    assert all(h["sampling/sampling_logp_difference/max"] < 1e-3 for h in logs)
    assert any(h["credit/extra_credit_token_frac"] > 0 for h in logs)
    prompt = trainer.processing_class.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True, tokenize=True
    )
    prompt = list(prompt if isinstance(prompt, list) else prompt["input_ids"])
    trainer.vllm_generation.sync_weights()
    assert _logprob_gap(trainer, prompt) < 1e-4
