"""
RL from the same starting policy with each estimator: same prompts, budget, seeds and evaluation.

Every run is a real trl_credit trainer (`GRPOTrainer`, or `PPOTrainer` for the critic) on the demo task, with a small
mixin that (1) measures, on every training batch, where the advantages fell relative to the first wrong token
(`CreditStats`), and (2) can replay fixed completions through the trainer's whole scoring and credit path, so that the
credit map compares every estimator on the same sampled completions.

An estimator joins the demo by adding one entry to `PRESETS`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PrinterCallback, TrainerCallback

from .sft import policy_stats, sample_completions
from .task import analyze, chain_reward, load_tokenizer, parse_prompt, prompt_text, rl_dataset


@dataclass(frozen=True)
class Preset:
    """
    One estimator of the demo.

    Args:
        label (`str`): name in tables and plots.
        config (`dict`): config fields that differ from the shared RL settings (the estimator and its knobs).
        trainer (`str`, *optional*, defaults to `"grpo"`): `"grpo"` (`trl_credit.GRPOTrainer` / `GRPOConfig`) or
            `"ppo"` (`trl_credit.trainers.ppo.PPOTrainer` / `PPOConfig`, with a learned critic).
        description (`str`, *optional*): one line for the report.
        derived (`Callable[[RLSettings], dict]`, *optional*): config fields that depend on the shared settings (e.g.
            a tree shape whose leaves must match `num_generations`), applied after `config`.
    """

    label: str
    config: dict[str, Any]
    trainer: str = "grpo"
    description: str = ""
    derived: Callable[[RLSettings], dict[str, Any]] | None = None

    def fields(self, settings: RLSettings) -> dict[str, Any]:
        """The preset's config fields under `settings`: `config`, then the `derived` ones."""
        return {**self.config, **(self.derived(settings) if self.derived is not None else {})}


