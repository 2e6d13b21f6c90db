"""The gradient noise scale of McCandlish et al. 2018 ("An Empirical Model of Large-Batch Training",
arXiv 1812.06162), from gradients a data-parallel update already has.

With G the true gradient and Sigma the per-sample gradient covariance, a gradient averaged over B
samples has E|G_B|^2 = |G|^2 + tr(Sigma) / B (their Appendix A.1). Two batch sizes give
two equations: the gradient of one rank or one accumulation micro-batch before the all-reduce
(B_small samples) and the update's gradient after it (B_big = kn). B_simple = tr(Sigma) / |G|^2
(their simple noise scale) approximates the critical batch: well below it, doubling kn nearly halves the updates
needed; well above it, a larger kn buys little.

Any loop whose update is the mean gradient over kn = n x W x A samples (A micro-batches of n samples on
each of W ranks, W x A >= 2), in a few lines:

    noise = LoopNoiseScale(model.parameters(), micro_batch_size=n, global_batch_size=kn, world_size=W,
                           every_updates=4).attach(optimizer)     # before or after DDP wraps the model
    ...                                                       # the loop, unchanged
    log(noise.fields())     # noise_scale (B_simple), noise_grad_sq, noise_trace_sigma
    save(noise.state_dict())                                  # load_state_dict on resume

Its pieces, for a loop that measures elsewhere than at the optimizer's step: `BackwardGradNorms`
(each backward's own squared norm, before `.grad` and the all-reduce), `grad_sq_norm` (|G_kn|^2 from
`.grad` after it) and `GradientNoiseScale` (the averages). Core module: torch only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from .errors import UserError
from .lr import _innermost_optimizer, step_skipped_by_amp

__all__ = ["noise_scale_estimates", "GradientNoiseScale", "BackwardGradNorms", "grad_sq_norm", "DeferredNoiseScale",
           "LoopNoiseScale"]


def _check_batches(small_batch: float, big_batch: float) -> None:
    if not (0 < small_batch < big_batch):
        raise UserError(f"noise scale needs 0 < small_batch < big_batch, got small_batch={small_batch}, "
                        f"big_batch={big_batch}; pass the samples behind each squared norm, the smaller first")


def noise_scale_estimates(small_sq_norm, small_batch: float, big_sq_norm, big_batch: float):
    """Unbiased estimates (|G|^2, tr(Sigma)) from |G_small|^2 over `small_batch` samples and |G_big|^2
    over `big_batch` samples (McCandlish et al., Appendix A.1):

        |G|^2     ~ (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
        tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1 / B_small - 1 / B_big)

    Each is unbiased but noisy, and either can be negative for one pair of gradients: average them
    over updates before taking their ratio (`GradientNoiseScale`). Floats or tensors.
    """
    _check_batches(small_batch, big_batch)
    grad_sq = (big_batch * big_sq_norm - small_batch * small_sq_norm) / (big_batch - small_batch)
    trace_sigma = (small_sq_norm - big_sq_norm) / (1.0 / small_batch - 1.0 / big_batch)
    return grad_sq, trace_sigma


class GradientNoiseScale:
    """Exponential moving averages of the two estimates of `noise_scale_estimates`, the ratio taken last.

    B_simple = EMA[tr(Sigma)] / EMA[|G|^2]: the single-update estimates are too noisy to divide
    (McCandlish et al., Appendix A.1, average them before the ratio). The averages are debiased as
    Adam's moments are (divided by 1 - decay^updates), so the first updates are not pulled to zero;
    the ratio is the same either way. `b_simple` is None before the first update and while either average
    is not positive (the noise of the single estimates then still dominates their mean).
    """

    def __init__(self, ema_decay: float = 0.95):
        if not 0 <= ema_decay < 1:
            raise UserError(f"ema_decay must lie in [0, 1), got {ema_decay}; 0.95 averages about the last 20 updates")
        self.ema_decay = float(ema_decay)
        self.updates = 0
        self._grad_sq = 0.0
        self._trace_sigma = 0.0

    def update(self, small_sq_norm, small_batch: float, big_sq_norm, big_batch: float) -> None:
        grad_sq, trace_sigma = noise_scale_estimates(float(small_sq_norm), small_batch, float(big_sq_norm), big_batch)
        if not (math.isfinite(grad_sq) and math.isfinite(trace_sigma)):
            raise UserError(f"non-finite squared gradient norms ({float(small_sq_norm)}, {float(big_sq_norm)}); "
                            "update the noise scale only after updates whose gradients are finite")
        d = self.ema_decay
        self._grad_sq = d * self._grad_sq + (1 - d) * grad_sq
        self._trace_sigma = d * self._trace_sigma + (1 - d) * trace_sigma
        self.updates += 1

    def _debiased(self, value: float) -> float | None:
        return value / (1 - self.ema_decay ** self.updates) if self.updates else None

    @property
    def grad_sq(self) -> float | None:
        """Averaged estimate of |G|^2 (squared norm of the true gradient)."""
        return self._debiased(self._grad_sq)

    @property
    def trace_sigma(self) -> float | None:
        """Averaged estimate of tr(Sigma) (per-sample gradient variance summed over parameters)."""
        return self._debiased(self._trace_sigma)

    @property
    def b_simple(self) -> float | None:
        """tr(Sigma) / |G|^2 in samples (images), or None (see the class docstring)."""
        if not self.updates or self._grad_sq <= 0 or self._trace_sigma <= 0:
            return None
        return self._trace_sigma / self._grad_sq

    def state_dict(self) -> dict:
        return {"ema_decay": self.ema_decay, "updates": self.updates, "grad_sq_ema": self._grad_sq,
                "trace_sigma_ema": self._trace_sigma}

    def load_state_dict(self, state: dict) -> None:
        if float(state["ema_decay"]) != self.ema_decay:
            raise UserError(f"the saved noise scale averages with ema_decay={state['ema_decay']} but this one uses "
                            f"{self.ema_decay}; resume with the same run.noise_scale_ema_decay")
        self.updates = int(state["updates"])
        self._grad_sq = float(state["grad_sq_ema"])
        self._trace_sigma = float(state["trace_sigma_ema"])


def grad_sq_norm(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """Squared L2 norm of all `.grad` of `params`, as a 0-dim tensor on their device (no sync): float32,
    or float64 for float64 gradients."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return sq_norm_of_pieces(torch.stack(torch._foreach_norm(grads)))


