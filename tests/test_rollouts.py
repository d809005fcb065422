"""The Monte-Carlo rollout engine (plan, rounds, budgets, processes) on a synthetic policy with exact values, and
VinePPO training end to end on the tiny model through every generation backend."""

import math
import statistics
import threading

import pytest
import torch

from trl_credit.credit import CreditBatch
from trl_credit.credit.steps import boundaries_to_segment_ids, estimated_state_mask
from trl_credit.credit.vineppo import compute_vineppo_advantages
from trl_credit.generation.rollouts import (
    BernoulliChainPolicy,
    Collective,
    RolloutBackend,
    VinePlan,
    _plan_calls,
    adaptive_k_bias,
    run_mc_rollouts,
)


EOS = BernoulliChainPolicy.EOS


def chunk_bounds(completion, n):
    """Steps of n tokens; the trailing EOS stays in the last step."""
    body = len(completion) - 1
    return list(range(0, body, n)) + [len(completion)]


def make_plan(policy, prompts, completions, rewards, G, *, K, n=2, max_steps=None, stride=1, tree_reuse=False,
              group_keys=None):  # fmt: skip
    bounds = [chunk_bounds(c, n) for c in completions]
    S = max(len(b) - 1 for b in bounds)
    est, interp = estimated_state_mask(torch.tensor([len(b) - 1 for b in bounds]), S, max_steps, stride)
    keys = group_keys if group_keys is not None else [i // G for i in range(len(completions))]
    plan = VinePlan(prompts, completions, bounds, est, torch.tensor(rewards, dtype=torch.float64), keys,
                    max_completion_length=policy.horizon + 1, num_rollouts=K, tree_reuse=tree_reuse,
                    eos_token_ids=[EOS])  # fmt: skip
    return plan, bounds, interp


def run(plan, policy, **kw):
    return run_mc_rollouts(plan, policy, policy.score, eos_token_ids=[EOS], **kw)


# ── plan and engine ────────────────────────────────────────────────────────────────────────────────────────────────
def test_each_unique_state_is_generated_exactly_k_times():
    policy = BernoulliChainPolicy([0.5, 0.5], horizon=6, threshold=3, seed=1)
    c = [[1, 1, 0, 1, 0, 0, EOS], [1, 1, 0, 0, 1, 1, EOS], [0, 1, 1, 1, 0, 0, EOS]]  # rows 0, 1 share "1 1"
    completions = c + [list(x) for x in c]  # group 1 repeats group 0 under another prompt
    prompts = [policy.prompt(0)] * 3 + [policy.prompt(1)] * 3
    plan, _, _ = make_plan(policy, prompts, completions, [1.0, 1, 0, 1, 1, 0], G=3, K=4)
    # per group: the root, "1 1" (shared), "1 1 0 1", "1 1 0 0", "0 1", "0 1 1 1"  → 6 unique states
    assert plan.num_states == 12
    assert plan.row_states[0][0] == plan.row_states[1][0] == plan.row_states[2][0] != plan.row_states[3][0]
    assert plan.row_states[0][1] == plan.row_states[1][1]
    stats = run(plan, policy)
    assert stats.backend_calls == 1 and policy.calls == 1  # one generation call for the whole step
    seen = {}
    for p in policy.prefixes_seen:
        seen[p] = seen.get(p, 0) + 1
    assert len(seen) == 12 and set(seen.values()) == {4}
    assert stats.rollouts.tolist() == [4.0] * 12
    values = plan.row_values(stats.value_sum, stats.count)
    assert values[0, 0] == values[1, 0] == values[2, 0] and values[0, 1] == values[1, 1]  # shared estimates


def test_repeated_prompt_groups_share_states_through_group_keys():
    policy = BernoulliChainPolicy([0.5], horizon=4, threshold=2, seed=2)
    completions = [[1, 0, 1, 0, EOS], [0, 0, 1, 1, EOS]] * 2
    prompts = [policy.prompt(0)] * 4
    plan, _, _ = make_plan(policy, prompts, completions, [1.0, 1, 1, 1], G=2, K=3, group_keys=[0, 0, 0, 0])
    assert plan.num_states == 3  # root + the two distinct "after step 0" prefixes, across both groups


def test_group_keys_merge_only_identical_prompts_and_inputs():
    from trl_credit.trainers.monte_carlo import VinePPOMixin

    rows = [{"prompt_ids": [1, 2], "inputs": {"solution": "3"}}] * 2
    rows += [{"prompt_ids": [1, 2], "inputs": {"solution": "4"}}] * 2
    rows += [{"prompt_ids": [1, 2], "inputs": {"solution": "3"}}] * 2
    assert VinePPOMixin._vine_group_keys(rows, 2) == [0, 0, 1, 1, 0, 0]


def test_deterministic_policy_gives_values_equal_to_rewards_and_zero_advantages():
    """A policy that always produces the same completion: every V̂(s_k) = r, every advantage 0 (spec invariant 4)."""
    policy = BernoulliChainPolicy([0.5, 0.5], horizon=8, threshold=4)
    winner, loser = [1, 1, 1, 1, 0, 1, 0, 1, EOS], [0, 0, 1, 0, 0, 0, 1, 0, EOS]
    replay = {(p0,) + tuple(c[:t]): c for p0, c in ((3, winner), (4, loser)) for t in range(len(c))}
    policy.deterministic = replay
    completions = [winner, winner, loser, loser]  # deterministic: the group's completions are identical
    rewards = [policy.reward(c) for c in completions]
    assert rewards == [1.0, 1.0, 0.0, 0.0]
    prompts = [policy.prompt(0)] * 2 + [policy.prompt(1)] * 2
    plan, bounds, _ = make_plan(policy, prompts, completions, rewards, G=2, K=3, n=3)
    stats = run(plan, policy)
    values = plan.row_values(stats.value_sum, stats.count)
    for i, r in enumerate(rewards):
        assert values[i, : len(bounds[i]) - 1].tolist() == [r] * (len(bounds[i]) - 1)
    seg = boundaries_to_segment_ids(bounds, 9)
    batch = CreditBatch(torch.zeros_like(seg), (seg >= 0).float(), torch.tensor(rewards), 2, segment_ids=seg,
                        segment_values=values.float())  # fmt: skip
    assert (compute_vineppo_advantages(batch, vine_advantage_norm="none").advantages == 0).all()


class FixedBackend(RolloutBackend):
    """Returns a fixed continuation for every prefix (optionally `call_budget` tokens long, without EOS)."""

    def __init__(self, per_request=True, length=None, continuation=(1, EOS)):
        self.per_request_budgets = per_request
        self.length, self.continuation = length, list(continuation)
        self.calls = []

    def generate(self, prefixes, budgets, call_budget):
        self.calls.append((len(prefixes), list(budgets), call_budget))
        if self.length == "budget":
            return [[1] * (b if self.per_request_budgets else call_budget) for b in budgets]
        return [list(self.continuation) for _ in prefixes]


def test_truncated_continuations_get_the_penalty_and_are_not_scored():
    policy = BernoulliChainPolicy([0.5], horizon=4, threshold=1)
    completions = [[1, 0, 1, 0, EOS]]
    plan, _, _ = make_plan(policy, [policy.prompt(0)], completions, [1.0], G=1, K=2)
    scored = []

    def score(states, ids):
        scored.extend(ids)
        return [1.0] * len(ids)

    stats = run_mc_rollouts(plan, FixedBackend(length="budget"), score, eos_token_ids=[EOS], truncation_penalty=-0.5)
    assert scored == [] and stats.truncated.sum() == stats.rollouts.sum() == 2 * plan.num_states
    assert (stats.values == -0.5).all()
    # a continuation that ends with EOS inside its budget is scored normally
    stats = run_mc_rollouts(plan, FixedBackend(), score, eos_token_ids=[EOS], truncation_penalty=-0.5)
    assert stats.truncated.sum() == 0 and (stats.values == 1.0).all()


def test_one_budget_per_call_backends_are_cut_to_each_states_budget():
    policy = BernoulliChainPolicy([0.5], horizon=8, threshold=1)
    plan, _, _ = make_plan(policy, [policy.prompt(0)], [[1] * 8 + [EOS]], [1.0], G=1, K=1, n=2)
    backend = FixedBackend(per_request=False, length="budget")
    backend.bucket_ratio = 0.5
    stats = run_mc_rollouts(plan, backend, lambda s, ids: [1.0] * len(ids), eos_token_ids=[EOS])
    # budgets 9, 7, 5, 3 → buckets {9, 7, 5} and {3}: each call decodes up to its largest budget
    assert [c[2] for c in backend.calls] == [9, 3]
    assert stats.generated_tokens.tolist() == [9, 9, 9, 3] and stats.truncated.sum() == 4


def test_plan_calls_bucket_budgets_and_chunk_rows_per_process():
    class Plain(RolloutBackend):  # planning reads only the call-shape attributes
        def generate(self, prefixes, budgets, call_budget):
            return [[] for _ in prefixes]

    class B(Plain):
        bucket_ratio = 0.5
        max_rows_per_call = 2

    calls = _plan_calls([10, 3, 9, 4, 6, 5, 1], B(), world=2)
    assert calls == [[0, 2, 4, 5], [3, 1], [6]]
    assert _plan_calls([10, 3, 9], Plain(), world=1) == [[0, 2, 1]]


def test_mc_value_is_unbiased_with_binomial_spread():
    """Spec oracle: T = 10, p = 0.4, m = 5, state after 4 tokens with 2 ones: V = 0.4557, sd = sqrt(V(1-V)/K)."""
    policy = BernoulliChainPolicy([0.4], horizon=10, threshold=5, seed=4)
    V = policy.value(0, [1, 1, 0, 0])
    assert V == pytest.approx(0.4557, abs=1e-4)
    reps = 200
    completion = [1, 1, 0, 0, 1, 0, 0, 0, 1, 0, EOS]
    for K in (1, 9, 100):
        # 200 independent estimates of the same state: distinct group keys switch deduplication off
        plan, _, _ = make_plan(policy, [policy.prompt(0)] * reps, [completion] * reps, [0.0] * reps, G=1, K=K, n=4,
                               max_steps=1, group_keys=list(range(reps)))  # fmt: skip
        stats = run(plan, policy)
        estimates = plan.row_values(stats.value_sum, stats.count)[:, 1].tolist()
        mean, sd = statistics.fmean(estimates), statistics.stdev(estimates)
        theory = math.sqrt(V * (1 - V) / K)
        assert abs(mean - V) < 4 * theory / math.sqrt(reps)
        assert 0.8 * theory < sd < 1.2 * theory


def test_tree_reuse_is_leave_one_out_and_samples_only_the_missing_rollouts():
    policy = BernoulliChainPolicy([0.5], horizon=4, threshold=2, seed=5)
    completions = [[1, 1, 0, 0, EOS], [1, 0, 0, 0, EOS], [0, 1, 1, 0, EOS], [0, 0, 0, 1, EOS]]
    rewards = [policy.reward(c) for c in completions]  # [1, 0, 1, 0]
    plan, _, _ = make_plan(policy, [policy.prompt(0)] * 4, completions, rewards, G=4, K=5, tree_reuse=True)
    root = plan.states[plan.row_states[0][0]]
    assert root.members == [0, 1, 2, 3] and root.num_rollouts == 5 - 3
    first = plan.states[plan.row_states[0][1]]  # "1 1": only row 0 passes through
    assert first.members == [0] and first.num_rollouts == 5
    stats = run(plan, policy)
    values = plan.row_values(stats.value_sum, stats.count)
    s, n = stats.value_sum[plan.row_states[0][0]].item(), stats.count[plan.row_states[0][0]].item()
    for i in range(4):
        others = [rewards[j] for j in range(4) if j != i]
        assert values[i, 0].item() == pytest.approx((s + sum(others)) / (n + 3))  # never its own reward


def test_tree_reuse_root_value_is_unbiased():
    policy = BernoulliChainPolicy([0.3], horizon=6, threshold=2, seed=6)
    V = policy.value(0, [])
    estimates = []
    for _ in range(300):
        completions = policy.sample(0, 4)
        rewards = [policy.reward(c) for c in completions]
        plan, _, _ = make_plan(policy, [policy.prompt(0)] * 4, completions, rewards, G=4, K=4, n=6,
                               max_steps=0, tree_reuse=True)  # fmt: skip
        stats = run(plan, policy)
        estimates.append(plan.row_values(stats.value_sum, stats.count)[0, 0].item())
    sd = math.sqrt(V * (1 - V) / 4)  # 1 rollout + 3 free samples
    assert abs(statistics.fmean(estimates) - V) < 4 * sd / math.sqrt(300)


def test_adaptive_k_stops_agreeing_states_with_the_documented_bias():
    policy = BernoulliChainPolicy([0.8], horizon=1, threshold=1, seed=7)  # every state: V = 0.8
    reps = 3000
    plan, _, _ = make_plan(policy, [policy.prompt(0)] * reps, [[1, EOS]] * reps, [1.0] * reps, G=1, K=9,
                           group_keys=list(range(reps)))  # fmt: skip
    stats = run(plan, policy, adaptive_k_min=3)
    assert stats.rounds == 2
    stopped = stats.rollouts == 3
    # the first three agree with probability 0.8^3 + 0.2^3
    assert stopped.float().mean().item() == pytest.approx(0.8**3 + 0.2**3, abs=0.03)
    assert stats.stopped_early == int(stopped.sum())
    bias = stats.values.mean().item() - 0.8
    expected = adaptive_k_bias(0.8, 9, 3)
    assert expected == pytest.approx(6 / 9 * 0.8 * 0.2 * (0.8**2 - 0.2**2))
    se = 0.15 / math.sqrt(reps)
    assert abs(bias - expected) < 4 * se and bias > 4 * se  # measurably biased, as documented


class ThreadCollective(Collective):
    """Ranks as threads; `gather` is an all-gather through a barrier."""

    def __init__(self, rank, world, shared):
        self.rank, self.world, self.is_main, self.shared = rank, world, rank == 0, shared

    def gather(self, tensor):
        self.shared["slots"][self.rank] = tensor
        self.shared["barrier"].wait()
        out = torch.stack(self.shared["slots"])
        self.shared["barrier"].wait()
        return out


class RecordingPolicy(BernoulliChainPolicy):
    per_request_budgets = False
    bucket_ratio = 0.5
    max_rows_per_call = 3

    def generate(self, prefixes, budgets, call_budget):
        self.lengths.append(len(prefixes))
        return super().generate(prefixes, budgets, call_budget)


@pytest.mark.parametrize("world", [2, 3])
def test_every_process_makes_the_same_calls_with_equal_lengths(world):
    base = BernoulliChainPolicy([0.5, 0.6], horizon=9, threshold=4, seed=8)
    completions = base.sample(0, 3) + base.sample(1, 3)
    rewards = [base.reward(c) for c in completions]
    prompts = [base.prompt(0)] * 3 + [base.prompt(1)] * 3
    shared = {"slots": [None] * world, "barrier": threading.Barrier(world)}
    results, policies = [None] * world, []

    def worker(rank):
        policy = RecordingPolicy(base.ps, 9, 4, seed=100 + rank)
        policy.lengths = []
        policies.append((rank, policy))
        plan, _, _ = make_plan(policy, prompts, completions, rewards, G=3, K=5, n=3)
        results[rank] = (plan, run_mc_rollouts(plan, policy, policy.score, eos_token_ids=[EOS], adaptive_k_min=2,
                                               collective=ThreadCollective(rank, world, shared)))  # fmt: skip

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    lengths = [p.lengths for _, p in sorted(policies, key=lambda x: x[0])]
    assert all(lengths[r] == lengths[0] for r in range(world)) and len(lengths[0]) >= 2  # same calls, same sizes
    plan, stats = results[0]
    for _, other in results[1:]:
        assert torch.equal(other.value_sum, stats.value_sum) and torch.equal(other.rollouts, stats.rollouts)
    # each state got its first-round rollouts, and all of them when they disagreed
    for s in range(plan.num_states):
        assert stats.rollouts[s] in (2, 5)
    assert stats.rollouts.sum() <= 5 * plan.num_states


# ── end to end: VinePPO training on the tiny model through every backend ──────────────────────────────────────────
def _trainer_class():
    from trl_credit import GRPOTrainer

    class RecordingVineTrainer(GRPOTrainer):
        """Keeps, per generation batch, what the MC values were computed from and what reached the loss."""

        def __init__(self, *args, **kwargs):
            self.vine_records, self.rollout_calls = [], []
            super().__init__(*args, **kwargs)

        def _vine_mc_values(self, out, ctx, batch_fields):
            result = super()._vine_mc_values(out, ctx, batch_fields)
            prompt_ids = [ids[m.bool()].tolist() for ids, m in zip(out["prompt_ids"], out["prompt_mask"])]
            self.vine_records.append(
                dict(result, rewards=batch_fields["rewards"].clone(), prompt_ids=prompt_ids,
                     completion_ids=[list(c) for c in ctx["completion_ids_list"]], calls=self.rollout_calls)
            )  # fmt: skip
            self.rollout_calls = []
            return result

        def _assign_credit(self, out, ctx):
            super()._assign_credit(out, ctx)
            if self.vine_records and "advantages" not in self.vine_records[-1]:
                self.vine_records[-1]["advantages"] = out["advantages"].detach().clone()

        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
            vllm = self.use_vllm
            budget = self.vllm_generation.max_completion_length if vllm else self.generation_config.max_new_tokens
            completion_ids, logprobs = super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations
            )
            if num_generations == 1:  # the group generation uses num_generations = G > 1
                self.rollout_calls.append((list(map(list, prompt_ids)), budget, completion_ids))
            return completion_ids, logprobs

    return RecordingVineTrainer


