import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from goyal_recipe import global_batch_loss

torch.manual_seed(0)
DATA = torch.randn(12, 5, dtype=torch.float64)
TARGET = torch.randint(0, 3, (12,))
# Uneven micro-batches: rank 0 gets [0:3] and [3:8], rank 1 gets [8:10] and [10:12].
SPLITS = {0: [(0, 3), (3, 8)], 1: [(8, 10), (10, 12)]}


def model():
    torch.manual_seed(1)
    return nn.Linear(5, 3).double()


def full_batch_grad():
    m = model()
    nn.functional.cross_entropy(m(DATA), TARGET).backward()  # mean over all 12 samples
    return torch.cat([p.grad.flatten() for p in m.parameters()])


def rank_grad(rank, world_size, grad_reduction):
    m = model()
    for lo, hi in SPLITS[rank]:
        per_sample = nn.functional.cross_entropy(m(DATA[lo:hi]), TARGET[lo:hi], reduction="none")
        global_batch_loss(per_sample, global_batch_size=12, world_size=world_size,
                          grad_reduction=grad_reduction).backward()  # accumulates in .grad
    return torch.cat([p.grad.flatten() for p in m.parameters()])


@pytest.mark.parametrize("grad_reduction", ["mean", "sum"])
def test_uneven_micro_batches_give_the_full_batch_gradient(grad_reduction):
    grads = [rank_grad(r, 2, grad_reduction) for r in (0, 1)]
    combined = sum(grads) / (2 if grad_reduction == "mean" else 1)
    torch.testing.assert_close(combined, full_batch_grad(), rtol=1e-12, atol=1e-12)


def _worker(rank, init_file, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    grad = rank_grad(rank, 2, "mean")
    dist.all_reduce(grad)
    grad /= 2  # what DDP / accelerate do: average across ranks
    if rank == 0:
        torch.save(grad, out)
    dist.destroy_process_group()


def test_real_two_process_allreduce(tmp_path):
    out = tmp_path / "grad.pt"
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(out)), nprocs=2, join=True)
    torch.testing.assert_close(torch.load(out), full_batch_grad(), rtol=1e-12, atol=1e-12)


def test_bad_arguments():
    with pytest.raises(ValueError, match="grad_reduction"):
        global_batch_loss(torch.ones(2), 4, grad_reduction="avg")
    with pytest.raises(ValueError, match="global_batch_size"):
        global_batch_loss(torch.ones(2), 0)
