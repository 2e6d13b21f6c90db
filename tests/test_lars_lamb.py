"""LARS and LAMB (timm's) in the recipe: BN and biases outside weight decay and the trust ratio, one update
computed by hand, the LR of every update from the Schedule, polynomial decay, and the 32k recipe."""

import pytest
import torch
from torch import nn

from goyal_recipe import GoyalLR, Schedule, build_optimizer
from goyal_recipe.config import ConfigError, load_config
from goyal_recipe.errors import UserError
from goyal_recipe.optim import _is_norm
from goyal_recipe.step import build_training

timm = pytest.importorskip("timm")

WEIGHT_DECAY = 5e-4


@pytest.mark.parametrize("kind", ["lars", "lamb"])
def test_timm_resnet_groups_keep_bn_and_bias_out_of_decay_and_trust_ratio(kind):
    model = timm.create_model("resnet10t", num_classes=4)
    optimizer = build_optimizer(model, kind, weight_decay=WEIGHT_DECAY)
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert set(groups) == {"decay", "norm", "bias"}
    norm_params = {id(p) for m in model.modules() if _is_norm(m) for p in m.parameters(recurse=False)}
    # the shortcut BN (downsample.2 in resnet10t's avg-pool shortcut) is a norm layer though its name has no "bn"
    assert any(name.startswith("layer2.0.downsample") and id(p) in norm_params for name, p in model.named_parameters())
    assert {id(p) for p in groups["norm"]["params"]} == norm_params
    assert {id(p) for p in groups["bias"]["params"]} == {id(model.fc.bias)}
    assert all(p.ndim > 1 for p in groups["decay"]["params"])
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    # timm adapts a group where weight_decay != 0 or always_adapt: the weights always, BN and biases never
    assert (groups["decay"]["weight_decay"], groups["decay"]["always_adapt"]) == (WEIGHT_DECAY, True)
    for name in ("norm", "bias"):
        assert (groups[name]["weight_decay"], groups[name]["always_adapt"]) == (0.0, False)
    if kind == "lars":
        assert groups["decay"]["trust_coeff"] == 0.001
    else:
        assert optimizer.defaults["max_grad_norm"] is None  # no clipping hidden in the optimizer


def small_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    with torch.no_grad():  # BN away from its init (gamma 1, beta 0), so its update shows
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    model(torch.randn(8, 3, 6, 6)).square().mean().backward()
    return model


@pytest.mark.parametrize("foreach", [False, True])
def test_one_lars_update_by_hand(foreach):
    model = small_model()
    conv, bn, fc = model[0], model[1], model[4]
    before = {name: (p.detach().clone(), p.grad.clone()) for name, p in model.named_parameters()}
    lr, eta = 0.7, 0.001
    build_optimizer(model, "lars", lr=lr, momentum=0.9, nesterov=False, weight_decay=WEIGHT_DECAY,
                    trust_coefficient=eta, foreach=foreach).step()
    for name, p in model.named_parameters():
        w, g = before[name]
        if p is conv.weight or p is fc.weight:  # Algorithm 1: eta |w| / (|g| + beta |w|) x (g + beta w)
            trust = eta * w.norm() / (g.norm() + WEIGHT_DECAY * w.norm())
            expected = w - lr * trust * (g + WEIGHT_DECAY * w)  # first update: the velocity is the step
        else:  # BN gamma/beta, conv and fc biases: plain SGD, no decay, no trust ratio
            assert any(p is q for q in (bn.weight, bn.bias, conv.bias, fc.bias))
            expected = w - lr * g
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("foreach", [False, True])
def test_one_lamb_update_by_hand(foreach):
    model = small_model()
    conv, fc = model[0], model[4]
    before = {name: (p.detach().clone(), p.grad.clone()) for name, p in model.named_parameters()}
    lr, eps = 0.01, 1e-6
    build_optimizer(model, "lamb", lr=lr, weight_decay=WEIGHT_DECAY, foreach=foreach).step()
    for name, p in model.named_parameters():
        w, g = before[name]
        # first update with bias correction: m_hat = g, v_hat = g^2, so Adam's step is g / (|g| + eps)
        adam = g / (g.abs() + eps)
        if p is conv.weight or p is fc.weight:  # decay inside the update, then the trust ratio |w| / |update|
            update = adam + WEIGHT_DECAY * w
            expected = w - lr * (w.norm() / update.norm()) * update
        else:
            expected = w - lr * adam
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("kind", ["lars", "lamb"])
def test_every_update_uses_the_schedules_lr(kind):
    """GoyalLR sets the LR of every group before each update: the gradual warmup from the reference LR, then
    the polynomial decay. With momentum 0, LARS moves a BN parameter by exactly lr_t x its gradient."""
    updates_per_epoch, epochs = 3, 4
    schedule = Schedule(global_batch_size=1024, base_lr=0.1, base_batch_size=256, warmup_epochs=1, decay="poly",
                        poly_power=2.0, epochs=epochs)
    model = small_model().double()  # float64: the displacement / gradient ratio below is exact to 1e-12
    optimizer = build_optimizer(model, kind, momentum=0.0, nesterov=False, weight_decay=WEIGHT_DECAY)
    GoyalLR(optimizer, schedule, updates_per_epoch)
    used = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: used.append([g["lr"] for g in opt.param_groups]))
    bn_weight = model[1].weight
    moved = []
    for t in range(updates_per_epoch * epochs):
        model.zero_grad()
        model(torch.randn(8, 3, 6, 6, dtype=torch.float64)).square().mean().backward()
        w, g = bn_weight.detach().clone(), bn_weight.grad.clone()
        optimizer.step()
        moved.append(float(((w - bn_weight.detach()) / g).mean()))
    expected = [schedule.lr(t / updates_per_epoch) for t in range(updates_per_epoch * epochs)]
    assert expected[:4] == pytest.approx([0.1, 0.2, 0.3, 0.4])  # warmup 0.1 -> 0.4 over 3 updates
    assert expected[4] == pytest.approx(0.4 * (1 - 1 / 9) ** 2)  # poly: 1/9 of the way from epoch 1 to 4
    assert used == [[lr] * 3 for lr in expected]
    if kind == "lars":
        assert moved == pytest.approx(expected, rel=1e-10)


