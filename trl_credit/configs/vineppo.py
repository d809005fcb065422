"""Config fields of VinePPO's Monte-Carlo step values (`advantage_estimator="vineppo"`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..credit import vineppo as _vineppo  # noqa: F401  (registers the "vineppo" estimator before validation)


@dataclass
class VinePPOArguments:
    r"""
    > Parameters that control VinePPO

    vine_num_rollouts (`int`, *optional*, defaults to `9`):
        `K`, the continuations sampled from each step state to estimate its value
        ([VinePPO](https://huggingface.co/papers/2410.01679) uses 9 in all main configs). They use the training
        sampling parameters and are never trained on.
    step_split (`str`, *optional*, defaults to `"math"`):
        How completions are cut into reasoning steps. `"math"`: the paper's LaTeX-aware MATH splitter (sentence ends
        and newlines, never inside inline math, parts over 100 characters broken). `"newline"`: the paper's GSM8K
        rule (one step per line, the `#### answer` line merged into the last step). `"token_chunks"`: every
        `vine_chunk_tokens` tokens. Each token takes the step of its first character, so every state is a token-id
        prefix of the sampled completion.
    vine_max_steps (`int` or `None`, *optional*, defaults to `None`):
        Cap `c` on the estimated states: states `s_0 … s_c` get a Monte-Carlo value, later ones the reward-to-go, so
        their steps get advantage 0 (the paper's `max_step_for_value_estimation`: none for MATH, 25 for GSM8K).
    vine_chunk_tokens (`int`, *optional*, defaults to `32`):
        Step length in tokens for `step_split="token_chunks"`.
    vine_advantage_norm (`str`, *optional*, defaults to `"batch"`):
        `"batch"` (paper): whiten the token advantages over the batch's valid tokens. `"group"`: whiten within each
        prompt's group. `"none"`: raw TD advantages (in `[-1, 1]` for 0/1 rewards).
    vine_truncation_penalty (`float`, *optional*, defaults to `0.0`):
        Reward of an unfinished sequence, one that reaches the horizon `max_completion_length` without EOS: a
        Monte-Carlo continuation that uses up its budget `max_completion_length − prefix_length`, and a training
        completion that is cut at `max_completion_length` alike, so that `r − V̂` compares values on one scale (the
        official unfinished-response penalty, 0).
    vine_tree_reuse (`bool`, *optional*, defaults to `False`):
        Not in the paper. Count the group's own completions that pass through a state as free samples of its value
        (leave-one-out: a completion never enters its own baseline) and sample only the missing `K − free` rollouts.
        Mostly saves rollouts at the prompt state, which all `G` completions share.
    vine_adaptive_k (`bool`, *optional*, defaults to `False`):
        Not in the paper. Sample `vine_adaptive_k_min` rollouts per state first and stop when they all agree; sample
        the other `K − vine_adaptive_k_min` only for states that disagree. Biased towards 0 and 1; for 0/1 rewards
        the bias is `(K−k)/K · V(1−V)(V^{k−1} − (1−V)^{k−1})`, at most 0.064 for `K = 9, k = 3` (docs/vineppo.md).
    vine_adaptive_k_min (`int`, *optional*, defaults to `3`):
        First-round rollouts per state with `vine_adaptive_k=True`.
    vine_boundary_stride (`int`, *optional*, defaults to `1`):
        Not in the paper. Estimate only every `m`-th state (`s_0, s_m, s_{2m}, …`) and interpolate the others linearly
        in token position (towards the reward at the end); `1` = every boundary (paper).
    vine_rollout_batch_size (`int` or `None`, *optional*, defaults to `None`):
        Transformers backend only: most continuations per `generate` call. `None` = the main generation's batch
        (`per_device_train_batch_size × steps_per_generation`), which is known to fit in memory. vLLM schedules its
        own batches and takes all continuations of a round in as few calls as possible.
    """

    vine_num_rollouts: int = field(
        default=9,
        metadata={"help": "VinePPO: K, Monte-Carlo continuations per step state (9 in the paper)."},
    )
    step_split: str = field(
        default="math",
        metadata={
            "help": "VinePPO: step segmentation: 'math' (the paper's LaTeX-aware MATH splitter), 'newline' (the "
            "paper's GSM8K rule) or 'token_chunks' (every vine_chunk_tokens tokens).",
        },
    )
    vine_max_steps: int | None = field(
        default=None,
        metadata={
            "help": "VinePPO: cap c on the estimated states (s_0..s_c get an MC value, later steps advantage 0). "
            "None = every step (paper, MATH); 25 matches the paper's GSM8K configs."
        },
    )
    vine_chunk_tokens: int = field(
        default=32,
        metadata={"help": "VinePPO: step length in tokens for step_split='token_chunks'."},
    )
    vine_advantage_norm: str = field(
        default="batch",
        metadata={
            "help": "VinePPO: 'batch' (paper: whiten token advantages over the batch), 'group' (whiten per group) "
            "or 'none' (raw TD advantages)."
        },
    )
    vine_truncation_penalty: float = field(
        default=0.0,
        metadata={
            "help": "VinePPO: reward of a sequence that reaches max_completion_length without EOS, MC continuation or "
            "training completion alike (paper: 0)."
        },
    )
    vine_tree_reuse: bool = field(
        default=False,
        metadata={
            "help": "VinePPO (not in the paper): count the group's completions through a state as free, "
            "leave-one-out samples of its value and sample only the missing rollouts."
        },
    )
    vine_adaptive_k: bool = field(
        default=False,
        metadata={
            "help": "VinePPO (not in the paper): sample vine_adaptive_k_min rollouts first and stop when they agree "
            "(bounded bias towards 0/1, see docs)."
        },
    )
    vine_adaptive_k_min: int = field(
        default=3,
        metadata={"help": "VinePPO: first-round rollouts per state with vine_adaptive_k=True."},
    )
    vine_boundary_stride: int = field(
        default=1,
        metadata={
            "help": "VinePPO (not in the paper): estimate every m-th state and interpolate the others; 1 = every "
            "boundary (paper)."
        },
    )
    vine_rollout_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "VinePPO, transformers backend: most continuations per generate call (None = the main "
            "generation batch, per_device_train_batch_size * steps_per_generation)."
        },
    )

    def _validate_vineppo(self) -> None:
        from ..credit.steps import STEP_SPLITS
        from ..credit.vineppo import ADVANTAGE_NORMS

        def positive_int(name: str, minimum: int = 1) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")

        positive_int("vine_num_rollouts")
        positive_int("vine_chunk_tokens")
        positive_int("vine_boundary_stride")
        positive_int("vine_adaptive_k_min")
        if self.vine_max_steps is not None:
            positive_int("vine_max_steps", minimum=0)
        if self.vine_rollout_batch_size is not None:
            positive_int("vine_rollout_batch_size")
        if self.step_split not in STEP_SPLITS:
            raise ValueError(f"step_split must be one of {STEP_SPLITS}, got {self.step_split!r}.")
        if self.vine_advantage_norm not in ADVANTAGE_NORMS:
            raise ValueError(f"vine_advantage_norm must be one of {ADVANTAGE_NORMS}, got {self.vine_advantage_norm!r}.")
        if not math.isfinite(self.vine_truncation_penalty):
            raise ValueError(f"vine_truncation_penalty must be a finite number, got {self.vine_truncation_penalty}.")
        if self.vine_adaptive_k and self.vine_adaptive_k_min >= self.vine_num_rollouts:
            raise ValueError(
                f"vine_adaptive_k_min={self.vine_adaptive_k_min} must be smaller than vine_num_rollouts="
                f"{self.vine_num_rollouts} for adaptive K to save anything; lower vine_adaptive_k_min or set "
                "vine_adaptive_k=False."
            )

        if not self.needs_mc_values:
            return
        generation_kwargs = self.generation_kwargs or {}
        fixed = sorted({"max_tokens", "max_new_tokens", "n", "num_return_sequences"} & set(generation_kwargs))
        if fixed:
            raise ValueError(
                f"generation_kwargs sets {fixed}, but VinePPO derives each continuation's budget "
                "(max_completion_length − prefix length) and count (vine_num_rollouts) itself. Remove them and use "
                "max_completion_length."
            )
        if self.use_vllm and self.vllm_mode == "colocate" and self.vllm_enable_sleep_mode and self.vine_adaptive_k:
            raise ValueError(
                "vllm_enable_sleep_mode=True frees the colocated vLLM weights after every generate call and re-pushes "
                "them on the next one; vine_adaptive_k=True needs two rollout rounds per step, i.e. a second full "
                "weight sync. Set vine_adaptive_k=False (all rollouts in one call) or vllm_enable_sleep_mode=False."
            )

    @property
    def needs_mc_values(self) -> bool:
        """Whether the configured estimator asks the trainer for Monte-Carlo step values."""
        from ..credit import get_advantage_estimator

        return "mc_values" in get_advantage_estimator(self.advantage_estimator).credit_requires
