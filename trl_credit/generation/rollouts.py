r"""
Monte-Carlo rollouts from step states: VinePPO's value estimator ([VinePPO](https://huggingface.co/papers/2410.01679)).

For every unique state `s` (the prompt plus a token prefix of a sampled completion, cut at a step boundary), sample
`K` continuations with the training policy and sampling parameters, score `prefix + continuation` with the reward
functions, and average: $\hat V(s) = \frac1K \sum_j r_j$, unbiased with variance $V(1-V)/K$ for 0/1 rewards.

Three pieces, so that the same engine runs inside the trainer, in the tests and in the benchmark:

- `VinePlan`: which states to estimate (deduplicated by token-id tuple, so the prompt state is estimated once per
  group), their budgets `max_completion_length − prefix_length`, the free samples of tree reuse, and how the
  per-state statistics become per-row values `(N, S)`.
- `run_mc_rollouts`: one or two rounds (adaptive K) of generation. Every rank gets an equal share of each backend
  call (padded with copies of a real request whose results are dropped) and makes the same number of calls and
  collectives; the statistics are gathered once per round.
- Backends: `TransformersRolloutBackend` (TRL's `_generate_single_turn`, budget buckets, row chunks),
  `VLLMColocateRolloutBackend` (one `llm.generate` call with a per-request budget), `TRLVLLMRolloutBackend` (TRL's
  vLLM path: server mode, or colocate with sleep mode / tensor parallelism; equal-length request lists on every rank).

The same backends sample SPO-tree's groups ([SPO](https://huggingface.co/papers/2505.23564)): `run_tree_rollouts`
grows one tree per prompt level by level (`b_d` continuations of every open node, `M` tokens per inner level), with
the same per-process contract, and returns `TreeRollouts` (nodes, leaves, the slots of replicated early leaves, and
the sampling log-probs that `RolloutBackend.generate_with_logprobs` reports for vLLM).

Cost-cutting options (off by default, paper-faithful K = 9 at every boundary):

- **tree reuse**: the group's completions that pass through `s` are samples from `π(·|s)` too; each row's value
  uses them leave-one-out (a completion never enters its own baseline), and only `max(0, K − free)` rollouts are
  sampled;
- **adaptive K**: sample `k` rollouts first, stop when they agree, otherwise sample the other `K − k`. For 0/1 rewards
  the bias is $\frac{K-k}{K} V(1-V)\,(V^{k-1} - (1-V)^{k-1})$ (towards the nearer extreme; ≤ 0.064 for K = 9, k = 3);
- **sparse boundaries**: estimate every `m`-th state, interpolate the rest (`trl_credit.credit.vineppo`).

Deviations from the official code: states are token-id prefixes, never re-tokenized text; the continuation budget
is `max_completion_length − prefix_length` (the official code allows up to 1024 new tokens from any prefix); a
continuation is truncated when it reaches its budget without EOS, and gets `vine_truncation_penalty` (0, as the
official unfinished-response penalty).

Notation: `N` completions, `G` group size, `K` rollouts per state, `M` unique states, `W` processes.
"""

from __future__ import annotations

import abc
import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..credit.spo_tree import tree_slot_leaves


def _noop(*args, **kwargs) -> None:
    return None


def adaptive_k_bias(value: float, num_rollouts: int, first_round: int) -> float:
    r"""
    Exact bias `E[V̂] − V` of adaptive K for 0/1 rewards: `k = first_round` rollouts, stop when they agree, else `K`.

    $$\mathrm{bias}(V) = \frac{K-k}{K}\, V(1-V)\left(V^{k-1} - (1-V)^{k-1}\right)$$

    Example:
    ```python
    >>> round(max(adaptive_k_bias(v / 1000, 9, 3) for v in range(1001)), 3)
    0.064
    ```
    """
    v, K, k = value, num_rollouts, first_round
    if k >= K:
        return 0.0
    return (K - k) / K * v * (1 - v) * (v ** (k - 1) - (1 - v) ** (k - 1))


# ── the plan: unique states, budgets, free samples ─────────────────────────────────────────────────────────────────
@dataclass
class MCState:
    """
    One unique state to estimate.

    Attributes:
        prefix_ids: prompt ids followed by the completion prefix (what the backend continues).
        completion_prefix: the completion part of the prefix (continuations are appended to it for scoring).
        source_row: a row whose prompt and reward inputs score the state's rollouts.
        budget: new-token budget `max_completion_length − len(completion_prefix)`.
        num_rollouts: continuations to sample (`K`, or `K − free samples` with tree reuse).
        members: rows that pass through the state (tree reuse), with their sample values.
    """

    prefix_ids: list[int]
    completion_prefix: list[int]
    source_row: int
    budget: int
    num_rollouts: int
    members: list[int] = field(default_factory=list)


