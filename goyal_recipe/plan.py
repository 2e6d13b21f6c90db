"""The cost model behind `goyal-plan`: time per update, gradient all-reduce, overlap with the backward
pass, scaling efficiency and time to train, from a per-GPU throughput and the cluster's links.

Pure Python (timm is imported only to count a named model's parameters). Every formula is in
`docs/plan.md` with its source. Units are in the names: `_s` seconds, `_bytes` bytes,
`_bytes_per_s` bytes per second in one direction, `_batch_size` images.

All-reduce costs follow the alpha-beta model of Thakur, Rabenseifner & Gropp (2005): a message of
m bytes over a link costs alpha + m / bandwidth. The reduction arithmetic (their gamma term) is left
out: on GPUs it runs at memory speed, far above any link.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from .errors import UserError

IMAGENET_TRAIN_IMAGES = 1_281_167
GB = 1e9
MB = 1e6
ALGORITHMS = ("ring", "rhd", "hierarchical")
# timm resnet50, sum of p.numel(): the paper's "approximately 25 million parameters" (Sec. 4, Hardware).
RESNET50_PARAMETERS = 25_557_032


class PlanError(UserError):
    """A plan input that cannot be modelled; the message names the input and the fix."""


@dataclass(frozen=True)
class Cluster:
    """Nodes of `gpus_per_node` GPUs. Bandwidths are per direction: inside a node the bandwidth of one
    ring edge (an all-reduce's bus bandwidth, as nccl-tests reports busbw), across nodes the sum of
    one node's network cards."""

    gpus_per_node: int
    intra_bytes_per_s: float
    intra_latency_s: float
    inter_bytes_per_s: float
    inter_latency_s: float

    def __post_init__(self):
        if self.gpus_per_node < 1 or min(self.intra_bytes_per_s, self.inter_bytes_per_s) <= 0:
            raise PlanError("GPUs per node and bandwidths must be positive; check --gpus-per-node, --intra-gb-s, "
                            "--inter-gb-s")
        if min(self.intra_latency_s, self.inter_latency_s) < 0:
            raise PlanError("latencies must be >= 0; check --intra-latency-us and --inter-latency-us")


@dataclass(frozen=True)
class Workload:
    """One GPU's training step and the recipe it runs."""

    parameter_count: int
    images_per_s_per_gpu: float
    """One GPU alone (no communication) at `per_gpu_batch_size` images per micro-batch."""
    per_gpu_batch_size: int
    bytes_per_gradient: int = 4
    """fp32 gradients, as DDP all-reduces them under autocast (the weights stay fp32)."""
    backward_fraction: float = 2 / 3
    """Share of a micro-batch's time spent in the backward pass: 2/3 when backward costs two forwards."""
    bucket_bytes: float = 25 * MB
    """DDP's default bucket_cap_mb = 25."""
    epochs: float = 90
    train_images: int = IMAGENET_TRAIN_IMAGES

    def __post_init__(self):
        if min(self.parameter_count, self.per_gpu_batch_size, self.bytes_per_gradient, self.train_images) < 1:
            raise PlanError("parameter count, per-GPU batch, bytes per gradient and training images must be >= 1")
        if min(self.images_per_s_per_gpu, self.bucket_bytes, self.epochs) <= 0 or not 0 < self.backward_fraction <= 1:
            raise PlanError("img/s, --bucket-mb and --epochs must be positive and --backward-fraction in (0, 1]")

    @property
    def gradient_bytes(self) -> float:
        return self.parameter_count * self.bytes_per_gradient


# ------------------------------------------------------------------------------------------------
# all-reduce of `nbytes` over `ranks` peers: alpha-beta costs (Thakur, Rabenseifner & Gropp 2005)


def ring_allreduce_s(nbytes: float, ranks: int, latency_s: float, bytes_per_s: float) -> float:
    """Reduce-scatter then all-gather around a ring: 2(p-1) steps of n/p bytes."""
    if ranks == 1:
        return 0.0
    return 2 * (ranks - 1) * latency_s + 2 * (ranks - 1) / ranks * nbytes / bytes_per_s


def rhd_allreduce_s(nbytes: float, ranks: int, latency_s: float, bytes_per_s: float) -> float:
    """Recursive halving (reduce-scatter) then recursive doubling (all-gather), Rabenseifner's algorithm:
    2 lg p steps, 2(p-1)/p n bytes. For p not a power of two the p - p' extra ranks first hand their
    data to a partner and get the result back at the end (Thakur et al. 2005, Sec. 4.4): 2 more steps of n."""
    if ranks == 1:
        return 0.0
    core = 2 ** int(math.log2(ranks))
    time_s = 2 * math.log2(core) * latency_s + 2 * (core - 1) / core * nbytes / bytes_per_s
    if core != ranks:
        time_s += 2 * (latency_s + nbytes / bytes_per_s)
    return time_s


def allreduce_s(algorithm: str, nbytes: float, gpus: int, cluster: Cluster) -> float:
    """Time to all-reduce `nbytes` over `gpus` GPUs of `cluster` with `algorithm`."""
    g = min(gpus, cluster.gpus_per_node)
    nodes = gpus // g
    intra = (cluster.intra_latency_s, cluster.intra_bytes_per_s)
    inter = (cluster.inter_latency_s, cluster.inter_bytes_per_s)
    if nodes == 1:
        fn = ring_allreduce_s if algorithm in ("ring", "hierarchical") else rhd_allreduce_s
        return fn(nbytes, g, *intra)
    if algorithm == "ring":
        # One ring through every GPU: each node's network card carries one edge in each direction, as
        # much as any NVLink edge, so the slowest edge and the slowest hop set the pace.
        return ring_allreduce_s(nbytes, gpus, cluster.inter_latency_s,
                                min(cluster.intra_bytes_per_s, cluster.inter_bytes_per_s))
    if algorithm == "rhd":
        # Neighbours inside a node first: lg g steps over NVLink on n bytes, then lg(nodes) steps on the
        # n/g bytes each GPU still holds, the g GPUs sharing the node's network cards.
        return (rhd_allreduce_s(nbytes, g, *intra)
                + rhd_allreduce_s(nbytes / g, nodes, cluster.inter_latency_s, cluster.inter_bytes_per_s / g))
    if algorithm == "hierarchical":
        # The paper's 3 phases (Sec. 4): reduce inside the server (ring reduce-scatter, half a ring
        # all-reduce), all-reduce across servers by recursive halving/doubling, broadcast inside the
        # server (ring all-gather, the other half).
        return ring_allreduce_s(nbytes, g, *intra) + rhd_allreduce_s(nbytes, nodes, *inter)
    raise PlanError(f"unknown all-reduce algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}")


# ------------------------------------------------------------------------------------------------
# overlap with the backward pass


def bucket_sizes(total_bytes: float, bucket_bytes: float) -> list[float]:
    """Gradient buckets in the order backward fills them; the last one holds the remainder."""
    full = int(total_bytes // bucket_bytes)
    sizes = [bucket_bytes] * full
    if total_bytes - full * bucket_bytes > 0:
        sizes.append(total_bytes - full * bucket_bytes)
    return sizes


def exposed_allreduce_s(total_bytes: float, bucket_bytes: float, backward_s: float, bucket_allreduce_s) -> float:
    """All-reduce time left after the backward pass ends.

    Backward produces gradient bytes at a constant rate; a bucket's all-reduce starts when its last
    gradient exists and the previous bucket's all-reduce is done (one communication stream). The last
    bucket is ready only when backward ends, so its all-reduce is never hidden."""
    done_bytes, finish_s = 0.0, 0.0
    for size in bucket_sizes(total_bytes, bucket_bytes):
        done_bytes += size
        ready_s = backward_s * done_bytes / total_bytes
        finish_s = max(finish_s, ready_s) + bucket_allreduce_s(size)
    return max(0.0, finish_s - backward_s)


# ------------------------------------------------------------------------------------------------
# one row of the plan


@dataclass(frozen=True)
class Row:
    gpus: int
    nodes: int
    global_batch_size: int
    accumulation_steps: int
    compute_s: float
    """Forward and backward of every micro-batch of one update, no communication."""
    allreduce_s: dict
    """Each algorithm's time for the whole gradient at once (no overlap)."""
    exposed_s: float
    """All-reduce time the backward pass does not hide, with the chosen algorithm."""
    update_s: float
    images_per_s: float
    updates_per_epoch: int
    time_to_train_s: float
    scaling_efficiency: float = float("nan")
    """Images/s per GPU against one full node's images/s per GPU."""

    @property
    def epochs_per_hour(self) -> float:
        return 3600 / (self.updates_per_epoch * self.update_s)


def plan_row(workload: Workload, cluster: Cluster, gpus: int, global_batch_size: int | None = None,
             algorithm: str = "hierarchical") -> Row:
    """The update of `gpus` GPUs: kn = per-GPU batch x GPUs unless `global_batch_size` fixes it (then the
    GPUs accumulate kn / (per-GPU batch x GPUs) micro-batches per update, all-reducing once)."""
    g, n = cluster.gpus_per_node, workload.per_gpu_batch_size
    if gpus < 1 or (gpus > g and gpus % g):
        raise PlanError(f"{gpus} GPUs do not fill whole nodes of {g}; use a multiple of {g} (or fewer than {g})")
    kn = n * gpus if global_batch_size is None else global_batch_size
    if kn < 1:
        raise PlanError(f"kn = {kn} must be a positive number of images; pass --kn >= 1")
    if kn % (n * gpus):
        raise PlanError(f"kn = {kn} is not a whole number of micro-batches of {n} on {gpus} GPUs; "
                        f"use a kn divisible by {n * gpus} or another per-GPU batch")
    accumulation = kn // (n * gpus)
    micro_s = n / workload.images_per_s_per_gpu
    compute_s = accumulation * micro_s
    grad = workload.gradient_bytes
    totals = {a: allreduce_s(a, grad, gpus, cluster) for a in ALGORITHMS}
    # DDP's no_sync(): only the last micro-batch's backward all-reduces, so only it can hide the traffic.
    exposed = exposed_allreduce_s(grad, workload.bucket_bytes, workload.backward_fraction * micro_s,
                                  lambda size: allreduce_s(algorithm, size, gpus, cluster)) if gpus > 1 else 0.0
    update_s = compute_s + exposed
    updates_per_epoch = workload.train_images // kn  # the sampler drops the last partial minibatch
    if updates_per_epoch < 1:
        raise PlanError(f"kn = {kn} exceeds the {workload.train_images} training images; use a smaller kn")
    return Row(gpus, max(1, gpus // g), kn, accumulation, compute_s, totals, exposed, update_s, kn / update_s,
               updates_per_epoch, workload.epochs * updates_per_epoch * update_s)


def plan_table(workload: Workload, cluster: Cluster, gpu_counts, global_batch_size: int | None = None,
               algorithm: str = "hierarchical") -> list[Row]:
    """Rows for each GPU count, each with its scaling efficiency against one node (at the same kn rule)."""
    node_gpus = cluster.gpus_per_node
    try:
        node_img_s_per_gpu = plan_row(workload, cluster, node_gpus, global_batch_size, algorithm).images_per_s / node_gpus
    except PlanError:  # a fixed kn smaller than one node's micro-batches: no node to compare with
        node_img_s_per_gpu = math.nan
    rows = []
    for gpus in gpu_counts:
        row = plan_row(workload, cluster, gpus, global_batch_size, algorithm)
        rows.append(replace(row, scaling_efficiency=row.images_per_s / gpus / node_img_s_per_gpu))
    return rows
