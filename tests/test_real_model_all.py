"""Every recipe in `recipes/` trains 2 steps on the real SmolLM2-135M-Instruct (LoRA or full fine-tuning, vLLM colocate
on CPU, GSM8K recipes on generated word problems, MATH recipes on the local MATH data), with the checks of
`tests/test_real_model.py`. About 1-2 minutes per recipe on 2 cores: deselected by default (pyproject's `addopts`);
run it before changing the recipes or the real-model path:

    flock /tmp/realmodel.lock .venv/bin/python -m pytest -m real_model_all -q
"""

from pathlib import Path

import pytest

from test_real_model import check_real_training, free_core_threads, real_data, recorder, run_recipe  # noqa: F401


RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*/*/*.yaml"))

pytestmark = [pytest.mark.real_model_all, pytest.mark.slow]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parent.parent.name}/{p.parent.name}/{p.stem}")
def test_every_recipe_trains_two_steps_on_the_real_model(recipe, smollm2_dir, real_data, recorder, tmp_path,
                                                         vllm_cpu_colocate):  # fmt: skip
    trainer, before = run_recipe(recipe, smollm2_dir, tmp_path, real_data)
    check_real_training(trainer, recorder, before)
