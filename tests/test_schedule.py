import math
import subprocess
import sys
from pathlib import Path

import pytest

from goyal_recipe import Schedule, scaled_lr

# The paper's Table: eta = 0.1 * kn / 256.
PAPER_LR_TABLE = {256: 0.1, 512: 0.2, 1024: 0.4, 2048: 0.8, 4096: 1.6, 8192: 3.2, 16384: 6.4}


@pytest.mark.parametrize("kn,lr", PAPER_LR_TABLE.items())
def test_linear_rule_matches_paper_table(kn, lr):
    assert scaled_lr(0.1, kn) == pytest.approx(lr, rel=1e-12)


def test_sqrt_and_none_rules():
    assert scaled_lr(0.1, 8192, rule="sqrt") == pytest.approx(0.1 * math.sqrt(32), rel=1e-12)
    assert scaled_lr(0.1, 8192, rule="none") == 0.1
    assert scaled_lr(0.2, 512, base_batch_size=128) == pytest.approx(0.8)


@pytest.mark.parametrize("kwargs,match", [
    (dict(rule="cubic"), "unknown LR scaling rule"),
    (dict(base_lr=0.0), "base_lr"),
    (dict(global_batch_size=0), "batch sizes"),
])
def test_scaled_lr_rejects_bad_input(kwargs, match):
    args = dict(base_lr=0.1, global_batch_size=256) | kwargs
    with pytest.raises(ValueError, match=match):
        scaled_lr(**args)


def test_gradual_warmup_kn8k():
    s = Schedule(global_batch_size=8192)
    expected = {0: 0.1, 1.0: 0.1 + 0.2 * 3.1, 2.5: 1.65, 5: 3.2, 29.999: 3.2, 30: 0.32, 59.9: 0.32,
                60: 0.032, 80: 0.0032, 89.99: 0.0032}
    for epoch, lr in expected.items():
        assert s.lr(epoch) == pytest.approx(lr, rel=1e-12), epoch
    assert s.peak_lr == pytest.approx(3.2)


def test_gradual_warmup_is_per_iteration():
    # 1,281,167 // 8192 = 156 iterations per epoch, T_w = 780; eta_t = eta + (t / T_w)(k - 1) eta.
    s = Schedule(global_batch_size=8192)
    for t in (1, 2, 100, 779):
        assert s.lr(t / 156) == pytest.approx(0.1 + (t / 780) * 31 * 0.1, rel=1e-12)
    assert s.lr(780 / 156) == pytest.approx(3.2)


def test_constant_and_no_warmup():
    const = Schedule(global_batch_size=8192, warmup="constant")
    assert [const.lr(e) for e in (0, 2.5, 4.999)] == [0.1, 0.1, 0.1]
    assert const.lr(5) == pytest.approx(3.2)
    none = Schedule(global_batch_size=8192, warmup="none")
    assert none.lr(0) == pytest.approx(3.2)
    assert none.lr(30) == pytest.approx(0.32)


def test_warmup_start_lr_override():
    s = Schedule(global_batch_size=1024, warmup_start_lr=0.0, warmup_epochs=2, milestones=(3,), epochs=4)
    assert s.lr(0) == 0.0
    assert s.lr(1) == pytest.approx(0.2)


def test_warmup_never_starts_above_the_peak():
    small = Schedule(global_batch_size=128)  # k < 1: peak 0.05, nothing to warm up to
    assert small.lr(0) == small.lr(2.5) == small.lr(5) == pytest.approx(0.05)


def test_cosine_and_no_decay():
    cos = Schedule(global_batch_size=8192, decay="cosine")
    assert cos.lr(5) == pytest.approx(3.2)
    assert cos.lr(47.5) == pytest.approx(1.6)
    assert cos.lr(90) == pytest.approx(0.0, abs=1e-15)
    flat = Schedule(global_batch_size=512, decay="none", warmup="none")
    assert flat.lr(0) == flat.lr(89) == pytest.approx(0.2)


@pytest.mark.parametrize("kwargs,match", [
    (dict(milestones=(60, 30)), "strictly increasing"),
    (dict(milestones=(30, 95)), "must lie in"),
    (dict(milestones=(3, 30)), "must lie in"),
    (dict(warmup_epochs=90), "not shorter than training"),
    (dict(epochs=0), "epochs must be > 0"),
    (dict(warmup="linear"), "unknown warmup"),
    (dict(decay="exp"), "unknown decay"),
    (dict(gamma=0), "gamma"),
    (dict(base_lr=-1), "base_lr"),
])
def test_schedule_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Schedule(global_batch_size=8192, **kwargs)


def test_describe_table():
    text = Schedule(global_batch_size=8192).describe(updates_per_epoch=156)
    assert "3.2 = 0.1 x 8192/256" in text
    assert "gradual, 0.1 -> 3.2 until epoch 5 (update 780)" in text
    assert "epoch 30 (update 4680), epoch 60 (update 9360), epoch 80 (update 12480)" in text
    assert "90 (14040 updates)" in text
    assert "0.1 x sqrt(8192/256)" in Schedule(global_batch_size=8192, scaling="sqrt").describe()


def test_schedule_module_does_not_import_torch():
    path = Path(__file__).parents[1] / "goyal_recipe" / "schedule.py"
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('schedule', {str(path)!r})\n"
        "mod = importlib.util.module_from_spec(spec); sys.modules['schedule'] = mod; spec.loader.exec_module(mod)\n"
        "assert abs(mod.Schedule(global_batch_size=8192).lr(2.5) - 1.65) < 1e-12\n"
        "assert 'torch' not in sys.modules, 'schedule.py pulled in torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
