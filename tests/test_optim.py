import pytest
import torch
from torch import nn

from goyal_recipe import GoyalLR, LRFoldedSGD, Schedule, build_optimizer, param_groups

timm = pytest.importorskip("timm")


def test_param_groups_timm_resnet50():
    model = timm.create_model("resnet50", num_classes=1000)
    groups = {g["name"]: g for g in param_groups(model)}
    # 53 BN layers x (gamma, beta); 53 convs + fc weight; fc bias.
    assert {n: (g["num_tensors"], g["num_params"], g["weight_decay"]) for n, g in groups.items()} == {
        "decay": (54, 25_502_912, 1e-4),
        "norm": (106, 53_120, 0.0),
        "bias": (1, 1_000, 1e-4),
    }
    names = {id(p): n for n, p in model.named_parameters()}
    norm_names = {names[id(p)] for p in groups["norm"]["params"]}
    # The shortcut BN of a timm ResNet is `downsample.1`: no "bn" in its name.
    assert {"layer1.0.downsample.1.weight", "layer1.0.downsample.1.bias", "layer4.0.downsample.1.weight"} <= norm_names
    bn_tensors = {n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) for n in (f"{n}.weight", f"{n}.bias")}
    assert norm_names == bn_tensors
    every = [id(p) for g in groups.values() for p in g["params"]]
    assert len(every) == len(set(every)) == len(list(model.parameters()))


def test_param_groups_bias_decay_and_shared_parameters():
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.LayerNorm(4), lin)  # shared module: parameters once
    groups = {g["name"]: g for g in param_groups(model, weight_decay=0.05, bias_weight_decay=0.0)}
    assert groups["decay"]["num_tensors"] == 1 and groups["bias"]["num_tensors"] == 1
    assert groups["bias"]["weight_decay"] == 0.0 and groups["norm"]["num_params"] == 8


def run_trajectory(make_opt, updates=50):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    data = torch.randn(updates, 16, 6, dtype=torch.float64)
    target = torch.randn(updates, 16, 3, dtype=torch.float64)
    opt = make_opt(model)
    # Warmup over updates 0-9 from 0.1 to 0.4, x0.1 at updates 30 and 40.
    sched = GoyalLR(opt, Schedule(global_batch_size=1024, warmup_epochs=1, milestones=(3, 4), epochs=5), 10)
    for x, y in zip(data, target):
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("nesterov", [False, True])
def test_lr_folded_sgd_with_correction_follows_torch_sgd(nesterov):
    def torch_sgd(m):
        return torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=nesterov)

    def folded(correction):
        return lambda m: LRFoldedSGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4,
                                     nesterov=nesterov, momentum_correction=correction)

    reference = run_trajectory(torch_sgd)
    corrected = run_trajectory(folded(True))
    uncorrected = run_trajectory(folded(False))
    rel = lambda a: float((a - reference).norm() / reference.norm())  # noqa: E731
    assert rel(corrected) < 1e-6
    assert rel(uncorrected) > 1e-2  # the missing correction changes the trajectory clearly


def test_lr_folded_sgd_matches_torch_sgd_at_constant_lr_without_correction():
    # Eq. (9) and (10) agree while the LR is fixed, correction or not.
    torch.manual_seed(1)
    w1 = nn.Parameter(torch.randn(5, dtype=torch.float64))
    w2 = nn.Parameter(w1.detach().clone())
    a = torch.optim.SGD([w1], lr=0.3, momentum=0.9)
    b = LRFoldedSGD([w2], lr=0.3, momentum=0.9, momentum_correction=False)
    for step in range(20):
        for w, opt in ((w1, a), (w2, b)):
            (w - 2).pow(2).sum().backward()
            opt.step()
            opt.zero_grad()
    torch.testing.assert_close(w1, w2, rtol=1e-12, atol=1e-12)


def test_lr_folded_sgd_state_survives_checkpoint():
    w = nn.Parameter(torch.ones(3))
    opt = LRFoldedSGD([w], lr=0.5, momentum=0.9)
    w.sum().backward()
    opt.step()
    state = opt.state_dict()
    assert state["state"][0]["lr"] == 0.5
    torch.testing.assert_close(state["state"][0]["velocity"], torch.full((3,), 0.5))


