"""`trl-credit train` / `python -m trl_credit.train`: train on GSM8K or MATH from a YAML recipe with CLI overrides.

    accelerate launch --config_file recipes/accelerate/single_gpu.yaml -m trl_credit.train \
        --config recipes/gsm8k/qwen2.5-1.5b-instruct/tempo_lora.yaml
    trl-credit train --config recipes/math/qwen2.5-math-1.5b/vineppo_lora.yaml --max_steps 10

Arguments come from three dataclasses parsed by TRL's `TrlParser` (YAML first, then the command line): the script
arguments below, the trainer's config (`trl_credit.GRPOConfig`, or `trl_credit.PPOConfig` with `trainer: ppo`), and
TRL's `ModelConfig` (`model_name_or_path`, `dtype`, `attn_implementation`, LoRA: `use_peft`, `lora_r`, ...; QLoRA:
`load_in_4bit`, ...). A key that none of them knows is an error that names the closest known keys. `--help` shows the
recipe usage and the common keys, `--help-all` every option.

Every run records its settings in `<output_dir>/trl_credit_run.json` and in each checkpoint it saves; a run that would
resume (or start over next to) the checkpoints of a run with other settings is refused unless `--overwrite_output_dir`
is given (`check_output_dir`).
"""

from __future__ import annotations

import argparse
import datetime
import difflib
import enum
import importlib
import json
import logging
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


logger = logging.getLogger(__name__)

REWARD_FUNCS = {
    "math": "trl_credit.rewards.math_reward",
    "gsm8k": "trl_credit.rewards.gsm8k_reward",
    "format": "trl_credit.rewards.format_reward",
}
TRAINERS = {
    "grpo": ("trl_credit.GRPOTrainer", "trl_credit.GRPOConfig"),
    "ppo": ("trl_credit.PPOTrainer", "trl_credit.PPOConfig"),
}
PROG = "trl-credit train"


