import copy

import pytest
import torch
from torch import nn

from goyal_recipe import GhostBatchNorm2d, use_ghost_batchnorm, zero_init_last_bn

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")


@pytest.mark.parametrize("builder,name,count,last", [
    ("timm", "resnet18", 8, "bn2"), ("timm", "resnet50", 16, "bn3"),
    ("torchvision", "resnet18", 8, "bn2"), ("torchvision", "resnet50", 16, "bn3"),
])
def test_zero_init_last_bn(builder, name, count, last):
    if builder == "timm":
        model = timm.create_model(name, zero_init_last=False)
    else:
        model = getattr(torchvision.models, name)(zero_init_residual=False)
    bns = dict((n, m) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d))
    assert all(bool((m.weight == 1).all()) for m in bns.values())
    touched = zero_init_last_bn(model)
    assert len(touched) == count
    assert touched[0] == f"layer1.0.{last}" and all(t.endswith(last) for t in touched)
    for n, m in bns.items():
        assert bool((m.weight == 0).all()) == (n in touched), n
    assert zero_init_last_bn(model) == touched  # idempotent


def test_zero_init_last_bn_uses_a_blocks_own_hook():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 1)
            self.norm_first = nn.BatchNorm2d(2)
            self.norm_last = nn.BatchNorm2d(2)

        def zero_init_last(self):
            nn.init.zeros_(self.norm_last.weight)

    model = nn.Sequential(Block(), Block())
    assert zero_init_last_bn(model) == ["0.norm_last", "1.norm_last"]
    assert bool((model[0].norm_first.weight == 1).all())


def separate_bns(ghost, groups):
    bns = []
    for _ in range(groups):
        bn = nn.BatchNorm2d(ghost.num_features, momentum=ghost.momentum).double()
        bn.load_state_dict(ghost.state_dict())
        bns.append(bn)
    return bns


@pytest.mark.parametrize("momentum", [0.1, None])
def test_ghost_bn_equals_separate_workers(momentum):
    torch.manual_seed(0)
    ghost = GhostBatchNorm2d(4, group_size=8, momentum=momentum).double()
    with torch.no_grad():
        ghost.weight.uniform_(0.5, 1.5)
        ghost.bias.uniform_(-0.5, 0.5)
    workers = separate_bns(ghost, 3)
    for step in range(2):
        x = (torch.randn(24, 4, 5, 3, dtype=torch.float64) * 3 + 1).requires_grad_()
        xs = [c.detach().clone().requires_grad_() for c in x.chunk(3)]
        out = ghost(x)
        ref = torch.cat([bn(c) for bn, c in zip(workers, xs)])
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
        w = torch.randn_like(out)
        (out * w).sum().backward()
        (ref * w).sum().backward()
        torch.testing.assert_close(x.grad, torch.cat([c.grad for c in xs]), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(ghost.weight.grad, sum(bn.weight.grad for bn in workers), rtol=1e-9, atol=1e-9)
        for bn in workers:
            bn.weight.grad = bn.bias.grad = None
        ghost.weight.grad = ghost.bias.grad = None
    # Running statistics: the average of what the three workers keep.
    for buf in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(ghost, buf), sum(getattr(bn, buf) for bn in workers) / 3)
    assert int(ghost.num_batches_tracked) == 2

    ghost.eval()
    plain = nn.BatchNorm2d(4).double()
    plain.load_state_dict(ghost.state_dict())
    plain.eval()
    x = torch.randn(5, 4, 5, 3, dtype=torch.float64)  # eval: any batch size
    torch.testing.assert_close(ghost(x), plain(x))


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("layout", ["per_group", "packed"])
@pytest.mark.parametrize("momentum", [0.3, None])
def test_both_ghost_bn_layouts_equal_separate_workers(momentum, layout, memory_format):
    """The CPU layout (a batch_norm per group) and the GPU one (groups packed as channels), each in
    both memory formats: outputs, input and parameter gradients, running statistics and layout."""
    torch.manual_seed(1)
    groups, channels = 3, 5
    ghost = GhostBatchNorm2d(channels, group_size=4, momentum=momentum, layout=layout).double()
    with torch.no_grad():
        ghost.weight.uniform_(0.5, 1.5)
        ghost.bias.uniform_(-0.5, 0.5)
        ghost.running_mean.normal_()
        ghost.running_var.uniform_(0.5, 1.5)
    workers = separate_bns(ghost, groups)
    x = (torch.randn(groups * 4, channels, 3, 2, dtype=torch.float64) * 2 - 1).contiguous(memory_format=memory_format)
    x.requires_grad_()
    xs = [c.detach().clone().requires_grad_() for c in x.chunk(groups)]

    out = ghost(x)
    assert out.is_contiguous(memory_format=memory_format)
    ref = torch.cat([bn(c) for bn, c in zip(workers, xs)])
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(x.grad, torch.cat([c.grad for c in xs]), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ghost.weight.grad, sum(bn.weight.grad for bn in workers), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ghost.bias.grad, sum(bn.bias.grad for bn in workers), rtol=1e-10, atol=1e-10)
    # The buffers end at the mean of what the k workers' own copies hold.
    for buf in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(ghost, buf), sum(getattr(bn, buf) for bn in workers) / groups,
                                   rtol=1e-12, atol=1e-12)


