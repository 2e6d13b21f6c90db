"""The recipe audit: a correct loop has no finding, and each departure of the issue's list, made on
purpose, gives its one finding (static ones from `audit`, runtime ones from `FirstUpdateCheck` at the
first real update, in one process)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, TensorDataset

from goyal_recipe import (EpochShuffleSampler, GoyalLR, Schedule, build_optimizer, global_batch_loss,
                          use_ghost_batchnorm, zero_init_last_bn)
from goyal_recipe.audit import Finding, audit, refuse_silent
from goyal_recipe.errors import RecipeMismatch, UserError
from goyal_recipe.first_update import _ACTIVE, FirstUpdateCheck

NUM_SAMPLES, KN, N, WORLD, ACCUMULATION = 256, 64, 16, 2, 2  # kn = 2 ranks x 16 x 2; 4 updates per epoch


class BasicBlock(nn.Module):  # the class name zero_init_last_bn knows (timm's and torchvision's)
    def __init__(self, width=8):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


def net():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), BasicBlock(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    zero_init_last_bn(model)
    return model


def schedule(**overrides):
    return Schedule(**{"global_batch_size": KN, "warmup_epochs": 1, "milestones": (2,), "epochs": 3, **overrides})


def loop(**overrides):
    """What a correct 2-rank loop holds (rank 0's view), with `overrides` replacing any piece."""
    parts = {"model": net()}
    parts["optimizer"] = build_optimizer(parts["model"], weight_decay=1e-4)
    parts["scheduler"] = GoyalLR(parts["optimizer"], schedule(), NUM_SAMPLES // KN)
    sampler = EpochShuffleSampler(NUM_SAMPLES, WORLD, 0, batch_size=N, accumulation_steps=ACCUMULATION)
    parts["loader"] = DataLoader(TensorDataset(torch.arange(NUM_SAMPLES)), batch_size=N, sampler=sampler)
    parts.update(world_size=WORLD, accumulation_steps=ACCUMULATION, bn_group_size=N)
    parts.update(overrides)
    return parts


def codes(**overrides):
    return [f.code for f in audit(**loop(**overrides))]


def finding(code, **overrides):
    found = {f.code: f for f in audit(**loop(**overrides))}
    assert code in found, list(found)
    return found[code]


def test_a_correct_loop_has_no_finding():
    assert audit(**loop()) == []
    # ... with its checkpoints saving the scheduler and the sampler, and ghost BN over the recipe's group.
    model = net()
    use_ghost_batchnorm(model, group_size=8)
    parts = loop(model=model, bn_group_size=8)
    parts["optimizer"] = build_optimizer(model)
    parts["scheduler"] = GoyalLR(parts["optimizer"], schedule(), 4)
    assert audit(**parts, checkpointed=[parts["scheduler"], parts["loader"].sampler]) == []


def test_finding_is_one_line_and_refusal_names_the_first_and_counts_the_rest():
    findings = [Finding("a", "first", False), Finding("b", "second", True), Finding("c", "third", True)]
    assert str(findings[1]) == "b: second"
    with pytest.raises(RecipeMismatch, match=r"^b: second \(and 1 more: c\)$") as caught:
        refuse_silent(findings)
    assert isinstance(caught.value, UserError)
    refuse_silent(findings[:1])  # nothing silent: no error


def test_weight_decay_on_bn():
    model = net()
    f = finding("norm_weight_decay", model=model,
                optimizer=torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=1e-4))
    assert f.silent and "6 normalisation parameters" in f.message and "1.weight" in f.message


def test_weight_decay_on_bias_when_asked():
    model = net()
    assert "bias_weight_decay" not in codes(model=model, optimizer=build_optimizer(model))  # the paper is silent
    f = finding("bias_weight_decay", model=model, optimizer=build_optimizer(model), bias_weight_decay=0.0)
    assert f.silent and "6.bias" in f.message


def test_peak_lr_against_the_linear_rule_for_the_real_kn():
    # The schedule is scaled for kn = 64 but the loop runs 2 x 16 x 4 = 128 samples per update.
    f = finding("lr_batch_size", accumulation_steps=4)
    assert f.silent and "peak LR 0.025 is scaled for kn = 64" in f.message and "gives 0.05" in f.message
    assert codes(accumulation_steps=4) == ["lr_batch_size", "updates_per_epoch"]
    assert codes(accumulation_steps=4, global_batch_size=KN)[0] == "batch_mismatch"


def test_scaling_and_warmup_ablations_are_reported_not_refused():
    for code, sched in (("lr_scaling", schedule(scaling="sqrt")), ("warmup_kind", schedule(warmup="constant")),
                        ("warmup_start", schedule(warmup_start_lr=0.0))):
        parts = loop()
        parts["scheduler"] = GoyalLR(parts["optimizer"], sched, 4)
        found = {f.code: f for f in audit(**parts)}
        assert code in found and not found[code].silent


def test_scheduler_that_is_not_goyal_lr_is_reported():
    parts = loop()
    parts["scheduler"] = torch.optim.lr_scheduler.StepLR(parts["optimizer"], 30)
    assert [f.code for f in audit(**parts)] == ["scheduler_unchecked"]


def test_bn_batch_different_from_the_recipes_group():
    f = finding("bn_group_size", bn_group_size=32)  # plain BN over the micro-batch of 16
    assert f.silent and "over 16 samples in 3 layers" in f.message
    model = net()
    use_ghost_batchnorm(model, group_size=8)
    assert "over 8 samples" in finding("bn_group_size", model=model, optimizer=build_optimizer(model)).message
    sync = nn.SyncBatchNorm.convert_sync_batchnorm(net())
    assert "SyncBatchNorm" in finding("bn_group_size", model=sync, optimizer=build_optimizer(sync)).message


def test_zero_gamma_not_applied():
    torch.manual_seed(0)
    model = net()
    nn.init.ones_(model[3].bn2.weight)
    f = finding("zero_gamma_missing", model=model, optimizer=build_optimizer(model))
    assert not f.silent and "3.bn2" in f.message
    # After updates (a resumed run) gamma has moved: not checked.
    assert "zero_gamma_missing" not in codes(model=model, optimizer=build_optimizer(model), fresh_start=False)


def test_sampler_that_does_not_reshuffle():
    dataset = TensorDataset(torch.arange(NUM_SAMPLES))
    for sampler in (SequentialSampler(dataset),
                    EpochShuffleSampler(NUM_SAMPLES, WORLD, 0, batch_size=N, accumulation_steps=2, shuffle=False)):
        assert finding("sampler_not_shuffled", loader=DataLoader(dataset, batch_size=N, sampler=sampler),
                       world_size=1 if isinstance(sampler, SequentialSampler) else WORLD).silent


def test_data_split_twice_by_a_sharded_loader():
    from accelerate.data_loader import BatchSamplerShard

    # accelerate's prepare() deals the loader's batches to the processes; this sampler already splits over them.
    sampler = loop()["loader"].sampler
    shard = BatchSamplerShard(BatchSampler(sampler, N, drop_last=False), num_processes=WORLD, process_index=0)
    found = codes(loader=DataLoader(TensorDataset(torch.arange(NUM_SAMPLES)), batch_sampler=shard))
    assert found[0] == "data_split_twice" and "updates_per_epoch" in found


def test_data_not_split_and_split_wrongly():
    dataset = TensorDataset(torch.arange(NUM_SAMPLES))
    stream = EpochShuffleSampler(NUM_SAMPLES, batch_size=N, accumulation_steps=4)
    assert codes(loader=DataLoader(dataset, batch_size=N, sampler=stream))[0] == "data_not_split"
    assert codes(loader=DataLoader(dataset, batch_size=N, sampler=RandomSampler(dataset)))[0] == "data_not_split"
    four = EpochShuffleSampler(NUM_SAMPLES, 4, 0, batch_size=N)
    assert codes(loader=DataLoader(dataset, batch_size=N, sampler=four))[0] == "data_split_mismatch"


def test_partial_last_update():
    sampler = EpochShuffleSampler(NUM_SAMPLES - 16, WORLD, 0, batch_size=N)  # keeps 224: 3.5 updates of 64
    loader = DataLoader(TensorDataset(torch.arange(NUM_SAMPLES)), batch_size=N, sampler=sampler)
    assert "partial_update" in codes(loader=loader)


def _foreign_loader(num_samples, split_by, drop_last=False):
    """A DataLoader of micro-batches of N with torch's sampler: DistributedSampler over the 2 ranks (the DDP
    idiom), or RandomSampler (shuffle=True) whose batches accelerate's prepare() deals to the 2 ranks."""
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import DistributedSampler

    dataset = TensorDataset(torch.arange(num_samples))
    if split_by == "sampler":
        sampler = DistributedSampler(dataset, num_replicas=WORLD, rank=0, seed=0)
        return DataLoader(dataset, batch_size=N, sampler=sampler, drop_last=drop_last)
    batches = BatchSampler(RandomSampler(dataset), N, drop_last=drop_last)
    return DataLoader(dataset, batch_sampler=BatchSamplerShard(batches, num_processes=WORLD, process_index=0))


def foreign_loop(num_samples, split_by, drop_last=False):
    parts = loop(loader=_foreign_loader(num_samples, split_by, drop_last))
    parts["scheduler"] = GoyalLR(parts["optimizer"], schedule(), num_samples // KN)
    return parts


def test_epoch_of_partial_updates_from_torchs_samplers():
    # 200 samples, kn = 64: 3 updates. DistributedSampler gives each rank 100, 6 micro-batches of 16 and one of 4:
    # the 4th update holds 16 + 4 samples per rank (or the next epoch's), each weighted 1/64.
    found = audit(**foreign_loop(200, "sampler"))
    assert [f.code for f in found] == ["partial_update"] and found[0].silent
    assert found[0].message.startswith(
        "DistributedSampler yields 100 samples per epoch, cut into batches of 16 with a last one of 4 (drop_last="
        "False); each rank reads 7 micro-batches per epoch, 1 past the last whole update of 2: the epoch's last "
        "update does not hold kn = 64 fresh samples")
    assert found[0].message.endswith(
        "use recipe.sampler (an EpochShuffleSampler), or drop_last=True with a sample count that fills whole updates")
    with pytest.raises(RecipeMismatch, match=r"^partial_update: DistributedSampler yields 100 samples"):
        refuse_silent(found)
    # accelerate's prepare of DataLoader(shuffle=True): 13 batches of 16 (the last of 8) dealt to 2 ranks, 7 each.
    found = audit(**foreign_loop(200, "loader"))
    assert [f.code for f in found] == ["partial_update"]
    assert found[0].message.startswith(
        "RandomSampler yields 200 samples per epoch, cut into batches of 16 with a last one of 8 (drop_last=False); "
        "each rank reads 7 micro-batches per epoch, 1 past the last whole update of 2:")
    # Full batches only, but 7 per rank: the last update is one micro-batch short.
    for split_by in ("sampler", "loader"):
        found = audit(**foreign_loop(224, split_by, drop_last=True))
        assert [f.code for f in found] == ["partial_update"]
        assert found[0].message.startswith(
            "each rank reads 7 micro-batches per epoch, 1 past the last whole update of 2: ")


def test_torchs_samplers_filling_whole_updates_are_accepted():
    for split_by in ("sampler", "loader"):
        assert audit(**foreign_loop(256, split_by)) == []  # 128 per rank: 8 micro-batches, 4 updates
        assert audit(**foreign_loop(200, split_by, drop_last=True)) == []  # 6 per rank: 3 updates, 8 dropped


def test_schedule_counting_other_updates_per_epoch_than_the_data():
    parts = loop()
    parts["scheduler"] = GoyalLR(parts["optimizer"], schedule(), 8)
    assert [f.code for f in audit(**parts)] == ["updates_per_epoch"]


def test_gradient_clipping():
    f = finding("grad_clipping", grad_clip_norm=1.0)
    assert f.silent
    assert not finding("grad_clipping", grad_clip_norm=1.0, allow=("grad_clipping",)).silent


def test_scheduler_or_sampler_not_saved_with_checkpoints():
    parts = loop()
    assert codes(checkpointed=[]) == ["scheduler_not_checkpointed", "sampler_not_checkpointed"]

    class Wrapper:  # an object holding both, as accelerate's AcceleratedScheduler or the integrations' recipes
        scheduler, sampler = parts["scheduler"], parts["loader"].sampler

    assert audit(**parts, checkpointed=[Wrapper()]) == []


# ---------------------------------------------------------------------------------------------------
# At the first update


def first_update(loss_of, *, micro_batches=2, n=32, loss_divisor=1, clip=None, kn=64, scheduler_state=None,
                 sampler_epoch=None, **check):
    """One process, kn = 64 = 2 micro-batches of 32; run one update with `loss_of(per_sample)` and return
    (check, error message or None, whether the weights moved)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    optimizer = build_optimizer(model, weight_decay=0.0)
    scheduler = GoyalLR(optimizer, schedule(), 4)
    sampler = EpochShuffleSampler(NUM_SAMPLES, batch_size=32, accumulation_steps=2)
    if scheduler_state is not None:
        scheduler.load_state_dict(scheduler_state)
    sampler.set_epoch(scheduler.updates_done // 4 if sampler_epoch is None else sampler_epoch)
    checker = FirstUpdateCheck(optimizer, global_batch_size=kn, loss_divisor=loss_divisor, scheduler=scheduler,
                               sampler=sampler, accumulation_steps=micro_batches, **check)
    before = model.weight.detach().clone()
    x, y = torch.randn(micro_batches * n, 4), torch.randint(0, 3, (micro_batches * n,))
    try:
        for xb, yb in zip(x.split(n), y.split(n)):
            (loss_of(F.cross_entropy(model(xb), yb, reduction="none")) / loss_divisor).backward()  # the engine's
        if clip is not None:
            checker.record_clipping(clip)
        optimizer.step()
        error = None
    except RecipeMismatch as exc:
        error = str(exc)
    return checker, error, not torch.equal(before, model.weight)


def test_first_update_of_a_right_loop_passes_and_removes_its_loss_check():
    checker, error, moved = first_update(lambda losses: global_batch_loss(losses, 64))
    assert error is None and moved and checker.findings == []
    # The loss is no longer watched; the step hook waits for epoch 1's first update (the sampler's epoch).
    assert checker not in _ACTIVE and checker.active


def test_loss_divided_twice():
    # accelerate's accumulate(): backward divides by 2 a loss already divided by kn.
    _, error, moved = first_update(lambda losses: global_batch_loss(losses, 64), loss_divisor=2)
    assert error.startswith("loss_divided_twice: each sample's gradient carries 0.5 x 1/kn") and not moved


def test_loss_divided_again_after_the_helper_is_measured_in_the_backward():
    """A loop that divides the helper's loss once more (accelerate's manual accumulation idiom, `loss / A`) gives
    half the gradient: the gradient reaching the helper's loss shows it, whatever the integration declared."""
    _, error, moved = first_update(lambda losses: global_batch_loss(losses, 64) / 2)
    assert error.startswith("loss_divided_twice: each sample's gradient carries 0.5 x 1/kn") and not moved
    _, error, moved = first_update(lambda losses: global_batch_loss(losses, 64) * 3)
    assert error.startswith("loss_scale: each sample's gradient carries 3 x 1/kn") and not moved


@pytest.mark.parametrize("declared", [True, False], ids=["scale read", "scale unreadable"])
def test_a_loss_scalers_factor_is_told_from_a_wrong_normalisation(declared):
    """fp16's loss scaling multiplies the loss by 2^16: with the scale read, it is divided out and a right loop passes
    while a loop that also halves the loss is refused; where the integration cannot read it (DeepSpeed's fp16), any
    factor is reported as unchecked, never refused."""
    scale = (lambda: 65536.0) if declared else (lambda: None)
    checker, error, moved = first_update(lambda losses: global_batch_loss(losses, 64) * 65536.0, loss_scale=scale)
    assert error is None and moved
    assert [f.code for f in checker.findings] == ([] if declared else ["loss_scale_unchecked"])
    checker, error, moved = first_update(lambda losses: global_batch_loss(losses, 64) * 32768.0, loss_scale=scale)
    if declared:
        assert error.startswith("loss_divided_twice: each sample's gradient carries 0.5 x 1/kn") and not moved
    else:
        assert error is None and moved and [f.code for f in checker.findings] == ["loss_scale_unchecked"]
    # no loss scaler (the default): the factor is the loop's own
    _, error, _ = first_update(lambda losses: global_batch_loss(losses, 64) * 65536.0)
    assert error.startswith("loss_scale: each sample's gradient carries 65536 x 1/kn")


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "for-loop"])
def test_gradients_dropped_before_the_update_are_not_the_updates(fused):
    """What is zeroed before the step is no part of the update: a loop that zeroes the gradients at each of the 2
    micro-batches steps with 32 samples' gradient, not kn = 64's (refused); a loss scaler's skipped attempts
    (GradScaler does not call a for-loop step(), and tells a fused one to skip) do not add to the first update's
    samples (passes, at its first real update)."""
    def run(zero_each_micro_batch, overflows):
        torch.manual_seed(0)
        model = nn.Linear(4, 3)
        optimizer = (torch.optim.SGD(model.parameters(), lr=0.1, fused=True) if fused
                     else build_optimizer(model, weight_decay=0.0, foreach=False))
        scheduler = GoyalLR(optimizer, schedule(), 4)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        check = FirstUpdateCheck(optimizer, global_batch_size=64, scheduler=scheduler, accumulation_steps=2,
                                 loss_scale=scaler.get_scale)
        try:
            for attempt in range(overflows + 1):
                for micro_batch in range(2):
                    if zero_each_micro_batch:
                        optimizer.zero_grad()
                    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
                    loss = global_batch_loss(F.cross_entropy(model(x), y, reduction="none"), 64)
                    scaler.scale(loss * (float("inf") if attempt < overflows else 1.0)).backward()
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad()
        except RecipeMismatch as exc:
            return str(exc), scheduler.updates_done
        return [f.code for f in check.findings], scheduler.updates_done

    error, updates = run(zero_each_micro_batch=True, overflows=0)
    assert error.startswith("samples_per_update: the first update used 32 samples") and updates == 0
    assert run(zero_each_micro_batch=False, overflows=3) == ([], 1)


