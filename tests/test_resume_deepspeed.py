"""engine=deepspeed keeps rank-local state across a checkpoint too: DeepSpeed's own checkpoint holds rank 0's
module state only (its BN buffers included), so the per-rank buffers, RNG and epoch sums come from the files the
trainer writes beside it."""

import pytest
import torch
from safetensors.torch import load_file

from _runs import overrides, records, step_losses, train

pytest.importorskip("deepspeed")


def _epochs(run_dir):
    last = {r["epoch"]: r for r in records(run_dir, "epoch")}
    return {e: {k: v for k, v in r.items() if k not in ("time", "epoch_s")} for e, r in last.items()}


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
    run_dir, reference = tmp_path / "resumed", tmp_path / "reference"
    assert step_losses(run_dir) == step_losses(reference)
    resumed, uninterrupted = load_file(run_dir / "model.safetensors"), load_file(reference / "model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    for key, value in uninterrupted.items():
        assert torch.equal(resumed[key], value), key
    assert _epochs(run_dir) == _epochs(reference)