def _train(model_dir, tmp_path, *, peft_config=None, **overrides):
    from trl_credit import GRPOConfig
    from trl_credit.testing import shaped_math_reward, tiny_math_dataset

    kw = dict(
        output_dir=str(tmp_path), advantage_estimator="vineppo", max_steps=2, per_device_train_batch_size=6,
        num_generations=3, max_completion_length=16, learning_rate=5e-2, report_to="none", bf16=False, use_cpu=True,
        save_strategy="no", logging_steps=1, disable_tqdm=True, seed=3, vine_num_rollouts=3,
        step_split="token_chunks", vine_chunk_tokens=5, vine_advantage_norm="none", vine_rollout_batch_size=64,
    )  # fmt: skip
    kw.update(overrides)
    trainer = _trainer_class()(model=model_dir, reward_funcs=shaped_math_reward, args=GRPOConfig(**kw),
                               train_dataset=tiny_math_dataset(24), peft_config=peft_config)  # fmt: skip
    trainer.train()
    return trainer


def _check_vine_training(trainer, check_calls=True):
    """Invariants any backend must satisfy on the recorded generation batches."""
    args = trainer.args
    assert trainer.state.global_step == args.max_steps and len(trainer.vine_records) == args.max_steps
    logs = [h for h in trainer.state.log_history if "loss" in h]
    for h in logs:
        assert h["credit/mc_unique_states"] > 0 and h["credit/mc_rollouts"] > 0 and h["credit/mc_generated_tokens"] > 0
        assert 0 <= h["credit/mc_truncation_rate"] <= 1 and 0 < h["credit/mc_time_share"] < 1
    G = args.num_generations
    for rec in trainer.vine_records:
        seg, values, rewards, adv = rec["segment_ids"], rec["segment_values"], rec["rewards"], rec["advantages"]
        for i, comp in enumerate(rec["completion_ids"]):
            S = int(seg[i].max()) + 1
            assert (seg[i, : len(comp)] >= 0).all() and (seg[i, len(comp) :] < 0).all()  # token coverage
            starts = [int((seg[i] == k).nonzero()[0]) for k in range(S)]
            # raw TD advantages telescope: Σ_k a_k = r − V̂(s_0)
            telescoped = sum(adv[i, t].item() for t in starts)
            assert telescoped == pytest.approx(rewards[i].item() - values[i, 0].item(), abs=1e-4)
            assert values[i, :S].isfinite().all()  # no cap here: every state estimated or interpolated
        if not args.vine_tree_reuse:  # the prompt state is estimated once and shared by the group
            for g in range(len(rewards) // G):
                assert (values[g * G : (g + 1) * G, 0] == values[g * G, 0]).all()
        if not check_calls:
            continue
        # every rollout continues a token-id prefix of a sampled completion, within the training horizon
        rows = zip(rec["prompt_ids"], rec["completion_ids"])
        states = {tuple(p + c[:b]) for p, c in rows for b in range(len(c))}
        assert rec["calls"]
        for prefixes, budget, conts in rec["calls"]:
            for prefix, cont in zip(prefixes, conts):
                assert tuple(prefix) in states
                assert len(cont) <= budget <= args.max_completion_length


@pytest.mark.slow
def test_vineppo_trains_with_transformers_generate_and_lora(tiny_model_dir, tmp_path):
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = _train(tiny_model_dir, tmp_path, peft_config=lora)
    from trl_credit.generation.rollouts import TransformersRolloutBackend

    assert isinstance(trainer._vine_backend, TransformersRolloutBackend)
    _check_vine_training(trainer)
    assert trainer.generation_config.max_new_tokens == trainer.args.max_completion_length  # budget restored
    lora_b = [p for n, p in trainer.model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # LoRA B starts at zero: the adapter trained
    logs = [h for h in trainer.state.log_history if "loss" in h]
    # K rollouts per unique state (no tree reuse, no adaptive K)
    assert all(h["credit/mc_rollouts"] == 3 * h["credit/mc_unique_states"] for h in logs)


@pytest.mark.slow
def test_vineppo_states_are_macro_action_boundaries_when_macro_action_is_set(tiny_model_dir, tmp_path):
    # macro_action applies to the Monte-Carlo value source too: states at every 4th token instead of text steps
    trainer = _train(tiny_model_dir, tmp_path, step_split="newline", macro_action="ngram", macro_action_n=4,
                     macro_action_last_singleton=False)  # fmt: skip
    _check_vine_training(trainer)
    for rec in trainer.vine_records:
        for i, comp in enumerate(rec["completion_ids"]):
            expected = torch.arange(len(comp)) // 4
            assert torch.equal(rec["segment_ids"][i, : len(comp)], expected)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all(h["credit/macro_count"] > 0 for h in logs)


@pytest.mark.vllm
@pytest.mark.slow
def test_vineppo_trains_with_vllm_colocate_and_lora_in_one_call_per_round(tiny_model_dir, vllm_cpu_colocate, tmp_path):
    from peft import LoraConfig

    from trl_credit.generation.rollouts import VLLMColocateRolloutBackend

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    trainer = _train(tiny_model_dir, tmp_path, peft_config=lora, use_vllm=True, vllm_mode="colocate",
                     vllm_max_model_length=256, step_split="math", vine_tree_reuse=True, vine_adaptive_k=True,
                     vine_adaptive_k_min=2, vllm_importance_sampling_correction=True)  # fmt: skip (logs the gap)
    assert isinstance(trainer._vine_backend, VLLMColocateRolloutBackend)
    _check_vine_training(trainer, check_calls=False)  # the direct path bypasses _generate_single_turn
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all(h["credit/mc_backend_calls"] <= 2 for h in logs)  # one llm.generate call per adaptive round
    assert all("credit/mc_free_samples" in h and "credit/mc_stopped_early" in h for h in logs)
    assert all(h["sampling/sampling_logp_difference/max"] < 1e-3 for h in logs)  # rollouts use synced weights
    assert trainer.vllm_generation.max_num_seqs == 6 * 3  # the engine was widened to K × the group batch


@pytest.mark.vllm
@pytest.mark.slow
def test_vineppo_trains_with_vllm_server(tiny_model_dir, vllm_cpu_server, vllm_cpu_server_client, tmp_path):
    from trl_credit.generation.rollouts import TRLVLLMRolloutBackend

    trainer = _train(tiny_model_dir, tmp_path, use_vllm=True, vllm_mode="server", vllm_server_base_url=vllm_cpu_server,
                     vine_boundary_stride=2, max_steps=3, vllm_importance_sampling_correction=True)  # fmt: skip
    assert isinstance(trainer._vine_backend, TRLVLLMRolloutBackend)
    _check_vine_training(trainer)
    # every step samples from the weights of the step before (the file sync reaches the server's packed kernels)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3 and all(h["sampling/sampling_logp_difference/max"] < 1e-3 for h in logs), logs
    assert trainer.vllm_generation.max_completion_length == trainer.args.max_completion_length


@pytest.mark.distributed
@pytest.mark.slow
def test_vineppo_on_two_processes_with_a_group_straddling_the_ranks(tiny_model_dir, tmp_path):
    from pathlib import Path

    from dist_utils import run_accelerate

    script = Path(__file__).parent / "scripts" / "vineppo_record.py"
    stdout = run_accelerate(script, tiny_model_dir, tmp_path, "vine_adaptive_k=True", "vine_adaptive_k_min=2",
                            num_processes=2)  # fmt: skip
    assert "world_size 2 steps 2" in stdout
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 2
    for rec0, rec1 in zip(*ranks):
        # both ranks planned, sampled (in shares) and gathered the same global MC values
        assert torch.equal(rec0["segment_ids"], rec1["segment_ids"]) and torch.equal(rec0["rewards"], rec1["rewards"])
        assert torch.allclose(rec0["segment_values"], rec1["segment_values"], equal_nan=True)
        # same number of backend calls with equally long prompt lists on every rank (server-mode contract)
        assert rec0["call_sizes"] == rec1["call_sizes"] and len(rec0["call_sizes"]) >= 2
        seg, values = rec0["segment_ids"], rec0["segment_values"]
        N, T = seg.shape
        assert N == 6  # B = 3 per rank, G = 2: rows 2 and 3 form a group split across the ranks
        assert values[2, 0] == values[3, 0]  # its prompt state was estimated once
        batch = CreditBatch(torch.zeros_like(seg), rec0["loss_mask"].float(), rec0["rewards"], 2,
                            loss_mask=rec0["loss_mask"], segment_ids=seg, segment_values=values)  # fmt: skip
        expected = compute_vineppo_advantages(batch, vine_advantage_norm="batch").advantages
        local = [rec0["advantages"], rec1["advantages"]]
        got = torch.cat([torch.nn.functional.pad(a, (0, T - a.size(1))) for a in local])
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