def test_loss_scaled_otherwise():
    _, error, _ = first_update(lambda losses: losses.sum() / 16, micro_batches=2)
    assert error is not None and error.startswith("loss_unchecked")  # not through a helper: unchecked, refused
    _, error, _ = first_update(lambda losses: global_batch_loss(losses, 16))
    assert error.startswith("loss_scale: each sample's gradient carries 4 x 1/kn")


def test_unchecked_mean_loss_is_refused_only_where_a_mean_is_wrong():
    checker, error, moved = first_update(lambda losses: losses.mean(), loss_divisor=2)  # the engine divides by A
    assert error is None and moved and [f.code for f in checker.findings] == ["loss_unchecked"]
    assert not checker.findings[0].silent
    _, error, moved = first_update(lambda losses: losses.mean())  # nothing divides by A: 2x the gradient
    assert error.startswith("loss_unchecked") and "2 x the paper's gradient" in error and not moved


def test_samples_per_update_other_than_kn():
    _, error, _ = first_update(lambda losses: global_batch_loss(losses, 64), micro_batches=1)
    assert error.startswith("samples_per_update: the first update used 32 samples")


def test_clipping_seen_in_the_loop():
    _, error, _ = first_update(lambda losses: global_batch_loss(losses, 64), clip=1.0)
    assert error.startswith("grad_clipping: the loop clips gradients to norm 1")
    _, error, _ = first_update(lambda losses: global_batch_loss(losses, 64), clip=1.0, allow=("grad_clipping",))
    assert error is None


