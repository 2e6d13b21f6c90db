"""Where code run on a CPU would make the host wait for a CUDA device: the CI's stand-in for
`torch.cuda.set_sync_debug_mode`, which needs a GPU.

On a CPU every tensor is a host tensor, so `HostWaits` keeps the distinction itself: the tensors it is
given (the loader's batch) and whatever is computed from host tensors alone, or made from Python data
without a device, are host tensors; every other tensor (parameters, buffers, gradients, optimizer state,
anything made on `device=`) stands for a device tensor. It then records, with the Python line:

- a device value read on the host: `.item()`, `bool()`, `int()`, `float()` (aten's `_local_scalar_dense`),
  an op whose output shape depends on device data (`nonzero`, a boolean-mask index, ...), `.tolist()`,
  `.numpy()`, `.cpu()`;
- a blocking host-to-device copy: `.to(device)` or `copy_` of a host tensor without `non_blocking=True`,
  `torch.tensor(data, device=...)`, an indexed assignment of a Python number or a host tensor into a
  device tensor (CUDA copies the value from the host and waits);
- a host tensor with elements in an op with device tensors (on CUDA: an error).

What it cannot see: `.to("cpu")` of a device tensor (on a CPU the device is "cpu" too; `.cpu()` and
`.tolist()` are seen), and waits inside a library's C++ that reads no device value through aten."""

from __future__ import annotations

import traceback

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakTensorKeyDictionary

READS = {"tolist", "numpy", "cpu"}
FROM_DATA = {"tensor", "as_tensor"}
COPIES = {"to", "copy_", "__setitem__"}  # between host and device by design: judged as copies above


def _tensors(*trees) -> list[torch.Tensor]:
    return [t for t in tree_flatten(trees)[0] if isinstance(t, torch.Tensor)]


def _line() -> str:
    """The innermost frame outside torch and this file: the line that asked for the wait."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        name = frame.filename
        if not (name.endswith("_host_waits.py") or "/torch/" in name or name.startswith("<")):
            return f"{name.rsplit('/site-packages/', 1)[-1]}:{frame.lineno}"
    return "?"


class _Functions(TorchFunctionMode):
    def __init__(self, waits: HostWaits):
        super().__init__()
        self.waits = waits

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        w, name = self.waits, getattr(func, "__name__", "")
        out = func(*args, **kwargs)
        inputs = _tensors(args, kwargs)
        devices = [t for t in inputs if not w.is_host(t)]
        if name in READS and devices:
            w.wait(f"device value read on the host ({name})")
        host_out = not devices
        if name == "to" and inputs and w.is_host(inputs[0]):
            device, _, non_blocking, _ = torch._C._nn._parse_to(*args[1:], **kwargs)
            if device is not None:
                host_out = False
                if out is inputs[0]:  # on a CPU .to(device) returns the host tensor itself; on CUDA, a device copy
                    out = out.clone()
                if not non_blocking:
                    w.wait("blocking host-to-device copy (.to without non_blocking=True)")
        elif name == "copy_" and devices and devices[0] is inputs[0] and w.is_host(inputs[1]) \
                and not kwargs.get("non_blocking", len(args) > 2 and args[2]):
            w.wait("blocking host-to-device copy (copy_ from a host tensor)")
        elif name == "__setitem__" and devices and devices[0] is args[0] and (
                not isinstance(args[2], torch.Tensor) or w.is_host(args[2])):
            w.wait("blocking host-to-device copy (an indexed assignment of a host value)")
        elif name in FROM_DATA and not inputs:
            host_out = kwargs.get("device") is None
            if not host_out:
                w.wait(f"blocking host-to-device copy (torch.{name} with a device)")
        elif not inputs and kwargs.get("device") is not None:
            host_out = False  # a factory on the device: filled by a kernel
        if name not in COPIES and devices and any(w.is_host(t) and t.dim() > 0 for t in inputs):
            w.wait(f"host tensor with elements in a device op ({name}): an error on CUDA")
        if host_out:
            for t in _tensors(out):
                w.host[t] = True
        return out


class _Kernels(TorchDispatchMode):
    def __init__(self, waits: HostWaits):
        super().__init__()
        self.waits = waits

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        reads = (func is torch.ops.aten._local_scalar_dense.default or torch.Tag.data_dependent_output in func.tags
                 or torch.Tag.dynamic_output_shape in func.tags)
        if reads and any(not self.waits.is_host(t) for t in _tensors(args, kwargs)):
            self.waits.wait(f"device value read on the host ({func.overloadpacket.__name__})")
        return func(*args, **(kwargs or {}))


class HostWaits:
    """Context manager: `waits` lists (what, where) for each wait, in order."""

    def __init__(self, host_tensors=()):
        self.host = WeakTensorKeyDictionary()
        for t in host_tensors:
            self.host[t] = True
        self.waits: list[tuple[str, str]] = []
        self._modes = (_Functions(self), _Kernels(self))

    def is_host(self, t: torch.Tensor) -> bool:
        return t in self.host

    def wait(self, what: str) -> None:
        self.waits.append((what, _line()))

    def __enter__(self) -> HostWaits:
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
