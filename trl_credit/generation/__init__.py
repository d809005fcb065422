"""Generation helpers the trainers use: Monte-Carlo rollouts from token prefixes in every backend (`rollouts`), the
attention-statistics capture pass (`attention_capture`), and the patches that run vLLM's CPU build with TRL
(`vllm_cpu`). They may import `trl_credit.credit`, never the trainers.
"""
