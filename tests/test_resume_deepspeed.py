"""engine=deepspeed keeps rank-local state across a checkpoint too: DeepSpeed's own checkpoint holds rank 0's
module state only (its BN buffers included), so the per-rank buffers, RNG and epoch sums come from the files the
trainer writes beside it."""

import pytest
import torch
from safetensors.torch import load_file

from _runs import assert_same_run, overrides, train

pytest.importorskip("deepspeed")


@pytest.mark.slow
def test_two_process_deepspeed_resume_inside_an_epoch_equals_uninterrupted(data_root, tmp_path):
    same = {"engine": "deepspeed", "run.resume": "auto", "run.checkpoint_every_updates": 2}
    train(overrides(data_root, tmp_path, "reference", **same), launcher="deepspeed")
    train(overrides(data_root, tmp_path, "resumed", **same, **{"run.max_updates": 6}), launcher="deepspeed")
    checkpoint = tmp_path / "resumed" / "checkpoints" / "update_000000006"
    ranks = [load_file(checkpoint / f"buffers_rank{rank}.safetensors") for rank in (0, 1)]
    assert any(not torch.equal(ranks[0][key], ranks[1][key]) for key in ranks[0])  # per-worker BN, mid-epoch
    proc = train(overrides(data_root, tmp_path, "resumed", **same), launcher="deepspeed")
    assert "at update 6" in proc.stdout
    assert_same_run(tmp_path / "resumed", tmp_path / "reference", samples=False)