def test_poly_decay_table_and_bad_power():
    s = Schedule(global_batch_size=32768, base_lr=0.1, base_batch_size=256, warmup_epochs=5, decay="poly",
                 epochs=90)
    assert [s.lr(e) for e in (0, 2.5, 5, 47.5, 90)] == pytest.approx([0.1, 6.45, 12.8, 3.2, 0.0])
    linear = Schedule(global_batch_size=256, warmup="none", decay="poly", poly_power=1.0, epochs=10)
    assert [linear.lr(e) for e in (0, 2.5, 5, 10)] == pytest.approx([0.1, 0.075, 0.05, 0.0])
    assert "polynomial, power 2, to 0 at epoch 90 (update 3510)" in s.describe(39)
    with pytest.raises(ValueError, match="poly_power must be > 0"):
        Schedule(global_batch_size=256, decay="poly", poly_power=0)
    with pytest.raises(ConfigError, match="optim.poly_power"):
        load_config(None, ["optim.poly_power=-1"])


def test_bad_settings_name_the_key():
    model = small_model()
    with pytest.raises(UserError, match="optim.norm_weight_decay=0"):
        build_optimizer(model, "lars", norm_weight_decay=1e-4)
    with pytest.raises(UserError, match="optim.bias_weight_decay=0"):
        build_optimizer(model, "lamb", bias_weight_decay=1e-4)
    cfg = load_config(None, ["optim.optimizer=lars", "engine=deepspeed", "deepspeed.zero_stage=1"])
    with pytest.raises(ConfigError, match="deepspeed.zero_stage=0"):
        build_training(cfg, engine=None, plan=None, num_classes=4, updates_per_epoch=1)


def test_kn32k_lars_recipe():
    cfg = load_config("recipes/resnet50_kn32k_lars.yaml")
    o, s = cfg.optim, cfg.schedule()
    assert (o.optimizer, o.trust_coefficient, o.momentum, o.nesterov) == ("lars", 0.001, 0.9, False)
    assert (cfg.batch.global_batch_size, o.epochs, o.decay, o.poly_power) == (32768, 90, "poly", 2.0)
    assert (o.norm_weight_decay, o.bias_weight_decay) == (0.0, 0.0)
    updates_per_epoch = 1_281_167 // 32768  # 39
    assert s.lr(0) == 0.1 and s.lr(5) == pytest.approx(12.8)
    assert s.lr(1 / updates_per_epoch) == pytest.approx(0.1 + (12.8 - 0.1) / (5 * updates_per_epoch))
