"""A second device on a CPU-only machine, for tests: what fails on a GPU because a tensor was left on the host.

On CUDA, an operation that mixes a device tensor with a host tensor of one or more dimensions fails
("Expected all tensors to be on the same device"), ``.numpy()`` of a device tensor fails, and a
factory call asked for a device tensor refuses a CPU generator. None of this shows on a CPU-only
machine, where every tensor is on the CPU. Under :class:`FakeGpu`, tensors carry a mark saying they
live on a second device (``maia:0``, see ``BACKEND``): ``x.device`` reports it,
``torch.zeros(n, device=x.device)``, ``.to(x.device)``, ``.to(x)``, ``.cuda()`` and ``Module.to`` give
marked tensors, ``.cpu()`` an unmarked copy, results of operations on marked tensors are marked,
and the three failures above are raised as :class:`DeviceMismatch`. The numbers are computed on the
CPU as usual, so a test's results are the CPU's.

Indexing a device tensor with host index tensors (``x[idx]``, ``x[idx] = v``) is allowed, as CUDA
allows it, and so is ``copy_`` between the two.

The mark is a Python attribute of the tensor object. Gradients, which autograd makes, are marked
through the ``.grad`` getter; ``Parameter.__deepcopy__`` keeps the mark; ``Module.to`` and
``torch.Generator`` are replaced while the mode is active (a module's parameters and buffers are
marked or unmarked in place; ``Generator(device=...)`` on the device is a CPU generator that reports
the device). ``.numpy()`` inside torch's own functions is not seen: the mode sees the calls made from
outside torch, which is where a tensor is left behind.
"""
from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

# A device type torch parses but this machine has no backend for (Microsoft's MAIA): nothing is registered,
# so no global state of torch changes (a renamed privateuse1 backend would become torch's accelerator and
# break torch.compile for the rest of the process). The tensors stay on the CPU; only their mark moves.
BACKEND = "maia"
_MARK = "_mixbench_on_fake_device"
DEVICE = torch.device(BACKEND, 0)
CPU = torch.device("cpu")


class DeviceMismatch(RuntimeError):
    """What CUDA would raise: a host tensor met a device tensor, or a device tensor went to numpy."""


def on_device(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and getattr(t, _MARK, False)


def _mark(t: Any) -> Any:
    if isinstance(t, torch.Tensor) and not on_device(t):
        setattr(t, _MARK, True)
    return t


def _as_device(d: Any):
    """True for our device, False for another device, None for something that is not a device."""
    if isinstance(d, torch.device):
        return d.type == BACKEND
    if isinstance(d, str):
        try:
            return torch.device(d).type == BACKEND
        except RuntimeError:
            return None
    return None


def _to_host(args, kwargs) -> bool:
    return any(_as_device(a) is False for a in list(args[1:]) + [kwargs.get("device")])


def _getter_of(func: Any) -> Any:
    return getattr(func, "__self__", None) if getattr(func, "__name__", None) == "__get__" else None


_DEVICE_ATTR = torch._C.TensorBase.device
_DERIVED_ATTRS = (torch._C.TensorBase.grad, torch._C.TensorBase.data)  # tensors of the owner's device
_INDEXING = {torch.Tensor.__getitem__, torch.Tensor.__setitem__}
_COPIES = {torch.Tensor.copy_}
# torch internals that take tensors of two devices on purpose (Module.to)
_INTERNAL = {torch._has_compatible_shallow_copy_type, torch.Tensor.set_, torch.Tensor.__deepcopy__}


def _name(func: Any) -> str:
    return getattr(func, "__name__", str(func))


def _keeps_mark(real):
    """A copy method whose result is marked when its source is (``Parameter.__deepcopy__``)."""

    def copy(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        return _mark(out) if on_device(self) else out

    return copy


class _Generator(torch.Generator):
    """``torch.Generator`` while the mode is active: ``Generator(device=DEVICE)`` is a CPU generator
    that reports the device (its draws are the CPU's); any other device gets torch's own."""

    def __new__(cls, device=None):
        if _as_device(device) is True:
            return super().__new__(cls, "cpu")
        return _REAL_GENERATOR(device) if device is not None else _REAL_GENERATOR()

    def __init__(self, device=None):
        pass

    @property
    def device(self):
        return DEVICE


_REAL_GENERATOR = torch.Generator


def _module_to(real):
    """``Module.to`` that moves a module's parameters and buffers to (or from) the fake device in place."""

    def to(module, *args, **kwargs):
        device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*args, **kwargs)
        target = None if device is None else device.type == BACKEND
        module = real(module, *([] if dtype is None else [dtype]),
                      **({} if memory_format is None else {"memory_format": memory_format}))
        if target is not None:
            for t in list(module.parameters()) + list(module.buffers()):
                if target:
                    _mark(t)
                elif on_device(t):
                    delattr(t, _MARK)
        return module

    return to


# Calls that wait for the device: a value or a copy on the host.
_SYNCS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__float__,
          torch.Tensor.__index__, torch.Tensor.nonzero, torch.nonzero, torch.Tensor.cpu}