def test_lr_set_by_something_else():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    checker_optimizer = build_optimizer(model)
    scheduler = GoyalLR(checker_optimizer, schedule(), 4)
    # Another scheduler's warmup from 0, set after GoyalLR's.
    checker_optimizer.register_step_pre_hook(lambda *_: checker_optimizer.param_groups[0].update(lr=0.0))
    FirstUpdateCheck(checker_optimizer, global_batch_size=64, scheduler=scheduler)
    global_batch_loss(F.cross_entropy(model(torch.randn(64, 4)), torch.zeros(64, dtype=torch.long),
                                      reduction="none"), 64).backward()
    with pytest.raises(RecipeMismatch, match=r"^lr_off_schedule: update 0 is about to use LR 0, not the schedule's 0.025"):
        checker_optimizer.step()


def test_resume_that_restores_the_lr_and_not_the_data():
    state = {"updates_done": 6, "updates_per_epoch": 4, "last_epoch": 6}
    _, error, moved = first_update(lambda losses: global_batch_loss(losses, 64), scheduler_state=state)
    assert error.startswith("data_position: the LR is at update 6 (epoch 1, update 2 of 4) but the data at epoch 1, "
                            "sample 0") and not moved
    _, error, _ = first_update(lambda losses: global_batch_loss(losses, 64), scheduler_state=state, sampler_epoch=0)
    assert "data at epoch 0" in error
    # A loader that skips the resumed epoch's first 2 updates past the sampler's offset 0 (Trainer's resume).
    checker, error, moved = first_update(lambda losses: global_batch_loss(losses, 64), scheduler_state=state,
                                         data_skipped=2 * 64)
    assert error is None and moved and checker.findings == []


