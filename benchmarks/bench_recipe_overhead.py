"""Per-update cost of the recipe's machinery, each piece as the difference of one loop with and without it.

The loop is a plain training update on a synthetic batch (timm model, `build_optimizer` SGD,
forward / loss / backward / step / zero_grad). Against that baseline (constant LR, BatchNorm2d,
mean cross-entropy), each variant switches on one piece:

  goyal_lr     `GoyalLR` on the optimizer (pre/post step hooks + `scheduler.step()` per update)
  ghost_bn     `use_ghost_batchnorm(model, --bn-group-size)` instead of BatchNorm2d over the batch
  global_loss  `global_batch_loss(F.cross_entropy(reduction="none"), kn)` instead of the mean
  all          the three together
  noise_scale  the gradient noise scale as a user's loop measures it (`LoopNoiseScale` attached to the
               optimizer, as the integrations do) on every --noise-scale-every-th update: a hook per
               parameter recording the norm of each backward's gradient, the squared norm of the reduced
               .grad, and the averages read once per update (one host copy)
  noise_scale_idle  the same meter on updates it does not measure (no hooks then: one pre-step call)

Variants run interleaved; the overhead of a piece is the paired per-repeat difference to the
baseline, in ms per update and in % of the baseline update. A whole update's repeat-to-repeat
noise on a CPU is a few %, wider than ghost BN's cost, so ghost BN is also timed on its own
(`ghost_bn_layers_<layout>`): forward and backward of every BN layer of the model, alone, on the
inputs the layer sees in an update, GhostBatchNorm2d in each layout against BatchNorm2d,
interleaved; the difference is expressed in % of the baseline update. The noise scale is likewise timed
alone (`noise_scale_alone`): its per-parameter norms of one update's gradients, the norm of .grad and the
averages' update, in % of the baseline update: the cost of one measured update, and (`noise_scale_amortised`)
that cost divided by --noise-scale-every. The sampler piece is the index loop
the DataLoader runs per update (one `BatchSampler` batch), over one whole epoch of
--num-samples, divided by its updates: `EpochShuffleSampler` as the trainer iterates it (through
`EpochTaggedSampler`) against `torch.utils.data.RandomSampler`; the update's compute is the same
in both and cancels out.

    python benchmarks/bench_recipe_overhead.py --quick --device cpu
    python benchmarks/bench_recipe_overhead.py --batch-size 128
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import BatchSampler, RandomSampler

import common
from goyal_recipe.bn import LAYOUTS

IMAGENET_TRAIN_IMAGES = 1_281_167
QUICK = dict(model="resnet10t", image_size=32, batch_size=16, bn_group_size=8, num_classes=10, iters=2, warmup=1,
             repeats=2, num_samples=4096)
PIECES = ("goyal_lr", "ghost_bn", "global_loss")
GHOST_LAYOUTS = tuple(layout for layout in LAYOUTS if layout != "auto")


def parse(argv=None):
    p = common.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet18", help="timm model name")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64, help="= the global batch kn of the update")
    p.add_argument("--bn-group-size", type=int, default=32)
    p.add_argument("--ghost-bn-layout", choices=LAYOUTS, default="auto",
                   help="GhostBatchNorm2d layout (auto: per_group)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--channels-last", action="store_true", help="model and batch in channels_last memory format")
    common.add_keep_freed_memory_arg(p)
    p.add_argument("--iters", type=int, default=10, help="timed updates per repeat and variant")
    p.add_argument("--noise-scale-every", type=int, default=4,
                   help="measure the noise scale on every N-th update (run.noise_scale_every_updates)")
    p.add_argument("--num-samples", type=int, default=IMAGENET_TRAIN_IMAGES, help="epoch size for the sampler piece")
    return common.parse_args(p, QUICK, argv)


def mean_loss(logits, labels, kn):
    return F.cross_entropy(logits, labels)


def global_loss(logits, labels, kn):
    from goyal_recipe.loss import global_batch_loss

    return global_batch_loss(F.cross_entropy(logits, labels, reduction="none"), kn)


def autocast(args, device):
    if args.precision == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def model_copy(args, base_model, device, ghost_bn, layout=None):
    """A copy of the model on the device; with ghost_bn, its BN layers are GhostBatchNorm2d in
    `layout` (default --ghost-bn-layout)."""
    from goyal_recipe import use_ghost_batchnorm

    model = copy.deepcopy(base_model)
    if ghost_bn:
        use_ghost_batchnorm(model, args.bn_group_size, layout or args.ghost_bn_layout)
    model.to(device).train()
    return model.to(memory_format=torch.channels_last) if args.channels_last else model


def noise_scale_meter(model, optimizer, kn, every=1):
    """`LoopNoiseScale` on `model`'s parameters, measuring in `optimizer`'s pre-step hook every `every`-th
    update. One backward stands for the kn // 2 images of one of two micro-batches: the cost per backward
    is the same whatever the split."""
    from goyal_recipe.noise_scale import LoopNoiseScale

    return LoopNoiseScale(model.parameters(), micro_batch_size=kn // 2, global_batch_size=kn,
                          every_updates=every).attach(optimizer)


def make_noise_scale_alone(args, base_model, device, batch):
    """The noise scale's own work on one update's gradients, without the update: the norm the hook takes
    of every parameter's gradient, the reduced gradient's norm, and reading the averages."""
    from goyal_recipe import build_optimizer

    model = model_copy(args, base_model, device, ghost_bn=False)
    images, labels = batch
    with autocast(args, device):
        logits = model(images)
    F.cross_entropy(logits.float(), labels).backward()
    meter = noise_scale_meter(model, build_optimizer(model, "sgd", lr=0.1), args.batch_size)
    grads = [p.grad for p in model.parameters() if p.grad is not None]

    def alone():
        for grad in grads:
            meter._norms._record(grad)
        meter.measure()
        meter.fields()

    return alone


def make_noise_scale_idle_alone(args, base_model, device):
    """What the meter does on an update it does not measure, alone: its pre-step call and a read of the averages."""
    from goyal_recipe import build_optimizer

    model = model_copy(args, base_model, device, ghost_bn=False)
    meter = noise_scale_meter(model, build_optimizer(model, "sgd", lr=0.1), args.batch_size, every=2**62)
    meter.measure()  # update 0 is measured (no gradients here); every later one is not

    def idle():
        meter.measure()
        meter.fields()

    return idle


def make_update(args, base_model, device, batch, goyal_lr=False, ghost_bn=False, global_loss_=False,
                noise_scale_every=None):
    """One training update on its own copy of the model, with the chosen pieces switched on."""
    from goyal_recipe import GoyalLR, Schedule, build_optimizer

    model = model_copy(args, base_model, device, ghost_bn)
    optimizer = build_optimizer(model, "sgd", lr=0.1)
    meter = None if noise_scale_every is None else noise_scale_meter(model, optimizer, args.batch_size,
                                                                     noise_scale_every)
    scheduler = None
    if goyal_lr:
        schedule = Schedule(global_batch_size=args.batch_size)
        scheduler = GoyalLR(optimizer, schedule, IMAGENET_TRAIN_IMAGES // args.batch_size)
    loss_fn = global_loss if global_loss_ else mean_loss
    images, labels = batch
    kn = args.batch_size

    def update():
        with autocast(args, device):
            logits = model(images)
        loss_fn(logits.float(), labels, kn).backward()
        optimizer.step()
        if meter is not None:
            meter.fields()  # what a loop logging every update reads
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()

    return update


def bn_layer_inputs(args, base_model, device, images):
    """The input of every BatchNorm2d layer of the model in a training forward, in model order."""
    model = model_copy(args, base_model, device, ghost_bn=False)
    inputs = []
    hooks = [m.register_forward_pre_hook(lambda module, a: inputs.append(a[0].detach()))
             for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad(), autocast(args, device):
        model(images)
    for hook in hooks:
        hook.remove()
    return inputs


def make_bn_layers(args, base_model, device, inputs, ghost_layout=None):
    """Forward and backward of each BN layer alone on its update's input, as in the update:
    BatchNorm2d, or GhostBatchNorm2d in `ghost_layout`."""
    model = model_copy(args, base_model, device, ghost_bn=ghost_layout is not None, layout=ghost_layout)
    layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    cases = [(layer, x.clone().requires_grad_(), torch.randn_like(x)) for layer, x in zip(layers, inputs)]

    def passes():
        for layer, x, grad in cases:
            with autocast(args, device):
                out = layer(x)
            out.backward(grad.to(out.dtype))
            x.grad = None

    return passes


def epoch_shuffle_batches(args):
    """One epoch of index batches as the trainer's DataLoader draws them."""
    from goyal_recipe.data.pipeline import EpochTaggedSampler
    from goyal_recipe.sampler import EpochShuffleSampler

    sampler = EpochShuffleSampler(args.num_samples, seed=0, batch_size=args.batch_size)
    tagged = EpochTaggedSampler(sampler)
    batches = BatchSampler(tagged, args.batch_size, drop_last=True)
    epoch = iter(range(1_000_000))

    def one_epoch():
        sampler.set_epoch(next(epoch))
        return sum(1 for _ in batches)

    return one_epoch