class VinePlan:
    """
    The unique states of a batch and how their Monte-Carlo statistics become per-row state values.

    Args:
        prompt_ids (`Sequence[Sequence[int]]`): `N` prompts as token ids.
        completion_ids (`Sequence[Sequence[int]]`): `N` completions (real tokens, EOS included).
        boundaries (`Sequence[Sequence[int]]`): token boundaries `[0 = b_0 < … < b_S = T_i]` of each row (`[0]` for a
            row that needs no values).
        estimated (`torch.Tensor` of shape `(N, S)`, bool): the states to estimate (`estimated_state_mask`).
        rewards (`torch.Tensor` of shape `(N,)`): outcome rewards (`NaN` = unscorable; used by tree reuse).
        group_keys (`Sequence`): one hashable per row; rows with equal keys share a prompt and reward inputs, so their
            identical prefixes are one state (the trainer gives the group index, merged for repeated prompts).
        max_completion_length (`int`): the training horizon; continuation budget = horizon − prefix length.
        num_rollouts (`int`): `K`.
        tree_reuse (`bool`, *optional*): use the completions through a state as leave-one-out free samples.
        truncation_penalty (`float`, *optional*): value of a sample that hit the horizon without EOS.
        eos_token_ids (`Sequence[int]`, *optional*): to tell truncated completions for tree reuse.
    """

    def __init__(
        self,
        prompt_ids: Sequence[Sequence[int]],
        completion_ids: Sequence[Sequence[int]],
        boundaries: Sequence[Sequence[int]],
        estimated: torch.Tensor,
        rewards: torch.Tensor,
        group_keys: Sequence,
        *,
        max_completion_length: int,
        num_rollouts: int,
        tree_reuse: bool = False,
        truncation_penalty: float = 0.0,
        eos_token_ids: Sequence[int] = (),
    ):
        N, S = estimated.shape
        self.num_rows, self.num_columns = N, S
        self.num_rollouts = num_rollouts
        self.tree_reuse = tree_reuse
        eos = set(eos_token_ids)
        rewards = rewards.tolist()
        # A completion's own sample of the value of any state it passes through (tree reuse).
        self.sample_values = [
            math.nan
            if r != r
            else (truncation_penalty if len(c) >= max_completion_length and (not c or c[-1] not in eos) else r)
            for r, c in zip(rewards, completion_ids)
        ]
        self.states: list[MCState] = []
        self.row_states: list[list[int]] = [[-1] * S for _ in range(N)]
        index: dict[tuple, int] = {}
        est = estimated.tolist()
        for i in range(N):
            b = boundaries[i]
            comp = list(completion_ids[i])
            for k in range(min(S, len(b) - 1)):
                if not est[i][k]:
                    continue
                prefix = comp[: b[k]]
                key = (group_keys[i], tuple(prefix))
                if key not in index:
                    index[key] = len(self.states)
                    self.states.append(
                        MCState(
                            prefix_ids=list(prompt_ids[i]) + prefix,
                            completion_prefix=prefix,
                            source_row=i,
                            budget=max_completion_length - len(prefix),
                            num_rollouts=num_rollouts,
                        )
                    )
                self.row_states[i][k] = index[key]
        if any(s.budget < 1 for s in self.states):
            raise ValueError(
                "A step state leaves no token budget (its prefix is max_completion_length long); the last step's "
                "state is never estimated, so the boundaries passed to VinePlan are inconsistent."
            )
        if tree_reuse:
            by_key: dict = {}
            for j in range(N):
                by_key.setdefault(group_keys[j], []).append(j)
            for key, s in index.items():
                state = self.states[s]
                L = len(state.completion_prefix)
                state.members = [
                    j
                    for j in by_key[key[0]]
                    if self.sample_values[j] == self.sample_values[j]  # scorable
                    and len(completion_ids[j]) > L
                    and list(completion_ids[j][:L]) == state.completion_prefix
                ]
                # Leave-one-out: a row through the state sees the other members only.
                state.num_rollouts = max(0, num_rollouts - max(len(state.members) - 1, 0))

    @property
    def num_states(self) -> int:
        return len(self.states)

    def row_values(self, value_sum: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """
        Per-row state values `(N, S)` from per-state rollout sums and counts `(M,)`; `NaN` where not estimated (or
        no scorable sample). With tree reuse, row `i` adds the members of the state other than itself.
        """
        out = torch.full((self.num_rows, self.num_columns), math.nan, dtype=torch.float64)
        sums, counts = value_sum.tolist(), count.tolist()
        for i, states in enumerate(self.row_states):
            for k, s in enumerate(states):
                if s < 0:
                    continue
                total, n = sums[s], counts[s]
                if self.tree_reuse:
                    for j in self.states[s].members:
                        if j != i:
                            total += self.sample_values[j]
                            n += 1
                out[i, k] = total / n if n > 0 else math.nan
        return out


# ── the engine ─────────────────────────────────────────────────────────────────────────────────────────────────────
class Collective:
    """Single-process stand-in for the collectives the engine needs (the trainer passes an accelerate-backed one)."""

    rank = 0
    world = 1
    is_main = True

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """`(M, C)` on every rank → `(W, M, C)`."""
        return tensor[None]


class AccelerateCollective(Collective):
    """Collectives through an `accelerate.Accelerator` (gloo on CPU, NCCL on GPU)."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.rank = accelerator.process_index
        self.world = accelerator.num_processes
        self.is_main = accelerator.is_main_process

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return tensor[None]
        gathered = self.accelerator.gather(tensor.to(self.accelerator.device).contiguous())
        return gathered.view(self.world, *tensor.shape).cpu()


@dataclass
class RolloutStats:
    """
    What the rollouts produced, summed over processes.

    Attributes:
        value_sum, count, truncated, rollouts, generated_tokens (`torch.Tensor` of shape `(M,)`): per state, the sum
            of scorable rollout values, their number, the rollouts that hit their budget, all rollouts, and the tokens
            the backend decoded for the state.
        backend_calls (`int`): generation calls per process.
        rounds (`int`): 1, or 2 with adaptive K when some state disagreed.
        stopped_early (`int`): states that adaptive K stopped after the first round.
    """

    value_sum: torch.Tensor
    count: torch.Tensor
    truncated: torch.Tensor
    rollouts: torch.Tensor
    generated_tokens: torch.Tensor
    backend_calls: int = 0
    rounds: int = 0
    stopped_early: int = 0

    @property
    def values(self) -> torch.Tensor:
        """`(M,)` plain MC means (no free samples), `NaN` where nothing was scorable."""
        mean = self.value_sum / self.count.clamp(min=1)
        return torch.where(self.count > 0, mean, torch.full_like(self.count, math.nan))


class RolloutBackend(abc.ABC):
    """
    Generates continuations of token-id prefixes with the training policy.

    `generate(prefixes, budgets, call_budget)` returns one continuation (token ids, stopping after the first EOS) per
    prefix. Backends with `per_request_budgets` honour each budget; the others generate up to `call_budget`, the same
    on every process, and the engine cuts each continuation to its own budget (exact: sampling is left to right).
    The engine calls the backend equally often with equally long lists on every process, so collective backends
    (vLLM server, ZeRO-3/FSDP generation) are safe. `max_rows_per_call` bounds a call's rows per process;
    `bucket_ratio` groups budgets into calls whose smallest budget is at least that fraction of the largest
    (0 = one call).
    """

    per_request_budgets: bool = False
    max_rows_per_call: int | None = None
    bucket_ratio: float = 0.0

    @abc.abstractmethod
    def generate(self, prefixes: list[list[int]], budgets: list[int], call_budget: int) -> list[list[int]]:
        """Continuations (token ids, EOS included) of each prefix, sampled with the training parameters."""

    def generate_with_logprobs(
        self, prefixes: list[list[int]], budgets: list[int], call_budget: int
    ) -> tuple[list[list[int]], list[list[float]] | None]:
        """`generate`, plus the sampling log-probability of every continuation token where the backend reports one
        (vLLM); `None` otherwise (`model.generate`, which reports none)."""
        return self.generate(prefixes, budgets, call_budget), None


def _plan_calls(budgets: list[int], backend: RolloutBackend, world: int) -> list[list[int]]:
    """Global flat rollout indices of each backend call: budgets sorted descending, bucketed and chunked."""
    order = sorted(range(len(budgets)), key=lambda f: -budgets[f])
    buckets: list[list[int]] = []
    if backend.per_request_budgets or backend.bucket_ratio <= 0:
        buckets = [order] if order else []
    else:
        for f in order:
            if buckets and budgets[f] >= backend.bucket_ratio * budgets[buckets[-1][0]]:
                buckets[-1].append(f)
            else:
                buckets.append([f])
    if backend.max_rows_per_call is None:
        return buckets
    chunk = backend.max_rows_per_call * world
    return [bucket[a : a + chunk] for bucket in buckets for a in range(0, len(bucket), chunk)]


def _share(items: list[int], rank: int, world: int) -> list[int]:
    """Balanced contiguous share of `items` for `rank` (sizes differ by at most one)."""
    q, rem = divmod(len(items), world)
    start = rank * q + min(rank, rem)
    return items[start : start + q + (1 if rank < rem else 0)]


def run_mc_rollouts(
    plan: VinePlan,
    backend: RolloutBackend,
    score: Callable[[list[int], list[list[int]]], list[float]],
    *,
    eos_token_ids: Sequence[int],
    truncation_penalty: float = 0.0,
    adaptive_k_min: int | None = None,
    collective: Collective | None = None,
    progress: bool = False,
) -> RolloutStats:
    """
    Sample and score the plan's rollouts (one round, or two with adaptive K).

    Args:
        plan ([`VinePlan`]): the states, their budgets and rollout counts (the same on every process).
        backend ([`RolloutBackend`]): generation.
        score (`Callable`): `score(state_indices, full_completion_ids) -> rewards` for this process's rollouts
            (`prefix completion + continuation`); `NaN` = unscorable. Called once per backend call, on the calling
            thread.
        eos_token_ids (`Sequence[int]`): end-of-sequence ids (a continuation stops after the first one).
        truncation_penalty (`float`, *optional*): value of a continuation that reached its budget without EOS.
        adaptive_k_min (`int`, *optional*): first-round rollouts per state with adaptive K; `None` = off.
        collective ([`Collective`], *optional*): rank, world size and a gather; single process when omitted.
        progress (`bool`, *optional*): show a progress bar on the main process once rollouts last over 5 s.

    Returns:
        [`RolloutStats`] summed over processes (identical on every process).
    """
    collective = collective or Collective()
    M = plan.num_states
    eos = set(eos_token_ids)
    # columns: sum, count, truncated, rollouts, generated tokens, min, max
    totals = [[0.0, 0.0, 0.0, 0.0, 0.0, math.inf, -math.inf] for _ in range(M)]
    calls = rounds = stopped = 0
    wanted = [s.num_rollouts for s in plan.states]
    first = [min(adaptive_k_min, n) if adaptive_k_min is not None else n for n in wanted]

    bar = None
    if progress and collective.is_main and sum(wanted) > 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(first), desc="VinePPO rollouts", unit="rollout", delay=5.0, leave=False)

    def run_round(counts: list[int]) -> None:
        nonlocal calls
        flat = [s for s, n in enumerate(counts) for _ in range(n)]
        budgets = [plan.states[s].budget for s in flat]
        local = [[0.0, 0.0, 0.0, 0.0, 0.0, math.inf, -math.inf] for _ in range(M)]
        for call in _plan_calls(budgets, backend, collective.world):
            mine = _share(call, collective.rank, collective.world)
            size = math.ceil(len(call) / collective.world)
            # Equal-length lists on every process (server mode slices the gathered list by rank); pads are copies of
            # a real request whose results are dropped.
            padded = mine + [mine[-1] if mine else call[0]] * (size - len(mine))
            call_budget = max(budgets[f] for f in call)
            conts = backend.generate(
                [plan.states[flat[f]].prefix_ids for f in padded], [budgets[f] for f in padded], call_budget
            )
            calls += 1
            if len(conts) != len(padded):
                raise RuntimeError(f"The rollout backend returned {len(conts)} continuations for {len(padded)} inputs.")
            conts = conts[: len(mine)]
            states = [flat[f] for f in mine]
            to_score, to_score_idx, values = [], [], [0.0] * len(mine)
            for r, (s, cont) in enumerate(zip(states, conts)):
                cont = list(cont)
                local[s][4] += len(cont)
                cut = next((p + 1 for p, t in enumerate(cont) if t in eos), len(cont))
                cont = cont[: min(cut, plan.states[s].budget)]
                truncated = len(cont) >= plan.states[s].budget and (not cont or cont[-1] not in eos)
                local[s][3] += 1
                if truncated:
                    local[s][2] += 1
                    values[r] = truncation_penalty
                else:
                    to_score.append(plan.states[s].completion_prefix + cont)
                    to_score_idx.append(r)
            if to_score:
                scored = score([states[r] for r in to_score_idx], to_score)
                if len(scored) != len(to_score):
                    raise RuntimeError(f"score returned {len(scored)} rewards for {len(to_score)} completions.")
                for r, v in zip(to_score_idx, scored):
                    values[r] = math.nan if v is None else float(v)
            for s, v in zip(states, values):
                if v == v:
                    row = local[s]
                    row[0] += v
                    row[1] += 1
                    row[5] = min(row[5], v)
                    row[6] = max(row[6], v)
            if bar is not None:
                bar.update(len(call))
        gathered = collective.gather(torch.tensor(local, dtype=torch.float64).view(M, 7))  # one collective per round
        for rank_rows in gathered.tolist():
            for total, row in zip(totals, rank_rows):
                for c in range(5):
                    total[c] += row[c]
                total[5], total[6] = min(total[5], row[5]), max(total[6], row[6])

    with torch.no_grad():
        run_round(first)
        rounds = 1
        if adaptive_k_min is not None:
            agreed = [t[1] == t[3] and t[5] == t[6] for t in totals]
            second = [
                0 if agreed[s] or wanted[s] <= first[s] else wanted[s] - first[s] for s in range(M)
            ]
            stopped = sum(1 for s in range(M) if wanted[s] > first[s] and agreed[s])
            if any(second):
                if bar is not None:
                    bar.total += sum(second)
                    bar.refresh()
                run_round(second)
                rounds = 2
    if bar is not None:
        bar.close()
    result = torch.tensor(totals, dtype=torch.float64).view(M, 7)
    return RolloutStats(
        value_sum=result[:, 0],
        count=result[:, 1],
        truncated=result[:, 2],
        rollouts=result[:, 3],
        generated_tokens=result[:, 4],
        backend_calls=calls,
        rounds=rounds,
        stopped_early=stopped,
    )


# ── backends ───────────────────────────────────────────────────────────────────────────────────────────────────────
@contextlib.contextmanager
def _max_new_tokens(trainer, n: int):
    """Temporarily set the generation budget TRL's `_generate_single_turn` uses, in every backend."""
    if trainer.use_vllm:
        vg = trainer.vllm_generation
        old = vg.max_completion_length
        vg.max_completion_length = n
        try:
            yield
        finally:
            vg.max_completion_length = old
    else:
        old = (trainer.generation_config.max_new_tokens, trainer.generation_kwargs.get("max_new_tokens"))
        trainer.generation_config.max_new_tokens = n
        trainer.generation_kwargs["max_new_tokens"] = n
        try:
            yield
        finally:
            trainer.generation_config.max_new_tokens = old[0]
            trainer.generation_kwargs["max_new_tokens"] = old[1]


class TransformersRolloutBackend(RolloutBackend):
    """
    `model.generate` through TRL's `_generate_single_turn` (unwrapping, DeepSpeed/FSDP gathering, EOS masking and
    the training sampling parameters come from TRL). One budget per call, so budgets are bucketed (each call's
    smallest budget ≥ half its largest) and calls hold at most `max_rows` rows per process.
    """

    bucket_ratio = 0.5

    def __init__(self, trainer, max_rows: int):
        self.trainer = trainer
        self.max_rows_per_call = max_rows

    def generate(self, prefixes, budgets, call_budget):
        with _max_new_tokens(self.trainer, call_budget), torch.no_grad():
            completion_ids, _ = self.trainer._generate_single_turn(prefixes, None, {}, 1)
        return completion_ids

    def generate_with_logprobs(self, prefixes, budgets, call_budget):
        with _max_new_tokens(self.trainer, call_budget), torch.no_grad():
            return self.trainer._generate_single_turn(prefixes, None, {}, 1)


class TRLVLLMRolloutBackend(RolloutBackend):
    """
    TRL's vLLM path (`_generate_single_turn` → `VLLMGeneration.generate`) with one entry per rollout
    (`num_generations=1`; vLLM's prefix cache shares the prefill of repeated prefixes). Server mode gathers the
    lists of all processes and slices the answers by `rank × len(list)`, hence equal lengths; budgets are bucketed.
    Colocate mode with sleep mode or tensor parallelism takes everything in one call (each call re-pushes the
    weights with sleep mode).
    """

    def __init__(self, trainer):
        self.trainer = trainer
        self.bucket_ratio = 0.5 if trainer.vllm_generation.mode == "server" else 0.0

    def generate(self, prefixes, budgets, call_budget):
        with _max_new_tokens(self.trainer, call_budget), torch.no_grad():
            completion_ids, _ = self.trainer._generate_single_turn(prefixes, None, {}, 1)
        return completion_ids

    def generate_with_logprobs(self, prefixes, budgets, call_budget):
        with _max_new_tokens(self.trainer, call_budget), torch.no_grad():
            return self.trainer._generate_single_turn(prefixes, None, {}, 1)


class VLLMColocateRolloutBackend(RolloutBackend):
    """
    One `llm.generate` call on the colocated engine with a budget per request (`SamplingParams(n=k,
    max_tokens=budget)` for each run of identical prefixes), with the training sampling parameters. Only with sleep
    mode off (a sleeping engine holds no weights) and tensor parallelism 1 (TP ranks must send identical lists).
    """

    per_request_budgets = True

    def __init__(self, trainer):
        vg = trainer.vllm_generation
        if vg.mode != "colocate" or vg.enable_sleep_mode or vg.tensor_parallel_size != 1:
            raise ValueError("VLLMColocateRolloutBackend needs colocate mode, sleep mode off and tensor parallel 1.")
        self.trainer = trainer

    def generate(self, prefixes, budgets, call_budget):
        return self._sample(prefixes, budgets, logprobs=False)[0]

    def generate_with_logprobs(self, prefixes, budgets, call_budget):
        return self._sample(prefixes, budgets, logprobs=True)

    def _sample(self, prefixes, budgets, logprobs: bool):
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        trainer = self.trainer
        vg = trainer.vllm_generation
        # The group's generation synced the weights for this step already; this mirrors TRL's guard.
        if trainer.state.global_step != trainer._last_loaded_step:
            vg.sync_weights()
            trainer._last_loaded_step = trainer.state.global_step
        base = {
            "repetition_penalty": vg.repetition_penalty,
            "temperature": vg.temperature,
            "top_p": vg.top_p,
            "top_k": vg.top_k,
            "min_p": 0.0 if vg.min_p is None else vg.min_p,
        }
        base.update(vg.generation_kwargs)
        if logprobs:
            base["logprobs"] = 0  # the sampled token's log-prob only (in the engine's logprobs mode, as TRL's calls)
        if vg.structured_outputs_regex is not None:
            base["structured_outputs"] = StructuredOutputsParams(regex=vg.structured_outputs_regex)
        elif isinstance(base.get("structured_outputs"), dict):
            base["structured_outputs"] = StructuredOutputsParams(**base["structured_outputs"])
        requests, params, runs = [], [], []
        f = 0
        while f < len(prefixes):
            g = f
            while g < len(prefixes) and prefixes[g] == prefixes[f] and budgets[g] == budgets[f]:
                g += 1
            requests.append({"prompt_token_ids": list(prefixes[f])})
            params.append(SamplingParams(**{**base, "n": g - f, "max_tokens": budgets[f]}))
            runs.append(g - f)
            f = g
        with torch.no_grad():
            outputs = vg.llm.generate(requests, sampling_params=params, use_tqdm=False)
        conts, logps = [], []
        for out, n in zip(outputs, runs):
            if len(out.outputs) != n:
                raise RuntimeError(f"vLLM returned {len(out.outputs)} samples for a request with n={n}.")
            conts.extend(list(o.token_ids) for o in out.outputs)
            if logprobs:
                for o in out.outputs:
                    if o.logprobs is None:
                        raise RuntimeError("vLLM returned no log-probs although they were requested.")
                    logps.append([float(lp[t].logprob) for t, lp in zip(o.token_ids, o.logprobs)])
        return conts, (logps if logprobs else None)


@contextlib.contextmanager
def widen_vllm_max_num_seqs(factor: int):
    """
    While active, TRL's `GRPOTrainer` builds its colocated vLLM engine with `factor` times the concurrent sequences
    (`max_num_seqs`) it would use. The KV cache size does not change; vLLM only schedules more sequences at once.
    """
    import trl.trainer.grpo_trainer as grpo_module

    base = grpo_module.VLLMGeneration

    class WideVLLMGeneration(base):
        def __init__(self, *args, max_num_seqs: int, **kwargs):
            super().__init__(*args, max_num_seqs=max_num_seqs * factor, **kwargs)

    grpo_module.VLLMGeneration = WideVLLMGeneration
    try:
        yield
    finally:
        grpo_module.VLLMGeneration = base


def make_rollout_backend(trainer, max_rows: int | None = None) -> RolloutBackend:
    """The rollout backend matching the trainer's generation backend."""
    if trainer.use_vllm:
        vg = trainer.vllm_generation
        if vg.mode == "colocate" and not vg.enable_sleep_mode and vg.tensor_parallel_size == 1:
            return VLLMColocateRolloutBackend(trainer)
        return TRLVLLMRolloutBackend(trainer)
    if max_rows is None:
        max_rows = trainer.args.per_device_train_batch_size * trainer.args.steps_per_generation
    return TransformersRolloutBackend(trainer, max_rows)


# ── tree rollouts (SPO-tree) ───────────────────────────────────────────────────────────────────────────────────────
@dataclass
class TreeNode:
    """
    One node of a sampled tree: the segment (token ids) its parent's state was continued with.

    Attributes:
        token_ids: the segment's tokens (EOS included when it ended there).
        logprobs: the sampling log-probability of each token (`None` when the backend reports none).
        leaf: the node is not expanded (EOS, a stop, the horizon, or the last level).
        truncated: a leaf that reached `max_completion_length` without EOS.
    """

    token_ids: list[int]
    logprobs: list[float] | None
    leaf: bool
    truncated: bool = False


@dataclass
class TreeRollouts:
    r"""
    The trees sampled by `run_tree_rollouts`, one per prompt (identical on every process).

    A node is addressed by its path (child index per level, from the root's children). The completions of a prompt
    are its `Π_d b_d` *slots* in lexicographic path order; a leaf above the last level fills every slot of its subtree
    (replication, `trl_credit.credit.spo_tree.tree_slot_leaves`).

    Attributes:
        shape (`tuple[int, ...]`): `(b_0, …, b_{D−1})`.
        segment_tokens (`int`): `M`, the tokens of every non-final segment.
        nodes (`list[dict[tuple[int, ...], TreeNode]]`): per prompt, every node by path.
        generated_tokens (`int`): tokens of all segments (what the backends decoded, cut after EOS), all processes.
        backend_calls (`int`): generation calls per process.
    """

    shape: tuple[int, ...]
    segment_tokens: int
    nodes: list[dict[tuple[int, ...], TreeNode]]
    generated_tokens: int = 0
    backend_calls: int = 0

    @property
    def num_slots(self) -> int:
        return math.prod(self.shape)

    def leaves(self, prompt: int) -> list[tuple[int, ...]]:
        """The paths of the prompt's leaves, in lexicographic order."""
        return sorted(path for path, node in self.nodes[prompt].items() if node.leaf)

    def slot_paths(self, prompt: int) -> list[tuple[int, ...]]:
        """The leaf path of each of the prompt's `Π_d b_d` slots (replication)."""
        leaves = self.leaves(prompt)
        return [leaves[i] for i in tree_slot_leaves(leaves, self.shape)]

    def completion(self, prompt: int, path: Sequence[int]) -> tuple[list[int], list[float] | None, list[int]]:
        """`(token ids, log-probs or None, segment lengths)` of the completion from the root to the node `path`."""
        ids: list[int] = []
        logps: list[float] | None = []
        lengths = []
        for d in range(1, len(path) + 1):
            node = self.nodes[prompt][tuple(path[:d])]
            ids += node.token_ids
            lengths.append(len(node.token_ids))
            logps = None if logps is None or node.logprobs is None else logps + node.logprobs
        return ids, logps, lengths


def validate_tree_shape(shape: Sequence[int], segment_tokens: int, max_completion_length: int) -> tuple[int, ...]:
    """The tree shape as a tuple, or a `ValueError` naming the problem: every level needs `b_d ≥ 1` children and the
    last level needs at least one token of budget, `(D − 1)·M < max_completion_length`."""
    shape = tuple(shape)
    if not shape or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in shape):
        raise ValueError(f"spo_tree_shape must be a non-empty list of integers >= 1 (children per level), got {shape}.")
    if isinstance(segment_tokens, bool) or not isinstance(segment_tokens, int) or segment_tokens < 1:
        raise ValueError(f"spo_tree_segment_tokens must be an integer >= 1, got {segment_tokens!r}.")
    D = len(shape)
    if (D - 1) * segment_tokens >= max_completion_length:
        raise ValueError(
            f"spo_tree_shape {list(shape)} has {D} levels of spo_tree_segment_tokens={segment_tokens} tokens: the "
            f"first {D - 1} levels alone take {(D - 1) * segment_tokens} tokens, which leaves no budget for the last "
            f"level within max_completion_length={max_completion_length}. Need (levels − 1) × "
            "spo_tree_segment_tokens < max_completion_length: use fewer levels, shorter segments or a longer "
            "max_completion_length."
        )
    return shape