def test_resume_mid_epoch_with_a_sampler_that_cannot_start_there():
    from torch.utils.data.distributed import DistributedSampler

    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    optimizer = build_optimizer(model)
    scheduler = GoyalLR(optimizer, schedule(), 4)
    scheduler.load_state_dict({"updates_done": 6, "updates_per_epoch": 4, "last_epoch": 6})
    sampler = DistributedSampler(range(NUM_SAMPLES), num_replicas=1, rank=0)
    sampler.set_epoch(1)
    FirstUpdateCheck(optimizer, global_batch_size=64, scheduler=scheduler, sampler=sampler)
    global_batch_loss(F.cross_entropy(model(torch.randn(64, 4)), torch.zeros(64, dtype=torch.long),
                                      reduction="none"), 64).backward()
    with pytest.raises(RecipeMismatch, match=r"^data_position: resumed at update 2 of epoch 1, but "
                                             r"DistributedSampler cannot start mid-epoch"):
        optimizer.step()


def test_check_leaves_after_the_next_epochs_first_step_beside_a_later_hook():
    """The check's pre-hook goes once epoch 1's first update is checked, after that step: deleting it while the
    optimizer runs its pre-hooks would break the loop over them when another hook follows (a noise-scale meter)."""
    model, optimizer, scheduler, sampler, checker = _checked_linear_loop()
    later = []
    optimizer.register_step_pre_hook(lambda *_: later.append(scheduler.updates_done))
    x, y = torch.randn(64, 4), torch.zeros(64, dtype=torch.long)
    for update in range(5):
        sampler.set_epoch(update // 4)
        global_batch_loss(F.cross_entropy(model(x), y, reduction="none"), 64).backward()
        optimizer.step()
        optimizer.zero_grad()
        assert checker.active == (update < 4)
    assert later == [0, 1, 2, 3, 4]  # the later hook ran at every update, the check's last one included
    # Left: GoyalLR's pre- and post-hook and the later hook; the check's removal post-hook removed itself too.
    assert len(optimizer._optimizer_step_pre_hooks) == 2 and len(optimizer._optimizer_step_post_hooks) == 1


def _checked_linear_loop():
    """A linear model's loop of 4 updates of 64 per epoch, watched by a FirstUpdateCheck."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    optimizer = build_optimizer(model)
    scheduler = GoyalLR(optimizer, schedule(), 4)
    sampler = EpochShuffleSampler(NUM_SAMPLES, batch_size=64)
    checker = FirstUpdateCheck(optimizer, global_batch_size=64, scheduler=scheduler, sampler=sampler)
    return model, optimizer, scheduler, sampler, checker


def test_sampler_not_advanced_at_the_next_epoch():
    model, optimizer, scheduler, sampler, checker = _checked_linear_loop()
    x, y = torch.randn(64, 4), torch.zeros(64, dtype=torch.long)
    for update in range(4):
        global_batch_loss(F.cross_entropy(model(x), y, reduction="none"), 64).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert checker.active  # waits for the first update of epoch 1
    global_batch_loss(F.cross_entropy(model(x), y, reduction="none"), 64).backward()
    with pytest.raises(RecipeMismatch, match=r"^sampler_not_reshuffled: update 4 starts epoch 1"):
        optimizer.step()
    assert not checker.active
    sampler.set_epoch(1)
    optimizer.step()  # the hooks are gone: nothing checked any more
