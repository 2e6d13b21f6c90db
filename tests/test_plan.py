"""goyal-plan's cost model: each all-reduce formula by hand, the limits, the paper's own timing from its
published hardware facts, a published multi-GPU figure it was not fitted to, and the critical batch."""

import json
import math

import pytest

from goyal_recipe.plan import (IMAGENET_TRAIN_IMAGES, RESNET50_PARAMETERS, Cluster, PlanError, Workload,
                               allreduce_s, bucket_sizes, exposed_allreduce_s, plan_row, plan_table,
                               rhd_allreduce_s, ring_allreduce_s)
from goyal_recipe.plan_inputs import (parameter_count, read_noise_scale, updates_over_minimum,
                                      updates_saved_by_doubling)
from goyal_recipe.plan_cli import DGX_A100, PAPER_MEASURED, PRESETS, PUBLISHED_THROUGHPUT, main

N = 1e8  # bytes
TWO_NODES = Cluster(gpus_per_node=8, intra_bytes_per_s=20e9, intra_latency_s=5e-6,
                    inter_bytes_per_s=6.25e9, inter_latency_s=25e-6)


# ------------------------------------------------------------------------------------------------
# all-reduce formulas against hand-computed cases


def test_ring_by_hand():
    # 2 (p-1) alpha + 2 (p-1)/p n / B = 6 x 10 us + 1.5 x 1e8 / 1e10
    assert ring_allreduce_s(N, 4, 10e-6, 1e10) == pytest.approx(60e-6 + 0.015, rel=1e-12)
    assert ring_allreduce_s(N, 1, 10e-6, 1e10) == 0.0


def test_recursive_halving_doubling_by_hand():
    # p = 8: 2 lg 8 = 6 steps; 2 x 7/8 n / B
    assert rhd_allreduce_s(N, 8, 10e-6, 1e10) == pytest.approx(6 * 10e-6 + 0.0175, rel=1e-12)
    # p = 6: the 4-rank core (4 steps, 2 x 3/4 n / B) plus one step of n before and after
    assert rhd_allreduce_s(N, 6, 10e-6, 1e10) == pytest.approx(4e-5 + 0.015 + 2 * (1e-5 + 0.01), rel=1e-12)
    # latency-bound: 2 lg p steps against ring's 2 (p-1)
    assert rhd_allreduce_s(8, 256, 1e-5, 1e12) == pytest.approx(16e-5, rel=1e-6)
    assert ring_allreduce_s(8, 256, 1e-5, 1e12) == pytest.approx(510e-5, rel=1e-6)


def test_cluster_algorithms_by_hand_on_two_nodes():
    intra = 14 * 5e-6 + 2 * 7 / 8 * N / 20e9  # ring inside a node of 8: 8.82 ms
    inter = 2 * 25e-6 + 2 * 1 / 2 * N / 6.25e9  # recursive halving/doubling over 2 nodes: 16.05 ms
    assert allreduce_s("hierarchical", N, 16, TWO_NODES) == pytest.approx(intra + inter, rel=1e-12)
    # one ring over 16 GPUs, paced by the 6.25 GB/s network card and the 25 us hop
    assert allreduce_s("ring", N, 16, TWO_NODES) == pytest.approx(30 * 25e-6 + 2 * 15 / 16 * N / 6.25e9, rel=1e-12)
    # recursive halving/doubling, node neighbours first: 3 NVLink steps on n, then 1 step on n/8 per GPU,
    # 8 GPUs sharing the card
    rhd = (6 * 5e-6 + 2 * 7 / 8 * N / 20e9) + (2 * 25e-6 + (N / 8) / (6.25e9 / 8))
    assert allreduce_s("rhd", N, 16, TWO_NODES) == pytest.approx(rhd, rel=1e-12)
    # inside one node the flat algorithms are the node's own
    assert allreduce_s("ring", N, 4, TWO_NODES) == pytest.approx(ring_allreduce_s(N, 4, 5e-6, 20e9), rel=1e-12)
    with pytest.raises(PlanError, match="unknown all-reduce algorithm 'tree'"):
        allreduce_s("tree", N, 16, TWO_NODES)


def test_overlap_hides_all_but_the_last_bucket_when_links_keep_up():
    assert bucket_sizes(102e6, 25e6) == [25e6, 25e6, 25e6, 25e6, 2e6]
    # 4 buckets ready at 0.25, 0.5, 0.75, 1.0 s; each takes 0.1 s: only the last one shows
    assert exposed_allreduce_s(100e6, 25e6, 1.0, lambda size: 0.1) == pytest.approx(0.1)
    # each takes 0.4 s: the stream falls behind, done at 0.65, 1.05, 1.45, 1.85 s
    assert exposed_allreduce_s(100e6, 25e6, 1.0, lambda size: 0.4) == pytest.approx(0.85)


