import copy

import pytest
import torch
from torch import nn

from goyal_recipe import GhostBatchNorm2d, use_ghost_batchnorm, zero_init_last_bn
from goyal_recipe.bn import GhostBatchNormAct2d
from goyal_recipe.errors import UserError

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
        bn = nn.BatchNorm2d(ghost.num_features, momentum=ghost.momentum).to(ghost.weight.device, ghost.weight.dtype)
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


CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                         reason="needs a CUDA device")])


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("layout", ["per_group", "packed"])
@pytest.mark.parametrize("momentum", [0.3, None])
def test_both_ghost_bn_layouts_equal_separate_workers(momentum, layout, memory_format, device):
    """Both layouts (a batch_norm per group; groups packed as channels), each in both memory formats: outputs,
    input and parameter gradients, running statistics and layout."""
    torch.manual_seed(1)
    groups, channels = 3, 5
    ghost = GhostBatchNorm2d(channels, group_size=4, momentum=momentum, layout=layout).double().to(device)
    with torch.no_grad():
        ghost.weight.uniform_(0.5, 1.5)
        ghost.bias.uniform_(-0.5, 0.5)
        ghost.running_mean.normal_()
        ghost.running_var.uniform_(0.5, 1.5)
    workers = separate_bns(ghost, groups)
    x = (torch.randn(groups * 4, channels, 3, 2, dtype=torch.float64, device=device) * 2 - 1)
    x = x.contiguous(memory_format=memory_format).requires_grad_()
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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("layout", ["per_group", "packed"])
def test_ghost_bn_in_bf16_on_cuda_equals_separate_workers_in_fp32(layout):
    """What a bf16 autocast run feeds it: bf16 channels_last activations, fp32 parameters and statistics. The
    CUDA kernels accumulate in fp32, so the result is the fp32 per-group BN rounded to bf16."""
    torch.manual_seed(2)
    groups, channels = 4, 16
    ghost = GhostBatchNorm2d(channels, group_size=8, momentum=0.1, layout=layout).cuda()
    with torch.no_grad():
        ghost.weight.uniform_(0.5, 1.5)
        ghost.bias.uniform_(-0.5, 0.5)
    workers = separate_bns(ghost, groups)
    x = (torch.randn(groups * 8, channels, 7, 7, device="cuda") * 3 + 1).bfloat16()
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    xs = [c.detach().float().requires_grad_() for c in x.chunk(groups)]
    out = ghost(x)
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)
    ref = torch.cat([bn(c) for bn, c in zip(workers, xs)])
    torch.testing.assert_close(out.float(), ref, rtol=1.6e-2, atol=1.6e-2)
    grad = torch.randn_like(ref).bfloat16().float()  # the same upstream gradient for both, exactly
    out.backward(grad.bfloat16())
    ref.backward(grad)
    torch.testing.assert_close(x.grad.float(), torch.cat([c.grad for c in xs]), rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(ghost.weight.grad, sum(bn.weight.grad for bn in workers), rtol=2e-2, atol=2e-2)
    for buf in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(ghost, buf), sum(getattr(bn, buf) for bn in workers) / groups,
                                   rtol=1e-2, atol=1e-3)


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


class _ScaledBatchNorm2d(nn.BatchNorm2d):
    def forward(self, x):
        return 2 * super().forward(x)


def test_use_ghost_batchnorm_refuses_an_unknown_bn_subclass_before_changing_a_layer_and_its_advice_works():
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Sequential(_ScaledBatchNorm2d(3)), GhostBatchNorm2d(3, group_size=8))
    with pytest.raises(UserError, match=r"^ghost BN cannot stand in for 1\.0 \(.*_ScaledBatchNorm2d\): .* "
                                        r"build those layers as one of these, or keep BN statistics") as info:
        use_ghost_batchnorm(model, group_size=2)
    assert "\n" not in str(info.value)
    assert type(model[0]) is nn.BatchNorm2d and type(model[1][0]) is _ScaledBatchNorm2d
    assert model[2].group_size == 8
    model[1][0] = nn.BatchNorm2d(3)  # the advice: build the layer as nn.BatchNorm2d
    assert use_ghost_batchnorm(model, group_size=2) == 3
    assert all(isinstance(m, GhostBatchNorm2d) for m in (model[0], model[1][0], model[2]))
    assert not isinstance(model[1], GhostBatchNorm2d)


