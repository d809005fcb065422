"""`trl_credit.PPOTrainer`: PPO with a learned critic (GAE; MA-PPO with macro actions) on TRL 1.16's `GRPOTrainer`.

TRL removed its `PPOTrainer` in 1.13 (huggingface/trl#7020). This one is built on `trl_credit.GRPOTrainer`, so it
keeps TRL's generation (vLLM included), reward functions, PEFT, tools and loss types, and adds a critic:

1. at rollout time, one no-grad pass of the critic gives the value `V(s_t)` of every completion token (`out["values"]`);
   with `kl_coef`, the sampling and reference log-probs are read (or computed) for the KL penalty in the rewards;
2. the `"gae"` estimator turns values and rewards into `(B, T)` advantages and value targets (`out["returns"]`), over
   tokens or macro actions (`macro_action`);
3. `_compute_loss` adds `vf_coef` × the clipped value loss to TRL's policy loss; the critic has its own optimizer
   parameter groups (`value_learning_rate`), gradient clipping, checkpoint (`<output_dir>/value_model`) and resume.

Single process and DDP: the critic is a separate module, prepared by the accelerator like the policy. DeepSpeed
(ZeRO-2/3) and FSDP2 prepare one module per trainer (a second DeepSpeed engine would bring its own optimizer; FSDP2
prepares models only with their optimizer), so there the critic is registered as a submodule of the policy (the
pattern of TRL ≤ 0.12's `PolicyAndValueWrapper`, without a wrapper TRL would not know): one engine shards both, and
the optimizer groups, clipping, saving and vLLM's weight sync separate them again by their name prefix.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
from accelerate.utils import is_peft_model
from torch import nn
from transformers import AutoModelForSequenceClassification, PreTrainedModel, TrainerCallback

from ..configs.ppo import PPOConfig
from ..credit.ppo import explained_variance
from .grpo import GRPOTrainer

VALUE_MODEL_DIR = "value_model"  # the critic is saved beside the policy, in <output_dir>/value_model
VALUE_ADAPTER_NAME = "value"  # PEFT saves a non-default adapter in a sub-folder, <output_dir>/value_model/value
# Under DeepSpeed and FSDP the critic is this submodule of the policy (one module, one engine; see
# `PPOTrainer._attach_critic_to_policy`); its parameters are named `trl_credit_critic.model.…` there.
CRITIC_MODULE = "trl_credit_critic"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "vocab.txt")


class ValueModel(nn.Module):
    """
    Per-token values from a sequence-classification model (as TRL ≤ 1.12's value model): the backbone's hidden state
    at every position through the scalar `score` head.

    Args:
        model ([`~transformers.PreTrainedModel`] or [`~peft.PeftModel`]):
            A model with a `score` head of one output (e.g. `AutoModelForSequenceClassification(num_labels=1)`), or
            a PEFT model wrapping one.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        inner = self.pretrained
        head = getattr(inner, "score", None)
        if not isinstance(head, nn.Module) or getattr(head, "out_features", 1) != 1:
            raise ValueError(
                f"The value model must have a scalar `score` head (AutoModelForSequenceClassification with "
                f"num_labels=1); {type(inner).__name__} has {head!r}."
            )

    @property
    def pretrained(self) -> PreTrainedModel:
        """The underlying `PreTrainedModel` (inside the PEFT wrapper for a LoRA critic)."""
        return self.model.get_base_model() if is_peft_model(self.model) else self.model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """`(B, L)` values of every position of `input_ids (B, L)`."""
        inner = self.pretrained
        backbone = getattr(inner, inner.base_model_prefix)
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return inner.score(hidden).squeeze(-1)


def tokenizer_differences(policy, critic, limit: int = 3) -> list[str]:
    """
    How the critic's tokenizer differs from the policy's, as readable lines (empty when they agree): vocabulary size,
    tokens mapped to other ids, and the policy's special tokens that the critic lacks or maps to another id. Special
    tokens' roles (which one is `pad`, `eos`) may differ: the critic reads ids, not roles.
    """
    policy_vocab, critic_vocab = policy.get_vocab(), critic.get_vocab()
    problems = []
    if len(policy_vocab) != len(critic_vocab):
        problems.append(f"{len(critic_vocab)} tokens in the critic's vocabulary, {len(policy_vocab)} in the policy's")
    moved = [(t, i, critic_vocab.get(t)) for t, i in sorted(policy_vocab.items(), key=lambda x: x[1])
             if critic_vocab.get(t) != i]  # fmt: skip
    if moved:
        examples = ", ".join(
            f"{t!r}: {i} for the policy, {'absent' if c is None else c} for the critic" for t, i, c in moved[:limit]
        )
        more = ", …" if len(moved) > limit else ""
        problems.append(f"{len(moved)} of the policy's tokens are absent or have another id ({examples}{more})")
    special = [t for t in policy.all_special_tokens if critic_vocab.get(t) != policy_vocab.get(t)]
    if special:
        problems.append(f"the policy's special tokens {special} are missing or have other ids in the critic's")
    return problems


def _is_partitioned(module: nn.Module) -> bool:
    """Whether `module` holds DeepSpeed ZeRO-3 partitioned parameters (built under `zero.Init`)."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


def _gathered(module: nn.Module, modifier_rank: int | None = None):
    """Gather `module`'s ZeRO-3 partitioned parameters (writes by `modifier_rank` are kept); a no-op otherwise."""
    if not _is_partitioned(module):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=modifier_rank)


