"""Input-pipeline throughput: the trainer's training loader against torchvision ImageFolder + PIL + DataLoader.

trainer:   `goyal_recipe.data.pipeline.build_data` for an imagefolder recipe, iterated as the trainer
           iterates it: `ImageFolderSource` + `SampleReader` in the workers (augmentation seeded per
           sample; `TrainDecode`'s crop planned from the JPEG header, draft decode when the crop allows
           it, random-resized crop, flip; uint8 out) + `EpochTaggedSampler(EpochShuffleSampler)`
           + `build_loader` (persistent workers, pinned memory on CUDA), then the stage in this process
           that finishes each batch on --device (float, normalise); `--decode gpu`: the stage decodes too.
trainer_workers: the same DataLoader without the stage: the batches as the workers hand them on
           (uint8; with `--decode gpu` the bytes), i.e. the workers' ceiling when the stage runs on a GPU.
reference: `torchvision.datasets.ImageFolder` with its default PIL loader and the same torchvision
           transforms, `DataLoader(shuffle=True)` (the PyTorch ImageNet example).

Both read the same generated ImageNet-sized JPEGs (default 500x375, quality 90, written to
benchmarks/.cache on first use). One repeat is one full epoch of each loader, interleaved; the
first batches (worker start-up, at least one per worker) are not timed, the rest are. Nothing
consumes the batches, so this is the loader's ceiling: img/s in total and per worker process (the
trainer's stage runs in the main process, on the CPU with --device cpu, and is counted in its img/s).

    python benchmarks/bench_data.py --quick --device cpu
    python benchmarks/bench_data.py --workers 8 --batch-size 64 --classes 20 --per-class 200
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.utils.data import DataLoader

import common

QUICK = dict(classes=2, per_class=16, batch_size=4, workers=1, warmup=1, repeats=2, image_size=64)


def parse(argv=None):
    p = common.base_parser(__doc__.split("\n\n")[0])
    common.add_jpeg_data_args(p)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="loader worker processes")
    p.add_argument("--image-size", type=int, default=224, help="training crop")
    p.add_argument("--decode", choices=("cpu", "gpu"), default="cpu", help="the trainer's data.decode")
    p.add_argument("--no-draft", dest="draft", action="store_false", help="the trainer with data.decode_draft=false")
    p.set_defaults(per_class=160)
    return common.parse_args(p, QUICK, argv)


class _LoaderEngine(SimpleNamespace):
    """The little of an engine that `build_data` reads: one process on --device."""

    def barrier(self) -> None:
        pass


def trainer_loaders(args, root: Path) -> dict:
    """The training loader the trainer builds for this data and these flags, as the trainer iterates it
    (each batch through the stage to --device), and its DataLoader alone (the workers' batches)."""
    from goyal_recipe.config import RecipeConfig, plan_batches
    from goyal_recipe.data.pipeline import build_data

    cfg = RecipeConfig.model_validate({
        "data": {"source": "imagefolder", "root": str(root), "image_size": args.image_size, "workers": args.workers,
                 "decode": args.decode, "decode_draft": args.draft},
        "batch": {"global_batch_size": args.batch_size, "per_device_batch_size": args.batch_size},
        "model": {"bn": "per_device"},
        "run": {"eval_every_epochs": 0},
    })
    engine = _LoaderEngine(world_size=1, rank=0, is_main=True, device=torch.device(args.device))
    data = build_data(cfg, plan_batches(cfg, 1), engine)
    epochs = iter(range(1_000_000))

    def epoch_of(loader):
        def one_epoch():
            data.train_sampler.set_epoch(next(epochs))
            return iter(loader)

        return one_epoch

    return {"trainer": epoch_of(data.train_loader), "trainer_workers": epoch_of(data.train_loader.loader)}


def reference_loader(args, root: Path):
    """torchvision ImageFolder (default PIL loader) + the same transforms + DataLoader(shuffle=True)."""
    from torchvision import datasets
    from torchvision import transforms as T

    normalize = T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    dataset = datasets.ImageFolder(str(root / "train"), T.Compose([
        T.RandomResizedCrop(args.image_size), T.RandomHorizontalFlip(), T.ToTensor(), normalize]))
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                        pin_memory=args.device == "cuda")
    return lambda: iter(loader)


def time_epochs(loaders: dict, warmup_batches: int, repeats: int, device: str) -> dict[str, list[float]]:
    """Seconds of the timed batches of one epoch per repeat and loader (loaders interleaved); the
    device is synchronised at the end, as --decode gpu leaves its work queued there."""
    seconds = {name: [] for name in loaders}
    names = list(loaders)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            batches = loaders[name]()
            for _ in range(warmup_batches):
                next(batches)
            start = time.perf_counter()
            for _ in batches:
                pass
            common.synchronize(device)
            seconds[name].append(time.perf_counter() - start)
            del batches
    return seconds


def main(argv=None):
    args = parse(argv)
    root = common.ensure_jpeg_data(args)
    files = sorted((root / "train").rglob("*.JPEG"))
    batches_per_epoch = len(files) // args.batch_size
    warmup = max(args.warmup, args.workers, 1)
    timed = batches_per_epoch - warmup
    if timed < 1:
        raise SystemExit(f"{len(files)} images make {batches_per_epoch} batches of {args.batch_size}: not more than "
                         f"the {warmup} warmup batches; raise --per-class or --classes")
    loaders = {**trainer_loaders(args, root), "reference": reference_loader(args, root)}
    seconds = time_epochs(loaders, warmup, args.repeats, args.device)

    images = timed * args.batch_size
    processes = max(args.workers, 1)
    variants, rows = {}, []
    for name, secs in seconds.items():
        total = common.summary([images / s for s in secs])
        per_worker = common.summary([images / s / processes for s in secs])
        variants[name] = {"img_per_s": total, "img_per_s_per_worker": per_worker}
        rows.append([name, common.spread(total), common.spread(per_worker)])
    ratios = {name: common.summary([r / t for t, r in zip(seconds[name], seconds["reference"])])
              for name in ("trainer", "trainer_workers")}
    mean_bytes = sum(f.stat().st_size for f in files) / len(files)
    derived = {"ratio_trainer_over_reference": ratios["trainer"],
               "ratio_trainer_workers_over_reference": ratios["trainer_workers"], "mean_jpeg_bytes": mean_bytes}
    record = common.make_record(common.script_name(__file__), args, variants, derived,
                                {"data_dir": str(root), "images": len(files), "warmup_batches": warmup,
                                 "timed_batches": timed})
    print(common.header(record))
    common.print_table(
        f"{len(files)} JPEGs {args.source_size} q{args.jpeg_quality} ({mean_bytes / 1e3:.0f} kB mean) -> "
        f"{args.image_size}px crops, batch {args.batch_size}, {args.workers} workers: median [min, max] of "
        f"{args.repeats} epochs x {timed} timed batches", ["loader", "img/s", "img/s per worker"], rows)
    print(f"trainer / reference img/s: {common.spread(ratios['trainer'], '{:.3f}')} (with the stage on "
          f"{args.device}); trainer_workers / reference: {common.spread(ratios['trainer_workers'], '{:.3f}')}")
    common.finish(record, args.results)


if __name__ == "__main__":
    main()
