"""Two CPU processes (gloo, `accelerate launch`) where a prompt's group straddles the ranks give the advantages that
one process computes on the same gathered batch."""

from pathlib import Path

import pytest
import torch

from dist_utils import run_accelerate
from trl_credit import GRPOConfig
from trl_credit.credit import (
    CreditBatch,
    call_estimator,
    compute_gigpo_advantages,
    compute_tempo_advantages,
    get_advantage_estimator,
)
from trl_credit.testing import CPU_TEST_ARGS


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


@pytest.mark.parametrize("estimator", ["tempo", "gigpo"])
def test_a_truncated_row_masked_out_of_the_loss_stays_in_a_tree_that_straddles_the_ranks(tiny_model_dir, tmp_path,
                                                                                        estimator):  # fmt: skip
    """`mask_truncated_completions=True` on 2 processes: the tree is built from the gathered real lengths, so a
    truncated row (no loss token) still shares its prefix with its group on the other rank."""
    stdout = run_accelerate(SCRIPT, tiny_model_dir, tmp_path, estimator, "--mixed-truncation", num_processes=2)
    assert "world_size 2 steps 1" in stdout
    rec0, rec1 = (torch.load(tmp_path / f"rank{r}.pt")[0] for r in range(2))
    ids = _stack([rec0["completion_ids"], rec1["completion_ids"]], pad=0)
    generated = _stack([rec0["generated_mask"], rec1["generated_mask"]], pad=0)
    loss = _stack([rec0["completion_mask"], rec1["completion_mask"]], pad=0)
    got = _stack([rec0["advantages"], rec1["advantages"]], pad=0.0)
    assert generated.sum(1).tolist() == [3, 6, 3, 6, 4, 3]  # the real lengths, gathered in rank order
    assert loss.sum(1).tolist() == [3, 0, 3, 0, 4, 3]  # TRL masked the two truncated rows out of the loss
    args = GRPOConfig(output_dir=str(tmp_path / "ref"), advantage_estimator=estimator, num_generations=2,
                      per_device_train_batch_size=6, **CPU_TEST_ARGS)  # fmt: skip

    def expected(tree_mask):
        batch = CreditBatch(completion_ids=ids, completion_mask=tree_mask, loss_mask=loss, rewards=rec0["rewards"],
                            num_generations=2)  # fmt: skip
        return call_estimator(get_advantage_estimator(estimator), batch, args).advantages

    torch.testing.assert_close(got, expected(generated))
    assert torch.count_nonzero(got[[1, 3]]) == 0  # no loss token, no advantage
    # rows 2 and 3 (one per rank) share tokens 7, 9: the finished row gets its group's advantage on both
    assert got[2, 0] != 0 and got[2, 0] == got[2, 1]
    # a tree built from TRL's zeroed mask would put row 3 under no node and give row 2 another credit
    assert not torch.allclose(got, expected(loss))