def random_sampler_batches(args):
    """One epoch of index batches from DataLoader(shuffle=True)'s sampler."""
    sampler = RandomSampler(range(args.num_samples), generator=torch.Generator().manual_seed(0))
    batches = BatchSampler(sampler, args.batch_size, drop_last=True)
    return lambda: sum(1 for _ in batches)


def main(argv=None):
    import timm

    args = parse(argv)
    common.apply_keep_freed_memory(args)
    if args.batch_size % args.bn_group_size:
        raise SystemExit(f"--bn-group-size {args.bn_group_size} must divide --batch-size {args.batch_size}")
    torch.manual_seed(0)
    device = args.device
    base = timm.create_model(args.model, num_classes=args.num_classes)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    batch = (images, torch.randint(0, args.num_classes, (args.batch_size,), device=device))
    updates = {
        "baseline": make_update(args, base, device, batch),
        "goyal_lr": make_update(args, base, device, batch, goyal_lr=True),
        "ghost_bn": make_update(args, base, device, batch, ghost_bn=True),
        "global_loss": make_update(args, base, device, batch, global_loss_=True),
        "all": make_update(args, base, device, batch, goyal_lr=True, ghost_bn=True, global_loss_=True),
        "noise_scale": make_update(args, base, device, batch, noise_scale_every=args.noise_scale_every),
        # Measured at the first (warm-up) update only: every timed update is one the meter does not measure.
        "noise_scale_idle": make_update(args, base, device, batch, noise_scale_every=2**62),
    }
    seconds = common.time_interleaved(updates, args.iters, args.warmup, args.repeats, device)
    alone_s = common.time_interleaved({"noise_scale_alone": make_noise_scale_alone(args, base, device, batch),
                                       "noise_scale_idle_alone": make_noise_scale_idle_alone(args, base, device)},
                                      args.iters, args.warmup, args.repeats, device)
    noise_s = alone_s["noise_scale_alone"]
    inputs = bn_layer_inputs(args, base, device, images)
    bn_layers = {"plain": make_bn_layers(args, base, device, inputs)}
    bn_layers.update({layout: make_bn_layers(args, base, device, inputs, layout) for layout in GHOST_LAYOUTS})
    bn_s = common.time_interleaved(bn_layers, args.iters, args.warmup, args.repeats, device)
    samplers = {"epoch_shuffle": epoch_shuffle_batches(args), "random": random_sampler_batches(args)}
    updates_per_epoch = args.num_samples // args.batch_size
    sampler_s = {name: [s / updates_per_epoch for s in secs] for name, secs in
                 common.time_interleaved(samplers, 1, min(args.warmup, 1), args.repeats, "cpu").items()}

    base_s = seconds["baseline"]
    variants = {"baseline": {"step_ms": common.summary([1e3 * s for s in base_s])}}
    rows = [["baseline", common.spread(variants["baseline"]["step_ms"], "{:.2f}"), "-", "-"]]
    derived = {"overhead_ms": {}, "overhead_pct": {}}
    for name in (*PIECES, "all", "noise_scale", "noise_scale_idle"):
        diff = [v - b for v, b in zip(seconds[name], base_s)]
        v = {"step_ms": common.summary([1e3 * s for s in seconds[name]]),
             "overhead_ms": common.summary([1e3 * d for d in diff]),
             "overhead_pct": common.summary([100 * d / b for d, b in zip(diff, base_s)])}
        variants[name] = v
        derived["overhead_ms"][name] = v["overhead_ms"]["median"]
        derived["overhead_pct"][name] = v["overhead_pct"]["median"]
        rows.append([name, common.spread(v["step_ms"], "{:.2f}"), common.spread(v["overhead_ms"], "{:+.3f}"),
                     common.spread(v["overhead_pct"], "{:+.2f}")])
    step_median = variants["baseline"]["step_ms"]["median"] / 1e3
    variants["bn_layers_plain"] = {"ms": common.summary([1e3 * s for s in bn_s["plain"]])}
    for layout in GHOST_LAYOUTS:
        diff = [g - p for g, p in zip(bn_s[layout], bn_s["plain"])]
        layers = {"ms": common.summary([1e3 * s for s in bn_s[layout]]),
                  "overhead_ms": common.summary([1e3 * d for d in diff]),
                  "overhead_pct": common.summary([100 * d / step_median for d in diff])}
        name = f"ghost_bn_layers_{layout}"
        variants[name] = layers
        derived["overhead_ms"][name] = layers["overhead_ms"]["median"]
        derived["overhead_pct"][name] = layers["overhead_pct"]["median"]
        rows.append([f"{name} ({len(inputs)} BN layers alone)",
                     f"{layers['ms']['median']:.2f} vs {variants['bn_layers_plain']['ms']['median']:.2f}",
                     common.spread(layers["overhead_ms"], "{:+.3f}"), common.spread(layers["overhead_pct"], "{:+.2f}")])
    noise_alone = {"ms": common.summary([1e3 * s for s in noise_s]),
                   "overhead_pct": common.summary([100 * s / step_median for s in noise_s])}
    variants["noise_scale_alone"] = noise_alone
    derived["overhead_ms"]["noise_scale_alone"] = noise_alone["ms"]["median"]
    derived["overhead_pct"]["noise_scale_alone"] = noise_alone["overhead_pct"]["median"]
    rows.append(["noise_scale_alone (one measurement, no update)", f"{noise_alone['ms']['median']:.3f}",
                 common.spread(noise_alone["ms"], "{:+.3f}"), common.spread(noise_alone["overhead_pct"], "{:+.3f}")])
    idle = {"ms": common.summary([1e3 * s for s in alone_s["noise_scale_idle_alone"]]),
            "overhead_pct": common.summary([100 * s / step_median for s in alone_s["noise_scale_idle_alone"]])}
    variants["noise_scale_idle_alone"] = idle
    derived["overhead_ms"]["noise_scale_idle_alone"] = idle["ms"]["median"]
    derived["overhead_pct"]["noise_scale_idle_alone"] = idle["overhead_pct"]["median"]
    rows.append(["noise_scale_idle_alone (an update not measured)", f"{idle['ms']['median']:.4f}",
                 common.spread(idle["ms"], "{:+.4f}"), common.spread(idle["overhead_pct"], "{:+.4f}")])
    every = args.noise_scale_every
    amortised = {key: common.summary([v / every for v in noise_alone[key]["values"]]) for key in ("ms", "overhead_pct")}
    variants["noise_scale_amortised"] = amortised
    derived["overhead_ms"]["noise_scale_amortised"] = amortised["ms"]["median"]
    derived["overhead_pct"]["noise_scale_amortised"] = amortised["overhead_pct"]["median"]
    rows.append([f"noise_scale_amortised (one measurement every {every} updates)", f"{amortised['ms']['median']:.3f}",
                 common.spread(amortised["ms"], "{:+.3f}"), common.spread(amortised["overhead_pct"], "{:+.3f}")])
    for name, per_update in sampler_s.items():
        variants[f"sampler_{name}"] = {"ms_per_update": common.summary([1e3 * s for s in per_update])}
    diff = [e - r for e, r in zip(sampler_s["epoch_shuffle"], sampler_s["random"])]
    sampler = {"overhead_ms": common.summary([1e3 * d for d in diff]),
               "overhead_pct": common.summary([100 * d / step_median for d in diff])}
    variants["sampler"] = sampler
    derived["overhead_ms"]["sampler"] = sampler["overhead_ms"]["median"]
    derived["overhead_pct"]["sampler"] = sampler["overhead_pct"]["median"]
    rows.append(["sampler (epoch_shuffle - random)",
                 f"{variants['sampler_epoch_shuffle']['ms_per_update']['median']:.4f} vs "
                 f"{variants['sampler_random']['ms_per_update']['median']:.4f}",
                 common.spread(sampler["overhead_ms"], "{:+.4f}"), common.spread(sampler["overhead_pct"], "{:+.3f}")])

    record = common.make_record(common.script_name(__file__), args, variants, derived,
                                {"updates_per_epoch_for_sampler": updates_per_epoch})
    print(common.header(record))
    common.print_table(
        f"{args.model} {args.image_size}px batch {args.batch_size} {args.precision}"
        f"{', channels_last' if args.channels_last else ''}, ghost BN ({args.ghost_bn_layout}) groups of "
        f"{args.bn_group_size}: median [min, max] of {args.repeats} repeats x {args.iters} updates "
        f"(sampler: {args.num_samples} samples per epoch)",
        ["piece", "update ms", "overhead ms/update", "overhead % of update"], rows)
    common.finish(record, args.results)


if __name__ == "__main__":
    main()