def check_fsdp_plugin_for_critic(plugin) -> None:
    """Refuse an FSDP setup (an accelerate `FullyShardedDataParallelPlugin`) under which `PPOTrainer`'s critic cannot
    be a shard unit of its own inside the policy's FSDP tree (see `PPOTrainer._attach_critic_to_policy`)."""
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    if getattr(plugin, "fsdp_version", 1) != 2:
        raise ValueError(
            "PPOTrainer's critic supports FSDP2 (fsdp_version: 2, as in recipes/accelerate/fsdp2.yaml), not "
            "FSDP1: FSDP1 replaces the critic by a FullyShardedDataParallel wrapper of flattened shards, and "
            "the critic's forward runs apart from the policy's. Set fsdp_version: 2."
        )
    policy = plugin.auto_wrap_policy
    policy = policy.func if isinstance(policy, functools.partial) else policy
    if policy is not transformer_auto_wrap_policy:
        raise ValueError(
            "PPOTrainer's critic under FSDP2 needs fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP (as in "
            "recipes/accelerate/fsdp2.yaml): the critic's forward runs apart from the policy's, so it must be a "
            f"shard unit of its own; this launch uses {getattr(policy, '__name__', policy)}."
        )


class _ZeroCriticGradients(TrainerCallback):
    # `Trainer` zeroes only the policy's gradients after each optimizer step (`model.zero_grad()`).
    def __init__(self, module: nn.Module):
        self.module = module

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.module.zero_grad(set_to_none=True)


