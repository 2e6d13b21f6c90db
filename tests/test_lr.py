import io

import pytest
import torch
from torch import nn

from goyal_recipe import GoyalLR, Schedule

# 4 updates per epoch, warmup over 2 epochs from 0.1 to 0.4 (kn=1024), x0.1 at epochs 3 and 4 of 5.
SCHEDULE = Schedule(global_batch_size=1024, warmup_epochs=2, milestones=(3, 4), epochs=5)
UPDATES_PER_EPOCH = 4
EXPECTED_LR = [0.1, 0.1375, 0.175, 0.2125, 0.25, 0.2875, 0.325, 0.3625,
               0.4, 0.4, 0.4, 0.4, 0.04, 0.04, 0.04, 0.04, 0.004, 0.004, 0.004, 0.004]


def make(lr_scales=(1.0,)):
    params = [nn.Parameter(torch.zeros(3, dtype=torch.float64)) for _ in lr_scales]
    groups = [{"params": [p], "lr_scale": s} for p, s in zip(params, lr_scales)]
    opt = torch.optim.SGD(groups, lr=123.0)  # initial lr is overwritten by the schedule
    return params, opt, GoyalLR(opt, SCHEDULE, UPDATES_PER_EPOCH)


def update(params, opt, micro_batches=1):
    """One optimizer update whose gradient is exactly 1 per element, so the step equals -lr."""
    before = [p.detach().clone() for p in params]
    for _ in range(micro_batches):
        sum(p.sum() for p in params).div(micro_batches).backward()
    opt.step()
    opt.zero_grad()
    return [float((b - p.detach())[0]) for b, p in zip(before, params)]


@pytest.mark.parametrize("calls_per_update", [0, 1, 4])
def test_lr_per_update_whatever_the_number_of_step_calls(calls_per_update):
    params, opt, sched = make()
    used = []
    for _ in EXPECTED_LR:
        used += update(params, opt)
        for _ in range(calls_per_update):
            sched.step()
    assert used == pytest.approx(EXPECTED_LR, rel=1e-12)
    assert sched.updates_done == len(EXPECTED_LR)


def test_skipped_updates_do_not_advance_the_schedule():
    # An AMP overflow skips optimizer.step() but the loop (or accelerate) still steps the scheduler.
    params, opt, sched = make()
    used = []
    for t, _ in enumerate(EXPECTED_LR):
        if t in (2, 9, 12):
            for _ in range(3):
                sched.step()  # skipped iterations
        used += update(params, opt)
        sched.step()
    assert used == pytest.approx(EXPECTED_LR, rel=1e-12)


def test_gradient_accumulation_counts_updates_not_micro_batches():
    params, opt, sched = make()
    used = []
    for _ in EXPECTED_LR:
        used += update(params, opt, micro_batches=3)
        sched.step()
    assert used == pytest.approx(EXPECTED_LR, rel=1e-12)


def test_an_optimizer_stepped_one_group_at_a_time_counts_one_update():
    # DeepSpeed ZeRO-1/2 narrow param_groups to one group and call the inner step() per group.
    params, opt, sched = make(lr_scales=(1.0, 0.5, 2.0))
    used = []
    for _ in range(10):
        before = [p.detach().clone() for p in params]
        sum(p.sum() for p in params).backward()
        groups = opt.param_groups
        for group in groups:
            opt.param_groups = [group]
            opt.step()
        opt.param_groups = groups
        opt.zero_grad()
        used += [float((b - p.detach())[0]) for b, p in zip(before, params)]
        sched.step()
    assert sched.updates_done == 10
    assert used == pytest.approx([lr * s for lr in EXPECTED_LR[:10] for s in (1.0, 0.5, 2.0)], rel=1e-12)


def test_per_group_lr_scale():
    params, opt, sched = make(lr_scales=(1.0, 0.5))
    first = update(params, opt)
    sched.step()
    assert first == pytest.approx([0.1, 0.05])
    assert sched.get_last_lr() == pytest.approx([0.1375, 0.06875])


def test_get_last_lr_is_the_next_updates_lr():
    params, opt, sched = make()
    assert sched.get_last_lr() == pytest.approx([0.1])
    for t in range(13):
        update(params, opt)
        sched.step()
        assert sched.get_last_lr() == pytest.approx([EXPECTED_LR[t + 1]])


