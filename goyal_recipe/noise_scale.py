"""The gradient noise scale of McCandlish et al. 2018 ("An Empirical Model of Large-Batch Training",
arXiv 1812.06162), from gradients a data-parallel update already has.

With G the true gradient and Sigma the per-sample gradient covariance, a gradient averaged over B
samples has E|G_B|^2 = |G|^2 + tr(Sigma) / B (their Appendix A.1). Two batch sizes give
two equations: the gradient of one rank or one accumulation micro-batch before the all-reduce
(B_small samples) and the update's gradient after it (B_big = kn). B_simple = tr(Sigma) / |G|^2
(their simple noise scale) approximates the critical batch: well below it, doubling kn nearly halves the updates
needed; well above it, a larger kn buys little.

Any loop whose update is the mean gradient over kn = n x W x A images (A micro-batches of n images on
each of W ranks), in a few lines:

    noise = GradientNoiseScale()
    norms = BackwardGradNorms(model.parameters())     # hooks on the parameters, before or after DDP wraps them
    for images, labels in micro_batches:              # the A micro-batches of this update
        (loss_fn(model(images), labels) * c).backward()   # c: what the loop multiplies a micro-batch mean by
    small = all_reduce_sum(norms.take()) / (c ** 2 * W * A)   # mean |G_n|^2 over the (rank, micro-batch) pairs
    noise.update(small, n, grad_sq_norm(model.parameters()), kn)   # .grad after the all-reduce: |G_kn|^2
    optimizer.step(); optimizer.zero_grad()
    print(noise.b_simple)

(c = 1 / A for the usual `loss / accumulation_steps`; c = n W / kn under `global_batch_loss`; W x A must
be at least 2.) Core module: torch only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from .errors import UserError

__all__ = ["noise_scale_estimates", "GradientNoiseScale", "BackwardGradNorms", "grad_sq_norm"]


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
    """Squared L2 norm of all `.grad` of `params`, as a 0-dim float32 tensor on their device (no sync)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = torch._foreach_norm(grads)
    return torch.stack(norms).float().square().sum()


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
            self._norms.append(torch.linalg.vector_norm(grad, dtype=torch.float32))

    def take(self) -> torch.Tensor:
        """Sum over the backward passes since the last call of their squared gradient norm (0-dim tensor)."""
        norms, self._norms = self._norms, []
        return torch.stack(norms).square().sum() if norms else torch.zeros(())

    def clear(self) -> None:
        self._norms = []

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._norms = []