def sq_norm_of_pieces(norms: torch.Tensor) -> torch.Tensor:
    """The squared norm of a vector from the L2 norms of its pieces, in at least float32 (float64 for float64)."""
    return norms.to(torch.promote_types(norms.dtype, torch.float32)).square().sum()


class BackwardGradNorms:
    """Squared norms of the gradients each backward pass produces, before they reach `.grad`.

    A hook on each parameter sees the gradient of that backward alone, before it is accumulated into
    `.grad` and before DDP's or DeepSpeed's all-reduce (those act on the accumulated `.grad`, after
    the hooks), so each micro-batch's own gradient is measured with no extra pass and no copy. The hook
    only records one norm per parameter (one kernel, asynchronous); `take()` returns the sum of their
    squares since the last `take()`, which is the sum over backward passes of each pass's squared norm.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter]):
        self._norms: list[torch.Tensor] = []
        self.active = True
        """False: the hooks record nothing (updates not measured cost one Python call per parameter)."""
        self._handles = [p.register_hook(self._record) for p in params if p.requires_grad]

    def _record(self, grad: torch.Tensor) -> None:
        if self.active:
            # At least float32 (bf16/fp16 gradients), float64 for a float64 model.
            self._norms.append(torch.linalg.vector_norm(grad, dtype=torch.promote_types(grad.dtype, torch.float32)))

    def take(self) -> torch.Tensor:
        """Sum over the backward passes since the last call of their squared gradient norm (0-dim tensor)."""
        norms, self._norms = self._norms, []
        return sq_norm_of_pieces(torch.stack(norms)) if norms else torch.zeros(())

    def clear(self) -> None:
        self._norms = []

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._norms = []


class DeferredNoiseScale:
    """`GradientNoiseScale` fed with squared norms that stay on the device until the averages are read:
    `record` keeps each measured update's (mean |G_small|^2, |G_big|^2) as a tensor, and reading `tracker`
    or `fields()` folds them in, in order, with one host copy. Non-finite pairs (an update whose
    gradients overflowed) are left out. A loop measuring updates adds no host synchronisation to them."""

    def __init__(self, micro_batch_size: int, global_batch_size: int, ema_decay: float = 0.95):
        self.micro_batch_size, self.global_batch_size = int(micro_batch_size), int(global_batch_size)
        _check_batches(self.micro_batch_size, self.global_batch_size)
        self._tracker = GradientNoiseScale(ema_decay)
        self._pending: list[torch.Tensor] = []

    def record(self, small_sq_norm: torch.Tensor, big_sq_norm) -> None:
        """One update's mean squared norm over its micro-batch gradients and its gradient's squared norm."""
        small = small_sq_norm.double().reshape(())
        self._pending.append(torch.stack([small, torch.as_tensor(big_sq_norm, dtype=torch.float64).reshape(())
                                          .to(small.device)]))

    @property
    def tracker(self) -> GradientNoiseScale:
        if self._pending:
            pending, self._pending = torch.stack(self._pending).tolist(), []
            for small, big in pending:
                if math.isfinite(small) and math.isfinite(big):
                    self._tracker.update(small, self.micro_batch_size, big, self.global_batch_size)
        return self._tracker

    def fields(self) -> dict:
        """B_simple in samples, and the averaged |G|^2 and tr(Sigma) it divides (empty before a measurement)."""
        t = self.tracker
        if not t.updates:
            return {}
        return {"noise_scale": t.b_simple, "noise_grad_sq": t.grad_sq, "noise_trace_sigma": t.trace_sigma}


class LoopNoiseScale:
    """B_simple of a data-parallel loop's updates, measured on the gradients the loop already computes.

    Each update of kn = n x W x A samples runs A backward passes of n samples on each of W ranks. The
    small batches are those W x A micro-batch gradients, seen by `BackwardGradNorms` before they are
    accumulated or all-reduced; the big batch is the update's gradient over kn, read from `.grad` after
    the all-reduce (or given by the engine: `measure(big_sq_norm=...)`). `attach(optimizer)` measures
    in a pre-step hook of the innermost torch optimizer, whose step runs once per real update.

    `loss_scale`: what each micro-batch's per-sample mean loss is multiplied by before its backward,
    after any division the engine makes (default n W / kn: the loss of `global_batch_loss` or a
    recipe's `loss()` under a mean all-reduce; a plain `loss / A` is the same). Only every
    `every_updates`-th update is measured (update t when t % every_updates == 0): the hooks are
    registered for the backward passes of those updates alone, so the others cost one Python call.
    Each measured update adds one all-reduce of one number; the squared norms stay on the device
    until the averages are read (`tracker`, `fields()`, `state_dict()`). Under a gradient scaler
    (fp16), `grad_scaler.get_scale()` is divided out of the micro-batch norms; a step the scaler skips
    is not an update (also when a fused optimizer's step runs with the scaler's non-zero `found_inf`) and
    leaves non-finite norms, so the next update is not measured. A fused optimizer's `.grad` is still
    scaled at its step (its kernel unscales): the scaler's `grad_scale` is divided out of |G_kn|^2.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], *, micro_batch_size: int, global_batch_size: int,
                 world_size: int = 1, loss_scale: float | None = None, every_updates: int = 1,
                 ema_decay: float = 0.95, grad_scaler=None):
        n, kn, world = int(micro_batch_size), int(global_batch_size), int(world_size)
        if n < 1 or kn % (n * world):
            raise UserError(f"global_batch_size={kn} is not a whole number of micro-batches of {n} on {world} "
                            "ranks; pass the loop's kn, per-device micro-batch and world size")
        if kn == n:
            raise UserError(f"the noise scale needs two gradients per update, but kn = {kn} is one micro-batch "
                            "on one rank; use gradient accumulation or more ranks, or leave it off")
        if int(every_updates) < 1:
            raise UserError(f"every_updates must be at least 1, got {every_updates}")
        self.params = [p for p in params if p.requires_grad]
        self.micro_batch_size, self.global_batch_size, self.world_size = n, kn, world
        self.every_updates = int(every_updates)
        self.grad_scaler = grad_scaler
        scale = n * world / kn if loss_scale is None else float(loss_scale)
        # Mean |G_n|^2 over the W x A (rank, micro-batch) gradients from the sum of their scaled squares.
        self._small_factor = 1.0 / (scale ** 2 * (kn // n))
        self.averages = DeferredNoiseScale(n, kn, ema_decay)
        self._norms: BackwardGradNorms | None = None
        self._hook = None
        self.updates_seen = 0
        self._arm()

    # --- measuring
    def _arm(self) -> None:
        """Hooks on for the next update's backward passes when it is measured, else off."""
        measured = self.updates_seen % self.every_updates == 0
        if measured and self._norms is None:
            self._norms = BackwardGradNorms(self.params)
        elif not measured and self._norms is not None:
            self._norms.remove()
            self._norms = None

    def measure(self, big_sq_norm=None) -> None:
        """Call once per real update, after the gradient all-reduce (every rank: a collective on measured
        updates). `big_sq_norm`: |G_kn|^2 where the engine keeps the reduced gradient out of `.grad`."""
        if self._norms is not None:
            small = self._norms.take().double()
            if big_sq_norm is None:
                big_sq_norm = grad_sq_norm(self.params)
            if self.world_size > 1:
                import torch.distributed as dist

                dist.all_reduce(small)
            if self.grad_scaler is not None and self.grad_scaler.is_enabled():
                small = small / self.grad_scaler.get_scale() ** 2  # the hooks saw the scaled loss's gradients
            self.averages.record(small * self._small_factor, big_sq_norm)
        self.updates_seen += 1
        if self.every_updates > 1:
            self._arm()

    def attach(self, optimizer) -> "LoopNoiseScale":
        """Measure in a pre-step hook of the innermost torch optimizer (under accelerate's or Trainer's wrapper)."""
        self._hook = _innermost_optimizer(optimizer).register_step_pre_hook(self._before_step)
        return self

    def _before_step(self, optimizer, args, kwargs) -> None:
        # A fused optimizer's step that GradScaler skips is no update: its norms stay pending, as when
        # GradScaler does not call step() at all, and poison the next measured update's.
        if step_skipped_by_amp(optimizer, kwargs):
            return
        big_sq_norm = None
        grad_scale = kwargs.get("grad_scale", getattr(optimizer, "grad_scale", None))
        if grad_scale is not None and self._norms is not None:
            # GradScaler leaves `.grad` scaled for an optimizer that unscales in its kernel (fused) and
            # hands it the scale: divide it out here, as GradScaler's unscale_ does for the others.
            big_sq_norm = grad_sq_norm(self.params) / torch.as_tensor(grad_scale, dtype=torch.float64).square()
        self.measure(big_sq_norm)

    def remove(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._norms is not None:
            self._norms.remove()
            self._norms = None

    # --- reading
    @property
    def tracker(self) -> GradientNoiseScale:
        """The averages, with the updates measured since the last read folded in (one host copy)."""
        return self.averages.tracker

    def fields(self) -> dict:
        """`noise_scale` (B_simple, samples), `noise_grad_sq`, `noise_trace_sigma`: what to log."""
        return self.averages.fields()

    def state_dict(self) -> dict:
        return {"tracker": self.tracker.state_dict(), "updates_seen": self.updates_seen}

    def load_state_dict(self, state: dict) -> None:
        self.tracker.load_state_dict(state["tracker"])
        self.updates_seen = int(state["updates_seen"])
        if self._norms is not None:
            self._norms.clear()
        self._arm()
