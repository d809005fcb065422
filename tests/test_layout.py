"""The package's layering (docs/index.md, "Where things are") and its public names.

Layers, bottom-up: `credit` (pure math) → `configs`, `generation`, `rewards`, `data`, `models` → `trainers` → the
entry points (`train`, `evaluation`, `demo`, `cli`, `viz`, `testing`). A module may import its own folder and the
folders its row allows; the test reads every `import` statement of the package (lazy ones inside functions included).
"""

from __future__ import annotations

import ast
import importlib
import pathlib
import subprocess
import sys

import pytest


PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "trl_credit"

# What each top-level unit of `trl_credit` may import from the package, besides itself.
BOTTOM = {"credit": set()}
MIDDLE = {
    "_compat": set(),
    "configs": {"credit"},
    "generation": {"credit"},
    "data": set(),
    "rewards": {"data"},
    "models": set(),
}
TRAINERS = {"trainers": {"credit", "configs", "generation", "rewards", "data", "models", "_compat"}}
ENTRY_POINTS = {"train", "evaluation", "demo", "cli", "viz", "testing"}
ALLOWED = {**BOTTOM, **MIDDLE, **TRAINERS}


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "<root>"


def import_graph() -> dict[str, set[str]]:
    """`{module: {imported trl_credit modules}}` from the source, resolving relative imports."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        module = ".".join(parts)
        package = parts if is_pkg else parts[:-1]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[: len(package) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                    names = [f"{target}.{a.name}" for a in node.names] if not node.module else [target]
                else:
                    names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            deps.update(n for n in names if n == "trl_credit" or n.startswith("trl_credit."))
        graph[module] = deps
    return graph


def test_every_top_level_unit_is_assigned_a_layer():
    units = {_unit(m) for m in import_graph()} - {"<root>"}
    unknown = units - set(ALLOWED) - ENTRY_POINTS
    assert not unknown, f"new top-level units {sorted(unknown)}: add them to tests/test_layout.py and docs/index.md"


def test_imports_only_point_down_the_layers():
    violations = []
    for module, deps in import_graph().items():
        unit = _unit(module)
        if unit in ENTRY_POINTS or unit == "<root>":
            continue
        for dep in deps:
            target = _unit(dep)
            if target != unit and target not in ALLOWED[unit]:
                violations.append(f"{module} imports {dep}")
    assert not violations, "imports against the layering:\n" + "\n".join(sorted(violations))


def test_credit_math_imports_no_training_stack():
    """`trl_credit.credit` loads with torch alone: no trl, transformers, accelerate, vllm or trainer module."""
    code = (
        "import sys, trl_credit.credit\n"
        "stack = {'trl', 'transformers', 'accelerate', 'vllm', 'peft'}\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in stack"
        " or m.startswith('trl_credit.trainers') or m.startswith('trl_credit.generation'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"importing trl_credit.credit loaded {out}"


def test_the_layering_check_catches_an_upward_import(tmp_path, monkeypatch):
    """The checker itself: a credit module importing a trainer is reported."""
    fake = tmp_path / "trl_credit"
    (fake / "credit").mkdir(parents=True)
    (fake / "trainers").mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "credit" / "__init__.py").write_text("from ..trainers import grpo\n")
    (fake / "trainers" / "__init__.py").write_text("")
    (fake / "trainers" / "grpo.py").write_text("from ..credit import x\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    with pytest.raises(AssertionError, match="trl_credit.credit imports trl_credit.trainers"):
        test_imports_only_point_down_the_layers()


PUBLIC = {
    "trl_credit": ["GRPOConfig", "GRPOTrainer", "PPOConfig", "PPOTrainer", "__version__"],
    "trl_credit.rewards": [
        "MathVerifyReward", "Verdict", "completion_text", "format_reward", "gsm8k_reward", "math_reward",
        "math_verify_reward",
    ],
    "trl_credit.data": [
        "DEFAULT_SYSTEM_PROMPT", "DEFAULT_TEMPLATE", "DEFAULT_TEXT_TEMPLATE", "last_boxed_answer", "load_math_dataset",
    ],
    "trl_credit.viz": [
        "CreditMapCallback", "CreditRow", "credit_map_figure", "credit_map_html", "credit_rows", "save_credit_map",
    ],
    "trl_credit.credit": [
        "ADVANTAGE_ESTIMATORS", "CreditBatch", "CreditOutput", "PrefixTreeValues", "RHYTHM_STRATEGIES", "STEP_SPLITS",
        "advantage_denominator", "aggregate_heads", "apply_token_weights", "attention_band", "boundary_segments",
        "call_estimator", "compute_fai", "compute_fai_band", "compute_gae_advantages", "compute_gigpo_advantages",
        "compute_grpo_advantages", "compute_macro_tempo_advantages", "compute_row_distance", "compute_segment_gae",
        "compute_tempo_advantages", "compute_vineppo_advantages", "compute_waad", "compute_waad_band",
        "dominated_anchors", "entropy_threshold", "entropy_token_weights", "estimated_state_mask", "estimator_kwargs",
        "explained_variance", "get_advantage_estimator", "group_heads", "interpolate_state_values", "kl_penalty",
        "macro_aggregate", "macro_log_ratio", "nanstd", "ngram_segments", "perplexity_segments", "prefix_tree_values",
        "punctuation_segments", "punctuation_token_flags", "random_ngram_segments", "register_advantage_estimator",
        "reward_std", "rhythm_gammas", "rhythm_layer_indices", "segment_completions", "segments_from_starts",
        "split_math", "split_newline", "token_segments", "top_q_mask", "waad_delta",
        # added in this release (SPO, validation of estimator outputs, non-finite rewards)
        "CutpointSegments", "SPO_ADVANTAGE_NORMS", "compute_spo_chain_advantages", "compute_spo_tree_advantages",
        "cutpoint_boundaries", "masked_whiten", "nonfinite_rewards_to_nan", "num_tree_slots", "probability_mask",
        "spo_normalize", "tree_node_counts", "tree_node_values", "tree_paths_tensor", "tree_segment_ids",
        "tree_slot_leaves", "validate_credit_output",
    ],
}


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_public_names_are_still_exposed(module):
    mod = importlib.import_module(module)
    missing = [name for name in PUBLIC[module] if not hasattr(mod, name)]
    assert not missing, f"{module} no longer exposes {missing}"


def test_top_level_trainers_are_the_classes_of_the_trainers_package():
    import trl_credit
    from trl_credit.trainers.grpo import GRPOTrainer
    from trl_credit.trainers.ppo import PPOTrainer

    assert trl_credit.GRPOTrainer is GRPOTrainer and trl_credit.PPOTrainer is PPOTrainer
