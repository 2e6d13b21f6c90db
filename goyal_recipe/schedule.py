"""Learning-rate maths of Goyal et al. 2017, as pure functions of training progress.

Progress is a fractional epoch (optimizer updates done / updates per epoch), so the same
`Schedule` gives the same LR at the same point of training whatever the world size, the
gradient accumulation or the engine. Pure Python: no torch import.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

SCALING_RULES = ("linear", "sqrt", "none")
WARMUP_KINDS = ("gradual", "constant", "none")
DECAY_KINDS = ("step", "cosine", "poly", "none")


def scaled_lr(base_lr: float, global_batch_size: int, base_batch_size: int = 256, rule: str = "linear") -> float:
    """LR for a global minibatch of `global_batch_size` images (kn) from the LR of the reference minibatch.

    linear: base_lr * kn / base_batch_size (the paper's linear scaling rule, Sec. 2.1);
    sqrt:   base_lr * sqrt(kn / base_batch_size) (the ablation of Sec. 5.2);
    none:   base_lr unchanged (the "no scaling" ablation).
    """
    if rule not in SCALING_RULES:
        raise ValueError(f"unknown LR scaling rule {rule!r}; use one of {', '.join(SCALING_RULES)}")
    if base_lr <= 0:
        raise ValueError(f"base_lr must be > 0, got {base_lr}")
    if global_batch_size <= 0 or base_batch_size <= 0:
        raise ValueError(f"batch sizes must be > 0, got global_batch_size={global_batch_size}, base_batch_size={base_batch_size}")
    ratio = global_batch_size / base_batch_size
    if rule == "linear":
        return base_lr * ratio
    if rule == "sqrt":
        return base_lr * math.sqrt(ratio)
    return base_lr


@dataclass(frozen=True, kw_only=True)
class Schedule:
    """The LR of a run as a function of the fractional epoch.

    Units: LRs are absolute; `warmup_epochs`, `milestones` and `epochs` are in epochs (passes over
    the training set). Defaults are the paper's ResNet-50 recipe: base LR 0.1 per 256 images scaled
    linearly to kn, gradual warmup from 0.1 over 5 epochs, x0.1 at epochs 30, 60 and 80 of 90.
    `decay="poly"` is the polynomial decay of the LARS/LAMB recipes (You et al. 2017, arXiv 1708.03888):
    peak x (1 - p) ** poly_power over the progress p from the warmup's end to `epochs`.
    """

    global_batch_size: int
    base_lr: float = 0.1
    base_batch_size: int = 256
    scaling: str = "linear"
    warmup: str = "gradual"
    warmup_epochs: float = 5.0
    warmup_start_lr: float | None = None
    decay: str = "step"
    milestones: tuple[float, ...] = field(default=(30, 60, 80))
    gamma: float = 0.1
    epochs: float = 90
    poly_power: float = 2.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "milestones", tuple(self.milestones))
        if self.warmup not in WARMUP_KINDS:
            raise ValueError(f"unknown warmup {self.warmup!r}; use one of {', '.join(WARMUP_KINDS)}")
        if self.decay not in DECAY_KINDS:
            raise ValueError(f"unknown decay {self.decay!r}; use one of {', '.join(DECAY_KINDS)}")
        if self.epochs <= 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if self.warmup != "none" and self.warmup_epochs >= self.epochs:
            raise ValueError(
                f"warmup_epochs={self.warmup_epochs} is not shorter than training (epochs={self.epochs}); "
                "shorten the warmup or train longer"
            )
        if self.warmup_start_lr is not None and self.warmup_start_lr < 0:
            raise ValueError(f"warmup_start_lr must be >= 0, got {self.warmup_start_lr}")
        if self.gamma <= 0:
            raise ValueError(f"gamma must be > 0, got {self.gamma}")
        if not self.poly_power > 0:
            raise ValueError(f"poly_power must be > 0, got {self.poly_power}; You et al. use 2 for LARS ResNet-50")
        if self.decay == "step":
            ms = self.milestones
            if any(b <= a for a, b in zip(ms, ms[1:])):
                raise ValueError(f"milestones must be strictly increasing, got {list(ms)}")
            if ms and not (self._warmup_end <= ms[0] and ms[-1] < self.epochs):
                raise ValueError(
                    f"milestones {list(ms)} must lie in [warmup end {self._warmup_end}, epochs {self.epochs}); "
                    "move them or change warmup_epochs/epochs"
                )
        self.peak_lr  # validates base_lr, batch sizes and scaling rule

    @property
    def peak_lr(self) -> float:
        """The scaled LR reached at the end of warmup (eta = 0.1 * kn / 256 in the paper)."""
        return scaled_lr(self.base_lr, self.global_batch_size, self.base_batch_size, self.scaling)

    @property
    def start_lr(self) -> float:
        """LR at epoch 0 of a warmup: unless set, the reference minibatch's LR (the paper's eta),
        capped at the peak, since a kn below the reference batch has nothing to warm up to."""
        return min(self.base_lr, self.peak_lr) if self.warmup_start_lr is None else self.warmup_start_lr

    @property
    def _warmup_end(self) -> float:
        return 0.0 if self.warmup == "none" else self.warmup_epochs

    def _decayed(self, epoch: float) -> float:
        if self.decay == "step":
            return self.peak_lr * self.gamma ** bisect.bisect_right(self.milestones, epoch)
        if self.decay in ("cosine", "poly"):
            span = self.epochs - self._warmup_end
            progress = min(max((epoch - self._warmup_end) / span, 0.0), 1.0)
            if self.decay == "poly":
                return self.peak_lr * (1.0 - progress) ** self.poly_power
            return 0.5 * self.peak_lr * (1.0 + math.cos(math.pi * progress))
        return self.peak_lr

    def lr(self, epoch: float) -> float:
        """LR at fractional epoch `epoch` (updates done / updates per epoch)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if epoch < self._warmup_end:
            if self.warmup == "constant":
                return self.start_lr
            # Gradual warmup (Sec. 2.2): eta_t = eta + (t / T_w) * (k * eta - eta), one step per iteration.
            return self.start_lr + (epoch / self.warmup_epochs) * (self.peak_lr - self.start_lr)
        return self._decayed(epoch)

    def describe(self, updates_per_epoch: int | None = None) -> str:
        """Human-readable table of the schedule; with `updates_per_epoch`, also in updates."""
        return format_table(self.rows(updates_per_epoch))

    def rows(self, updates_per_epoch: int | None = None) -> list[tuple[str, str]]:
        """(name, value) rows of `describe`."""
        kn, base = self.global_batch_size, self.base_batch_size
        formula = {
            "linear": f"{self.base_lr:g} x {kn}/{base}",
            "sqrt": f"{self.base_lr:g} x sqrt({kn}/{base})",
            "none": f"{self.base_lr:g} (unscaled)",
        }[self.scaling]

        def at(epoch: float) -> str:
            return f"epoch {epoch:g}" + (f" (update {round(epoch * updates_per_epoch)})" if updates_per_epoch else "")

        if self.warmup == "none":
            warmup = "none"
        else:
            warmup = f"{self.warmup}, {self.start_lr:g} -> {self.peak_lr:g} until {at(self.warmup_epochs)}"
        if self.decay == "step":
            decay = f"x{self.gamma:g} at " + (", ".join(at(m) for m in self.milestones) or "no milestones")
        elif self.decay == "cosine":
            decay = f"cosine to 0 at {at(self.epochs)}"
        elif self.decay == "poly":
            decay = f"polynomial, power {self.poly_power:g}, to 0 at {at(self.epochs)}"
        else:
            decay = "none"
        rows = [
            ("global batch (kn)", str(kn)),
            ("scaling rule", self.scaling),
            ("peak LR", f"{self.peak_lr:g} = {formula}"),
            ("warmup", warmup),
            ("decay", decay),
            ("epochs", f"{self.epochs:g}" + (f" ({round(self.epochs * updates_per_epoch)} updates)" if updates_per_epoch else "")),
        ]
        return rows


def format_table(rows: list[tuple[str, str]]) -> str:
    """Two aligned columns."""
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