def test_ghost_bn_rejects_an_unknown_layout():
    with pytest.raises(ValueError, match="layout must be one of auto, per_group, packed, got 'rows'"):
        GhostBatchNorm2d(3, layout="rows")
    with pytest.raises(ValueError, match="layout must be one of auto, per_group, packed, got 'rows'"):
        use_ghost_batchnorm(nn.Sequential(nn.BatchNorm2d(3)), layout="rows")


def test_use_ghost_batchnorm_checks_its_arguments_before_changing_a_layer():
    model = nn.Sequential(GhostBatchNorm2d(4, group_size=8, layout="packed"), nn.BatchNorm2d(3))
    for kwargs, message in (({"group_size": 0}, "group_size must be a positive integer, got 0"),
                            ({"group_size": 2, "layout": "rows"}, "layout must be one of")):
        with pytest.raises(ValueError, match=message):
            use_ghost_batchnorm(model, **kwargs)
        assert (model[0].group_size, model[0].layout) == (8, "packed")
        assert type(model[1]) is nn.BatchNorm2d


def test_use_ghost_batchnorm_sets_the_layout_of_new_and_existing_layers():
    model = nn.Sequential(nn.BatchNorm2d(3), GhostBatchNorm2d(4, group_size=8))
    assert use_ghost_batchnorm(model, group_size=2, layout="packed") == 2
    assert [(m.group_size, m.layout) for m in model] == [(2, "packed"), (2, "packed")]


def test_ghost_bn_single_group_is_batchnorm_and_channels_last_and_bf16():
    torch.manual_seed(0)
    ghost = GhostBatchNorm2d(3, group_size=4)
    plain = copy.deepcopy(nn.BatchNorm2d(3))
    x = torch.randn(4, 3, 6, 6)
    torch.testing.assert_close(ghost(x), plain(x))
    x8 = torch.randn(8, 3, 6, 6)
    torch.testing.assert_close(ghost(x8.contiguous(memory_format=torch.channels_last)), ghost(x8))
    out = ghost(x8.bfloat16())
    assert out.dtype == torch.bfloat16


def test_ghost_bn_rejects_a_partial_group():
    ghost = GhostBatchNorm2d(3, group_size=32)
    with pytest.raises(ValueError, match="not a multiple of group_size=32"):
        ghost(torch.randn(48, 3, 2, 2))


def test_use_ghost_batchnorm_on_timm_resnet_keeps_state_and_checkpoint_format():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.weight.uniform_(0.5, 1.5)
    reference = copy.deepcopy(model.state_dict())
    assert use_ghost_batchnorm(model, group_size=2) == 20
    assert sum(isinstance(m, GhostBatchNorm2d) for m in model.modules()) == 20
    state = model.state_dict()
    assert list(state) == list(reference)
    for key in reference:
        torch.testing.assert_close(state[key], reference[key])
    model.train()
    model(torch.randn(4, 3, 32, 32)).sum().backward()  # trains with groups of 2
    plain = timm.create_model("resnet18", num_classes=10)
    plain.load_state_dict(model.state_dict(), strict=True)  # ghost checkpoint -> plain timm model
    model.load_state_dict(plain.state_dict(), strict=True)  # and back
    assert use_ghost_batchnorm(model, group_size=4) == 20
    assert {m.group_size for m in model.modules() if isinstance(m, GhostBatchNorm2d)} == {4}


def test_use_ghost_batchnorm_refuses_bn_subclasses_with_extra_behaviour():
    from timm.layers import BatchNormAct2d

    model = nn.Sequential(nn.Conv2d(3, 4, 1), BatchNormAct2d(4))
    with pytest.raises(TypeError, match="BatchNormAct2d"):
        use_ghost_batchnorm(model)