def test_build_optimizer_kinds():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4))
    sgd = build_optimizer(model, "sgd")
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"] is True
    assert [g["weight_decay"] for g in sgd.param_groups] == [1e-4, 0.0]
    assert isinstance(build_optimizer(model, "folded_sgd"), LRFoldedSGD)
    with pytest.raises(ValueError, match="unknown optimizer 'adam'"):
        build_optimizer(model, "adam")


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("correction", [False, True])
def test_lr_folded_sgd_foreach_equals_the_per_tensor_loop(nesterov, correction):
    def folded(foreach):
        return lambda m: LRFoldedSGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=nesterov,
                                     momentum_correction=correction, foreach=foreach)

    # 50 updates through warmup and two decays: the same operations in the same order, to the bit.
    assert torch.equal(run_trajectory(folded(True)), run_trajectory(folded(False)))


def test_lr_folded_sgd_foreach_with_tensors_joining_late():
    """A tensor without gradient in the first update starts its velocity later than the others of its group."""
    def run(foreach):
        torch.manual_seed(2)
        early, late = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(3))
        opt = LRFoldedSGD([early, late], lr=0.5, momentum=0.9, weight_decay=1e-2, nesterov=True, foreach=foreach)
        for update, lr in enumerate((0.5, 1.0, 0.25)):
            for group in opt.param_groups:
                group["lr"] = lr
            loss = early.pow(2).sum() + (late.pow(3).sum() if update else 0)
            loss.backward()
            opt.step()
            opt.zero_grad()
        return torch.cat([early.detach(), late.detach()]), opt.state[late]["lr"]

    (foreach, late_lr), (loop, _) = run(True), run(False)
    assert torch.equal(foreach, loop) and late_lr == 0.25


def test_build_optimizer_takes_the_fast_path():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4))
    sgd = build_optimizer(model, "sgd")  # CPU parameters: torch's fused kernel (torch >= 2.4)
    assert sgd.defaults["fused"] is True and not sgd.defaults["foreach"]
    # Parameters torch has no fused kernel for (complex ones): the foreach path.
    complex_sgd = build_optimizer(nn.Linear(3, 2, dtype=torch.complex64), "sgd")
    assert complex_sgd.defaults["foreach"] is True and not complex_sgd.defaults["fused"]
    assert build_optimizer(model, "sgd", foreach=False).defaults["foreach"] is False
    assert build_optimizer(model, "folded_sgd").defaults["foreach"] is True
    assert build_optimizer(model, "folded_sgd", foreach=False).defaults["foreach"] is False
    if torch.cuda.is_available():
        fused = build_optimizer(model.cuda(), "sgd")
        assert fused.defaults["fused"] is True and not fused.defaults["foreach"]


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_fast_paths_equal_the_per_tensor_loop(nesterov):
    # The foreach path takes torch's per-tensor steps to the bit, the fused kernel (the default on a CPU and on
    # CUDA) up to the rounding of its multiply-adds, with decay on some tensors only: 50 updates through warmup
    # and two decays (measured: 1.3e-15 at most, 2e-13 relative).
    def sgd(**path):
        return lambda m: build_optimizer(m, "sgd", nesterov=nesterov, **path)

    loop = run_trajectory(sgd(foreach=False))
    assert build_optimizer(nn.Linear(2, 2), "sgd").defaults["fused"] is True
    assert torch.equal(run_trajectory(sgd(foreach=True)), loop)
    fused = run_trajectory(sgd())
    assert torch.allclose(fused, loop, rtol=1e-11, atol=1e-14)


def test_a_grad_scalers_skipped_step_leaves_the_fused_sgd_untouched():
    """fp16's GradScaler skips a step whose gradients overflowed. Given the fused kernel's overflow flag, torch's
    fused SGD still wrote its momentum buffer (uninitialised memory on a first step) and the next updates went
    wrong; build_optimizer's SGD leaves the skip to GradScaler: no state, no change, then the per-tensor path's
    updates."""
    def train(path):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
        x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
        optimizer = build_optimizer(model, "sgd", **path)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        before = [p.detach().clone() for p in model.parameters()]
        for step in range(4):
            loss = nn.functional.cross_entropy(model(x), y) * (float("inf") if step == 0 else 1.0)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
            if step == 0:
                assert optimizer.state == {} or all("momentum_buffer" not in s for s in optimizer.state.values())
                assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert build_optimizer(nn.Linear(2, 2), "sgd").defaults["fused"] is True
    assert torch.allclose(train({}), train({"foreach": False}), rtol=1e-6, atol=1e-7)
