import warnings

import pytest
import torch

from goyal_recipe import EpochShuffleSampler


def ranks(num_samples, replicas, **kw):
    return [EpochShuffleSampler(num_samples, replicas, r, **kw) for r in range(replicas)]


@pytest.mark.parametrize("num_samples,replicas,batch_size,accumulation,kept", [
    (100, 1, 1, 1, 100), (100, 3, 1, 1, 99), (101, 4, 1, 1, 100), (1000, 8, 4, 2, 960),
    (37, 2, 5, 1, 30), (1281167, 8, 32, 32, 1277952),  # ImageNet at kn=8k on 8 GPUs: 156 updates
])
def test_each_kept_sample_once_per_epoch(num_samples, replicas, batch_size, accumulation, kept):
    samplers = ranks(num_samples, replicas, seed=3, batch_size=batch_size, accumulation_steps=accumulation)
    for epoch in (0, 1):
        for s in samplers:
            s.set_epoch(epoch)
        shards = [list(s) for s in samplers]
        assert {len(sh) for sh in shards} == {kept // replicas}
        assert all(len(s) == kept // replicas for s in samplers)
        union = [i for sh in shards for i in sh]
        assert len(union) == len(set(union)) == kept
        assert set(union) <= set(range(num_samples))


@pytest.mark.parametrize("num_samples,replicas,batch_size", [(10, 3, 1), (37, 2, 5), (23, 4, 2), (5, 8, 1)])
def test_no_drop_keeps_every_sample_once(num_samples, replicas, batch_size):
    samplers = ranks(num_samples, replicas, drop_last=False, batch_size=batch_size)
    shards = [list(s) for s in samplers]
    assert sorted(i for sh in shards for i in sh) == list(range(num_samples))
    assert [len(s) for s in samplers] == [len(sh) for sh in shards]
    assert max(map(len, shards)) - min(map(len, shards)) <= batch_size


def test_orders_depend_on_seed_and_epoch_only():
    a, b, c = (EpochShuffleSampler(50, seed=s) for s in (7, 7, 8))
    order = lambda s, epoch: s.rank_indices(epoch).tolist()  # noqa: E731
    assert order(a, 0) == order(b, 0)
    assert order(a, 0) != order(c, 0)
    assert order(a, 1) != order(a, 0)
    assert sorted(order(a, 1)) == list(range(50))
    a.set_epoch(1)
    assert list(a) == order(b, 1)


def test_blocks_make_workers_and_accumulation_the_same_groups():
    # Two ranks with micro-batches of 4 and one process with 2 accumulation micro-batches of 4
    # see the same BN groups in the same updates (footnote 5).
    two = ranks(64, 2, seed=1, batch_size=4)
    one = EpochShuffleSampler(64, 1, 0, seed=1, batch_size=4, accumulation_steps=2)
    r0, r1, single = list(two[0]), list(two[1]), list(one)
    for update in range(8):
        assert single[8 * update: 8 * update + 4] == r0[4 * update: 4 * update + 4]
        assert single[8 * update + 4: 8 * update + 8] == r1[4 * update: 4 * update + 4]
    perm = one.permutation(0)
    assert r0 == perm.view(-1, 2, 4)[:, 0].flatten().tolist()


def test_batch_size_one_is_the_interleaved_split():
    samplers = ranks(12, 3, seed=5)
    perm = samplers[0].permutation(0)
    assert [list(s) for s in samplers] == [perm[r::3].tolist() for r in range(3)]


def test_resume_inside_an_epoch_yields_exactly_the_remainder():
    s = EpochShuffleSampler(100, 4, 2, seed=9, batch_size=5)
    s.set_epoch(3)
    full = list(s)
    s.set_epoch(3, start=10)
    assert len(s) == 15
    assert list(s) == full[10:]
    restored = EpochShuffleSampler(100, 4, 2, seed=9, batch_size=5)
    restored.load_state_dict(s.state_dict())
    assert list(restored) == full[10:]
    s.set_epoch(4)
    assert len(s) == 25  # a new epoch starts at its beginning
    with pytest.raises(ValueError, match="seed"):
        EpochShuffleSampler(100, 4, 2, seed=1).load_state_dict(s.state_dict())


def test_forgetting_set_epoch_is_reported():
    s = EpochShuffleSampler(10)
    list(s)
    with pytest.warns(UserWarning, match="call set_epoch"):
        list(s)
    s.set_epoch(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        list(s)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_samples=0), "num_samples"), (dict(rank=2, num_replicas=2), "rank"),
    (dict(num_samples=10, batch_size=4, num_replicas=3), "do not fill one update"),
])
def test_bad_arguments(kwargs, match):
    args = dict(num_samples=100) | kwargs
    with pytest.raises(ValueError, match=match):
        EpochShuffleSampler(**args)


def test_works_as_a_dataloader_sampler():
    data = torch.arange(40)
    s = EpochShuffleSampler(40, 2, 1, seed=0, batch_size=4)
    loader = torch.utils.data.DataLoader(data, batch_size=4, sampler=s)
    assert torch.cat(list(loader)).tolist() == s.rank_indices(0).tolist()