# ------------------------------------------------------------------------------------------------
# limits


def test_one_gpu_has_no_communication():
    workload = Workload(RESNET50_PARAMETERS, images_per_s_per_gpu=500.0, per_gpu_batch_size=64)
    row = plan_row(workload, TWO_NODES, 1)
    assert row.allreduce_s == {"ring": 0.0, "rhd": 0.0, "hierarchical": 0.0} and row.exposed_s == 0.0
    assert row.images_per_s == pytest.approx(500.0, rel=1e-12)
    assert row.updates_per_epoch == IMAGENET_TRAIN_IMAGES // 64
    assert row.time_to_train_s == pytest.approx(90 * (IMAGENET_TRAIN_IMAGES // 64) * 64 / 500.0, rel=1e-12)


def test_infinite_bandwidth_scales_linearly():
    ideal = Cluster(8, math.inf, 0.0, math.inf, 0.0)
    workload = Workload(RESNET50_PARAMETERS, 1000.0, 32)
    rows = plan_table(workload, ideal, [8, 64, 512], global_batch_size=16384)
    assert [r.accumulation_steps for r in rows] == [64, 8, 1]
    assert [r.scaling_efficiency for r in rows] == pytest.approx([1.0, 1.0, 1.0], rel=1e-12)
    assert [r.time_to_train_s * r.gpus for r in rows] == pytest.approx([rows[0].time_to_train_s * 8] * 3, rel=1e-12)


def test_bad_gpu_counts_and_batches_name_the_fix():
    workload = Workload(RESNET50_PARAMETERS, 1000.0, 32)
    with pytest.raises(PlanError, match="12 GPUs do not fill whole nodes of 8; use a multiple of 8"):
        plan_row(workload, TWO_NODES, 12)
    with pytest.raises(PlanError, match="kn = 1000 is not a whole number of micro-batches of 32 on 8 GPUs"):
        plan_row(workload, TWO_NODES, 8, global_batch_size=1000)


# ------------------------------------------------------------------------------------------------
# the paper's timing from its hardware facts: P100 img/s from 29 h on 8 GPUs, 8 GPUs per server,
# 50 Gbit Ethernet, 25.6M fp32 gradients (102 MB), 120 ms backward (Sec. 4)

PAPER_256_GPU_HOURS, PAPER_EFFICIENCY = PAPER_MEASURED[256]  # "about one hour" (tolerance +-10 %), "~90 %"


def _paper_rows():
    p = PRESETS["paper"]
    img_s, batch, _ = PUBLISHED_THROUGHPUT["p100"]
    workload = Workload(RESNET50_PARAMETERS, img_s, batch, backward_fraction=p.backward_fraction)
    return {r.gpus: r for r in plan_table(workload, p.cluster, p.gpu_counts)}


def test_paper_timing_from_its_hardware_facts():
    rows = _paper_rows()
    assert PUBLISHED_THROUGHPUT["p100"][0] == pytest.approx(138.06, abs=0.01)
    assert RESNET50_PARAMETERS * 4 / 1e6 == pytest.approx(100, rel=0.03)  # the paper's "100MB"
    assert rows[8].time_to_train_s / 3600 == pytest.approx(29.0, rel=0.01)  # the input, back through the model
    assert rows[256].global_batch_size == 8192 and rows[256].updates_per_epoch == 156
    # about one hour, within 10 %
    assert rows[256].time_to_train_s / 3600 == pytest.approx(PAPER_256_GPU_HOURS, rel=0.10)
    # the model counts only all-reduce time the backward pass does not hide, so it may read above the
    # measured ~90 % (stragglers, host copies and the data path also cost the paper's run) but not below:
    # stated tolerance [90 %, 97 %]
    assert PAPER_EFFICIENCY <= rows[256].scaling_efficiency <= PAPER_EFFICIENCY + 0.07
    # update time from 8 to 352 GPUs (kn x44): the paper measured +12 %; the model's rise is smaller, not larger
    rise = rows[352].update_s / rows[8].update_s - 1
    assert 0.03 < rise <= 0.12
    # the paper's own sizing (Sec. 4): 2 x 100 MB per 125 ms needs 12.8 Gbit/s, under 50 Gbit/s, so at
    # 256 GPUs the last bucket is most of what shows
    assert rows[256].exposed_s < 0.05 * rows[256].update_s


# ------------------------------------------------------------------------------------------------
# a published multi-GPU figure the model was not fitted to: NVIDIA DeepLearningExamples, PyTorch
# ResNet-50 v1.5 README, "Training performance: NVIDIA DGX A100 (8x A100 80GB)", batch 256 per GPU:
# TF32 1 GPU 938 img/s, 8 GPUs 7,248; AMP 1 GPU 2,470, 8 GPUs 16,621. Only the 1-GPU figures go in.


def _dgx_a100_8(gpu):
    img_s, batch, _ = PUBLISHED_THROUGHPUT[gpu]
    return plan_row(Workload(RESNET50_PARAMETERS, img_s, batch), DGX_A100, 8)


def test_dgx_a100_tf32_eight_gpus_within_5_percent():
    assert _dgx_a100_8("a100-tf32").images_per_s == pytest.approx(7248, rel=0.05)


def test_dgx_a100_amp_gap_is_not_the_allreduce():
    # README: the model reads 19,744 img/s against 16,621 (+19 %): its all-reduce over NVLink shows for
    # well under 1 % of a 104 ms update, so the missing 16 % is outside what the model counts.
    row = _dgx_a100_8("a100")
    assert row.images_per_s / 16621 - 1 == pytest.approx(0.19, abs=0.01)
    assert row.exposed_s < 0.01 * row.update_s


# ------------------------------------------------------------------------------------------------
# the critical batch from a run's measured gradient noise scale


def _write_run(run_dir, noise_scales):
    run_dir.mkdir(parents=True)
    records = [{"kind": "run", "name": run_dir.name, "global_batch_size": 256}]
    for update, b in enumerate(noise_scales, 1):
        step = {"kind": "step", "update": update, "loss": 1.0}
        if b is not None:
            step |= {"noise_scale": b, "noise_grad_sq": 1.0, "noise_trace_sigma": b}
        records.append(step)
    records.append({"kind": "epoch", "epoch": 1, "noise_scale": 1e9})  # not a step record: ignored
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")


def test_noise_scale_is_the_median_of_the_late_half(tmp_path):
    _write_run(tmp_path / "r", [None, None, 100.0, -50.0, 300.0, 4000.0, 5000.0, 6000.0])
    reading = read_noise_scale(tmp_path / "r")
    assert (reading.noise_scale, reading.records_used, reading.records_with_noise_scale) == (5000.0, 3, 6)
    assert updates_over_minimum(1000, 5000.0) == 6.0
    assert updates_saved_by_doubling(5000, 5000.0) == 0.25


def test_cli_marks_kn_past_the_noise_scale(tmp_path, capsys):
    _write_run(tmp_path / "r", [3000.0] * 4)
    assert main(["--preset", "paper", "--gpus", "8", "64", "128", "--run-dir", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    lines = {int(line.split()[0]): line for line in out.splitlines() if line.split()[:1] in (["8"], ["64"], ["128"])}
    # kn = 256, 2048, 4096: S/S_min = 1 + 3000/kn; only 4096 lies past B_noise
    assert " 12.72 " in lines[8] and " 2.46 " in lines[64] and " 1.73 " in lines[128]
    assert [("past B_noise" in lines[g]) for g in (8, 64, 128)] == [False, False, True]
    assert "B_noise = 3,000 images (median of the last 2 of 4 step records" in out


def test_cli_says_when_the_run_has_no_noise_scale(tmp_path, capsys):
    _write_run(tmp_path / "r", [None] * 3)
    assert main(["--preset", "paper", "--gpus", "8", "--run-dir", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "has no step record with a noise_scale; nothing is marked" in out and "past B_noise" not in out
    assert main(["--run-dir", str(tmp_path / "missing")]) == 2
    assert "metrics.jsonl not found" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# the console script


def test_cli_paper_preset_prints_the_model_beside_the_paper(capsys):
    assert main(["--preset", "paper"]) == 0
    out = capsys.readouterr().out
    rows = _paper_rows()
    table = [line.split() for line in out.splitlines() if line[:5].strip().isdigit()]
    assert [int(t[0]) for t in table] == [8, 16, 32, 64, 128, 256, 352]
    for t in table:
        row = rows[int(t[0])]
        assert int(t[2]) == row.global_batch_size
        assert float(t[9]) == pytest.approx(1e3 * row.update_s, abs=0.05)
        assert float(t[11].rstrip("%")) == pytest.approx(100 * row.scaling_efficiency, abs=0.05)
    assert "29.03 h  paper: 29 h" in out
    assert f"{rows[256].time_to_train_s / 60:.1f} min  paper: ~1 h, ~90 % scaling efficiency" in out
    assert "138.1 img/s at 32 per micro-batch (derived from Goyal et al. 2017" in out


def test_cli_reads_kn_and_epochs_from_a_recipe(tmp_path, capsys):
    recipe = tmp_path / "kn8k_45ep.yaml"
    recipe.write_text("model: {name: resnet50}\nbatch: {global_batch_size: 8192, per_device_batch_size: 256}\n"
                      "optim: {epochs: 45, milestones: [15, 30, 40]}\n")
    assert main(["--preset", "dgx-h100", "--recipe", str(recipe), "--img-per-s", "2500",
                 "--per-gpu-batch", "256", "--gpus", "8", "16", "32", "64"]) == 0
    out = capsys.readouterr().out
    table = [line.split() for line in out.splitlines() if line[:5].strip().isdigit()]
    assert [(int(t[0]), int(t[2]), int(t[3])) for t in table] == [(8, 8192, 4), (16, 8192, 2), (32, 8192, 1)]
    assert "skipped: 64 GPUs: kn = 8192 is not a whole number of micro-batches of 256 on 64 GPUs" in out
    assert "recipe: 45 epochs of 1,281,167 images; kn = 8192 fixed" in out
    # 8 GPUs: 4 micro-batches of 256 at 2,500 img/s plus what the last backward does not hide, 156 updates x 45
    row = plan_row(Workload(RESNET50_PARAMETERS, 2500.0, 256, epochs=45), PRESETS["dgx-h100"].cluster, 8, 8192)
    assert row.compute_s == pytest.approx(4 * 256 / 2500, rel=1e-12)
    assert row.time_to_train_s == pytest.approx(45 * 156 * 4 * 256 / 2500, rel=1e-3)  # 47.9 min
    assert table[0][-2:] == [f"{row.time_to_train_s / 60:.1f}", "min"] == ["47.9", "min"]


def test_cli_bad_input_is_one_line(capsys):
    assert main(["--bucket-mb", "0"]) == 2
    assert capsys.readouterr().err == ("goyal-plan: error: img/s, --bucket-mb and --epochs must be positive and "
                                       "--backward-fraction in (0, 1]\n")
    assert main(["--img-per-s", "900"]) == 2
    assert "--img-per-s needs --per-gpu-batch" in capsys.readouterr().err


def test_cli_takes_a_bench_step_record(tmp_path, capsys):
    record = {"benchmark": "bench_step", "date": "2026-01-02T03:04:05+00:00",
              "machine": {"gpu": {"name": "NVIDIA H100 80GB HBM3", "count": 1}},
              "settings": {"batch_size": 128, "model": "resnet50"},
              "variants": {"trainer": {"img_per_s": {"median": 1234.5}}}}
    path = tmp_path / "bench_step.jsonl"
    path.write_text(json.dumps(record) + "\n")
    assert main(["--preset", "dgx-h100", "--bench", str(path), "--gpus", "1"]) == 0
    out = capsys.readouterr().out
    assert "1,234.5 img/s at 128 per micro-batch (bench_step on NVIDIA H100 80GB HBM3, 2026-01-02:" in out
    assert main(["--bench", str(path), "--per-gpu-batch", "256"]) == 2
    assert "differs from the 128 the throughput was measured at" in capsys.readouterr().err


def test_cli_plot(tmp_path, capsys):
    assert main(["--preset", "dgx-a100", "--plot", str(tmp_path / "plan.png")]) == 0
    assert (tmp_path / "plan.png").stat().st_size > 10_000


def test_every_throughput_is_published_and_a_preset_without_one_asks_for_a_measurement(capsys):
    assert sorted(PUBLISHED_THROUGHPUT) == ["a100", "a100-tf32", "h200", "p100"]
    assert all(source for _, _, source in PUBLISHED_THROUGHPUT.values())
    assert main(["--preset", "dgx-h100"]) == 2
    assert capsys.readouterr().err == (
        "goyal-plan: error: --preset dgx-h100 has no published img/s of one GPU: measure it with "
        "benchmarks/bench_step.py and pass --bench FILE, or pass --img-per-s with --per-gpu-batch, or a published "
        "figure with --gpu (p100, a100-tf32, a100, h200)\n")
    assert main(["--preset", "dgx-h100", "--gpu", "h200", "--gpus", "8"]) == 0
    assert "7,784.9 img/s at 400 per micro-batch (derived from MLPerf Training v4.0" in capsys.readouterr().out


def test_parameter_count_from_timm_or_a_number():
    assert parameter_count("25.6e6") == 25_600_000
    assert parameter_count("resnet18") == 11_689_512  # built by timm without weights
    timm = pytest.importorskip("timm")  # resnet50 is not built: its count is RESNET50_PARAMETERS, timm's own
    assert parameter_count("resnet50") == RESNET50_PARAMETERS == sum(
        p.numel() for p in timm.create_model("resnet50", pretrained=False).parameters())
    with pytest.raises(PlanError, match="--model 1.5: a parameter count must be a positive whole number"):
        parameter_count("1.5")
