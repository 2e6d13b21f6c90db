"""The gradient noise scale: the estimator against a closed form, the tracker's state, the per-backward norms,
and goyal-train's measurement under every split of the same images into ranks and micro-batches."""

import json

import pytest
import torch
from torch import nn

from _loop import run_local
from _reference import EVERY_UPDATE, LARS, NOISE_KEYS, assert_same_noise, logged, one_process_run
from _runs import EPOCHS, RECIPE, UPDATES_PER_EPOCH, overrides, records, train
from goyal_recipe import GradientNoiseScale, Schedule, noise_scale_estimates
from goyal_recipe.config import BatchPlan, load_config
from goyal_recipe.engines.local import LocalEngine
from goyal_recipe.errors import UserError
from goyal_recipe.lr import GoyalLR
from goyal_recipe.noise_scale import BackwardGradNorms, grad_sq_norm
from goyal_recipe.step import TrainStep, noise_scale_meter



def least_squares_draws(draws, big_batch, micro_batches, dim, noise_std, delta, generator):
    """Per update: the mean |G_small|^2 over `micro_batches` gradients of big_batch / micro_batches samples,
    and |G_big|^2 of their mean, for the loss 1/2 (x.w - y)^2 with x ~ N(0, I), y = x.w* + N(0, noise_std^2),
    at w = w* + delta. Per-sample gradient: x (x.delta - eps)."""
    x = torch.randn(draws, big_batch, dim, generator=generator, dtype=torch.float64)
    eps = noise_std * torch.randn(draws, big_batch, generator=generator, dtype=torch.float64)
    per_sample = x * (x @ delta - eps).unsqueeze(-1)
    small = per_sample.reshape(draws, micro_batches, big_batch // micro_batches, dim).mean(2)
    big = per_sample.mean(1)
    return small.square().sum(-1).mean(1), big.square().sum(-1)


def test_estimates_match_the_closed_form_of_least_squares():
    """G = delta; Sigma = (|delta|^2 + s^2) I + delta delta^T (Isserlis' theorem for Gaussian x), so
    tr(Sigma) = d (|delta|^2 + s^2) + |delta|^2 and B_simple = tr(Sigma) / |delta|^2."""
    dim, noise_std, big_batch, micro_batches, draws = 8, 1.0, 64, 8, 20_000
    generator = torch.Generator().manual_seed(0)
    delta = torch.randn(dim, generator=generator, dtype=torch.float64) * 0.3
    grad_sq_true = float(delta.square().sum())
    trace_true = dim * (grad_sq_true + noise_std ** 2) + grad_sq_true
    small, big = least_squares_draws(draws, big_batch, micro_batches, dim, noise_std, delta, generator)
    grad_sq, trace_sigma = noise_scale_estimates(small, big_batch // micro_batches, big, big_batch)
    assert float(grad_sq.mean()) == pytest.approx(grad_sq_true, rel=0.03)
    assert float(trace_sigma.mean()) == pytest.approx(trace_true, rel=0.02)
    # The naive reading of |G_big|^2 as |G|^2 is biased by tr(Sigma) / B_big, far beyond those tolerances.
    assert float(big.mean()) == pytest.approx(grad_sq_true + trace_true / big_batch, rel=0.02)
    assert float(big.mean()) > 1.2 * grad_sq_true

    tracker = GradientNoiseScale(ema_decay=0.999)
    for s, b in zip(small.tolist(), big.tolist()):
        tracker.update(s, big_batch // micro_batches, b, big_batch)
    assert tracker.b_simple == pytest.approx(trace_true / grad_sq_true, rel=0.05)


def test_estimates_of_one_pair_by_hand_and_bad_batches():
    grad_sq, trace_sigma = noise_scale_estimates(3.0, 8, 1.5, 32)
    assert grad_sq == pytest.approx((32 * 1.5 - 8 * 3.0) / 24)  # 1.0
    assert trace_sigma == pytest.approx((3.0 - 1.5) / (1 / 8 - 1 / 32))  # 16.0
    for small_batch, big_batch in ((8, 8), (16, 8), (0, 8)):
        with pytest.raises(UserError, match="small_batch < big_batch"):
            noise_scale_estimates(1.0, small_batch, 1.0, big_batch)
    with pytest.raises(UserError, match="ema_decay"):
        GradientNoiseScale(ema_decay=1.0)


def test_tracker_averages_then_divides_and_round_trips():
    pairs = [(3.0, 1.5), (2.0, 1.9), (5.0, 1.0), (1.0, 1.2)]
    tracker = GradientNoiseScale(ema_decay=0.5)
    assert tracker.b_simple is None and tracker.grad_sq is None
    tracker.update(*(3.0, 8), *(1.5, 32))
    assert (tracker.grad_sq, tracker.trace_sigma, tracker.b_simple) == pytest.approx((1.0, 16.0, 16.0))  # debiased
    grad_ema = trace_ema = 0.0
    for t, (s, b) in enumerate(pairs, 1):
        if t > 1:
            tracker.update(s, 8, b, 32)
        g, tr = noise_scale_estimates(s, 8, b, 32)
        grad_ema, trace_ema = 0.5 * grad_ema + 0.5 * g, 0.5 * trace_ema + 0.5 * tr
    assert tracker.grad_sq == pytest.approx(grad_ema / (1 - 0.5 ** 4))
    assert tracker.trace_sigma == pytest.approx(trace_ema / (1 - 0.5 ** 4))
    assert tracker.b_simple == pytest.approx(trace_ema / grad_ema)  # ratio of the averages, not average of ratios

    restored = GradientNoiseScale(ema_decay=0.5)
    restored.load_state_dict(json.loads(json.dumps(tracker.state_dict())))
    for other in (tracker, restored):
        other.update(4.0, 8, 1.1, 32)
    assert restored.state_dict() == tracker.state_dict()
    assert (restored.b_simple, restored.updates) == (tracker.b_simple, 5)
    with pytest.raises(UserError, match="ema_decay"):
        GradientNoiseScale(ema_decay=0.9).load_state_dict(tracker.state_dict())

    unresolved = GradientNoiseScale()
    unresolved.update(1.0, 8, 1.2, 32)  # |G_big| > |G_small|: tr(Sigma) estimate < 0
    assert unresolved.trace_sigma < 0 and unresolved.b_simple is None


def test_backward_grad_norms_are_each_passes_own_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    batches = [torch.randn(6, 5) for _ in range(3)]
    expected = 0.0
    for x in batches:  # each pass's gradient alone, as autograd.grad gives it
        grads = torch.autograd.grad(model(x).square().mean(), list(model.parameters()))
        expected += sum(float(g.square().sum()) for g in grads)
    norms = BackwardGradNorms(model.parameters())
    for x in batches:  # accumulated into .grad, as under gradient accumulation
        model(x).square().mean().backward()
    assert float(norms.take()) == pytest.approx(expected, rel=1e-6)
    assert float(norms.take()) == 0.0
    accumulated = sum(float(p.grad.square().sum()) for p in model.parameters())
    assert float(grad_sq_norm(model.parameters())) == pytest.approx(accumulated, rel=1e-6)
    assert accumulated != pytest.approx(expected, rel=1e-3)  # the sum of passes is not the pass sum's norm
    norms.active = False  # an update that is not measured records nothing
    model(batches[0]).sum().backward()
    assert float(norms.take()) == 0.0
    norms.active = True
    norms.remove()
    model(batches[0]).sum().backward()
    assert float(norms.take()) == 0.0


# goyal-train: LARS with polynomial decay (the schedule of _reference.LARS's runs), 4 updates of kn = 16.
SCHEDULE = Schedule(global_batch_size=16, base_lr=0.05, base_batch_size=4, warmup_epochs=1, decay="poly",
                    epochs=EPOCHS)


@pytest.fixture(scope="module")
def noise_runs(data_root, tmp_path_factory):
    """1 process x 2 micro-batches of 8 (engine=local, in this process: TensorBoard, plots). The same images as
    2 processes x 8 are checked in the accelerate and DeepSpeed integration tests, in their launches."""
    one, output = one_process_run(data_root, tmp_path_factory)
    return one.parent, output


def test_noise_scale_in_step_records_epoch_line_tensorboard_and_plot(noise_runs):
    out, stdout = noise_runs
    steps = records(out / "one", "step")
    assert [r["update"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        assert r["noise_grad_sq"] > 0 and r["noise_trace_sigma"] > 0
        assert r["noise_scale"] == pytest.approx(r["noise_trace_sigma"] / r["noise_grad_sq"], rel=1e-12)
        # LARS's per-update LR is the schedule's (poly decay after the gradual warmup)
        assert r["lr"] == pytest.approx(SCHEDULE.lr((r["update"] - 1) / UPDATES_PER_EPOCH), rel=1e-12)
    assert len({r["noise_scale"] for r in steps}) == 4  # it moves with the weights
    b_simple = steps[-1]["noise_scale"]
    assert f"noise scale: B_simple = {b_simple:.4g} images; kn = 16 is {16 / b_simple:.3g}x B_simple" in stdout
    assert (out / "one" / "plots" / "noise_scale.png").stat().st_size > 0
    events = b"".join(p.read_bytes() for p in (out / "one" / "tracking").rglob("events.out.tfevents*"))
    assert b"train/noise_scale" in events and b"train/noise_trace_sigma" in events


def test_resume_continues_the_noise_tracker(noise_runs, data_root, tmp_path):
    out, _ = noise_runs
    run_local(data_root, tmp_path, "one", **{**LARS, "run.max_updates": 2, "run.resume": "auto"})
    with logged() as lines:
        run_local(data_root, tmp_path, "one", **{**LARS, "run.resume": "auto"})
    assert any("at update 2" in line for line in lines)
    assert_same_noise(tmp_path / "one", out / "one")  # updates 3 and 4 average on from the saved EMAs
    resumed = records(tmp_path / "one", "step")
    assert [r["update"] for r in resumed] == [1, 2, 3, 4]


def test_one_gradient_per_update_logs_no_noise_scale(data_root, tmp_path):
    with logged() as lines:
        run_local(data_root, tmp_path, "single", **{"batch.per_device_batch_size": 16, "run.max_updates": 1,
                                                     **EVERY_UPDATE})
    assert sum("noise scale not measured: it needs two gradients per update" in line for line in lines) == 1
    steps = records(tmp_path / "single", "step")
    assert len(steps) == 1 and not any(key in steps[0] for key in NOISE_KEYS)


def test_recipe_switch_turns_the_meter_off():
    cfg = load_config(RECIPE, ["run.noise_scale=false"])
    plan = BatchPlan(global_batch_size=16, per_device_batch_size=8, world_size=1, accumulation_steps=2,
                     bn_group_size=8)
    assert noise_scale_meter(cfg, engine=None, plan=plan, model=None) is None
    assert (load_config(RECIPE).run.noise_scale, load_config(RECIPE).run.noise_scale_every_updates) == (True, 4)


@pytest.mark.slow  # the deepspeed launcher takes about a minute to start 2 CPU processes
def test_deepspeed_launcher_two_processes_same_noise_scale(noise_runs, data_root, tmp_path):
    """ZeRO-0 (.grad, as accelerate) with LARS over 4 updates; ZeRO-1 with 2 processes runs by default in
    test_integration_deepspeed's launch."""
    out, _ = noise_runs
    train(overrides(data_root, tmp_path, "zero0", engine="deepspeed", **LARS), launcher="deepspeed")
    assert records(tmp_path / "zero0", "run")[0]["world_size"] == 2
    assert_same_noise(tmp_path / "zero0", out / "one")


class _HostTensor(torch.Tensor):
    """The loader's CPU tensors (sample indices, bad flags): reading them on the host waits for no device."""


def test_an_update_reads_one_device_value_on_the_host(monkeypatch):
    """On CUDA every read of a device value on the host waits for the kernels queued before it. An update reads
    one, the finiteness verdict, measured by the noise scale or not; the measured squared norms stay on the
    device until the averages are read (one copy for all the updates recorded since)."""
    cfg = load_config(RECIPE, ["run.noise_scale_every_updates=2"])
    plan = BatchPlan(global_batch_size=16, per_device_batch_size=8, world_size=1, accumulation_steps=2,
                     bn_group_size=8)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = GoyalLR(optimizer, Schedule(global_batch_size=16, warmup="none", decay="none", epochs=1), 4)
    train_step = TrainStep(cfg, LocalEngine(cfg), plan, model, optimizer, scheduler)
    batches = iter([(torch.randn(8, 3, 8, 8), torch.randint(0, 3, (8,)),
                     torch.arange(8 * i, 8 * i + 8).as_subclass(_HostTensor),
                     torch.tensor([0] * 7 + [i % 2]).as_subclass(_HostTensor)) for i in range(6)])
    reads = []
    for name in ("__bool__", "__float__", "__int__", "item", "tolist"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name):
            if type(self) is torch.Tensor:
                reads.append(_name)
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, name, counted)
    for update in range(3):  # measured, not measured, measured
        reads.clear()
        stats, _, applied, indices = train_step(batches)
        assert applied and reads == ["__bool__"], (update, reads)
        assert indices == list(range(16 * update, 16 * update + 16))
        # images, and the bad flag of the update's second micro-batch
        assert [float(stats.images), float(stats.bad_images)] == [16.0, 1.0]
    reads.clear()
    fields = train_step.noise_fields()
    assert reads == ["tolist"] and train_step.noise.tracker.updates == 2
    assert fields["noise_scale"] is None or fields["noise_scale"] > 0
    assert fields["noise_grad_sq"] == train_step.noise.tracker.grad_sq


class _Scaler:
    """A gradient scaler's two calls the meter makes (fp16): the scale the loss was multiplied by."""

    def __init__(self, scale):
        self.scale = scale

    def is_enabled(self):
        return True

    def get_scale(self):
        return self.scale


def test_loop_meter_measures_chosen_updates_from_the_loops_own_gradients():
    """One process, 3 micro-batches of 4 per update (kn = 12), measured on updates 0 and 2 of 3: the averages
    are those of the micro-batch gradients computed apart (autograd.grad), and the hooks exist only during a
    measured update's backward passes. A loss scaled by 8 (fp16) gives the same estimate once unscaled."""
    from goyal_recipe.noise_scale import LoopNoiseScale

    torch.manual_seed(0)
    inputs = [torch.randn(4, 5, dtype=torch.float64) for _ in range(9)]
    data = [(x, x[:, :3].argmax(1)) for x in inputs]  # learnable labels: |G|^2 well above its noise

    def model_and_meter(**kwargs):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        meter = LoopNoiseScale(model.parameters(), micro_batch_size=4, global_batch_size=12, every_updates=2,
                               **kwargs).attach(optimizer)
        return model, optimizer, meter

    def loss(model, x, y, scale=1.0):  # each micro-batch's mean / A, as a plain accumulation loop writes it
        return nn.functional.cross_entropy(model(x), y) / 3 * scale

    model, optimizer, meter = model_and_meter()
    expected, hooks = GradientNoiseScale(), []
    for update in range(3):
        hooks.append(meter._norms is not None)
        params = list(model.parameters())
        small = []
        for x, y in data[3 * update:3 * update + 3]:  # on copies of the weights: the meter's hooks see nothing
            copies = {name: p.detach().clone().requires_grad_() for name, p in model.named_parameters()}
            logits = torch.func.functional_call(model, copies, (x,))
            grads = torch.autograd.grad(nn.functional.cross_entropy(logits, y), list(copies.values()))
            small.append(sum(float(g.square().sum()) for g in grads))
        for x, y in data[3 * update:3 * update + 3]:
            loss(model, x, y).backward()
        big = sum(float(p.grad.square().sum()) for p in params)
        if update % 2 == 0:
            expected.update(sum(small) / 3, 4, big, 12)
        optimizer.step()
        optimizer.zero_grad()
    assert hooks == [True, False, True] and meter.updates_seen == 3
    assert meter.tracker.updates == 2 and expected.b_simple > 0
    assert meter.fields() == {"noise_scale": pytest.approx(expected.b_simple, rel=1e-12),
                              "noise_grad_sq": pytest.approx(expected.grad_sq, rel=1e-12),
                              "noise_trace_sigma": pytest.approx(expected.trace_sigma, rel=1e-12)}

    scaled_model, scaled_optimizer, scaled = model_and_meter(grad_scaler=_Scaler(8.0))
    for update in range(3):
        for x, y in data[3 * update:3 * update + 3]:
            loss(scaled_model, x, y, scale=8.0).backward()
        for p in scaled_model.parameters():
            p.grad /= 8.0  # what GradScaler.unscale_ does before the step
        scaled_optimizer.step()
        scaled_optimizer.zero_grad()
    assert scaled.fields() == pytest.approx(meter.fields(), rel=1e-12)

    restored = model_and_meter()[2]
    restored.load_state_dict(json.loads(json.dumps(meter.state_dict())))
    assert restored.state_dict() == meter.state_dict() and restored._norms is None  # update 3 is not measured
    with pytest.raises(UserError, match="needs two gradients per update"):
        LoopNoiseScale(model.parameters(), micro_batch_size=12, global_batch_size=12)
    with pytest.raises(UserError, match="not a whole number of micro-batches"):
        LoopNoiseScale(model.parameters(), micro_batch_size=5, global_batch_size=12)


def test_loop_recipe_watch_again_keeps_the_running_noise_averages():
    """A second `watch()` carries the meter's averages on (it restarted from nothing), and a resumed state is
    loaded by the first watch only (every later watch rewound the averages to the checkpoint)."""
    from goyal_recipe.integrations import LoopRecipe

    torch.manual_seed(0)
    model = nn.Linear(5, 3).double()
    data = [(torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))) for _ in range(8)]
    schedule = Schedule(global_batch_size=8, base_batch_size=8, warmup="none", decay="none", epochs=1)

    def new_recipe():
        return LoopRecipe(schedule, num_samples=32, per_device_batch_size=4, world_size=1, rank=0,
                          split_in_sampler=True, bn_group_size=None, noise_scale_every_updates=1)

    def watch(recipe, optimizer):
        recipe.watch(model, optimizer)
        recipe.check.remove()  # the meter alone: this loop is not the recipe's (no sampler, no recipe loss)

    def update(optimizer, k):  # 2 micro-batches of 4 = kn
        for x, y in data[2 * k:2 * k + 2]:
            (nn.functional.cross_entropy(model(x), y) / 2).backward()
        optimizer.step()
        optimizer.zero_grad()

    def seen(recipe):
        state = recipe.noise_scale.state_dict()
        return state["updates_seen"], state["tracker"]["updates"]

    recipe, optimizer = new_recipe(), torch.optim.SGD(model.parameters(), lr=0.01)
    watch(recipe, optimizer)
    update(optimizer, 0), update(optimizer, 1)
    saved = recipe.state_dict()
    assert seen(recipe) == (2, 2)
    watch(recipe, optimizer)
    assert recipe.noise_scale.state_dict() == saved["noise_scale"]
    update(optimizer, 2)
    assert seen(recipe) == (3, 3)

    resumed, optimizer = new_recipe(), torch.optim.SGD(model.parameters(), lr=0.01)
    resumed.make_scheduler(optimizer)
    resumed.load_state_dict(saved)
    watch(resumed, optimizer)
    assert seen(resumed) == (2, 2)
    update(optimizer, 2)
    watch(resumed, optimizer)
    assert seen(resumed) == (3, 3)



def test_loop_meter_does_not_count_steps_a_grad_scaler_skips():
    """GradScaler calls a fused optimizer's step() on an overflow too (`found_inf` set, the kernel skips the
    update) and a for-loop optimizer's not at all: either way the attempt is no update, and its non-finite
    norms leave the retry unmeasured. The fused step's `.grad` is still scaled, unless the loop unscaled
    it first: the same estimate either way. 6 updates of 2 micro-batches of 4; 3 attempts before them overflow."""
    from goyal_recipe.noise_scale import LoopNoiseScale

    def run(fused, unscale_first=False):
        torch.manual_seed(0)
        model = nn.Linear(5, 3).double()
        nn.init.zeros_(model.weight)  # far from the minimum: |G|^2 well above its noise
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, **({"fused": True} if fused else {"foreach": False}))
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=1000)
        meter = LoopNoiseScale(model.parameters(), micro_batch_size=4, global_batch_size=8,
                               grad_scaler=scaler).attach(optimizer)
        generator = torch.Generator().manual_seed(1)
        overflows, seen_after_skip = {0, 1, 5}, []  # 2 attempts before update 0, 1 before update 3
        for attempt in range(9):
            before = model.weight.detach().clone()
            for micro_batch in range(2):
                x = torch.randn(4, 5, generator=generator, dtype=torch.float64)
                loss = nn.functional.cross_entropy(model(x), x[:, :3].argmax(1)) / 2
                if attempt in overflows and micro_batch == 0:
                    loss = loss * float("inf")
                scaler.scale(loss).backward()
            if unscale_first:
                scaler.unscale_(optimizer)  # as a loop that clips gradients does: no scale left for the kernel
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
            if attempt in overflows:
                assert torch.equal(model.weight, before), (fused, attempt)
                seen_after_skip.append(meter.updates_seen)
        assert seen_after_skip == [0, 0, 3] and meter.updates_seen == 6, fused
        assert meter.tracker.updates == 4, fused  # updates 0 and 3 summed their attempt's non-finite norms
        return meter.fields()

    fused = run(fused=True)
    assert fused["noise_scale"] > 0
    assert fused == pytest.approx(run(fused=False), rel=1e-12)
    assert fused == pytest.approx(run(fused=True, unscale_first=True), rel=1e-12)