class PPOTrainer(GRPOTrainer):
    """
    PPO with a learned critic and generalized advantage estimation, over tokens or macro actions (MA-PPO,
    https://huggingface.co/papers/2410.02743), with TRL 1.16's generation, vLLM, reward functions, PEFT and loss
    types. `args` is a [`trl_credit.PPOConfig`]; the arguments are those of [`trl_credit.GRPOTrainer`] plus:

    Args:
        value_model (`str`, [`~transformers.PreTrainedModel`] or `None`, *optional*):
            The critic. `None`: `args.value_model_init` if set, otherwise the policy checkpoint with a new scalar head
            (zero-initialized, so every value starts at 0). A path: a sequence-classification checkpoint loaded with
            `num_labels=1` (a reward model, as MA-RLHF; a causal LM gets a new zero head). A model: any
            `*ForSequenceClassification` with a one-output `score` head, or a PEFT model wrapping one.
        value_peft_config ([`~peft.PeftConfig`], *optional*):
            Train the critic as a LoRA adapter (its score head fully trained). Same as `args.value_peft_config`.

    Example:
    ```python
    from peft import LoraConfig
    from trl_credit import PPOConfig, PPOTrainer

    args = PPOConfig(output_dir="out", gamma=1.0, lam=0.95, vf_coef=0.1, macro_action="ngram", macro_action_n=5)
    trainer = PPOTrainer(model="Qwen/Qwen2.5-0.5B-Instruct", reward_funcs=my_reward, args=args, train_dataset=ds,
                         peft_config=LoraConfig(task_type="CAUSAL_LM"), value_peft_config=LoraConfig())
    trainer.train()
    ```
    """

    _tag_names = ["trl", "ppo", "trl-credit"]
    _name = "PPO (trl-credit)"
    value_model: nn.Module | None = None  # set after TRL's constructor; None with Monte-Carlo values
    _critic_prefix: str | None = None  # "trl_credit_critic." when the critic is a submodule of the policy

    def __init__(
        self,
        model,
        reward_funcs=None,
        args: PPOConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        reward_processing_classes=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
        tools: list[Callable] | None = None,
        rollout_func=None,
        environment_factory=None,
        value_model: str | nn.Module | None = None,
        value_peft_config=None,
    ):
        if args is None:
            from trl.trainer.utils import get_config_model_id

            model_name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = PPOConfig(f"{model_name.split('/')[-1]}-PPO")
        elif not isinstance(args, PPOConfig):
            raise TypeError(
                f"args must be a trl_credit.PPOConfig (got {type(args).__module__}.{type(args).__name__}): use "
                "`from trl_credit import PPOConfig`; it accepts every GRPOConfig option plus the PPO fields."
            )
        uses_critic = args.advantage_estimator == "gae"
        if not uses_critic and (value_model is not None or value_peft_config is not None):
            raise ValueError(
                f"advantage_estimator={args.advantage_estimator!r} estimates values with Monte-Carlo rollouts and "
                "builds no critic, but a value_model or value_peft_config was passed. Remove it, or use "
                "advantage_estimator='gae'."
            )
        if value_peft_config is not None and args.value_peft_config is not None:
            raise ValueError("value_peft_config is set both as a trainer argument and in PPOConfig; set only one.")
        if value_model is not None and args.value_model_init is not None:
            raise ValueError("value_model (trainer argument) and PPOConfig.value_model_init both name a critic; "
                             "set only one.")  # fmt: skip
        # Captured before TRL wraps the policy with PEFT: the critic starts from the policy's own backbone weights.
        critic_source = self._critic_source(model, value_model, args) if uses_critic else None

        super().__init__(
            model=model,
            reward_funcs=reward_funcs,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            reward_processing_classes=reward_processing_classes,
            callbacks=callbacks,
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
            tools=tools,
            rollout_func=rollout_func,
            environment_factory=environment_factory,
        )

        if uses_critic:
            if value_peft_config is None and args.value_peft_config is not None:
                from peft import LoraConfig

                value_peft_config = LoraConfig(**args.value_peft_config)
            # Fork the RNG so that building the critic leaves the trainer's random stream as TRL set it.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(args.seed)
                critic = self._build_critic(critic_source, value_peft_config)
            self._check_critic_vocabulary(critic_source, critic)
            if self.is_deepspeed_enabled or self.is_fsdp_enabled:
                self._attach_critic_to_policy(ValueModel(critic))
            else:
                self.value_model = self.accelerator.prepare_model(ValueModel(critic))
                self.add_callback(_ZeroCriticGradients(self.value_model))
        if args.kl_coef != 0.0:
            self._build_kl_reference(quantization_config)

    # ── the critic under DeepSpeed / FSDP2: one module, one engine ─────────────────────────────────────────────────
    def _attach_critic_to_policy(self, critic: ValueModel) -> None:
        """
        Register the critic as the submodule `trl_credit_critic` of the policy, so that the one module the Trainer
        prepares (`accelerator.prepare(self.model, optimizer)`) holds both: one DeepSpeed engine, one FSDP2 tree, one
        optimizer, one checkpoint. TRL keeps seeing `self.model` as the policy (generation, PEFT, log-probs); the
        critic runs through its own forward (ZeRO-3's per-module hooks gather its weights; under FSDP2 it is its own
        shard unit, added to the policy's `_no_split_modules`). On a PEFT policy the critic hangs on the `PeftModel`
        itself, outside the tuner, so merging or disabling the policy's adapter never touches it.
        """
        if self.is_fsdp_enabled:
            plugin = self.accelerator.state.fsdp_plugin
            check_fsdp_plugin_for_critic(plugin)
            inner = self.model.get_base_model() if is_peft_model(self.model) else self.model
            name = type(critic).__name__
            inner._no_split_modules = [*(inner._no_split_modules or []), name]  # read by accelerate's wrap policy
            if plugin.transformer_cls_names_to_wrap is not None and name not in plugin.transformer_cls_names_to_wrap:
                plugin.transformer_cls_names_to_wrap.append(name)  # a plugin already set up for another model
            if isinstance(plugin.auto_wrap_policy, functools.partial):
                classes = plugin.auto_wrap_policy.keywords.get("transformer_layer_cls", set())
                plugin.auto_wrap_policy = functools.partial(
                    plugin.auto_wrap_policy.func, transformer_layer_cls={*classes, type(critic)}
                )
        self.model.add_module(CRITIC_MODULE, critic)
        self.value_model = critic
        self._critic_prefix = CRITIC_MODULE + "."
        self._root_initialized = False
        if self.use_vllm:
            # vLLM's weight sync walks the policy's `named_parameters()` (gathering each under ZeRO-3/FSDP2, a
            # collective every rank runs): the critic's parameters are gathered like the others but never sent.
            iterate = self.vllm_generation._iter_named_params
            prefix = self._critic_prefix

            def policy_parameters():
                for name, param in iterate():
                    if not name.startswith(prefix):
                        yield name, param

            self.vllm_generation._iter_named_params = policy_parameters

    def _policy_named_parameters(self, model: nn.Module):
        """The policy's own parameters of `model` (the prepared policy, which may hold the critic)."""
        prefix = self._critic_prefix
        return [(n, p) for n, p in model.named_parameters() if prefix is None or not n.startswith(prefix)]

    def _initialize_root(self, input_ids: torch.Tensor) -> None:
        # FSDP2 settles which module is the root at the first forward of any shard unit: it must be the policy's
        # (with vLLM generation the critic's no-grad pass may come first). One forward of one token settles it.
        if self._critic_prefix is None or self._root_initialized or not self.is_fsdp_enabled:
            return
        with torch.no_grad():
            self.model(input_ids=input_ids[:1, :1], attention_mask=torch.ones_like(input_ids[:1, :1]))
        self._root_initialized = True

    # ── critic construction ────────────────────────────────────────────────────────────────────────────────────────
    @staticmethod
    def _critic_source(model, value_model, args: PPOConfig) -> tuple[str, Any]:
        if value_model is not None:
            if isinstance(value_model, str):
                return "path", value_model
            if isinstance(value_model, nn.Module):
                return "module", value_model
            raise TypeError(f"value_model must be None, a path or a model, got {type(value_model).__name__}.")
        if args.value_model_init is not None:
            return "path", args.value_model_init
        if isinstance(model, str):
            return "policy_path", model
        if is_peft_model(model):
            return "policy_path", model.get_base_model().config._name_or_path
        backbone = getattr(model, model.base_model_prefix)
        with _gathered(backbone):  # a policy built under DeepSpeed's zero.Init holds only its shards
            state = {name: tensor.detach().clone() for name, tensor in backbone.state_dict().items()}
        return "policy_module", (copy.deepcopy(model.config), state, model.dtype)

    def _build_critic(self, source: tuple[str, Any], peft_config) -> nn.Module:
        kind, payload = source
        args = self.args
        if kind == "module":
            critic = payload
            if is_peft_model(critic) and peft_config is not None:
                raise ValueError("value_model is already a PEFT model; do not also pass value_peft_config.")
        elif kind in ("path", "policy_path"):
            kwargs = dict(args.model_init_kwargs or {})
            kwargs.pop("quantization_config", None)  # the critic is trained in full precision (or as LoRA)
            kwargs.pop("device_map", None)  # placed by the accelerator
            if kind == "path":
                kwargs.pop("revision", None)  # the policy's revision
            dtype = kwargs.pop("dtype", "float32")
            if isinstance(dtype, str) and dtype != "auto":
                dtype = getattr(torch, dtype)
            kwargs.setdefault("trust_remote_code", args.trust_remote_code)
            try:
                critic, info = AutoModelForSequenceClassification.from_pretrained(
                    payload, num_labels=1, dtype=dtype, output_loading_info=True, **kwargs
                )
            except OSError as e:
                raise OSError(
                    f"Could not load the critic from {payload!r} ({e}). Pass value_model= a local checkpoint or a "
                    "model, or save the policy to disk first (the default critic starts from the policy checkpoint)."
                ) from e
            if any(key.startswith("score.") for key in info["missing_keys"]):
                self._zero_score_head(critic)
        elif kind == "policy_module":
            config, backbone_state, dtype = payload
            config.num_labels = 1
            critic = AutoModelForSequenceClassification.from_config(config)
            backbone = getattr(critic, critic.base_model_prefix)
            # Under FSDP's cpu_ram_efficient_loading only rank 0 holds the weights (the others' may be on `meta`):
            # accelerate's `prepare` broadcasts rank 0's critic with the policy.
            if not any(t.is_meta for t in backbone_state.values()):
                with _gathered(backbone, modifier_rank=0):
                    backbone.load_state_dict(backbone_state)
            if not _is_partitioned(critic):
                critic = critic.to(dtype)
            self._zero_score_head(critic)
        else:
            raise ValueError(f"Unknown critic source {kind!r}.")
        if args.disable_dropout:
            from trl.trainer.utils import disable_dropout_in_model

            disable_dropout_in_model(critic)
        if peft_config is not None:
            from peft import get_peft_model

            peft_config = copy.deepcopy(peft_config)
            # The head is new (or a reward model's): always train it fully, or a zero head would stay zero.
            peft_config.modules_to_save = sorted(set(peft_config.modules_to_save or []) | {"score"})
            critic = get_peft_model(critic, peft_config, adapter_name=VALUE_ADAPTER_NAME)
        inner = critic.get_base_model() if is_peft_model(critic) else critic
        inner.config.use_cache = False
        if args.gradient_checkpointing:
            inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs)
            if is_peft_model(critic):
                critic.enable_input_require_grads()
        critic.train()
        return critic

    def _check_critic_vocabulary(self, source: tuple[str, Any], critic: nn.Module) -> None:
        """
        The critic reads the policy's token ids, so it must share the policy's tokenizer: another vocabulary makes its
        inputs meaningless (same size) or out of range (smaller: an `IndexError` at the first critic forward). Refuse
        a mismatch here, comparing the critic checkpoint's tokenizer (vocabulary and special tokens) with the policy's;
        when the critic has no tokenizer to compare, check that its embeddings cover the policy's vocabulary and warn.
        """
        kind, payload = source
        if kind in ("policy_path", "policy_module"):
            return  # the policy's own weights, hence its tokenizer
        inner = critic.get_base_model() if is_peft_model(critic) else critic
        name = payload if kind == "path" else getattr(inner.config, "_name_or_path", "") or ""
        described = f"value_model {name!r}" if name else "the value_model module"
        critic_tokenizer = self._critic_tokenizer(name, local_only=kind == "module")
        policy_tokenizer = self._tokenizer
        if critic_tokenizer is not None:
            problems = tokenizer_differences(policy_tokenizer, critic_tokenizer)
            if problems:
                raise ValueError(
                    f"The critic's tokenizer ({described}) differs from the policy's: {'; '.join(problems)}. The "
                    "critic reads the policy's token ids, so it must share the policy's tokenizer: use a critic "
                    "trained with the policy's tokenizer (e.g. a reward model fine-tuned from the same base), or leave "
                    "value_model unset to start the critic from the policy."
                )
        num_embeddings = inner.get_input_embeddings().num_embeddings
        if num_embeddings < len(policy_tokenizer):
            raise ValueError(
                f"The critic ({described}) embeds {num_embeddings} token ids but the policy's tokenizer has "
                f"{len(policy_tokenizer)}: the critic cannot read the policy's completions. Use a critic that shares "
                "the policy's tokenizer, or leave value_model unset to start the critic from the policy."
            )
        if critic_tokenizer is None:
            warnings.warn(
                f"Could not load a tokenizer for {described} to check that it shares the policy's vocabulary (its "
                f"embeddings cover the policy's {len(policy_tokenizer)} token ids). The critic reads the policy's "
                "token ids: make sure it was trained with the policy's tokenizer.",
                stacklevel=3,
            )

    def _critic_tokenizer(self, name: str, local_only: bool):
        """The tokenizer saved with the critic checkpoint `name`, or `None` when there is none to load."""
        from transformers import AutoTokenizer

        if not name or (local_only and not os.path.isdir(name)):
            return None
        if os.path.isdir(name) and not any(os.path.isfile(os.path.join(name, f)) for f in TOKENIZER_FILES):
            return None  # a checkpoint saved without its tokenizer (transformers would build an empty one)
        try:
            tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=self.args.trust_remote_code)
        except (OSError, ValueError, KeyError, TypeError):
            return None
        # A repository without tokenizer files yields a tokenizer holding only its special tokens.
        return tokenizer if len(tokenizer.get_vocab()) > len(tokenizer.all_special_tokens) else None

    @staticmethod
    def _zero_score_head(critic: PreTrainedModel) -> None:
        # A zero head makes every initial value 0: a neutral baseline, no random offsets in the first advantages.
        # Under zero.Init the head is partitioned: an in-place edit of the empty local shard would do nothing.
        with _gathered(critic.score, modifier_rank=0), torch.no_grad():
            critic.score.weight.zero_()
            if getattr(critic.score, "bias", None) is not None:
                critic.score.bias.zero_()

    def _build_kl_reference(self, quantization_config) -> None:
        """A frozen reference for the KL penalty in the rewards. TRL builds one only for `beta != 0`; with PEFT the
        reference is the policy with its adapter disabled, as in TRL."""
        if self.ref_model is not None or is_peft_model(self.accelerator.unwrap_model(self.model)):
            return
        from trl.trainer.utils import (
            add_fused_lm_head,
            create_model_from_path,
            disable_dropout_in_model,
            get_config_model_id,
        )

        args = self.args
        kwargs = dict(args.model_init_kwargs or {})
        if quantization_config is not None:
            kwargs["quantization_config"] = quantization_config
        if args.distributed_state.distributed_type in ["MULTI_GPU", "DEEPSPEED"]:
            kwargs["device_map"] = None
        kwargs.setdefault("trust_remote_code", args.trust_remote_code)
        kwargs.setdefault("dtype", self.model.dtype)
        kwargs.setdefault("attn_implementation", self.model.config._attn_implementation)
        path = get_config_model_id(self.model.config)
        try:
            ref = create_model_from_path(path, **kwargs)
        except (OSError, ValueError) as e:
            raise ValueError(
                f"kl_coef={args.kl_coef} needs a reference model, loaded from the policy's checkpoint {path!r}, which "
                f"failed ({e}). Pass the policy as a path (or save it first), train a PEFT adapter (the reference is "
                "then the adapter-free model), or set kl_coef=0.0."
            ) from e
        if args.disable_dropout:
            disable_dropout_in_model(ref)
        add_fused_lm_head(ref, temperature=self.temperature, cast_lm_head_to_fp32=args.cast_lm_head_to_fp32)
        # As TRL prepares its own reference model (`beta != 0`): an inference engine of its own under DeepSpeed/FSDP.
        if self.is_deepspeed_enabled:
            from trl.models import prepare_deepspeed

            self.ref_model = prepare_deepspeed(ref, self.accelerator)
        elif self.is_fsdp_enabled:
            from trl.models import prepare_fsdp

            plugin = self.accelerator.state.fsdp_plugin
            if self.accelerator.num_processes > 1 and getattr(plugin, "cpu_ram_efficient_loading", False):
                # With cpu_ram_efficient_loading only rank 0 reads the checkpoint: transformers leaves the other ranks'
                # weights uninitialized, and `prepare_fsdp` shards what each rank holds (the policy gets rank 0's
                # weights from accelerate's `prepare`). Without this broadcast the KL is measured against garbage.
                for tensor in ref.state_dict().values():
                    torch.distributed.broadcast(tensor, src=0)
            self.ref_model = prepare_fsdp(ref, self.accelerator)
        else:
            self.ref_model = self.accelerator.prepare_model(ref, evaluation_mode=True)

    # ── rollout: values, KL log-probs, advantages ──────────────────────────────────────────────────────────────────
    def _credit_requirement(self, requirement: str, out, ctx, batch_fields) -> dict[str, Any]:
        if requirement != "critic_values":
            return super()._credit_requirement(requirement, out, ctx, batch_fields)
        if self.value_model is None:
            raise ValueError(f"advantage_estimator={self.args.advantage_estimator!r} needs a critic; none was built.")
        values = self._critic_values(out)
        out["values"] = values  # the rollout values V_old, for the clipped value loss
        fields = {"values": self._gather_rows(values, 0.0)}
        if self.args.kl_coef != 0.0:
            old = out.get("old_per_token_logps")
            old = old.float() if old is not None else self._policy_logps(out)
            fields["old_logps"] = self._gather_rows(old.contiguous(), 0.0)
            fields["ref_logps"] = self._gather_rows(self._reference_logps(out).contiguous(), 0.0)
        return fields

    def _critic_inputs(self, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        return input_ids, attention_mask, prompt_ids.size(1), completion_ids.size(1)

    @torch.no_grad()
    def _critic_values(self, out: dict[str, Any]) -> torch.Tensor:
        """This rank's `(B, T)` values `V(s_t)` of the state before every completion token (0 on padding)."""
        from trl.models.utils import disable_gradient_checkpointing

        critic = self.accelerator.unwrap_model(self.value_model)
        input_ids, attention_mask, P, T = self._critic_inputs(out)
        self._initialize_root(input_ids)
        chunk = self.args.per_device_train_batch_size
        values = []
        with disable_gradient_checkpointing(critic.pretrained, self.args.gradient_checkpointing_kwargs):
            for start in range(0, input_ids.size(0), chunk):
                rows = slice(start, start + chunk)
                with self.accelerator.autocast():
                    v = critic(input_ids[rows], attention_mask[rows])
                # The value of the state before completion token t sits at the position just before it.
                values.append(v[:, P - 1 : P - 1 + T].float())
        values = torch.cat(values, dim=0)
        return torch.where(out["completion_mask"] > 0, values, torch.zeros_like(values))

    @torch.no_grad()
    def _reference_logps(self, out: dict[str, Any]) -> torch.Tensor:
        """This rank's `(B, T)` log-probs of the completion tokens under the reference model."""
        from trl.models.utils import disable_gradient_checkpointing
        from trl.trainer.utils import use_adapter

        if out.get("ref_per_token_logps") is not None:
            return out["ref_per_token_logps"].float()
        input_ids, attention_mask, _, T = self._critic_inputs(out)
        chunk = self.args.per_device_train_batch_size
        if self.ref_model is not None:
            logps, _, _ = self._get_per_token_logps_and_entropies(
                self.ref_model, input_ids, attention_mask, T, batch_size=chunk
            )
            return logps.float()
        policy = self.accelerator.unwrap_model(self.model)
        with disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            with use_adapter(policy, adapter_name="ref" if "ref" in policy.peft_config else None):
                logps, _, _ = self._get_per_token_logps_and_entropies(
                    self.model, input_ids, attention_mask, T, batch_size=chunk
                )
        return logps.float()

    def _macro_reference_logps(self, out: dict[str, Any]) -> torch.Tensor | None:
        # Perplexity macros read the reference log-probs of the KL penalty (MA-RLHF): computed once here, kept in
        # `out` under TRL's key, where the "critic_values" requirement finds them (segments are prepared first).
        if out.get("ref_per_token_logps") is None and self.args.kl_coef != 0.0:
            out["ref_per_token_logps"] = self._reference_logps(out)
        return super()._macro_reference_logps(out)

    def _credit_batch_fields(self, out: dict[str, Any], ctx: dict[str, Any]) -> dict[str, Any]:
        fields = super()._credit_batch_fields(out, ctx)
        penalty = self.args.missing_eos_penalty
        if penalty:
            ids, mask = fields["completion_ids"], fields["completion_mask"]
            last = ids.gather(1, (mask.sum(1, keepdim=True) - 1).clamp(min=0)).squeeze(1)
            eos = torch.tensor(self.eos_token_ids, device=ids.device)
            has_eos = torch.isin(last, eos) & (mask.sum(1) > 0)
            fields["rewards"] = torch.where(has_eos, fields["rewards"], fields["rewards"] - penalty)
        return fields

    def _assign_credit(self, out: dict[str, Any], ctx: dict[str, Any]) -> None:
        super()._assign_credit(out, ctx)
        if "values" not in out or "returns" not in out:
            return
        metrics = self._metrics["train"]
        mask = out["completion_mask"] if "tool_mask" not in out else out["completion_mask"] * out["tool_mask"]
        values = self._gather_rows(out["values"].contiguous(), 0.0)
        returns = self._gather_rows(out["returns"].contiguous(), 0.0)
        mask = self._gather_rows(mask.contiguous(), 0)
        keep = (mask > 0) & ~torch.isnan(returns)
        metrics["value/explained_variance"].append(explained_variance(values, returns, mask))
        if keep.any():
            metrics["value/values_mean"].append(values[keep].mean().item())
            metrics["value/returns_mean"].append(returns[keep].mean().item())

    # ── training: value loss, optimizer, gradient clipping ─────────────────────────────────────────────────────────
    def _compute_loss(self, model, inputs):
        loss = super()._compute_loss(model, inputs)
        if self.value_model is None or "returns" not in inputs:
            return loss  # evaluation batches carry no value targets
        mode = "train" if self.model.training else "eval"
        input_ids, attention_mask, P, T = self._critic_inputs(inputs)
        with self.accelerator.autocast():
            values = self.value_model(input_ids, attention_mask)[:, P - 1 : P - 1 + T].float()
        old_values, returns = inputs["values"], inputs["returns"]
        mask = (
            inputs["completion_mask"] if "tool_mask" not in inputs else inputs["completion_mask"] * inputs["tool_mask"]
        )
        mask = (mask > 0) & ~torch.isnan(returns)
        returns = torch.nan_to_num(returns, nan=0.0)
        c = self.args.cliprange_value
        clipped = old_values + torch.clamp(values - old_values, -c, c)
        unclipped_loss = (values - returns) ** 2
        clipped_loss = (clipped - returns) ** 2
        per_token = 0.5 * torch.maximum(unclipped_loss, clipped_loss)
        m = mask.to(per_token.dtype)
        value_loss = (per_token * m).sum() / m.sum().clamp(min=1.0)
        normalizer = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        loss = loss + self.args.vf_coef * value_loss / normalizer

        # Logged as global token means, like TRL's own metrics.
        stats = torch.stack([
            (per_token * m).sum(), ((clipped_loss > unclipped_loss).float() * m).sum(), (values * m).sum(), m.sum()
        ]).detach()  # fmt: skip
        stats = self.accelerator.reduce(stats, reduction="sum")
        count = stats[3].clamp(min=1.0)
        self._metrics[mode]["value/loss"].append((stats[0] / count).item())
        self._metrics[mode]["value/clipfrac"].append((stats[1] / count).item())
        self._metrics[mode]["value/vpred_mean"].append((stats[2] / count).item())
        return loss

    def create_optimizer(self, model=None):
        user_supplied = self.optimizer is not None
        optimizer = super().create_optimizer(model)
        if self.value_model is None:
            return optimizer
        critic = self.accelerator.unwrap_model(self.value_model)
        named = [(n, p) for n, p in critic.named_parameters() if p.requires_grad]
        if self._critic_prefix is not None and not user_supplied:
            # The critic is a submodule of the policy: Trainer put its parameters into the policy's groups.
            ids = {id(p) for _, p in named}
            for group in optimizer.param_groups:
                group["params"] = [p for p in group["params"] if id(p) not in ids]
            optimizer.param_groups[:] = [group for group in optimizer.param_groups if group["params"]]
        present = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if any(id(p) in present for _, p in named):
            return optimizer  # a user-supplied optimizer that already holds the critic
        decay = set(self.get_decay_parameter_names(critic))
        lr = self.args.value_learning_rate if self.args.value_learning_rate is not None else self.args.learning_rate
        for params, weight_decay in (
            ([p for n, p in named if n in decay], self.args.weight_decay),
            ([p for n, p in named if n not in decay], 0.0),
        ):
            if params:
                optimizer.add_param_group({"params": params, "weight_decay": weight_decay, "lr": lr})
        return optimizer

    def _clip_grad_norm(self, model):
        if self._critic_prefix is not None:
            if self.is_deepspeed_enabled:
                # DeepSpeed clips all of its engine's gradients together (`gradient_clipping`): policy and critic
                # share one norm, and the returned norm is theirs together (docs/scaling.md).
                return super()._clip_grad_norm(model)
            # FSDP2: the policy and the critic clipped separately, as without sharding (DTensor-aware norms).
            policy = [p for _, p in self._policy_named_parameters(model)]
            grad_norm = self.accelerator.clip_grad_norm_(policy, self.args.max_grad_norm)
            params = [p for p in self.value_model.parameters() if p.grad is not None]
            if params:
                value_norm = self.accelerator.clip_grad_norm_(params, self.args.max_grad_norm)
                self._metrics["train"]["value/grad_norm"].append(float(value_norm))
            return grad_norm
        grad_norm = super()._clip_grad_norm(model)
        if self.value_model is not None:
            # After the policy's clip: fp16 gradients are already unscaled, and DDP has already averaged them.
            params = [p for p in self.value_model.parameters() if p.grad is not None]
            if params:
                value_norm = torch.nn.utils.clip_grad_norm_(params, self.args.max_grad_norm)
                self._metrics["train"]["value/grad_norm"].append(float(value_norm))
        return grad_norm

    # ── checkpoints ────────────────────────────────────────────────────────────────────────────────────────────────
    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        if self._critic_prefix is not None:
            self._save_policy_and_critic(output_dir, state_dict)
            return
        super()._save(output_dir, state_dict=state_dict)
        if self.value_model is not None and self.args.should_save:
            output_dir = output_dir if output_dir is not None else self.args.output_dir
            critic = self.accelerator.unwrap_model(self.value_model).model
            critic.save_pretrained(os.path.join(output_dir, VALUE_MODEL_DIR))

    def _save_policy_and_critic(self, output_dir: str | None, state_dict) -> None:
        """Under DeepSpeed/FSDP2: split the one model's full state dict (gathered from the shards on every rank by
        `Trainer.save_model`) into the policy's checkpoint and the critic's `value_model` folder."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if state_dict is not None and not state_dict:
            # ZeRO-3 without `zero3_save_16bit_model`: Trainer writes only the engine checkpoint (policy and critic,
            # recovered with DeepSpeed's zero_to_fp32.py); no gathered weights to split.
            super()._save(output_dir, state_dict=state_dict)
            return
        if state_dict is None:  # ZeRO-2 and unsharded saves: every rank holds the full parameters
            state_dict = self.accelerator.unwrap_model(self.model).state_dict()
        critic_prefix = self._critic_prefix + "model."
        policy_state = {k: v for k, v in state_dict.items() if not k.startswith(self._critic_prefix)}
        critic_state = {k[len(critic_prefix) :]: v for k, v in state_dict.items() if k.startswith(critic_prefix)}
        super()._save(output_dir, state_dict=policy_state)
        if self.args.should_save:
            self.value_model.model.save_pretrained(os.path.join(output_dir, VALUE_MODEL_DIR), state_dict=critic_state)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        # Under DeepSpeed/FSDP2 the critic is part of the engine's checkpoint, restored with the policy.
        if self.value_model is not None and self._critic_prefix is None:
            self._load_value_model(os.path.join(resume_from_checkpoint, VALUE_MODEL_DIR))

    def _load_value_model(self, path: str) -> None:
        """Load the critic's weights saved by `_save` (full model, or LoRA adapter and score head)."""
        import safetensors.torch
        from transformers.trainer_utils import load_sharded_checkpoint

        critic = self.accelerator.unwrap_model(self.value_model).model
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"The checkpoint has no critic at {path}: it was not written by trl_credit.PPOTrainer, so the critic "
                "cannot be restored. Resume from a PPOTrainer checkpoint."
            )
        if is_peft_model(critic):
            from peft import set_peft_model_state_dict

            adapter = os.path.join(path, VALUE_ADAPTER_NAME, "adapter_model.safetensors")
            state = safetensors.torch.load_file(adapter)
            result = set_peft_model_state_dict(critic, state, adapter_name=VALUE_ADAPTER_NAME)
            if result.unexpected_keys:
                raise ValueError(f"The saved critic adapter does not match this critic: {result.unexpected_keys[:5]}")
            return
        if os.path.isfile(os.path.join(path, "model.safetensors")):
            state = safetensors.torch.load_file(os.path.join(path, "model.safetensors"))
            critic.load_state_dict(state, strict=True)
        else:
            load_sharded_checkpoint(critic, path, strict=True)
