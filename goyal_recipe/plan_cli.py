"""goyal-plan: time per update, all-reduce, scaling efficiency and time to train before a cluster is
booked, with the critical batch of a measured run beside it. The model is `goyal_recipe.plan`;
its formulas and sources are in docs/plan.md.

    goyal-plan --preset paper
    goyal-plan --preset dgx-h100 --img-per-s IMG_S --per-gpu-batch 256 --run-dir runs/resnet50_kn8k --plot plan.png
    goyal-plan --preset dgx-h100 --bench benchmarks/results/bench_step.jsonl --recipe recipes/resnet50_kn8k.yaml
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError
from .errors import UserError
from .plan import ALGORITHMS, GB, IMAGENET_TRAIN_IMAGES, MB, Cluster, PlanError, Row, Workload, plan_table
from .plan_inputs import (parameter_count, read_noise_scale, throughput_from_bench, updates_over_minimum,
                          updates_saved_by_doubling)

# Goyal et al. 2017's own timing of ResNet-50 on P100 servers at kn = 32 x GPUs, 90 epochs (Fig. 7):
# GPUs -> (hours, scaling efficiency against 8 GPUs), and what the paper says, beside the paper preset's rows.
PAPER_MEASURED = {8: (29.0, 1.0), 256: (1.0, 0.90)}
PAPER_SAYS = {8: "29 h", 256: "~1 h, ~90 % scaling efficiency", 352: "update time +12 % over 8 GPUs"}

# ResNet-50 training img/s of one GPU alone, at a per-GPU micro-batch: (img/s, micro-batch, source).
PUBLISHED_THROUGHPUT = {
    # Goyal et al. 2017: 8 P100s train 90 epochs in 29 h at kn = 256 (n = 32):
    # 90 x 1,281,167 / (29 x 3600 s) / 8 GPUs = 138.06 img/s (fp32; includes the server's own all-reduce).
    "p100": (90 * IMAGENET_TRAIN_IMAGES / (PAPER_MEASURED[8][0] * 3600) / 8, 32, "derived from Goyal et al. 2017: 29 h on 8 GPUs"),
    # NVIDIA DeepLearningExamples, PyTorch ResNet-50 v1.5 README, "Training performance: NVIDIA DGX A100
    # (8x A100 80GB)", 1 GPU, batch 256 (pytorch-21.03 NGC container).
    "a100-tf32": (938.0, 256, "NVIDIA DeepLearningExamples ResNet-50 v1.5, DGX A100, 1 GPU TF32"),
    "a100": (2470.0, 256, "NVIDIA DeepLearningExamples ResNet-50 v1.5, DGX A100, 1 GPU AMP"),
    # MLPerf Training v4.0 (closed), NVIDIA 8x H200, ResNet-50 to 75.9 % top-1 in 12.0 min, kn = 3,200,
    # ~35 epochs: 35 x 1,281,167 / 720 s / 8 GPUs = 7,785 img/s per GPU. Optimised (DALI, CUDA graphs,
    # LARS), not eager, and measured inside a node, so it already carries that node's all-reduce.
    "h200": (35 * IMAGENET_TRAIN_IMAGES / 720 / 8, 400, "derived from MLPerf Training v4.0, 8x H200 in 12.0 min"),
}

# Links. Bandwidths per direction. Latencies are small-message orders of magnitude; a 25 MB bucket
# makes them matter only for a flat ring over hundreds of GPUs.
BIG_BASIN = Cluster(  # Goyal et al. 2017, Sec. 4: 8 P100s on NVLink per server, one 50 Gbit Ethernet card
    gpus_per_node=8,
    intra_bytes_per_s=20 * GB,  # one NVLink 1.0 link (P100: 4 links of 20 GB/s per direction)
    intra_latency_s=5e-6,
    inter_bytes_per_s=50e9 / 8,  # 50 Gbit/s = 6.25 GB/s
    inter_latency_s=25e-6,  # TCP over Ethernet
)
DGX_A100 = Cluster(8, 300 * GB, 5e-6, 8 * 200e9 / 8, 5e-6)  # NVLink 3 (12 x 25 GB/s), 8 x 200 Gb/s HDR InfiniBand
DGX_H100 = Cluster(8, 450 * GB, 5e-6, 8 * 400e9 / 8, 5e-6)  # NVLink 4 (18 x 25 GB/s), 8 x 400 Gb/s NDR InfiniBand


@dataclass(frozen=True)
class Preset:
    gpu: str | None
    """Key of PUBLISHED_THROUGHPUT; None where no figure is published: the img/s must be measured."""
    cluster: Cluster
    gpu_counts: tuple[int, ...]
    backward_fraction: float = 2 / 3
    global_batch_size: int | None = None


PAPER_LARGEST_SAFE_KN = 8192  # Goyal et al. 2017, error against kn (Fig. 1, Table): flat up to 8k
_P100_STEP_S = 32 / PUBLISHED_THROUGHPUT["p100"][0]
PRESETS = {
    # kn = 32 x GPUs as in the paper's timing (Fig. 7): 256 GPUs run kn = 8k. Backward: "120 ms" on one
    # P100 (Sec. 4, Hardware), of a 232 ms step.
    "paper": Preset("p100", BIG_BASIN, (8, 16, 32, 64, 128, 256, 352), backward_fraction=0.120 / _P100_STEP_S),
    "dgx-a100": Preset("a100", DGX_A100, (1, 8, 16, 32, 64, 128, 256)),
    "dgx-h100": Preset(None, DGX_H100, (1, 8, 16, 32, 64, 128, 256)),  # no published 1-GPU figure: measure it
    "dgx-h200": Preset("h200", DGX_H100, (8, 16, 32, 64, 128, 256)),  # DGX H200: the DGX H100's links
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="goyal-plan", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="paper",
                   help="cluster, GPU and GPU counts to start from; every flag below overrides it")
    a = p.add_argument_group("workload")
    a.add_argument("--model", default=None, help="timm model name or parameter count (default: the recipe's, else resnet50)")
    a.add_argument("--bytes-per-gradient", type=int, default=4, help="4: fp32 gradients (DDP under autocast)")
    a.add_argument("--gpu", choices=sorted(PUBLISHED_THROUGHPUT), default=None, help="published img/s per GPU")
    a.add_argument("--bench", type=Path, default=None,
                   help="bench_step.py results file: its newest record's trainer img/s and batch")
    a.add_argument("--img-per-s", type=float, default=None, help="measured img/s of one GPU (with --per-gpu-batch)")
    a.add_argument("--per-gpu-batch", type=int, default=None, help="micro-batch the img/s was measured at")
    a.add_argument("--kn", type=int, default=None, help="fix the global batch (accumulate); default per-GPU batch x GPUs")
    a.add_argument("--recipe", type=Path, default=None, help="YAML recipe: kn, per-device batch, epochs, model")
    a.add_argument("--epochs", type=float, default=None, help="default: the recipe's, else 90")
    a.add_argument("--backward-fraction", type=float, default=None, help="backward share of a step (default 2/3)")
    a.add_argument("--bucket-mb", type=float, default=25.0, help="gradient bucket (DDP bucket_cap_mb)")
    c = p.add_argument_group("cluster (default: the preset's)")
    c.add_argument("--gpus", type=int, nargs="+", default=None, help="GPU counts of the table")
    c.add_argument("--gpus-per-node", type=int, default=None)
    c.add_argument("--intra-gb-s", type=float, default=None, help="GB/s per direction inside a node (nccl-tests busbw)")
    c.add_argument("--inter-gb-s", type=float, default=None, help="GB/s per direction per node across nodes")
    c.add_argument("--intra-latency-us", type=float, default=None)
    c.add_argument("--inter-latency-us", type=float, default=None)
    c.add_argument("--algorithm", choices=ALGORITHMS, default="hierarchical",
                   help="all-reduce behind the update time (all three are printed)")
    p.add_argument("--run-dir", type=Path, default=None, help="a run with a measured gradient noise scale")
    p.add_argument("--plot", type=Path, default=None, help="write time to train and efficiency against GPUs here")
    return p


def _inputs(args):
    preset = PRESETS[args.preset]
    cfg = None
    if args.recipe is not None:
        from .config import load_config

        cfg = load_config(args.recipe)
    img_s, batch, model = None, None, None
    if args.img_per_s is not None:
        if args.per_gpu_batch is None:
            raise PlanError("--img-per-s needs --per-gpu-batch, the micro-batch it was measured at")
        img_s, batch, source = args.img_per_s, args.per_gpu_batch, "--img-per-s"
    elif args.bench is not None:
        img_s, batch, model, where = throughput_from_bench(args.bench)
        source = f"{where}: {args.bench}"
    elif args.gpu or preset.gpu:
        img_s, batch, source = PUBLISHED_THROUGHPUT[args.gpu or preset.gpu]
    else:
        raise PlanError(f"--preset {args.preset} has no published img/s of one GPU: measure it with "
                        "benchmarks/bench_step.py and pass --bench FILE, or pass --img-per-s with --per-gpu-batch, "
                        f"or a published figure with --gpu ({', '.join(PUBLISHED_THROUGHPUT)})")
    if args.per_gpu_batch is not None and args.per_gpu_batch != batch:
        raise PlanError(f"--per-gpu-batch {args.per_gpu_batch} differs from the {batch} the throughput was "
                        f"measured at; measure at that batch (bench_step.py --batch-size) or pass --img-per-s")
    if cfg is not None and cfg.batch.per_device_batch_size != batch:
        raise PlanError(f"{args.recipe} runs {cfg.batch.per_device_batch_size} images per device but the "
                        f"throughput is for {batch}; measure at the recipe's batch or pass --img-per-s")
    model = args.model or (cfg.model.name if cfg else None) or model or "resnet50"
    kn = args.kn if args.kn is not None else (cfg.batch.global_batch_size if cfg else preset.global_batch_size)
    epochs = args.epochs if args.epochs is not None else (cfg.optim.epochs if cfg else 90)
    backward = args.backward_fraction if args.backward_fraction is not None else preset.backward_fraction
    workload = Workload(parameter_count(model), img_s, batch, args.bytes_per_gradient, backward,
                        args.bucket_mb * MB, epochs)
    base = preset.cluster
    cluster = Cluster(
        args.gpus_per_node if args.gpus_per_node is not None else base.gpus_per_node,
        args.intra_gb_s * GB if args.intra_gb_s is not None else base.intra_bytes_per_s,
        args.intra_latency_us * 1e-6 if args.intra_latency_us is not None else base.intra_latency_s,
        args.inter_gb_s * GB if args.inter_gb_s is not None else base.inter_bytes_per_s,
        args.inter_latency_us * 1e-6 if args.inter_latency_us is not None else base.inter_latency_s)
    return preset, workload, cluster, kn, model, source


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def _percent(fraction: float) -> str:
    return "-" if math.isnan(fraction) else f"{100 * fraction:.1f}%"


def render(args) -> tuple[str, list[Row], float | None]:
    """The plan as text, its rows, and the noise scale used (if any)."""
    preset, workload, cluster, kn, model, source = _inputs(args)
    gpu_counts = args.gpus or preset.gpu_counts
    rows, skipped = [], []
    for gpus in gpu_counts:
        try:
            rows.extend(plan_table(workload, cluster, [gpus], kn, args.algorithm))
        except PlanError as e:
            if kn is None:
                raise
            skipped.append(f"skipped: {gpus} GPUs: {e}")
    if not rows:
        raise PlanError(f"no GPU count in {list(gpu_counts)} splits kn = {kn}; pass --gpus that divide it")
    noise = read_noise_scale(args.run_dir) if args.run_dir else None
    lines = [
        f"model {model}: {workload.parameter_count:,} parameters, {workload.gradient_bytes / MB:.1f} MB of gradients "
        f"({workload.bytes_per_gradient} B each) in {args.bucket_mb:g} MB buckets",
        f"one GPU: {workload.images_per_s_per_gpu:,.1f} img/s at {workload.per_gpu_batch_size} per micro-batch "
        f"({source}); backward {100 * workload.backward_fraction:.0f} % of a step",
        f"cluster: {cluster.gpus_per_node} GPUs/node, {cluster.intra_bytes_per_s / GB:g} GB/s and "
        f"{cluster.intra_latency_s * 1e6:g} us inside, {cluster.inter_bytes_per_s / GB:g} GB/s per node and "
        f"{cluster.inter_latency_s * 1e6:g} us across; update time with the {args.algorithm} all-reduce",
        f"recipe: {workload.epochs:g} epochs of {workload.train_images:,} images; "
        + (f"kn = {kn} fixed" if kn else f"kn = {workload.per_gpu_batch_size} x GPUs"),
        "",
    ]
    head = (f"{'GPUs':>5} {'nodes':>5} {'kn':>6} {'acc':>3} {'compute':>8} {'ring':>7} {'rhd':>7} {'hier':>7} "
            f"{'exposed':>8} {'update':>8} {'img/s':>9} {'eff':>6} {'ep/h':>7} {'to train':>9}")
    if noise:
        head += f" {'S/Smin':>6} {'2x kn saves':>11}"
    lines += [head + "   (times in ms; eff against one node)"]
    for r in rows:
        a = r.allreduce_s
        line = (f"{r.gpus:>5} {r.nodes:>5} {r.global_batch_size:>6} {r.accumulation_steps:>3} {1e3 * r.compute_s:>8.1f} "
                f"{1e3 * a['ring']:>7.1f} {1e3 * a['rhd']:>7.1f} {1e3 * a['hierarchical']:>7.1f} "
                f"{1e3 * r.exposed_s:>8.1f} {1e3 * r.update_s:>8.1f} {r.images_per_s:>9,.0f} "
                f"{_percent(r.scaling_efficiency):>6} {r.epochs_per_hour:>7.2f} {_hours(r.time_to_train_s):>9}")
        if noise:
            line += (f" {updates_over_minimum(r.global_batch_size, noise.noise_scale):>6.2f} "
                     f"{100 * updates_saved_by_doubling(r.global_batch_size, noise.noise_scale):>10.0f}%")
            if r.global_batch_size > noise.noise_scale:
                line += "  past B_noise"
        if args.preset == "paper" and not args.gpus and r.gpus in PAPER_SAYS:
            line += f"  paper: {PAPER_SAYS[r.gpus]}"
        lines.append(line)
    lines += skipped
    if model == "resnet50" and rows[-1].global_batch_size > PAPER_LARGEST_SAFE_KN:
        lines.append(f"note: the paper's ResNet-50 error rises past kn = {PAPER_LARGEST_SAFE_KN} with this recipe "
                     "(top-1 23.74 % at 8k, 24.79 % at 16k, 27.55 % at 32k, 33.96 % at 64k)")
    if args.run_dir:
        lines.append("")
        if noise is None:
            lines.append(f"critical batch: {args.run_dir / 'metrics.jsonl'} has no step record with a noise_scale; "
                         "nothing is marked (train with the gradient noise scale on to measure it)")
        else:
            lines.append(
                f"critical batch: B_noise = {noise.noise_scale:,.0f} images (median of the last "
                f"{noise.records_used} of {noise.records_with_noise_scale} step records with one, {noise.path}). "
                "Updates S = S_min (1 + B_noise / kn) (McCandlish et al. 2018): past kn = B_noise doubling kn "
                "saves under 1/4 of the updates, so more GPUs mostly buy throughput, not fewer updates.")
    return "\n".join(lines), rows, noise.noise_scale if noise else None


def plot(rows: list[Row], path: Path, noise_scale: float | None, title: str, paper: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gpus = [r.gpus for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.loglog(gpus, [r.time_to_train_s / 3600 for r in rows], "o-", label="model")
    ideal = rows[0].time_to_train_s / 3600 * rows[0].gpus
    left.loglog(gpus, [ideal / g for g in gpus], "--", color="grey", label="linear from the first row")
    left.set(xlabel="GPUs", ylabel="time to train (h)", title=title)
    right.semilogx(gpus, [100 * r.scaling_efficiency for r in rows], "o-")
    efficiencies = [100 * r.scaling_efficiency for r in rows if not math.isnan(r.scaling_efficiency)]
    right.set(xlabel="GPUs", ylabel="scaling efficiency against one node (%)",
              ylim=(min([80.0] + [e - 5 for e in efficiencies]), 102))
    if paper:
        left.plot(list(PAPER_MEASURED), [h for h, _ in PAPER_MEASURED.values()], "s", color="black",
                  label="paper (measured)")
        right.plot(list(PAPER_MEASURED), [100 * e for _, e in PAPER_MEASURED.values()], "s", color="black")
    if noise_scale:
        past = [r.gpus for r in rows if r.global_batch_size > noise_scale]
        for ax in (left, right):
            if past:
                ax.axvspan(past[0], gpus[-1], color="orange", alpha=0.15, label="kn past B_noise")
    left.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        text, rows, noise_scale = render(args)
        if args.plot:
            plot(rows, args.plot, noise_scale, f"goyal-plan --preset {args.preset}", paper=args.preset == "paper")
    except (UserError, ConfigError) as e:
        print(f"goyal-plan: error: {e}", file=sys.stderr)
        return 2
    print(text)
    if args.plot:
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