def _gather_continuations(
    prefixes: list[list[int]],
    budget: int,
    backend: RolloutBackend,
    collective: Collective,
    eos: set[int],
    logprobs: bool,
    bar,
) -> tuple[list[list[int]], list[list[float]] | None, int]:
    """Continue every prefix once with the same budget, an equal share per process; every process gets all results
    (token ids cut after the first EOS and at the budget, and their log-probs). Returns `(ids, logps, calls)`."""
    R = len(prefixes)
    ids_out: list[list[int] | None] = [None] * R
    lps_out: list[list[float] | None] = [None] * R
    calls = 0
    world, rank = collective.world, collective.rank
    for call in _plan_calls([budget] * R, backend, world):
        mine = _share(call, rank, world)
        size = math.ceil(len(call) / world)
        # Equal-length lists on every process (server mode slices the gathered list by rank); pads are copies of a
        # real request whose results are dropped.
        padded = mine + [mine[-1] if mine else call[0]] * (size - len(mine))
        conts, logps = backend.generate_with_logprobs([prefixes[f] for f in padded], [budget] * size, budget)
        calls += 1
        if len(conts) != size or (logps is not None and len(logps) != size):
            raise RuntimeError(f"The rollout backend returned {len(conts)} continuations for {size} inputs.")
        if logprobs and logps is None:
            raise RuntimeError(
                "The rollout backend returned no sampling log-probs, which the trainer needs with vLLM (importance "
                "sampling correction, SPO cutpoints from the sampling log-probs)."
            )
        ids_t = torch.full((size, budget + 1), -1, dtype=torch.long)  # column 0: length
        lps_t = torch.full((size, budget), math.nan, dtype=torch.float32)
        for r, cont in enumerate(conts):
            cont = list(cont)
            cut = next((p + 1 for p, t in enumerate(cont) if t in eos), len(cont))
            n = min(cut, budget)
            ids_t[r, 0] = n
            ids_t[r, 1 : n + 1] = torch.tensor(cont[:n], dtype=torch.long)
            if logprobs:
                lp = [math.nan if x is None else float(x) for x in logps[r][:n]]
                lps_t[r, : len(lp)] = torch.tensor(lp, dtype=torch.float32)
        all_ids = collective.gather(ids_t)  # (W, size, budget + 1)
        all_lps = collective.gather(lps_t) if logprobs else None
        for w in range(world):
            for j, f in enumerate(_share(call, w, world)):
                n = int(all_ids[w, j, 0])
                ids_out[f] = all_ids[w, j, 1 : n + 1].tolist()
                lps_out[f] = all_lps[w, j, :n].tolist() if logprobs else None
        if bar is not None:
            bar.update(len(call))
    return ids_out, (lps_out if logprobs else None), calls


