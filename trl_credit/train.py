"""`trl-credit train` / `python -m trl_credit.train`: train on GSM8K or MATH from a YAML recipe with CLI overrides.

    accelerate launch --config_file recipes/accelerate/single_gpu.yaml -m trl_credit.train \
        --config recipes/gsm8k/qwen2.5-1.5b-instruct/tempo_lora.yaml
    trl-credit train --config recipes/math/qwen2.5-math-1.5b/vineppo_lora.yaml --max_steps 10

Arguments come from three dataclasses parsed by TRL's `TrlParser` (YAML first, then the command line): the script
arguments below, the trainer's config (`trl_credit.GRPOConfig`, or `trl_credit.PPOConfig` with `trainer: ppo`), and
TRL's `ModelConfig` (`model_name_or_path`, `dtype`, `attn_implementation`, LoRA: `use_peft`, `lora_r`, ...; QLoRA:
`load_in_4bit`, ...). A key that none of them knows is an error that names the closest known keys.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import sys
from dataclasses import dataclass, field, fields


REWARD_FUNCS = {
    "math": "trl_credit.rewards.math_reward",
    "gsm8k": "trl_credit.rewards.gsm8k_reward",
    "format": "trl_credit.rewards.format_reward",
}
TRAINERS = {
    "grpo": ("trl_credit.GRPOTrainer", "trl_credit.GRPOConfig"),
    "ppo": ("trl_credit.PPOTrainer", "trl_credit.PPOConfig"),
}


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
            Keep only the first N training problems (smoke runs).
        conversational (`bool`, *optional*, defaults to `True`):
            Chat-format prompts (instruct models) or plain-text prompts (base models).
        system_prompt (`str`, *optional*):
            System message of chat prompts; defaults to asking for step-by-step reasoning and a `\boxed{}` answer.
        prompt_template (`str`, *optional*):
            User message (or whole plain prompt) with `{problem}`; see `trl_credit.data.load_math_dataset`.
        reward_funcs (`list[str]`, *optional*, defaults to `["math"]`):
            Reward functions: `math`, `gsm8k`, `format`, or dotted import paths (`my_module.my_reward`, resolved from
            the working directory too). Weights go in the trainer config's `reward_weights`.
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


def _peek_trainer(argv: list[str]) -> str:
    """The trainer kind, from `--trainer` or the YAML's `trainer:` key, before the full parse needs its config class."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    pre.add_argument("--trainer")
    known, _ = pre.parse_known_args(argv)
    kind = known.trainer
    if kind is None and known.config:
        import yaml

        with open(known.config) as f:
            kind = (yaml.safe_load(f) or {}).get("trainer")
    kind = kind or "grpo"
    if kind not in TRAINERS:
        raise ValueError(f"trainer must be one of {sorted(TRAINERS)}, got {kind!r}.")
    return kind


def make_parser(kind: str):
    from trl import ModelConfig, TrlParser

    config_cls = _import(TRAINERS[kind][1])
    return TrlParser((TrainScriptArguments, config_cls, ModelConfig), prog="trl-credit train")


def _unknown_keys_error(parser, unknown: list[str], where: str) -> ValueError:
    known = sorted({f.name for dc in parser.dataclass_types for f in fields(dc)})
    lines = []
    for key in unknown:
        name = key.lstrip("-").split("=", 1)[0]
        close = difflib.get_close_matches(name, known, n=3)
        lines.append(f"  {name}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    return ValueError(
        f"Unknown key(s) in the {where}:\n" + "\n".join(lines) + "\nEvery key must be a field of the script arguments, "
        "the trainer config or ModelConfig (see `trl-credit train --help`)."
    )


def parse_args(argv: list[str] | None = None):
    """Parse YAML + CLI into `(script_args, training_args, model_args)`; unknown keys raise `ValueError`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    kind = _peek_trainer(argv)
    parser = make_parser(kind)
    script_args, training_args, model_args, config_rest, cli_rest = parser.parse_args_and_config(
        args=argv, return_remaining_strings=True, separate_remaining_strings=True
    )
    if config_rest:
        raise _unknown_keys_error(parser, [k for k in config_rest if k.startswith("--")], "config file")
    if cli_rest:
        raise _unknown_keys_error(parser, [k for k in cli_rest if k.startswith("-")] or cli_rest, "command line")
    script_args.trainer = kind
    return script_args, training_args, model_args


def build_datasets(script_args):
    from .data import load_math_dataset

    kwargs = dict(conversational=script_args.conversational)
    if script_args.system_prompt is not None:
        kwargs["system_prompt"] = script_args.system_prompt
    if script_args.prompt_template is not None:
        kwargs["template"] = script_args.prompt_template
    train = load_math_dataset(
        script_args.dataset_name, script_args.dataset_train_split, script_args.dataset_source,
        limit=script_args.dataset_limit, **kwargs,
    )  # fmt: skip
    test = None
    if script_args.dataset_test_split:
        test = load_math_dataset(
            script_args.dataset_name, script_args.dataset_test_split, script_args.dataset_source, **kwargs
        )
    return train, test


def _prepare_vllm_on_cpu(training_args) -> None:
    """vLLM's CPU build needs patches that TRL does not apply (see `trl_credit.generation.vllm_cpu`); GPU runs are untouched."""
    if not training_args.use_vllm:
        return
    from .generation.vllm_cpu import apply_colocate, apply_server_client, is_vllm_cpu

    if is_vllm_cpu():
        if training_args.vllm_mode == "colocate":
            apply_colocate()
        else:
            apply_server_client()


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
    return resume


def train(argv: list[str] | None = None):
    """Parse, build the trainer, train, save; returns the trainer (for programmatic use and tests)."""
    from trl import get_peft_config, get_quantization_config

    script_args, training_args, model_args = parse_args(argv)
    if model_args.model_name_or_path is None:
        raise ValueError("model_name_or_path is required (YAML key or --model_name_or_path).")

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
    _prepare_vllm_on_cpu(training_args)

    trainer_cls = _import(TRAINERS[script_args.trainer][0])
    trainer = trainer_cls(
        model=model_args.model_name_or_path,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        peft_config=get_peft_config(model_args),
        quantization_config=quantization_config,
    )
    trainer.train(resume_from_checkpoint=_last_checkpoint(training_args))
    trainer.save_model(training_args.output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    return trainer


def main(argv: list[str] | None = None) -> int:
    train(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