def spo_tree_shape_for(num_generations: int) -> list[int]:
    """
    The demo's SPO-tree shape: two levels, `[2, G / 2]`, so that the tree's leaves are exactly the `G` trained
    completions (`[2, 2]` for the demo's G = 4); a one-level tree `[G]` (Dr.GRPO's `r − mean`, spec §11-7) when `G`
    is odd or below 4.
    """
    G = int(num_generations)
    return [2, G // 2] if G >= 4 and G % 2 == 0 else [G]


# Everything not listed here is shared by all runs (RLSettings). Knobs are the papers' defaults unless the comment
# says why the demo's short character-level completions need another value.
PRESETS: dict[str, Preset] = {
    "grpo": Preset("GRPO", {"advantage_estimator": "grpo"}, description="TRL's outcome advantage on every token"),
    "tempo": Preset(
        "TEMPO",
        {"advantage_estimator": "tempo"},
        description="GRPO + branch-gated TD on the group's prefix tree",
    ),
    "gigpo": Preset(
        "GiGPO",
        # scale_rewards stays "group" (shared setting) so that only the step term differs from GRPO.
        {"advantage_estimator": "gigpo"},
        description="GRPO + anchor-state MC residual at branch tokens",
    ),
    "vineppo": Preset(
        "VinePPO",
        # One step per line (the paper's GSM8K rule); K = 4 instead of 9 to fit the CPU budget (docs/demo.md); all
        # rollouts of a step in few generate calls, which is what a tiny model on CPU is fastest at.
        {"advantage_estimator": "vineppo", "step_split": "newline", "vine_num_rollouts": 4,
         "vine_rollout_batch_size": 256},
        description="Monte-Carlo values (K = 4 rollouts) at every line boundary, TD(0) step advantages, whitened",
    ),
    "ppo": Preset(
        "PPO (critic, step macros)",
        # MA-PPO over reasoning-step macros; no KL anywhere, as for every other run (beta = 0).
        {"advantage_estimator": "gae", "macro_action": "step", "step_split": "newline", "kl_coef": 0.0},
        trainer="ppo",
        description="learned critic (policy backbone, zero head), GAE(γ=1, λ=0.95) over line macros",
    ),
    "tempo+rhythm": Preset(
        "TEMPO + rhythm",
        # Horizons scaled to ~45-token completions (paper: W = 10, H_lo = 10, H_hi = 100 for thousands of tokens).
        {
            "advantage_estimator": "tempo",
            "token_weighting": "rhythm",
            "rhythm_window": 4,
            "rhythm_horizon_lo": 4,
            "rhythm_horizon_hi": 32,
        },
        description="TEMPO advantages × attention-rhythm token weights (preplan/anchor tokens × 1.5)",
    ),
    # SPO on the demo's character-level completions (≈ 34 tokens). The starting policy is nearly deterministic except
    # on the digits of a sum: at the official ρ = 0.9 a completion has 1.2 cutpoints on average and 29% have none
    # (they would train on nothing), so ρ = 0.95 (4.1 cutpoints, every completion has one) and a segment at every
    # cutpoint (k = 1, official 5: ≈ 5 segments per completion instead of 2). Measured on 256 samples of the starting
    # policy at T = 1 (docs/demo.md). The probability mask is on, as officially: only the cutpoint tokens train.
    "spo_chain": Preset(
        "SPO-chain",
        # K = 4 Monte-Carlo rollouts per boundary, as the VinePPO preset (official 9), for the CPU budget.
        {"advantage_estimator": "spo_chain", "spo_cutpoint_threshold": 0.95, "spo_cutpoints_per_segment": 1,
         "vine_num_rollouts": 4, "vine_rollout_batch_size": 256},
        description="Monte-Carlo values (K = 4) before every cutpoint (p < 0.95), TD(0) segment advantages on the "
        "cutpoint tokens only (probability mask), whitened",
    ),
    "spo_tree": Preset(
        "SPO-tree",
        # A 2-2 tree: 4 leaves = the demo's num_generations (4), so every slot is trained (`spo_tree_shape_for`
        # follows --num-generations); the first level is 16 tokens (about two lines of a 34-token completion), the
        # second the rest (≤ 40 tokens). Official: 6-6-6, M = 30 on GSM8K. Same ρ = 0.95 probability mask as SPO-chain.
        {"advantage_estimator": "spo_tree", "spo_tree_segment_tokens": 16, "spo_cutpoint_threshold": 0.95,
         "vine_rollout_batch_size": 256},
        description="the group sampled as a 2-2 tree (16-token first level), advantage V(node) − V(parent) per "
        "segment on the cutpoint tokens only (p < 0.95), each node trained once, whitened",
        derived=lambda settings: {"spo_tree_shape": spo_tree_shape_for(settings.num_generations)},
    ),
}


@dataclass(frozen=True)
class RLSettings:
    """
    Settings shared by every RL run.

    Args:
        steps (`int`): optimizer steps per run (the budget). eval_every (`int`): evaluate every this many steps.
        prompts_per_step (`int`): prompts per optimizer step. num_generations (`int`): group size `G`.
        learning_rate (`float`): constant AdamW learning rate. temperature (`float`): sampling temperature of
            training and evaluation.
    """

    steps: int = 40
    eval_every: int = 5
    prompts_per_step: int = 8
    num_generations: int = 4
    learning_rate: float = 3e-4
    temperature: float = 1.0


def trainer_classes(preset: Preset):
    """`(ConfigClass, TrainerClass)` of a preset; raises `ImportError` when that trainer is not in the package."""
    if preset.trainer == "grpo":
        from ..configs import GRPOConfig
        from ..trainers.grpo import GRPOTrainer

        return GRPOConfig, GRPOTrainer
    if preset.trainer == "ppo":
        from ..configs.ppo import PPOConfig
        from ..trainers.ppo import PPOTrainer

        return PPOConfig, PPOTrainer
    raise ValueError(f"Unknown trainer {preset.trainer!r} in a demo preset; use 'grpo' or 'ppo'.")


def build_config(preset: Preset, settings: RLSettings, *, output_dir: str, seed: int, max_completion_length: int):
    """The preset's config: shared settings, then the preset's fields."""
    config_cls, _ = trainer_classes(preset)
    fields = dict(
        output_dir=output_dir,
        max_steps=settings.steps,
        per_device_train_batch_size=settings.prompts_per_step * settings.num_generations,
        num_generations=settings.num_generations,
        max_completion_length=max_completion_length,
        temperature=settings.temperature,
        top_k=0,
        top_p=1.0,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        beta=0.0,
        report_to="none",
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        gradient_checkpointing=False,
        seed=seed,
        data_seed=seed,
    )
    fields.update(preset.fields(settings))
    return config_cls(**fields)


# ── credit diagnostics ─────────────────────────────────────────────────────────────────────────────────────────────
@dataclass
class CreditStats:
    """
    Running sums over the training batches of a run.

    `neg_*`: negative advantage mass (Σ max(−A_t, 0)) over the tokens of failed completions, split at the first wrong
    token, or at the start of the first wrong line (step). `extra_*`: trained tokens whose advantage differs from the
    completion's GRPO advantage (TRL's formula on the same rewards). `abs_sum` / `zero_tokens`: Σ |A_t| and the
    trained tokens with A_t = 0, which tell how large an update each estimator asks for at a shared learning rate.
    `tokens` counts every real token, `trained_tokens` those in the loss mask (all of them unless the estimator
    returns a loss mask, e.g. SPO's probability mask: a token outside it is not trained, which is not zero credit).
    """

    neg_before_token: float = 0.0
    neg_after_token: float = 0.0
    neg_before_step: float = 0.0
    neg_after_step: float = 0.0
    extra_tokens: int = 0
    abs_sum: float = 0.0
    zero_tokens: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    failed: int = 0
    completions: int = 0
    correct: int = 0

    def as_dict(self) -> dict[str, float]:
        def share(a, b):
            return a / (a + b) if a + b > 0 else math.nan

        return {
            "neg_share_after_first_error_token": share(self.neg_after_token, self.neg_before_token),
            "neg_share_after_first_error_step": share(self.neg_after_step, self.neg_before_step),
            "extra_credit_token_frac": self.extra_tokens / self.trained_tokens if self.trained_tokens else math.nan,
            "mean_abs_advantage": self.abs_sum / self.trained_tokens if self.trained_tokens else math.nan,
            "zero_advantage_token_frac": self.zero_tokens / self.trained_tokens if self.trained_tokens else math.nan,
            "trained_token_frac": self.trained_tokens / self.tokens if self.tokens else math.nan,
            "train_reward_mean": self.correct / self.completions if self.completions else math.nan,
            "failed_completions": float(self.failed),
        }


def token_text(tokenizer, ids: Sequence[int]) -> tuple[str, list[int]]:
    """
    Text of a completion up to (not including) its first EOS, one character per token: the tokenizer is
    character-level, and special tokens inside the text become `"\\x00"` so positions stay aligned.
    Returns `(text, valid_ids)`.
    """
    eos = tokenizer.eos_token_id
    chars, kept = [], []
    for i in ids:
        if i == eos:
            break
        tok = tokenizer.convert_ids_to_tokens(int(i))
        chars.append(tok if tok is not None and len(tok) == 1 else "\x00")
        kept.append(int(i))
    return "".join(chars), kept


def loss_mask_of(out: dict[str, Any]) -> torch.Tensor:
    """The loss mask a trainer's batch hands to TRL's loss: `completion_mask * tool_mask` (an estimator's
    `CreditOutput.loss_mask` is multiplied into `tool_mask`), or `completion_mask` alone."""
    mask = out["completion_mask"]
    return mask if out.get("tool_mask") is None else mask * out["tool_mask"].to(mask.device)


def batch_credit(tokenizer, prompts: Sequence[str], completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                 advantages: torch.Tensor, num_generations: int,
                 loss_mask: torch.Tensor | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """
    Per completion of a training batch: reward, first wrong token and step, per-token advantages, which tokens are
    trained (`trained`: 1 where `loss_mask > 0`; default every real token), and the GRPO advantage the same rewards
    give. Used by the diagnostics and by the credit map.
    """
    from ..credit import compute_grpo_advantages

    ids = completion_ids.cpu()
    mask = completion_mask.cpu().float()
    adv = advantages.detach().cpu().float()
    if adv.dim() == 1:
        adv = adv[:, None].expand_as(mask)
    adv = adv[:, : mask.shape[1]] * mask
    trained = mask if loss_mask is None else ((loss_mask.detach().cpu().float()[:, : mask.shape[1]] > 0) * mask)
    rows = []
    for i in range(ids.shape[0]):
        terms = parse_prompt(prompts[i])
        text, _ = token_text(tokenizer, ids[i][mask[i] > 0].tolist())
        a = analyze(terms, text)
        rows.append({"terms": terms, "text": text, "analysis": a, "reward": float(a.correct)})
    rewards = torch.tensor([r["reward"] for r in rows])
    grpo = compute_grpo_advantages(rewards, num_generations, "group")
    for i, row in enumerate(rows):
        n = int(mask[i].sum())
        row["advantages"] = adv[i, :n].tolist()
        row["trained"] = [int(x) for x in trained[i, :n].tolist()]
        row["grpo_advantage"] = float(grpo[i])
        e = row["analysis"].first_error_char
        row["first_error_token"] = e if e is not None and e < n else None
        row["first_error_step_token"] = (
            row["text"].rfind("\n", 0, e) + 1 if row["first_error_token"] is not None else None
        )
    return rows


def accumulate(stats: CreditStats, rows: Sequence[dict[str, Any]]) -> None:
    for row in rows:
        adv = torch.tensor(row["advantages"])
        trained = torch.tensor(row.get("trained", [1] * adv.numel()), dtype=torch.bool)
        stats.completions += 1
        stats.correct += row["reward"] == 1.0
        stats.tokens += adv.numel()
        stats.trained_tokens += int(trained.sum())
        # the credit of the trained tokens only: a token outside the loss mask gets no update, not a zero advantage
        stats.extra_tokens += int((((adv - row["grpo_advantage"]).abs() > 1e-6) & trained).sum())
        stats.abs_sum += float(adv[trained].abs().sum())
        stats.zero_tokens += int(((adv == 0) & trained).sum())
        e = row["first_error_token"]
        if row["reward"] == 1.0 or e is None:
            continue
        stats.failed += 1
        neg = (-adv).clamp(min=0)
        stats.neg_before_token += float(neg[:e].sum())
        stats.neg_after_token += float(neg[e:].sum())
        s = row["first_error_step_token"]
        stats.neg_before_step += float(neg[:s].sum())
        stats.neg_after_step += float(neg[s:].sum())


class DemoTrainerMixin:
    """
    Put before a trl_credit trainer class: records credit diagnostics of every training batch, and replays
    `forced_completions` (once) instead of sampling, so that a fixed batch goes through the trainer's own rewards,
    values, estimator and token weights.
    """

    demo_stats: CreditStats | None = None
    demo_forced_completions: list[list[int]] | None = None

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        forced = self.demo_forced_completions
        if forced is not None:
            self.demo_forced_completions = None  # later calls (VinePPO's rollouts) sample from the policy
            if len(forced) != len(prompt_ids):
                raise ValueError(f"{len(forced)} forced completions for {len(prompt_ids)} prompts.")
            return [list(c) for c in forced], None
        return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations, has_tool_images)

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        if self.model.training and self.demo_stats is not None:
            prompts = [x["prompt"] for x in inputs]
            rows = batch_credit(self.processing_class, prompts, out["completion_ids"], out["completion_mask"],
                                out["advantages"], self.num_generations, loss_mask_of(out))  # fmt: skip
            accumulate(self.demo_stats, rows)
        return out

    def credit_of(self, prompts: Sequence[str], answers: Sequence[int], completions: Sequence[Sequence[int]]):
        """
        Run fixed `completions` (token ids incl. EOS) of `prompts` through the training-time credit path. A trainer
        that samples its group itself (`samples_own_group`: SPO-tree samples it as a tree, whose structure its credit
        needs) scores its own samples of the same prompts instead.
        """
        self.model.train()
        self.demo_forced_completions = None if samples_own_group(self) else [list(c) for c in completions]
        saved, self.demo_stats = self.demo_stats, None
        try:
            out = self._generate_and_score_completions([{"prompt": p, "answer": a} for p, a in zip(prompts, answers)])
        finally:
            self.demo_stats, self.demo_forced_completions = saved, None
        return out


def samples_own_group(trainer) -> bool:
    """Whether `trainer` samples the training group in its own structure (SPO-tree's tree), so that independently
    sampled completions cannot be scored by it: its credit map then shows its own samples of the same prompts."""
    return bool(getattr(trainer, "_spo_tree_enabled", False))


_DEMO_CLASSES: dict[type, type] = {}


def demo_trainer_class(base: type) -> type:
    if base not in _DEMO_CLASSES:
        _DEMO_CLASSES[base] = type(f"Demo{base.__name__}", (DemoTrainerMixin, base), {})
    return _DEMO_CLASSES[base]


# ── evaluation and timing ──────────────────────────────────────────────────────────────────────────────────────────
@dataclass
class EvalPoint:
    step: int
    train_time_s: float
    accuracy: float
    step_error_rate: float


class EvalCallback(TrainerCallback):
    """Times every optimizer step (generation, credit and update; evaluation excluded) and evaluates every k steps."""

    def __init__(self, evaluate: Callable[[Any], dict[str, float]], every: int, on_step: Callable[[], None] | None):
        self.evaluate = evaluate
        self.every = every
        self.on_step = on_step
        self.step_times: list[float] = []
        self.points: list[EvalPoint] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.step_times.append(time.perf_counter() - self._start)
        step = state.global_step
        if step % self.every == 0 or step == state.max_steps:
            stats = self.evaluate(model)
            self.points.append(EvalPoint(step, sum(self.step_times), stats["accuracy"], stats["step_error_rate"]))
        if self.on_step is not None:
            self.on_step()


@dataclass
class RunResult:
    """One estimator × seed."""

    estimator: str
    seed: int
    points: list[EvalPoint]
    step_times: list[float]
    credit: dict[str, float]
    wall_time_s: float
    probe: list[dict[str, Any]] | None = None
    probe_error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["points"] = [asdict(p) for p in self.points]
        return out


@dataclass
class Evaluator:
    """Accuracy and per-step error rate at the training temperature on a fixed problem set with a fixed seed."""

    tokenizer: Any
    problems: list[list[int]]
    temperature: float
    max_new_tokens: int
    samples: int = 1
    seed: int = 1234

    def __call__(self, model) -> dict[str, float]:
        completions = sample_completions(
            model, self.tokenizer, self.problems, temperature=self.temperature, max_new_tokens=self.max_new_tokens,
            seed=self.seed, num_samples=self.samples,
        )  # fmt: skip
        return policy_stats(self.problems, completions)


def run_one(
    name: str,
    preset: Preset,
    settings: RLSettings,
    *,
    seed: int,
    sft_path: str,
    train_problems: list[list[int]],
    evaluator: Evaluator,
    start_point: EvalPoint,
    max_completion_length: int,
    run_dir: str | Path,
    probe: dict[str, Any] | None = None,
    on_step: Callable[[], None] | None = None,
) -> RunResult:
    """Train one estimator for one seed from the starting policy; optionally score the probe batch at the end."""
    start = time.perf_counter()
    config = build_config(preset, settings, output_dir=str(run_dir), seed=seed,
                          max_completion_length=max_completion_length)  # fmt: skip
    _, trainer_cls = trainer_classes(preset)
    tokenizer = load_tokenizer(sft_path)
    callback = EvalCallback(evaluator, settings.eval_every, on_step)
    trainer = demo_trainer_class(trainer_cls)(
        model=sft_path,
        reward_funcs=chain_reward,
        args=config,
        train_dataset=rl_dataset(train_problems),
        processing_class=tokenizer,
        callbacks=[callback],
    )
    # The demo prints its own progress; TRL's per-step log dicts would flood the terminal.
    trainer.remove_callback(PrinterCallback)
    trainer.demo_stats = CreditStats()
    trainer.train()
    probe_rows, probe_error = None, None
    if probe is not None:
        try:
            torch.manual_seed(probe["seed"])
            out = trainer.credit_of(probe["prompts"], probe["answers"], probe["completion_ids"])
            probe_rows = batch_credit(tokenizer, probe["prompts"], out["completion_ids"], out["completion_mask"],
                                      out["advantages"], settings.num_generations, loss_mask_of(out))  # fmt: skip
            own = samples_own_group(trainer)
            for row in probe_rows:
                row["analysis"] = asdict(row["analysis"])
                row["own_samples"] = own
        except Exception as e:  # noqa: BLE001 - the training run stands; only this estimator's credit map is missing
            probe_error = f"{type(e).__name__}: {e}"
    return RunResult(
        estimator=name,
        seed=seed,
        points=[start_point] + callback.points,
        step_times=callback.step_times,
        credit=trainer.demo_stats.as_dict(),
        wall_time_s=time.perf_counter() - start,
        probe=probe_rows,
        probe_error=probe_error,
    )


def make_probe(model, tokenizer, problems: Sequence[Sequence[int]], *, num_generations: int, temperature: float,
               max_new_tokens: int, seed: int, groups: int = 2, candidates: int = 48) -> dict[str, Any]:  # fmt: skip
    """
    Groups of completions of the starting policy that the credit map shows under every estimator: the first `groups`
    of the `candidates` problems whose `num_generations` samples hold both right and wrong answers, preferring groups
    with slips on different lines; failing that, the most varied groups seen (a weak policy still gets a map).
    """
    eos = tokenizer.eos_token_id
    scored = []
    for k, terms in enumerate(problems[:candidates]):
        texts = sample_completions(model, tokenizer, [terms], temperature=temperature, max_new_tokens=max_new_tokens,
                                   seed=seed + k, num_samples=num_generations)[0]  # fmt: skip
        analyses = [analyze(terms, t) for t in texts]
        n_right = sum(a.correct for a in analyses)
        error_lines = len({a.first_error_step for a in analyses if not a.correct})
        score = (min(n_right, num_generations - n_right, 1), min(error_lines, 2), len(set(texts)))
        scored.append((score, k, list(terms), texts))
        if sum(s[0][:2] == (1, 2) for s in scored) >= groups:
            break
    best = sorted(scored, key=lambda s: (s[0], -s[1]), reverse=True)[:groups]
    best.sort(key=lambda s: s[1])
    probe: dict[str, Any] = {"prompts": [], "answers": [], "completion_ids": [], "seed": seed}
    for _, _, terms, texts in best:
        probe["prompts"] += [prompt_text(terms)] * len(texts)
        probe["answers"] += [sum(terms)] * len(texts)
        # as the trainer's generation returns them: EOS included when emitted, never longer than max_new_tokens (a
        # sample cut at the budget has no EOS; one past the budget would leave its last state no token budget)
        probe["completion_ids"] += [(tokenizer(t, add_special_tokens=False)["input_ids"] + [eos])[:max_new_tokens]
                                    for t in texts]  # fmt: skip
    return probe
