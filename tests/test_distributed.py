"""Two CPU processes (gloo, `accelerate launch`) where a prompt's group straddles the ranks give the advantages that
one process computes on the same gathered batch."""

from pathlib import Path

import pytest
import torch

from dist_utils import run_accelerate
from trl_credit.credit import compute_gigpo_advantages, compute_tempo_advantages


pytestmark = [pytest.mark.distributed, pytest.mark.slow]

SCRIPT = Path(__file__).parent / "scripts" / "record_credit.py"


def _stack(tensors, pad):
    T = max(t.size(1) for t in tensors)
    return torch.cat([torch.nn.functional.pad(t, (0, T - t.size(1)), value=pad) for t in tensors])


@pytest.mark.parametrize("estimator", ["tempo", "gigpo"])
def test_two_processes_with_straddling_groups_match_one_process(tiny_model_dir, tmp_path, estimator):
    stdout = run_accelerate(SCRIPT, tiny_model_dir, tmp_path, estimator, num_processes=2)
    assert "world_size 2 steps 2" in stdout
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) >= 1
    fn = compute_tempo_advantages if estimator == "tempo" else compute_gigpo_advantages
    for rec0, rec1 in zip(*ranks):
        assert torch.equal(rec0["rewards"], rec1["rewards"])  # both ranks saw the same gathered rewards
        B = rec0["completion_ids"].size(0)
        assert B % 2 == 1  # B=3, G=2: the group made of rows 2 and 3 is split across the ranks
        ids = _stack([rec0["completion_ids"], rec1["completion_ids"]], pad=0)
        mask = _stack([rec0["completion_mask"], rec1["completion_mask"]], pad=0)
        expected = fn(ids, mask, rec0["rewards"], 2)
        got = _stack([rec0["advantages"], rec1["advantages"]], pad=0.0)
        assert torch.equal(got, expected)
        # the straddling group really contributes tree credit on both sides
        assert torch.count_nonzero(got[2:4]) > 0
