"""Training-step throughput of the trainer's update beside a plain eager PyTorch step, on synthetic tensors.

trainer:   the per-update work of `goyal_recipe.trainer.Trainer._train_epoch` (one micro-batch per
           update): `build_model` (ghost BN over --bn-group-size, zero-gamma, FC init, channels_last),
           `build_optimizer` (SGD, Nesterov, no decay on BN), the accelerate engine's prepare/autocast/
           backward/step, `global_batch_loss`, `GoyalLR`, the loss/top-1 window, optional
           `compile_model`.
baseline:  with --baseline-commit COMMIT, the trainer's update as of that git commit (its `goyal_recipe`
           taken with `git archive` and imported under another name into this process): the trainer
           against itself before a change, interleaved with the others.
reference: the step of the PyTorch ImageNet example: timm model with plain BN, `nn.CrossEntropyLoss`,
           `torch.optim.SGD(model.parameters())`, zero_grad / backward / step; same precision and
           memory format; eager unless --reference-compile.

Both take the same synthetic NCHW batch that already lives on the device (the host-to-device copy
is not measured) and are timed in the same run, interleaved. FLOPs of one step (forward + backward)
come from `torch.utils.flop_counter.FlopCounterMode`; MFU = achieved FLOP/s / peak, the peak from
--peak-tflops or a matmul probe in the step's dtype (CUDA only; on CPU only GFLOP/s is reported).

    python benchmarks/bench_step.py --quick --device cpu
    python benchmarks/bench_step.py --precision bf16 --memory-format channels_last --compile
"""

from __future__ import annotations

import contextlib
import importlib
import io
import itertools
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import common

IMAGENET_TRAIN_IMAGES = 1_281_167  # sets updates_per_epoch of the schedule, as on ImageNet
QUICK = dict(model="resnet10t", image_size=32, batch_size=16, bn_group_size=8, num_classes=10, iters=2, warmup=1,
             repeats=2)


def parse(argv=None):
    p = common.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet50", help="timm model name")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=256, help="per-device batch = global batch (one micro-batch)")
    p.add_argument("--bn-group-size", type=int, default=32, help="ghost BN group of the trainer variant")
    p.add_argument("--bn", choices=("ghost", "per_device"), default="ghost", help="the trainer variant's model.bn")
    p.add_argument("--bn-layout", choices=("auto", "per_group", "packed"), default="auto",
                   help="how the trainer variant's ghost BN computes its groups (goyal_recipe.bn.GhostBatchNorm2d)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--memory-format", choices=("nchw", "channels_last"), default="nchw")
    p.add_argument("--compile", action="store_true", help="torch.compile the trainer's model (compile_model)")
    p.add_argument("--reference-compile", action="store_true", help="torch.compile the reference model as well")
    p.add_argument("--optimizer", choices=("sgd", "folded_sgd"), default="sgd", help="trainer's optim.optimizer")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="torch.backends.cudnn.benchmark=True for both (the trainer leaves it off)")
    common.add_keep_freed_memory_arg(p)
    p.add_argument("--iters", type=int, default=20, help="timed steps per repeat")
    p.add_argument("--baseline-commit", default=None,
                   help="also time the trainer's update as of this git commit (variant 'baseline')")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak for MFU (default: matmul probe on CUDA)")
    return common.parse_args(p, QUICK, argv)


def synthetic_batch(args, device):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=g)
    labels = torch.randint(0, args.num_classes, (args.batch_size,), generator=g)
    # index and bad flag stay on the host, as the loader yields them
    index, bad = torch.arange(args.batch_size), torch.zeros(args.batch_size, dtype=torch.long)
    return images.to(device), labels.to(device), index, bad


def memory_format(args):
    return torch.channels_last if args.memory_format == "channels_last" else torch.preserve_format


def autocast(args, device):
    if args.precision == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def package_at_commit(commit: str, workdir: str, name: str = "goyal_recipe_baseline") -> str:
    """`goyal_recipe` as of `commit`, unpacked under `workdir` as the package `name` and importable from this
    process beside the working tree's (its relative imports need nothing; absolute ones are renamed)."""
    archive = subprocess.run(["git", "-C", str(common.REPO), "archive", commit, "goyal_recipe"],
                             capture_output=True, check=True).stdout
    root = Path(workdir) / "baseline"
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(root, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))  # Python < 3.10.12
    package = (root / "goyal_recipe").rename(root / name)
    for source in package.rglob("*.py"):
        source.write_text(re.sub(r"\bgoyal_recipe(?=[.\s])", name, source.read_text()))
    sys.path.insert(0, str(root))
    return name


