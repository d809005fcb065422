"""PPO with a critic and 5-gram macro actions on 2 CPU processes (gloo); launched by tests/test_ppo.py.

Usage: accelerate launch --multi_gpu --num_processes 2 ppo_ddp.py MODEL_DIR OUTPUT_DIR
Prints `PPO_DDP_OK <json>` on rank 0 when every check passes.
"""

import json
import sys

import torch
from accelerate.utils import gather_object

from trl_credit.configs.ppo import PPOConfig
from trl_credit.trainers.ppo import VALUE_MODEL_DIR, PPOTrainer
from trl_credit.testing import shaped_math_reward, tiny_math_dataset


def flat(module):
    return torch.cat([p.detach().reshape(-1).float().cpu() for p in module.parameters()])


def main(model_dir, output_dir):
    args = PPOConfig(
        output_dir=output_dir, max_steps=2, per_device_train_batch_size=2, num_generations=4, max_completion_length=8,
        learning_rate=1e-2, value_learning_rate=1e-2, report_to="none", bf16=False, use_cpu=True, save_strategy="no",
        logging_steps=1, disable_tqdm=True, gradient_checkpointing=False, seed=5, macro_action="ngram",
        macro_action_n=5,
    )  # fmt: skip
    # per-rank batch 2 < G = 4: every group straddles the two ranks.
    trainer = PPOTrainer(model=model_dir, reward_funcs=shaped_math_reward, args=args,
                         train_dataset=tiny_math_dataset(16))  # fmt: skip
    accelerator = trainer.accelerator
    assert accelerator.num_processes == 2, accelerator.num_processes
    assert isinstance(trainer.value_model, torch.nn.parallel.DistributedDataParallel), type(trainer.value_model)
    critic = accelerator.unwrap_model(trainer.value_model)
    critic_before = flat(critic)
    trainer.train()
    critic_after, policy_after = flat(critic), flat(trainer.accelerator.unwrap_model(trainer.model))
    digests = gather_object([(critic_after.sum().item(), critic_after.square().sum().item(),
                              policy_after.sum().item(), policy_after.square().sum().item())])  # fmt: skip
    assert digests[0] == digests[1], f"ranks diverged: {digests}"
    assert not torch.equal(critic_before, critic_after), "the critic did not train"
    logs = [h for h in trainer.state.log_history if "value/loss" in h]
    assert len(logs) == 2 and all(h["credit/macro_len"] > 1 for h in logs), logs
    trainer.save_model(output_dir)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        import os

        assert os.path.isfile(os.path.join(output_dir, VALUE_MODEL_DIR, "model.safetensors"))
        keys = ("loss", "value/loss", "value/explained_variance", "credit/macro_count", "credit/macro_len")
        print("PPO_DDP_OK", json.dumps([{k: h[k] for k in keys} for h in logs]))


if __name__ == "__main__":
    main(*sys.argv[1:3])
