"""The trainers: orchestration only (capture rewards, wrap TRL's generation step, gather groups, call the math, slice
back). The math lives in `trl_credit.credit`, generation helpers in `trl_credit.generation`.

- `grpo`: `GRPOTrainer`, TRL's `GRPOTrainer` with a pluggable `advantage_estimator`;
- `ppo`: `PPOTrainer`, a learned critic (GAE, MA-PPO) on top of it;
- `hooks`: `CreditHooks`, the base of the mixins (requirements, per-rank post-processing);
- `monte_carlo`: `VinePPOMixin`, Monte-Carlo values from rollouts at segment boundaries;
- `macro_actions`: `MacroActionMixin`, macro-action segments for every value source;
- `token_weights`: `TokenWeightingMixin`, attention (preplan/anchor/rhythm) and entropy token weights.
"""