def trainer_step(args, batch, workdir, package: str = "goyal_recipe"):
    """The trainer's own update (`package`.step.TrainStep on build_training); returns (step, device)."""
    config = importlib.import_module(f"{package}.config")
    make_engine = importlib.import_module(f"{package}.engines").make_engine
    step_module = importlib.import_module(f"{package}.step")
    RecipeConfig, plan_batches = config.RecipeConfig, config.plan_batches
    TrainStep, build_training = step_module.TrainStep, step_module.build_training

    cfg = RecipeConfig.model_validate({
        "run": {"name": "bench_step", "output_dir": str(workdir), "plots": False},
        "model": {"name": args.model, "bn": args.bn, "bn_group_size": args.bn_group_size,
                  "precision": args.precision, "channels_last": args.memory_format == "channels_last",
                  "compile": args.compile},
        "batch": {"global_batch_size": args.batch_size, "per_device_batch_size": args.batch_size},
        "optim": {"optimizer": args.optimizer},
    })
    if args.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "1"
    engine = make_engine(cfg)
    plan = plan_batches(cfg, engine.world_size)
    model, optimizer, scheduler = build_training(cfg, engine, plan, args.num_classes,
                                                 IMAGENET_TRAIN_IMAGES // plan.global_batch_size)
    model.train()
    if args.bn == "ghost" and args.bn_layout != "auto":
        use_ghost_batchnorm = importlib.import_module(f"{package}.bn").use_ghost_batchnorm
        use_ghost_batchnorm(engine.unwrap(model), args.bn_group_size, args.bn_layout)  # the layers' layout only
    train_step = TrainStep(cfg, engine, plan, model, optimizer, scheduler)

    def step():
        train_step(itertools.repeat(batch))

    return step, engine.device


def reference_model(args, device):
    import timm

    model = timm.create_model(args.model, num_classes=args.num_classes)
    return model.to(device, memory_format=memory_format(args))


def reference_step(args, batch, device):
    """The PyTorch ImageNet example's step, with the same precision and memory format."""
    model = reference_model(args, device)
    criterion = nn.CrossEntropyLoss().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    if args.reference_compile:
        model = torch.compile(model)
    model.train()
    fmt = memory_format(args)

    def step():
        images, target = batch[:2]
        images = images.to(device, non_blocking=True, memory_format=fmt)
        target = target.to(device, non_blocking=True)
        with autocast(args, device):
            output = model(images)
            loss = criterion(output, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def step_flops(args, batch, device) -> int:
    """FLOPs of one forward + backward on the batch (conv/matmul counted by FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = reference_model(args, device).train()
    images, labels = batch[:2]
    counter = FlopCounterMode(display=False)
    with counter:
        with autocast(args, device):
            loss = F.cross_entropy(model(images.to(memory_format=memory_format(args))), labels)
        loss.backward()
    return counter.get_total_flops()


def matmul_peak_tflops(args, device) -> float:
    """Dense matmul FLOP/s in the step's dtype: the measured peak for MFU."""
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    n, iters = 8192, 20
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    common.synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    common.synchronize(device)
    return 2 * n**3 * iters / (time.perf_counter() - start) / 1e12


def main(argv=None):
    args = parse(argv)
    common.apply_keep_freed_memory(args)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="bench_step_") as workdir:
        batch = synthetic_batch(args, args.device)
        trainer, device = trainer_step(args, batch, workdir)
        steps = {"trainer": trainer, "reference": reference_step(args, batch, device)}
        if args.baseline_commit:
            steps["baseline"] = trainer_step(args, batch, workdir, package_at_commit(args.baseline_commit, workdir))[0]
        seconds = common.time_interleaved(steps, args.iters, args.warmup, args.repeats, device)
    flops = step_flops(args, batch, device)
    peak, peak_source = args.peak_tflops, "--peak-tflops"
    if peak is None and torch.device(device).type == "cuda":
        peak, peak_source = matmul_peak_tflops(args, device), f"matmul probe ({args.precision})"
    elif peak is None:
        peak_source = None

    variants, rows = {}, []
    for name, per_step in seconds.items():
        img_s = common.summary([args.batch_size / s for s in per_step])
        tflops = common.summary([flops / s / 1e12 for s in per_step])
        variants[name] = {"img_per_s": img_s, "step_ms": common.summary([1e3 * s for s in per_step]),
                          "achieved_tflops": tflops}
        mfu = tflops["median"] / peak if peak else None
        variants[name]["mfu"] = mfu
        rows.append([name, common.spread(img_s), common.spread(variants[name]["step_ms"], "{:.2f}"),
                     f"{1e3 * tflops['median']:.1f}", f"{100 * mfu:.1f}%" if mfu is not None else "-"])
    ratio = common.summary([r / t for t, r in zip(seconds["trainer"], seconds["reference"])])
    derived = {"ratio_trainer_over_reference": ratio, "flops_per_step": flops,
               "gflops_per_image": flops / args.batch_size / 1e9, "peak_tflops": peak, "peak_source": peak_source}
    if args.baseline_commit:
        derived["ratio_trainer_over_baseline"] = common.summary(
            [b / t for t, b in zip(seconds["trainer"], seconds["baseline"])])
    record = common.make_record(common.script_name(__file__), args, variants, derived,
                                {"resolved_device": str(device)})
    print(common.header(record))
    common.print_table(
        f"{args.model} {args.image_size}px batch {args.batch_size} {args.precision} {args.memory_format}"
        f"{' compile' if args.compile else ''}: median [min, max] of {args.repeats} repeats x {args.iters} steps",
        ["variant", "img/s", "step ms", "GFLOP/s", "MFU"], rows)
    print(f"trainer / reference img/s: {common.spread(ratio, '{:.3f}')}; "
          f"{flops / args.batch_size / 1e9:.3f} GFLOP per image (fwd+bwd)"
          + (f"; peak {peak:.1f} TFLOP/s from {peak_source}" if peak else ""))
    if args.baseline_commit:
        print(f"trainer / baseline ({args.baseline_commit}) img/s: "
              f"{common.spread(derived['ratio_trainer_over_baseline'], '{:.3f}')}")
    common.finish(record, args.results)


if __name__ == "__main__":
    main()