class FakeGpu(TorchFunctionMode):
    """While active, marked tensors behave as tensors on a second device (see the module's docstring).

    ``syncs`` counts the calls that would make the host wait for the device (``.item()``, ``bool()``,
    ``.nonzero()``, a copy to the host, ...), by name.
    """

    def __init__(self):
        super().__init__()
        self.syncs: Counter = Counter()

    def __enter__(self):
        self._real = torch.nn.Module.to, torch.nn.Parameter.__deepcopy__, torch.Generator
        torch.nn.Module.to = _module_to(self._real[0])
        torch.nn.Parameter.__deepcopy__ = _keeps_mark(self._real[1])
        torch.Generator = _Generator
        return super().__enter__()

    def __exit__(self, *exc):
        torch.nn.Module.to, torch.nn.Parameter.__deepcopy__, torch.Generator = self._real
        return super().__exit__(*exc)

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        prop = _getter_of(func)
        if prop is _DEVICE_ATTR:
            return DEVICE if on_device(args[0]) else func(*args, **kwargs)
        if any(prop is attr for attr in _DERIVED_ATTRS):
            out = func(*args, **kwargs)
            return _mark(out) if on_device(args[0]) else out
        if args and on_device(args[0]) and (func in _SYNCS or (func is torch.Tensor.to and _to_host(args, kwargs))):
            self.syncs[_name(func)] += 1
        if func in (torch.Tensor.numpy, torch.Tensor.__array__) and on_device(args[0]):
            raise DeviceMismatch("can't convert a device tensor to numpy; copy it to the host first (.cpu())")
        if func is torch.Tensor.cpu:
            return args[0].clone() if on_device(args[0]) else args[0]
        if func is torch.Tensor.cuda:
            return _mark(args[0].clone())
        if func is torch.Tensor.to:
            return self._to(func, args, kwargs)
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        dev = any(on_device(t) for t in tensors)
        if dev and func not in _INDEXING and func not in _COPIES and func not in _INTERNAL:
            host = [tuple(t.shape) for t in tensors if not on_device(t) and t.dim() > 0]
            if host:
                raise DeviceMismatch(f"{_name(func)}: tensors on {DEVICE} and host tensors of shapes {host}")
        make = _as_device(kwargs.get("device")) is True
        if make:
            kwargs["device"] = CPU
        gen = kwargs.get("generator")
        if gen is not None and (gen.device.type == BACKEND) != (make or dev):
            where = DEVICE if make or dev else "the host"
            raise DeviceMismatch(f"{_name(func)}: a {gen.device.type} generator for a tensor on {where}")
        out = func(*args, **kwargs)
        if func in _COPIES:
            return out
        if dev or make:
            tree_map(_mark, out)
        return out

    @staticmethod
    def _to(func, args, kwargs):
        src, rest = args[0], list(args[1:])
        target = None  # True: to the device; False: to the host; None: where it is
        for i, a in enumerate(rest):
            if isinstance(a, torch.Tensor):  # .to(other): other's device and dtype
                target, rest[i] = on_device(a), a.dtype
            elif _as_device(a) is not None:
                target, rest[i] = _as_device(a), CPU
        if kwargs.get("device") is not None:
            target, kwargs["device"] = _as_device(kwargs["device"]), CPU
        out = func(src, *rest, **kwargs)
        if target is None:
            target = on_device(src)
        if target != on_device(src) and out is src:
            out = src.clone()
        if target:
            _mark(out)
        elif out is not src and on_device(out):
            delattr(out, _MARK)
        return out