@dataclass
class TrainScriptArguments:
    r"""
    Script arguments of `trl-credit train`.

    Parameters:
        trainer (`str`, *optional*, defaults to `"grpo"`):
            `"grpo"` ([`trl_credit.GRPOTrainer`]: `grpo`, `tempo`, `gigpo`, `vineppo` estimators and token weighting)
            or `"ppo"` ([`trl_credit.PPOTrainer`]: a learned critic with GAE, macro actions). Chooses the config class
            whose fields the rest of the YAML sets.
        dataset_name (`str`, *optional*, defaults to `"gsm8k"`):
            `"gsm8k"`, `"math"` (PRM800K split: 12k train / MATH-500 test) or `"math500"`.
        dataset_source (`str`, *optional*):
            Hub dataset id or local JSONL file/directory (e.g. `../shared/data/gsm8k`). Defaults to the Hub copy.
        dataset_train_split (`str`, *optional*, defaults to `"train"`):
            Split used for training.
        dataset_test_split (`str`, *optional*):
            Split used for evaluation (`eval_strategy` must be set too); none by default.
        dataset_limit (`int`, *optional*):
            Keep only the first N training problems (smoke runs); a positive integer.
        conversational (`bool`, *optional*, defaults to `True`):
            Chat-format prompts (instruct models) or plain-text prompts (base models).
        system_prompt (`str`, *optional*):
            System message of chat prompts; defaults to asking for step-by-step reasoning and a `\boxed{}` answer.
        prompt_template (`str`, *optional*):
            User message (or whole plain prompt) with `{problem}`; see `trl_credit.data.load_math_dataset`.
        reward_funcs (`list[str]`, *optional*, defaults to `["math"]`):
            Reward functions: `math`, `gsm8k`, `format`, or dotted import paths (`my_module.my_reward`, resolved from
            the working directory too). Weights go in the trainer config's `reward_weights`.
        overwrite_output_dir (`bool`, *optional*, defaults to `False`):
            Allow a run whose settings differ from those recorded in `output_dir` (`trl_credit_run.json`) to resume
            that directory's checkpoint or to start next to its checkpoints. Without it, such a run is refused: a
            second run with `--resume_from_checkpoint auto` would silently continue the first run's checkpoint.
            Nothing is deleted either way.
    """

    trainer: str = field(default="grpo", metadata={"help": "'grpo' or 'ppo': which trainer and config class to use."})
    dataset_name: str = field(default="gsm8k", metadata={"help": "'gsm8k', 'math' or 'math500'."})
    dataset_source: str | None = field(
        default=None, metadata={"help": "Hub dataset id or local JSONL file/dir (default: the Hub copy)."}
    )
    dataset_train_split: str = field(default="train", metadata={"help": "Training split."})
    dataset_test_split: str | None = field(default=None, metadata={"help": "Evaluation split (optional)."})
    dataset_limit: int | None = field(default=None, metadata={"help": "Use only the first N training problems."})
    conversational: bool = field(default=True, metadata={"help": "Chat prompts (True) or plain-text prompts."})
    system_prompt: str | None = field(
        default=None, metadata={"help": "System message of chat prompts (default asks for a \\boxed{} answer)."}
    )
    prompt_template: str | None = field(
        default=None, metadata={"help": "User message / plain prompt template with {problem}."}
    )
    reward_funcs: list[str] = field(
        default_factory=lambda: ["math"],
        metadata={"help": "Reward functions: 'math', 'gsm8k', 'format', or dotted import paths."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Allow resuming or starting next to checkpoints of a run with other settings in output_dir."},
    )

    def __post_init__(self):
        from .data import DEFAULT_SOURCES, check_limit

        if self.trainer not in TRAINERS:
            raise ValueError(f"trainer must be one of {sorted(TRAINERS)}, got {self.trainer!r}.")
        if self.dataset_name not in DEFAULT_SOURCES:
            raise ValueError(f"dataset_name must be one of {sorted(DEFAULT_SOURCES)}, got {self.dataset_name!r}.")
        splits = sorted(DEFAULT_SOURCES[self.dataset_name][2])
        for key in ("dataset_train_split", "dataset_test_split"):
            value = getattr(self, key)
            if value is not None and value not in splits:
                raise ValueError(
                    f"{key} must be one of {splits} for dataset_name={self.dataset_name!r}, got {value!r}."
                )
        check_limit(self.dataset_limit, "dataset_limit")
        if isinstance(self.reward_funcs, str):
            self.reward_funcs = [self.reward_funcs]
        if not self.reward_funcs or not all(isinstance(r, str) and r.strip() for r in self.reward_funcs):
            raise ValueError(
                f"reward_funcs must name at least one reward function ({', '.join(sorted(REWARD_FUNCS))} or a dotted "
                f"import path), got {self.reward_funcs!r}."
            )
        if self.prompt_template is not None and "{problem}" not in self.prompt_template:
            raise ValueError(
                f"prompt_template must contain '{{problem}}' where the question goes, got {self.prompt_template!r}."
            )


def _import(path: str):
    module, _, attr = path.rpartition(".")
    if not module:
        raise ValueError(f"{path!r} is not a dotted import path (module.attribute).")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    return getattr(importlib.import_module(module), attr)


def resolve_reward_funcs(names: list[str]) -> list:
    funcs = []
    for name in names:
        target = REWARD_FUNCS.get(name, name)
        try:
            funcs.append(_import(target))
        except (ImportError, AttributeError, ValueError) as e:
            raise ValueError(
                f"Unknown reward function {name!r}: use one of {sorted(REWARD_FUNCS)} or a dotted import path ({e})."
            ) from e
    return funcs


# ── recipes and the command line ───────────────────────────────────────────────────────────────────────────────────
def read_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """A recipe's YAML mapping, or an error naming the file and the problem (missing, invalid YAML, not a mapping)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Recipe {str(path)!r} does not exist (absolute: {path.resolve()}); recipes live in "
            "recipes/<dataset>/<model>/<method>_<variant>.yaml."
        )
    try:
        recipe = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ValueError(f"Recipe {str(path)!r} is not valid YAML: {e}") from e
    if recipe is None:
        return {}
    if not isinstance(recipe, dict):
        hint = " (a list of items: remove the leading `- ` of each line)" if isinstance(recipe, list) else ""
        raise ValueError(
            f"Recipe {str(path)!r} must be a YAML mapping of keys to values (`learning_rate: 1.0e-6`), but its top "
            f"level is a {type(recipe).__name__}{hint}."
        )
    bad = [k for k in recipe if not isinstance(k, str)]
    if bad:
        raise ValueError(f"Recipe {str(path)!r} has keys that are not names: {bad}.")
    return recipe


def _normalize_argv(argv: list[str]) -> list[str]:
    """`--config=PATH` → `--config PATH` (TRL's parser only reads the two-token form); a missing path is an error."""
    out = []
    for arg in argv:
        if arg.startswith("--config="):
            out += ["--config", arg.split("=", 1)[1]]
        else:
            out.append(arg)
    if out.count("--config") > 1:
        raise ValueError("--config is given more than once; pass one recipe and override its keys on the command line.")
    if "--config" in out:
        i = out.index("--config")
        if i + 1 >= len(out) or out[i + 1].startswith("--"):
            raise ValueError(
                "--config needs the path of a YAML recipe: --config recipes/<dataset>/<model>/<recipe>.yaml"
            )
    return out


def _peek_trainer(argv: list[str]) -> str:
    """The trainer kind, from `--trainer` or the YAML's `trainer:` key, before the full parse needs its config class."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    pre.add_argument("--trainer")
    known, _ = pre.parse_known_args(argv)
    kind = known.trainer
    if kind is None and known.config:
        kind = read_recipe(known.config).get("trainer")
    else:
        if known.config:
            read_recipe(known.config)  # a clear error now rather than TRL's later
    kind = kind or "grpo"
    if kind not in TRAINERS:
        raise ValueError(f"trainer must be one of {sorted(TRAINERS)}, got {kind!r}.")
    return kind


# Keys shown by `--help` (the rest by `--help-all`), in this order.
COMMON_KEYS = (
    "model_name_or_path", "output_dir", "max_steps", "learning_rate", "per_device_train_batch_size",
    "gradient_accumulation_steps", "num_generations", "max_completion_length", "temperature", "advantage_estimator",
    "beta", "seed", "use_peft", "lora_r", "use_vllm", "vllm_mode", "logging_steps", "save_steps", "report_to",
    "resume_from_checkpoint",
)  # fmt: skip
HELP_HINT = f"Run `{PROG} --help` for the recipe usage and common keys, `{PROG} --help-all` for every option."


def _parser_class():
    from trl import TrlParser

    class TrainParser(TrlParser):
        """TRL's parser with a one-line error instead of ~260 lines of usage, and a short `--help`."""

        def error(self, message):
            self.exit(2, f"{PROG}: error: {message}\n{HELP_HINT}\n")

    return TrainParser


def make_parser(kind: str):
    from trl import ModelConfig

    config_cls = _import(TRAINERS[kind][1])
    return _parser_class()((TrainScriptArguments, config_cls, ModelConfig), prog=PROG)


def _first_sentence(text: str | None, width: int = 78) -> str:
    text = " ".join((text or "").split())
    end = text.find(". ")
    text = text if end == -1 else text[: end + 1]
    return text if len(text) <= width else text[: width - 1] + "…"


def short_help(parser) -> str:
    """The recipe usage, the script arguments and `COMMON_KEYS`, with defaults (the rest: `--help-all`)."""
    actions: dict[str, argparse.Action] = {}
    for action in parser._actions:  # the first action of a dest: `--conversational`, not `--no_conversational`
        if action.option_strings and action.dest != "help":
            actions.setdefault(action.dest, action)
    script_keys = [f.name for f in fields(TrainScriptArguments)]

    def line(key: str) -> str:
        action = actions[key]
        default = action.default
        shown = "" if default in (None, argparse.SUPPRESS) or default == [] else f" (default: {default})"
        return f"  --{key:<30} {_first_sentence(action.help, width=84 - len(shown))}{shown}"

    lines = [
        f"usage: {PROG} --config RECIPE.yaml [--KEY VALUE ...]",
        "       accelerate launch --config_file recipes/accelerate/single_gpu.yaml -m trl_credit.train \\",
        "           --config RECIPE.yaml [--KEY VALUE ...]",
        "",
        "Train on GSM8K or MATH from a YAML recipe (recipes/<dataset>/<model>/<method>_<variant>.yaml). Any key of the",
        "recipe can be overridden on the command line (`--KEY VALUE`, the command line wins); keys are fields of the",
        "script arguments below, of the trainer config (trl_credit.GRPOConfig, or trl_credit.PPOConfig with --trainer",
        "ppo) and of TRL's ModelConfig. An unknown key is an error naming the closest known keys.",
        "",
        "examples:",
        f"  {PROG} --config recipes/gsm8k/qwen2.5-1.5b-instruct/tempo_lora.yaml --max_steps 10 --output_dir runs/t",
        f"  {PROG} --config recipes/gsm8k/qwen2.5-1.5b-instruct/tempo_lora.yaml --output_dir runs/t \\",
        "      --resume_from_checkpoint auto        # continue that run (refused if runs/t holds another run's)",
        f"  {PROG} --config RECIPE.yaml --dataset_source ../shared/data/gsm8k   # offline: local GSM8K files",
        "",
        "script arguments:",
        *[line(k) for k in script_keys if k in actions],
        "",
        "common keys of the trainer config and ModelConfig:",
        *[line(k) for k in COMMON_KEYS if k in actions],
        "",
        f"{len(actions)} options in all: `{PROG} --help-all` lists every one; docs/recipes.md explains the recipes.",
    ]
    return "\n".join(lines)


def _unknown_keys_error(parser, unknown: list[str], where: str) -> ValueError:
    known = sorted({f.name for dc in parser.dataclass_types for f in fields(dc)})
    lines = []
    for key in unknown:
        name = key.lstrip("-").split("=", 1)[0]
        close = difflib.get_close_matches(name, known, n=3)
        lines.append(f"  {name}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    return ValueError(
        f"Unknown key(s) in the {where}:\n" + "\n".join(lines) + "\nEvery key must be a field of the script arguments, "
        f"the trainer config or ModelConfig (see `{PROG} --help-all`)."
    )


def parse_args(argv: list[str] | None = None):
    """Parse YAML + CLI into `(script_args, training_args, model_args)`; unknown keys raise `ValueError`. `-h`/`--help`
    print the short help and `--help-all` every option, then exit (`SystemExit(0)`)."""
    argv = _normalize_argv(list(sys.argv[1:] if argv is None else argv))
    help_flags = {"-h", "--help", "--help-all"}
    wants_help = [a for a in argv if a in help_flags]
    rest = [a for a in argv if a not in help_flags]
    kind = _peek_trainer_quietly(rest) if wants_help else _peek_trainer(rest)
    parser = make_parser(kind)
    if "--help-all" in wants_help:
        parser.print_help()
        parser.exit(0)
    if wants_help:
        print(short_help(parser))
        parser.exit(0)
    script_args, training_args, model_args, config_rest, cli_rest = parser.parse_args_and_config(
        args=argv, return_remaining_strings=True, separate_remaining_strings=True
    )
    if config_rest:
        raise _unknown_keys_error(parser, [k for k in config_rest if k.startswith("--")], "config file")
    if cli_rest:
        raise _unknown_keys_error(parser, [k for k in cli_rest if k.startswith("-")] or cli_rest, "command line")
    script_args.trainer = kind
    return script_args, training_args, model_args


def _peek_trainer_quietly(argv: list[str]) -> str:
    """For `--help`: the trainer kind if it can be read, else `grpo` (help must not fail on a half-typed command)."""
    try:
        return _peek_trainer(argv)
    except (ValueError, OSError):
        return "grpo"


def build_datasets(script_args):
    from .data import HubDatasetError, load_math_dataset

    kwargs = dict(conversational=script_args.conversational)
    if script_args.system_prompt is not None:
        kwargs["system_prompt"] = script_args.system_prompt
    if script_args.prompt_template is not None:
        kwargs["template"] = script_args.prompt_template
    try:
        train = load_math_dataset(
            script_args.dataset_name, script_args.dataset_train_split, script_args.dataset_source,
            limit=script_args.dataset_limit, **kwargs,
        )  # fmt: skip
        test = None
        if script_args.dataset_test_split:
            test = load_math_dataset(
                script_args.dataset_name, script_args.dataset_test_split, script_args.dataset_source, **kwargs
            )
    except HubDatasetError as e:  # the remedy in this command's terms, not the Python API's
        raise e.fix("--dataset_source") from e.cause
    return train, test


# ── the run record: which run the checkpoints of an output_dir belong to ───────────────────────────────────────────
RUN_RECORD = "trl_credit_run.json"
# Keys that may change between a run and its resumption: how long it runs, where and how often it logs, saves and
# evaluates, and hardware/speed knobs that do not change what is learned. Every other key of the three dataclasses
# identifies the run.
RESUMABLE_KEYS = frozenset({
    "output_dir", "resume_from_checkpoint", "overwrite_output_dir", "max_steps", "num_train_epochs", "run_name",
    "project", "report_to", "disable_tqdm", "push_to_hub", "debug", "local_rank", "use_cpu", "bf16", "fp16", "tf32",
    "bf16_full_eval", "fp16_full_eval", "gradient_checkpointing", "gradient_checkpointing_kwargs",
    "torch_empty_cache_steps", "skip_memory_metrics", "use_liger_kernel", "liger_kernel_config", "accelerator_config",
    "deepspeed", "fsdp", "fsdp_config", "parallelism_config", "ignore_data_skip",
    "restore_callback_states_from_checkpoint", "enable_jit_checkpoint", "per_device_eval_batch_size", "do_eval",
    "do_predict", "do_train", "prediction_loss_only", "load_best_model_at_end", "metric_for_best_model",
    "greater_is_better", "batch_eval_metrics", "include_for_metrics", "include_num_input_tokens_seen", "use_cache",
    "ds3_gather_for_generation", "cache_implementation", "use_vllm", "attn_implementation", "dataset_test_split",
    "log_completions", "log_multimodal", "num_completions_to_print", "log_unique_prompts", "log_completions_hub_repo",
    "use_transformers_continuous_batching", "transformers_continuous_batching_config", "use_transformers_paged",
    "num_generations_eval", "trust_remote_code",
})  # fmt: skip
RESUMABLE_PREFIXES = ("logging_", "log_level", "log_on_each_node", "save_", "eval_", "hub_", "dataloader_", "ddp_",
                      "trackio_", "torch_compile", "vllm_", "rhythm_capture_batch_size", "vine_rollout_batch_size")
# ... except the vLLM keys that change the loss.
IDENTITY_PREFIXES = ("vllm_importance_sampling",)


def _identifies_the_run(key: str) -> bool:
    if key.startswith(IDENTITY_PREFIXES):
        return True
    return key not in RESUMABLE_KEYS and not key.startswith(RESUMABLE_PREFIXES)


def _jsonable(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return _jsonable(value.value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def run_identity(script_args, training_args, model_args) -> dict[str, Any]:
    """The settings that identify a run (every key not in `RESUMABLE_KEYS`/`RESUMABLE_PREFIXES`), JSON-ready."""
    values: dict[str, Any] = {}
    for obj in (script_args, training_args, model_args):
        for f in fields(obj):
            if _identifies_the_run(f.name) and f.name not in values and not f.name.endswith("_token"):
                values[f.name] = _jsonable(getattr(obj, f.name))
    return values


def write_run_record(directory: str | os.PathLike, identity: dict[str, Any]) -> Path:
    from . import __version__

    path = Path(directory) / RUN_RECORD
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "trl_credit_version": __version__,
        "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "identity": identity,
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_run_record(directory: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(directory) / RUN_RECORD
    try:
        return json.loads(path.read_text(encoding="utf-8"))["identity"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _differences(recorded: dict[str, Any], identity: dict[str, Any]) -> list[str]:
    keys = sorted(k for k in recorded.keys() & identity.keys() if recorded[k] != identity[k])
    return [f"  {k}: {recorded[k]!r} there, {identity[k]!r} now" for k in keys]


def _checkpoints(output_dir: Path) -> list[Path]:
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-", 1)[1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-", 1)[1]))


def check_output_dir(identity: dict[str, Any], output_dir: str | os.PathLike, resume: str | None,
                     overwrite: bool) -> None:  # fmt: skip
    """
    Refuse (`ValueError`) to resume, or to start next to, checkpoints of a run whose recorded settings differ from
    `identity`, unless `overwrite`; warn when they carry no record (an older trl-credit, another tool).

    `resume` is the checkpoint this run resumes (a path) or `None` for a run from step 0.
    """
    output_dir = Path(output_dir)
    checkpoints = _checkpoints(output_dir)
    if resume is None and not checkpoints:
        return
    names = ", ".join(p.name for p in checkpoints[-3:]) + (" ..." if len(checkpoints) > 3 else "")
    if overwrite:
        if checkpoints and resume is None:
            logger.warning(
                "--overwrite_output_dir: %s holds checkpoints (%s) that this run does not delete; it writes its own "
                "next to them (same step numbers are replaced).", output_dir, names,
            )  # fmt: skip
        return
    if resume is not None:
        recorded = read_run_record(resume) or read_run_record(output_dir)
        where = f"checkpoint {resume}"
    else:
        recorded = read_run_record(output_dir) or read_run_record(checkpoints[-1])
        where = f"the checkpoints in {output_dir} ({names})"
    if recorded is None:
        logger.warning(
            "Cannot check that %s belong(s) to this run: no %s was recorded (an older trl-credit or another tool "
            "wrote them).", where, RUN_RECORD,
        )  # fmt: skip
        return
    differences = _differences(recorded, identity)
    if not differences:
        if resume is None:
            logger.warning(
                "%s already holds checkpoints (%s) of a run with these settings; this run starts again from step 0 "
                "and replaces them as it saves (to continue that run instead: --resume_from_checkpoint auto).",
                output_dir, names,
            )  # fmt: skip
        return
    shown = differences[:12] + ([f"  ... and {len(differences) - 12} more"] if len(differences) > 12 else [])
    action = "resume" if resume is not None else "start next to"
    raise ValueError(
        f"Refusing to {action} {where}: they belong to another run, whose recorded settings ({RUN_RECORD}) differ "
        "from this run's:\n" + "\n".join(shown) + "\n"
        + ("Resuming would continue that run's weights and optimizer state under these settings. "
           if resume is not None else
           "A later --resume_from_checkpoint auto would pick up that run's checkpoints. ")
        + "Use another --output_dir, run again with that run's settings, or pass --overwrite_output_dir to proceed "
        "anyway."
    )  # fmt: skip


def _run_record_callback(identity: dict[str, Any]):
    from transformers import TrainerCallback

    class RunRecordCallback(TrainerCallback):
        """Writes the run's settings into every checkpoint it saves (main process), so a resume can check them."""

        def on_save(self, args, state, control, **kwargs):
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero and checkpoint.is_dir():
                write_run_record(checkpoint, identity)

    return RunRecordCallback()


def _is_main_process(training_args) -> bool:
    try:
        return training_args.process_index == 0
    except Exception:  # noqa: BLE001 - before the distributed state exists: the launcher's environment
        return int(os.environ.get("RANK", "0")) == 0


def _last_checkpoint(training_args):
    resume = training_args.resume_from_checkpoint
    if resume in (None, "", False):
        return None
    if str(resume).lower() in ("true", "auto", "last"):
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
        if last is None:
            raise ValueError(f"resume_from_checkpoint={resume!r} but {training_args.output_dir} has no checkpoint-*.")
        return last
    if not os.path.isdir(resume):
        raise ValueError(f"resume_from_checkpoint={resume!r} is not a directory; give a checkpoint-* path or 'auto'.")
    return resume


def _warn_unused(script_args, training_args) -> None:
    if script_args.dataset_test_split and str(getattr(training_args, "eval_strategy", "no")).endswith("no"):
        logger.warning("dataset_test_split=%r is loaded but never evaluated: set eval_strategy (steps or epoch) too.",
                       script_args.dataset_test_split)  # fmt: skip
    if not script_args.conversational and script_args.system_prompt is not None:
        logger.warning("system_prompt is unused with conversational=false (plain-text prompts have no system message).")


def prepare(argv: list[str] | None = None) -> dict[str, Any]:
    """Everything a run needs before its model is loaded, checked (arguments, output directory, data, rewards):
    usage errors surface here, in seconds."""
    from trl import get_quantization_config

    script_args, training_args, model_args = parse_args(argv)
    if model_args.model_name_or_path is None:
        raise ValueError("model_name_or_path is required (YAML key or --model_name_or_path).")
    _warn_unused(script_args, training_args)
    identity = run_identity(script_args, training_args, model_args)
    resume = _last_checkpoint(training_args)
    check_output_dir(identity, training_args.output_dir, resume, script_args.overwrite_output_dir)

    # As TRL's own scripts: ModelConfig fields, then the config's model_init_kwargs on top.
    model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    model_init_kwargs.update(training_args.model_init_kwargs or {})
    training_args.model_init_kwargs = model_init_kwargs
    quantization_config = get_quantization_config(model_args)

    train_dataset, eval_dataset = build_datasets(script_args)
    reward_funcs = resolve_reward_funcs(script_args.reward_funcs)
    return dict(
        script_args=script_args, training_args=training_args, model_args=model_args, identity=identity,
        resume=resume, quantization_config=quantization_config, train_dataset=train_dataset,
        eval_dataset=eval_dataset, reward_funcs=reward_funcs,
    )  # fmt: skip


def run(prepared: dict[str, Any]):
    """Build the trainer from `prepare`'s output, train, save; returns the trainer."""
    from trl import get_peft_config

    script_args, training_args, model_args = (prepared[k] for k in ("script_args", "training_args", "model_args"))
    trainer_cls = _import(TRAINERS[script_args.trainer][0])
    trainer = trainer_cls(
        model=model_args.model_name_or_path,
        reward_funcs=prepared["reward_funcs"],
        args=training_args,
        train_dataset=prepared["train_dataset"],
        eval_dataset=prepared["eval_dataset"],
        peft_config=get_peft_config(model_args),
        quantization_config=prepared["quantization_config"],
    )
    trainer.add_callback(_run_record_callback(prepared["identity"]))
    if _is_main_process(training_args):
        write_run_record(training_args.output_dir, prepared["identity"])
    trainer.train(resume_from_checkpoint=prepared["resume"])
    trainer.save_model(training_args.output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    return trainer


def train(argv: list[str] | None = None):
    """Parse, check, build the trainer, train, save; returns the trainer (for programmatic use and tests)."""
    return run(prepare(argv))


def main(argv: list[str] | None = None) -> int:
    """Entry point: usage errors (arguments, recipe, output directory, data, rewards) print one line and return 2."""
    from .cli import quiet_tested_vllm_warning

    quiet_tested_vllm_warning()
    try:
        prepared = prepare(argv)
    except (ValueError, TypeError, OSError, RuntimeError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    run(prepared)
    return 0


if __name__ == "__main__":
    sys.exit(main())
