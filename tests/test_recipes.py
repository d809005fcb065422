"""Every recipe parses and trains 2 optimizer steps on the tiny local stand-in through `trl-credit train` CLI overrides;
the DDP accelerate config runs on 2 CPU processes; resume; vLLM-CPU; unknown YAML keys are clear errors."""

import math
from pathlib import Path

import pytest
import yaml

from dist_utils import run_accelerate
from trl_credit.train import TRAINERS, parse_args, train


REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted((REPO / "recipes").glob("*/*/*.yaml"))


def tiny_overrides(model_dir, data_dir, recipe, out, **extra):
    dataset = yaml.safe_load(recipe.read_text())["dataset_name"]
    args = {
        "config": recipe, "model_name_or_path": model_dir, "dataset_source": data_dir / dataset,
        "dataset_limit": 8, "output_dir": out, "max_steps": 2, "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 1, "num_generations": 4, "max_completion_length": 12, "use_vllm": "false",
        "bf16": "false", "use_cpu": "true", "gradient_checkpointing": "false", "dtype": "float32",
        "load_in_4bit": "false", "save_strategy": "no", "report_to": "none", "logging_steps": 1,
        "log_completions": "false", "learning_rate": 1e-3,
    }  # fmt: skip
    args.update(extra)
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]


def test_every_recipe_is_listed_and_uses_a_real_model_id():
    assert len(RECIPES) >= 14
    methods = {p.stem.rsplit("_", 1)[0] for p in RECIPES}
    assert {"grpo", "tempo", "gigpo", "vineppo", "ppo_gae", "ma_ppo", "rhythm"} <= methods
    for path in RECIPES:
        cfg = yaml.safe_load(path.read_text())
        assert cfg["model_name_or_path"].startswith("Qwen/"), path
        assert path.read_text().startswith("# "), f"{path} has no header comment"
        assert "# Memory (estimated" in path.read_text(), path


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parent.parent.name}/{p.parent.name}/{p.stem}")
def test_recipe_parses_into_the_right_trainer_config(recipe):
    # use_cpu: the configs validate bf16 against the hardware; this machine has no GPU
    argv = ["--config", str(recipe), "--output_dir", "/tmp/parse", "--use_cpu", "true"]
    script_args, training_args, model_args = parse_args(argv)
    cfg = yaml.safe_load(recipe.read_text())
    assert type(training_args).__name__ == TRAINERS[script_args.trainer][1].rsplit(".", 1)[1]
    assert model_args.model_name_or_path == cfg["model_name_or_path"]
    assert training_args.advantage_estimator == cfg["advantage_estimator"]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parent.parent.name}/{p.parent.name}/{p.stem}")
def test_recipe_trains_two_steps_on_the_tiny_model(recipe, tiny_model_dir, data_dir, tmp_path):
    trainer = train(tiny_overrides(tiny_model_dir, data_dir, recipe, tmp_path))
    assert trainer.state.global_step == 2
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) for h in logs)
    assert (tmp_path / "config.json").exists() or (tmp_path / "adapter_config.json").exists()


def test_unknown_yaml_key_is_a_clear_error_naming_the_closest_key(tmp_path):
    recipe = yaml.safe_load(RECIPES[0].read_text())
    recipe["advantage_estimatr"] = "tempo"
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ValueError, match=r"advantage_estimatr \(did you mean advantage_estimator"):
        parse_args(["--config", str(path), "--use_cpu", "true"])
    with pytest.raises(ValueError, match=r"command line:\n  lerning_rate \(did you mean learning_rate"):
        parse_args(["--config", str(RECIPES[0]), "--use_cpu", "true", "--lerning_rate", "1e-5"])


def test_unknown_trainer_and_reward_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="trainer must be one of"):
        parse_args(["--config", str(RECIPES[0]), "--use_cpu", "true", "--trainer", "dpo"])
    from trl_credit.train import resolve_reward_funcs

    with pytest.raises(ValueError, match="Unknown reward function 'gsm9k'"):
        resolve_reward_funcs(["gsm9k"])


@pytest.mark.slow
def test_resume_from_the_last_checkpoint_continues_training(tiny_model_dir, data_dir, tmp_path):
    recipe = REPO / "recipes/gsm8k/qwen2.5-1.5b-instruct/tempo_lora.yaml"
    first = train(tiny_overrides(tiny_model_dir, data_dir, recipe, tmp_path, save_strategy="steps", save_steps=2))
    assert (tmp_path / "checkpoint-2").is_dir() and first.state.global_step == 2
    resumed = train(
        tiny_overrides(tiny_model_dir, data_dir, recipe, tmp_path, max_steps=3, resume_from_checkpoint="auto")
    )
    assert resumed.state.global_step == 3
    first_logs = [h for h in first.state.log_history if "loss" in h]
    resumed_logs = [h for h in resumed.state.log_history if "loss" in h]
    # steps 1-2 were restored from checkpoint-2 (identical records), only step 3 ran in the resumed process
    assert resumed_logs[:2] == first_logs and [h["step"] for h in resumed_logs] == [1, 2, 3]


@pytest.mark.vllm
@pytest.mark.slow
def test_recipe_with_vllm_colocate_on_cpu(tiny_model_dir, data_dir, tmp_path, vllm_cpu_colocate):
    recipe = REPO / "recipes/gsm8k/qwen2.5-1.5b-instruct/tempo_lora.yaml"
    trainer = train(
        tiny_overrides(
            tiny_model_dir, data_dir, recipe, tmp_path, use_vllm="true", vllm_enable_sleep_mode="false",
            vllm_max_model_length=256,
        )
    )  # fmt: skip
    assert trainer.state.global_step == 2 and trainer.vllm_generation is not None


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_accelerate_config_runs_on_two_cpu_processes(tiny_model_dir, data_dir, tmp_path):
    import subprocess
    import sys

    from conftest import free_port

    recipe = REPO / "recipes/gsm8k/qwen2.5-1.5b-instruct/tempo_lora.yaml"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO / "recipes/accelerate/multi_gpu.yaml"),
        "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(free_port()),
        "-m", "trl_credit.train",
        *tiny_overrides(tiny_model_dir, data_dir, recipe, tmp_path, per_device_train_batch_size=2),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "'epoch'" in proc.stdout + proc.stderr and (tmp_path / "adapter_config.json").exists()