def run_tree_rollouts(
    prompt_ids: Sequence[Sequence[int]],
    shape: Sequence[int],
    segment_tokens: int,
    max_completion_length: int,
    backend: RolloutBackend,
    *,
    eos_token_ids: Sequence[int],
    collective: Collective | None = None,
    logprobs: bool = False,
    progress: bool = False,
) -> TreeRollouts:
    r"""
    Sample one tree per prompt, level by level: level `d` continues every open node `b_d` times, with a budget of `M`
    tokens for `d < D − 1` and `max_completion_length − (D−1)·M` for the last level. A child that ends with EOS,
    stops short of its budget or reaches `max_completion_length` is a leaf; a child of exactly `M` tokens without EOS
    is expanded at the next level. SPO-tree's sampler ([SPO](https://huggingface.co/papers/2505.23564) §5.1, spec
    §9.3), a sibling of `run_mc_rollouts` with the same backends and the same per-process contract: every process
    passes the same prompts, makes the same calls with equal-length request lists (an equal share of every level) and
    ends with the same trees (one gather per call).

    Args:
        prompt_ids (`Sequence[Sequence[int]]`): one prompt per tree, as token ids (the same list on every process).
        shape (`Sequence[int]`): `(b_0, …, b_{D−1})`, children per node at each level.
        segment_tokens (`int`): `M`, new tokens per non-final segment.
        max_completion_length (`int`): the horizon `L` of a root-to-leaf completion; `(D−1)·M < L`.
        backend ([`RolloutBackend`]): generation with the training policy and sampling parameters.
        eos_token_ids (`Sequence[int]`): a continuation ends after the first of them.
        collective ([`Collective`], *optional*): rank, world size and a gather; single process when omitted.
        logprobs (`bool`, *optional*): keep the sampling log-probs (the backend must report them: vLLM).
        progress (`bool`, *optional*): a progress bar on the main process once sampling lasts over 5 s.

    Returns:
        [`TreeRollouts`].

    Cost (no early leaf): `M·Σ_{d<D−1} Π_{j≤d} b_j + Π_d b_d·(L − (D−1)M)` tokens per tree, at most `L` per slot.
    """
    collective = collective or Collective()
    shape = validate_tree_shape(shape, segment_tokens, max_completion_length)
    D, M, L = len(shape), segment_tokens, max_completion_length
    eos = set(eos_token_ids)
    P = len(prompt_ids)
    nodes: list[dict[tuple[int, ...], TreeNode]] = [{} for _ in range(P)]
    prefix: dict[tuple[int, tuple[int, ...]], list[int]] = {(p, ()): [] for p in range(P)}
    open_nodes = [(p, ()) for p in range(P)]
    generated = calls = 0

    bar = None
    if progress and collective.is_main and P:
        from tqdm.auto import tqdm

        bar = tqdm(total=P * shape[0], desc="SPO-tree rollouts", unit="rollout", delay=5.0, leave=False)
    with torch.no_grad():
        for d in range(D):
            if not open_nodes:
                break
            budget = M if d < D - 1 else L - (D - 1) * M
            requests = [(p, path + (c,)) for p, path in open_nodes for c in range(shape[d])]
            if bar is not None and d > 0:
                bar.total += len(requests)
                bar.refresh()
            conts, logps, n_calls = _gather_continuations(
                [list(prompt_ids[p]) + prefix[(p, path[:-1])] for p, path in requests],
                budget, backend, collective, eos, logprobs, bar,
            )  # fmt: skip
            calls += n_calls
            open_nodes = []
            for r, (p, path) in enumerate(requests):
                cont = conts[r]
                generated += len(cont)
                ends = bool(cont) and cont[-1] in eos
                length = len(prefix[(p, path[:-1])]) + len(cont)
                expand = d < D - 1 and not ends and len(cont) == M and length < L
                truncated = not expand and not ends and length >= L
                nodes[p][path] = TreeNode(cont, logps[r] if logps is not None else None, not expand, truncated)
                if expand:
                    prefix[(p, path)] = prefix[(p, path[:-1])] + cont
                    open_nodes.append((p, path))
    if bar is not None:
        bar.close()
    return TreeRollouts(shape, M, nodes, generated_tokens=generated, backend_calls=calls)