def test_resume_continues_the_schedule_exactly():
    params, opt, sched = make()
    for _ in range(7):
        update(params, opt)
        sched.step()
    buffer = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)  # plain data: loads without unpickling code

    params2, opt2, sched2 = make()
    with torch.no_grad():
        params2[0].copy_(params[0])
    opt2.load_state_dict(state["opt"])
    sched2.load_state_dict(state["sched"])
    used = []
    for _ in EXPECTED_LR[7:]:
        used += update(params2, opt2)
        sched2.step()
    assert used == pytest.approx(EXPECTED_LR[7:], rel=1e-12)


def test_resume_with_other_updates_per_epoch_is_refused():
    _, opt, sched = make()
    other = GoyalLR(torch.optim.SGD([nn.Parameter(torch.zeros(1))]), SCHEDULE, 8)
    with pytest.raises(ValueError, match="same global batch size"):
        other.load_state_dict(sched.state_dict())


def test_step_with_an_argument_is_refused():
    _, _, sched = make()
    with pytest.raises(TypeError, match="takes no argument"):
        sched.step(1024)


def test_accelerate_prepared_scheduler_with_accumulation():
    accelerate = pytest.importorskip("accelerate")
    acc = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = nn.Linear(3, 1, bias=False).double()
    nn.init.zeros_(model.weight)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = GoyalLR(opt, SCHEDULE, UPDATES_PER_EPOCH)
    model, opt, sched = acc.prepare(model, opt, sched)
    used = []
    x = torch.ones(1, 3, dtype=torch.float64)
    for _ in range(2 * 10):  # 10 updates of 2 micro-batches
        before = model.weight.detach().clone()
        with acc.accumulate(model):
            acc.backward(model(x).sum())  # accelerate divides by gradient_accumulation_steps
            opt.step()
            sched.step()
            opt.zero_grad()
        if not torch.equal(before, model.weight):
            used.append(float(before[0, 0] - model.weight.detach()[0, 0]))
    assert used == pytest.approx(EXPECTED_LR[:10], rel=1e-12)


@pytest.mark.parametrize("path", ["torch_fused", "build_optimizer", "for_loop"])
def test_steps_a_grad_scaler_skips_are_not_updates_with_either_optimizer_path(path):
    # GradScaler calls a fused optimizer's step() on an overflow too, with `found_inf` set, and the kernel
    # skips the update; a for-loop optimizer's step() it does not call, nor build_optimizer's fused SGD's (it
    # leaves the skip to GradScaler). None of these attempts is an update.
    from goyal_recipe import build_optimizer

    model = nn.Linear(3, 1, bias=False).double()
    nn.init.zeros_(model.weight)
    if path == "torch_fused":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, fused=True)
    else:
        opt = build_optimizer(model, momentum=0.0, nesterov=False, weight_decay=0.0,
                              foreach=None if path == "build_optimizer" else False)
    assert opt.defaults["fused"] is (None if path == "for_loop" else True)
    sched = GoyalLR(opt, SCHEDULE, UPDATES_PER_EPOCH)
    lr_at_step_calls = []  # registered after GoyalLR's: sees the LR its pre-hook set for the attempt
    opt.register_step_pre_hook(lambda o, args, kwargs: lr_at_step_calls.append(o.param_groups[0]["lr"]))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=1000)
    overflows = {0, 1, 2, 8, 9}  # attempts whose gradient is made inf: 3 before update 0, 2 before update 5
    used, after_skip = [], []
    for attempt in range(12 + len(overflows)):
        before = model.weight.detach().clone()
        scaler.scale(model(torch.ones(1, 3, dtype=torch.float64)).sum()).backward()  # unscaled gradient: 1
        if attempt in overflows:
            model.weight.grad[0, 1] = float("inf")
        scaler.step(opt)
        scaler.update()
        sched.step()
        opt.zero_grad()
        if attempt in overflows:
            assert torch.equal(model.weight, before), attempt
            after_skip.append(sched.updates_done)
        else:
            used.append(float(before[0, 0] - model.weight.detach()[0, 0]))
    assert sched.updates_done == 12 and after_skip == [0, 0, 0, 5, 5]
    assert used == pytest.approx(EXPECTED_LR[:12], rel=1e-12)
    if path == "torch_fused":  # a skipped attempt ran at the LR of the update that follows it
        assert lr_at_step_calls == pytest.approx(EXPECTED_LR[:1] * 4 + EXPECTED_LR[1:5] + EXPECTED_LR[5:6] * 3
                                                 + EXPECTED_LR[6:12], rel=1e-12)
    else:
        assert lr_at_step_calls == pytest.approx(EXPECTED_LR[:12], rel=1e-12)
    assert sched.get_last_lr() == pytest.approx([EXPECTED_LR[12]])