@pytest.mark.parametrize("momentum", [0.3, None])
def test_ghost_batchnormact_keeps_drop_then_act_and_equals_separate_workers(momentum):
    """timm's BatchNormAct2d normalises, then applies `drop`, then `act`: its ghost variant keeps
    both modules (the very objects) in that order. A drop that shifts by -1 and a ReLU do not commute."""
    from timm.layers import BatchNormAct2d

    class Shift(nn.Module):
        def forward(self, x):
            return x - 1

    torch.manual_seed(2)
    bn = BatchNormAct2d(4, momentum=momentum, act_layer=nn.ReLU, drop_layer=Shift).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    workers = [copy.deepcopy(bn) for _ in range(3)]
    model = nn.Sequential(bn)
    act, drop, weight = bn.act, bn.drop, bn.weight
    assert use_ghost_batchnorm(model, group_size=4) == 1
    ghost = model[0]
    assert type(ghost) is GhostBatchNormAct2d and ghost.act is act and ghost.drop is drop and ghost.weight is weight
    for _ in range(2):
        x = torch.randn(12, 4, 3, 3, dtype=torch.float64) * 2 + 1
        out = ghost(x)
        assert float(out.detach().min()) == 0.0  # ReLU applied last
        torch.testing.assert_close(out, torch.cat([w(c) for w, c in zip(workers, x.chunk(3))]), rtol=1e-12, atol=1e-12)
    for buf in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(ghost, buf), sum(getattr(w, buf) for w in workers) / 3, rtol=1e-12, atol=1e-12)
    workers[0].load_state_dict(ghost.state_dict())
    ghost.eval(), workers[0].eval()
    x = torch.randn(5, 4, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(ghost(x), workers[0](x), rtol=0, atol=0)


# timm's CNN families: ResNet-D (nn.BatchNorm2d), RegNet (BatchNormAct2d inside ConvNormAct),
# EfficientNet and MobileNetV3 (BatchNormAct2d with SiLU / hard-swish / ReLU and none).
TIMM_CNNS = ["resnet50d", "regnetx_002", "efficientnet_b0", "mobilenetv3_small_050"]


def _timm_cnn(name, **kwargs):
    try:
        return timm.create_model(name, pretrained=False, num_classes=5, **kwargs)
    except TypeError:  # EfficientNet and MobileNetV3 take no zero_init_last
        kwargs.pop("zero_init_last", None)
        return timm.create_model(name, pretrained=False, num_classes=5, **kwargs)


@pytest.mark.parametrize("name", TIMM_CNNS)
def test_ghost_bn_on_timm_cnns_equals_each_group_through_the_plain_model(name):
    """Training mode, float64, 2 groups x 2 images at 64 px: the ghost model's outputs and parameter
    gradients equal those of 2 copies of the plain model, each fed one group (k workers with BN over
    n = 2); its running statistics are the mean of the copies'; state_dict keys and tensors are kept.
    (At 32 px the last stages' BN sees 2 values per channel, and a 1e-15 change of the input moves
    the outputs by up to 4e-7: too ill-conditioned to compare two summation orders tightly.)"""
    torch.manual_seed(0)
    model = _timm_cnn(name, drop_rate=0.0).double().train()
    with torch.no_grad():  # away from timm's init (zero gammas, unit variances), so every layer counts
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 1.5)
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    acts = {n: (m.act, m.drop) for n, m in model.named_modules() if hasattr(m, "act") and isinstance(m, nn.BatchNorm2d)}
    assert (len(acts) > 0) == (name != "resnet50d")
    workers = [copy.deepcopy(model) for _ in range(2)]
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    params = [id(p) for p in model.parameters()]

    assert use_ghost_batchnorm(model, group_size=2) == len(bns)
    modules = dict(model.named_modules())
    assert all(isinstance(modules[n], GhostBatchNorm2d) for n in bns)
    assert all((modules[n].act, modules[n].drop) == pair for n, pair in acts.items())
    assert [id(p) for p in model.parameters()] == params  # an optimizer built before still trains them
    state = model.state_dict()
    assert list(state) == list(reference)
    assert all(torch.equal(state[k], reference[k]) for k in reference)

    x = torch.randn(4, 3, 64, 64, dtype=torch.float64)
    out = model(x)
    ref = torch.cat([w(c) for w, c in zip(workers, x.chunk(2))])
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-11)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    def flat(module, kind):  # one tensor per model: a comparison per layer would cost more than the models
        tensors = module.parameters() if kind == "grad" else (b for k, b in module.named_buffers() if kind in k)
        return torch.cat([(t.grad if kind == "grad" else t).flatten().double() for t in tensors])

    torch.testing.assert_close(flat(model, "grad"), sum(flat(w, "grad") for w in workers), rtol=1e-8, atol=1e-9)
    for kind in ("running_mean", "running_var"):
        torch.testing.assert_close(flat(model, kind), sum(flat(w, kind) for w in workers) / 2, rtol=1e-10, atol=1e-12)
    assert set(flat(model, "num_batches_tracked").tolist()) == {1.0}
    workers[0].load_state_dict(model.state_dict(), strict=True)  # ghost checkpoint -> plain timm model
    model.load_state_dict(workers[1].state_dict(), strict=True)  # and back


def _identity_shortcut(block):
    if hasattr(block, "has_skip"):  # EfficientNet / MobileNetV3 blocks
        return block.has_skip
    return getattr(block, "downsample", 0) is None or isinstance(getattr(block, "downsample", None), nn.Identity)


@pytest.mark.parametrize("name,count,last", [
    ("resnet50d", 16, "bn3"), ("regnetx_002", 13, "conv3.bn"),
    ("efficientnet_b0", 9, "bn3"), ("mobilenetv3_small_050", 7, "bn3"),
])
def test_zero_init_last_bn_on_timm_cnns_names_every_norm_it_zeroed(name, count, last):
    """The names returned are exactly the norms whose gamma is now zero and was not before, one per
    residual block; each block with an identity shortcut then starts as the identity (Sec. 5.1)."""
    torch.manual_seed(0)
    model = _timm_cnn(name, zero_init_last=False).double().eval()
    norms = {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    zero_before = {n for n, m in norms.items() if not m.weight.any()}
    names = zero_init_last_bn(model)
    zero_after = {n for n, m in norms.items() if not m.weight.any()}
    assert len(names) == count and all(n.endswith(last) for n in names)
    assert set(names) == zero_after - zero_before
    assert zero_init_last_bn(model) == names  # idempotent: the same names when already zero

    blocks = {n.rsplit(".", last.count(".") + 1)[0] for n in names}
    seen = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, (i[0], o)))
             for n, m in model.named_modules() if n in blocks]
    model(torch.randn(2, 3, 32, 32, dtype=torch.float64))
    for h in hooks:
        h.remove()
    identity = [n for n in blocks if _identity_shortcut(model.get_submodule(n))]
    assert len(identity) >= count // 2
    for n in identity:
        torch.testing.assert_close(seen[n][1], seen[n][0], rtol=0, atol=0, msg=n)