# ── a synthetic policy with exact values (tests, benchmarks) ───────────────────────────────────────────────────────
class BernoulliChainPolicy(RolloutBackend):
    r"""
    A synthetic policy whose state values are known exactly (the VinePPO spec's oracle), usable as a rollout backend.

    Prompt `[3 + i]` selects `p = ps[i]`. A completion is `horizon` i.i.d. tokens (1 with probability `p`, else 0)
    followed by EOS (token 2); its reward is 1 when it has at least `threshold` ones. After `t` tokens with `j` ones,
    $V = P[\mathrm{Bin}(\text{horizon} - t, p) \ge \text{threshold} - j]$.

    Args:
        ps (`Sequence[float]`): success probability of each prompt.
        horizon (`int`): tokens before EOS (`max_completion_length = horizon + 1`).
        threshold (`int`): ones needed for reward 1.
        seed (`int`, *optional*): seed of the sampler.
        deterministic (`dict`, *optional*): `tuple(prompt + completion prefix)` → completion; when given, `generate`
            replays the completion that has the prefix (a deterministic policy: every value equals the reward).
    """

    per_request_budgets = True
    EOS = 2

    def __init__(self, ps, horizon: int, threshold: int, seed: int = 0, deterministic: dict | None = None):
        import random

        self.ps, self.horizon, self.threshold = list(ps), horizon, threshold
        self.rng = random.Random(seed)
        self.deterministic = deterministic
        self.calls = 0
        self.prefixes_seen: list[tuple[int, ...]] = []

    def prompt(self, i: int) -> list[int]:
        return [3 + i]

    def _bits(self, p: float, n: int) -> list[int]:
        rand = self.rng.random
        return [1 if rand() < p else 0 for _ in range(n)]

    def sample(self, prompt_index: int, n: int) -> list[list[int]]:
        """`n` full completions (EOS included) for prompt `prompt_index`."""
        return [self._bits(self.ps[prompt_index], self.horizon) + [self.EOS] for _ in range(n)]

    def generate(self, prefixes, budgets, call_budget):
        self.calls += 1
        out = []
        for prefix in prefixes:
            self.prefixes_seen.append(tuple(prefix))
            completion_prefix = list(prefix[1:])
            if self.deterministic is not None:
                full = self.deterministic[tuple(prefix)]
                out.append(list(full[len(completion_prefix) :]))
                continue
            p = self.ps[prefix[0] - 3]
            out.append(self._bits(p, self.horizon - len(completion_prefix)) + [self.EOS])
        return out

    def reward(self, completion_ids) -> float:
        return 1.0 if sum(1 for t in completion_ids if t == 1) >= self.threshold else 0.0

    def score(self, states, completion_ids) -> list[float]:
        """A `score` callable for `run_mc_rollouts`."""
        return [self.reward(c) for c in completion_ids]

    def value(self, prompt_index: int, completion_prefix) -> float:
        """Exact value of the state `prompt + completion_prefix` (0/1 at the end)."""
        p = self.ps[prompt_index]
        bits = [t for t in completion_prefix if t in (0, 1)]
        remaining, needed = self.horizon - len(bits), self.threshold - sum(bits)
        if needed <= 0:
            return 1.0
        if needed > remaining:
            return 0.0
        return sum(math.comb(remaining, x) * p**x * (1 - p) ** (remaining - x) for x in range(needed, remaining + 1))
