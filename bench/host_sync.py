"""Would-be host synchronisations of a region, counted on CPU (issue 15).

On CUDA a training step is host-bound when the host waits for the GPU inside it: every device-to-host read of a
value (``.item()``, ``bool(t)``, ``float(t)``, ``.tolist()``, ``.cpu()``, ``.numpy()``), every op whose output shape
depends on the data (``nonzero``, ``unique``, ``masked_select``, boolean-mask indexing, ``repeat_interleave``
without ``output_size``) and every blocking copy between host and device (PyTorch's ``memcpy_and_sync``) stalls the
launch queue until the GPU has caught up. On a CPU these calls cost nothing, but the same Python code runs, so
counting them on CPU tells what would sync on CUDA. ``HostSyncCounter`` is a ``torch.overrides.TorchFunctionMode``
that does that count and records where each one is made (``file:line`` of the first frame outside torch).

Which tensors would be on the device? On CPU every tensor is, so the counter tracks it: a tensor is a *device
tensor* when it is on CUDA, when it was marked (``mark_device``: a model's parameters and buffers, a batch), when it
was made or moved onto the *stand-in device* ``STAND_IN`` (``torch.device("cpu", 0)``, which a CPU run passes where a
GPU run passes ``cuda``), or when it is computed from a device tensor. Everything else (layouts built on the host,
``torch.arange(n)`` without a device, ``.cpu()`` copies) is a host tensor, and reading a host tensor never syncs.
While the mode is active a device tensor's ``.device`` reads ``STAND_IN``, so code that places a tensor "next to"
another (``x.to(q.device)``, ``torch.ones(..., device=q.device)``) makes the same host/device choice as on CUDA, and
``layout.device != q.device`` is true exactly when it would be on a GPU.

What is counted (only inside ``counting()``, and only for device tensors):

- ``read``: ``item``, ``tolist``, ``numpy``, ``__bool__`` (``if t:``, ``bool(t.any())``), ``__int__``, ``__float__``,
  ``__index__``, ``__complex__``, ``__format__``, ``__repr__``, ``__array__``, ``__contains__``, ``is_nonzero``,
  ``equal``, ``allclose``; ``any``/``all`` themselves are not (they stay on the device until a ``bool``).
- ``d2h`` / ``h2d``: blocking copies between host and device (``.cpu()``, ``.to(host or device)``, ``.cuda()``,
  ``copy_`` across, ``torch.tensor(data, device=...)``, ``new_tensor``); ``non_blocking=True`` copies are not.
- ``shape``: data-dependent output shapes: ``nonzero``, ``argwhere``, ``unique``, ``unique_consecutive``,
  ``masked_select``, one-argument ``where``, ``bincount``, ``repeat_interleave`` with a tensor of repeats and no
  ``output_size``, indexing or index assignment with a boolean tensor.

Not seen: syncs inside ATen's C++ CUDA kernels (e.g. ``nn.Embedding``'s backward counts its segments on the host)
and ``torch.cuda.synchronize()`` calls, which are no tensor functions. On a GPU, ``torch.cuda.set_sync_debug_mode``
sees those (``watch_trainer_steps(..., cuda_debug=True)`` turns it on for the counted steps). Calls made from
Triton's CPU interpreter (which copies kernel arguments to the host to simulate a launch) are not counted: on a GPU
they are a kernel launch. The optimizer's CPU path (single-tensor AdamW) is not its CUDA path (foreach); both keep
the step counter on the host unless ``capturable``/``fused``.

Use::

    counter = HostSyncCounter()
    with counter:
        counter.mark_device(model, batch)
        with counter.counting("step 3"):
            ...
    counter.per_label()      # {"step 3": n}
    print(counter.report())  # one line per (kind, op, site)

``watch_trainer_steps`` counts whole steps of a ``bench.train.Trainer`` run (forward, loss, backward, clip,
optimizer, scheduler and the method's hooks; not the batch fetch, not the eval).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import warnings
import weakref
from collections import Counter
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode

STAND_IN = torch.device("cpu", 0)  # the device of a CPU run that stands in for the GPU

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_THIS_FILE = os.path.abspath(__file__)
_spec = importlib.util.find_spec("triton")
_TRITON_DIR = (os.path.dirname(_spec.origin) + os.sep) if _spec is not None and _spec.origin else None

_READS = {"item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__", "__complex__", "__format__",
          "__repr__", "__array__", "__contains__", "is_nonzero", "equal", "allclose"}
_SHAPE_OPS = {"nonzero", "argwhere", "unique", "unique_consecutive", "masked_select", "bincount", "_unique",
              "_unique2"}
_INDEX_OPS = {"__getitem__", "__setitem__", "index_put", "index_put_"}
_FROM_DATA = {"tensor", "as_tensor", "asarray"}  # factories that copy host data onto the target device
_HOST_RESULT = {"cpu", "numpy", "tolist", "item", "pin_memory"}
_DEVICE_DESC = torch._C.TensorBase.__dict__["device"]
_CHECKPOINT = os.path.join("utils", "checkpoint.py")


@dataclass(frozen=True)
class SyncEvent:
    kind: str  # read | d2h | h2d | shape
    op: str  # the torch function, e.g. "Tensor.__bool__" or "torch.nonzero"
    site: str  # file:line of the first frame outside torch (and outside this module)
    inner: str  # file:line inside torch where the call was made ("" if made outside torch)
    label: str  # the counting() label


def _name(func) -> tuple[str, str]:
    """(owner, name): ("Tensor", "item"), ("torch", "nonzero"), ("getter", "grad"), ("", "cross_entropy")."""
    q = getattr(func, "__qualname__", "") or ""
    if "<locals>" in q:  # e.g. torch.unique, made by torch._jit_internal.boolean_dispatch
        q = getattr(func, "__name__", "") or q
    owner, _, name = q.rpartition(".")
    if owner in ("TensorBase", "Tensor", "_TensorBase"):
        return "Tensor", name
    if owner in ("_VariableFunctionsClass", "") and (getattr(func, "__module__", "") or "torch").startswith("torch"):
        return "torch", name or getattr(func, "__name__", "")  # torch.*, torch.functional.*, torch.nn.functional.*
    if name == "__get__" and hasattr(func, "__self__"):
        return "getter", getattr(func.__self__, "__name__", "")
    if name == "__set__" and hasattr(func, "__self__"):
        return "setter", getattr(func.__self__, "__name__", "")
    return owner, name or getattr(func, "__name__", repr(func))


def _tensors(obj, out: list) -> list:
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            _tensors(x, out)
    elif isinstance(obj, dict):
        for x in obj.values():
            _tensors(x, out)
    return out


def _device_class(d) -> bool | None:
    """True: the device (CUDA, or the stand-in); False: the host; None: not a device argument."""
    if isinstance(d, torch.device):
        return d.type != "cpu" or d.index is not None
    if isinstance(d, str):
        return _device_class(torch.device(d))
    if isinstance(d, int) and not isinstance(d, bool):
        return True  # a CUDA ordinal
    return None


class HostSyncCounter(TorchFunctionMode):
    """Counts would-be host syncs of device tensors inside ``counting()`` regions (module docstring)."""

    def __init__(self):
        super().__init__()
        self._dev: dict[int, weakref.ref] = {}
        self.events: list[SyncEvent] = []
        self.ignored = 0  # calls made from Triton's interpreter (kernel launch simulation)
        self._label: str | None = None
        self.backward_traced = True  # False if torch's backward internals changed and backward ran unobserved

    # ---- device tracking -------------------------------------------------------------------------------
    def _tag(self, t: torch.Tensor) -> None:
        i = id(t)
        if i not in self._dev or self._dev[i]() is not t:
            self._dev[i] = weakref.ref(t, lambda _r, i=i, d=self._dev: d.pop(i, None) if d.get(i) is _r else None)

    def is_device(self, t) -> bool:
        if not isinstance(t, torch.Tensor):
            return False
        with torch._C.DisableTorchFunction():
            if t.is_cuda:
                return True
        r = self._dev.get(id(t))
        return r is not None and r() is t

    def mark_device(self, *objs) -> None:
        """Mark tensors as device tensors: tensors, containers of them, modules (parameters and buffers) and
        optimizers (their state, except AdamW's ``step``, which stays on the host unless capturable or fused)."""
        for obj in objs:
            if isinstance(obj, torch.nn.Module):
                for t in list(obj.parameters()) + list(obj.buffers()):
                    self._tag(t)
            elif isinstance(obj, torch.optim.Optimizer):
                for state in obj.state.values():
                    for k, v in state.items():
                        if isinstance(v, torch.Tensor) and k != "step":
                            self._tag(v)
            else:
                for t in _tensors(obj, []):
                    self._tag(t)

    # ---- counting --------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def counting(self, label: str = "region"):
        prev, self._label = self._label, label
        try:
            yield self
        finally:
            self._label = prev

    def per_label(self) -> dict[str, int]:
        c = Counter(e.label for e in self.events)
        return dict(c)

    def by_site(self, label: str | None = None) -> Counter:
        return Counter((e.kind, e.op, e.site, e.inner) for e in self.events if label is None or e.label == label)

    def report(self, label: str | None = None) -> str:
        rows = sorted(self.by_site(label).items(), key=lambda kv: (-kv[1], kv[0]))
        return "\n".join(f"{n:4d} x {kind:5s} {op:28s} {site}" + (f"  (in {inner})" if inner else "")
                         for (kind, op, site, inner), n in rows) or "no host syncs"

    def _record(self, kind: str, op: str) -> None:
        site, inner = "", ""
        method = op.rpartition(".")[2]
        f = sys._getframe(2)
        while f is not None:
            fn = f.f_code.co_filename
            if fn.startswith(_TORCH_DIR) or os.path.abspath(fn) == _THIS_FILE:
                if (not inner and fn.startswith(_TORCH_DIR) and not fn.endswith("overrides.py")
                        and f.f_code.co_name != method):  # not the op's own torch-function dispatch
                    inner = f"{os.path.relpath(fn, _TORCH_DIR)}:{f.f_lineno}"
                f = f.f_back
                continue
            if _TRITON_DIR and fn.startswith(_TRITON_DIR):
                self.ignored += 1  # Triton's interpreter simulating a launch: a kernel launch on a GPU
                return
            site = f"{_short(fn)}:{f.f_lineno}"
            break
        self.events.append(SyncEvent(kind, op, site, "torch/" + inner if inner else "", self._label))

    def _classify(self, owner: str, name: str, args, kwargs) -> str | None:
        a0 = args[0] if args else None
        if owner == "Tensor":
            if name in _READS and self.is_device(a0):
                return "read"
            if name in ("equal", "allclose") and any(self.is_device(t) for t in _tensors(args, [])):
                return "read"
            if name == "cpu" and self.is_device(a0):
                return "d2h"
            if name in ("to", "cuda", "copy_", "new_tensor"):
                return self._copy_kind(name, args, kwargs)
            if name in _SHAPE_OPS and self.is_device(a0):
                return "shape"
            if name == "repeat_interleave" and self._ri_syncs(args[1:], kwargs) and self.is_device(a0):
                return "shape"
            if name in _INDEX_OPS and self.is_device(a0) and len(args) > 1 and _bool_index(args[1]):
                return "shape"
            return None
        if owner == "torch":
            if name in ("equal", "allclose", "is_nonzero") and any(self.is_device(t) for t in _tensors(args, [])):
                return "read"
            if name in _SHAPE_OPS and self.is_device(a0):
                return "shape"
            if name == "where" and len(args) + len(kwargs) == 1 and self.is_device(a0):
                return "shape"
            if name == "repeat_interleave" and self.is_device(a0) and (
                    len(args) == 1 and not kwargs or self._ri_syncs(args[1:], kwargs)):
                return "shape"
            if name in _FROM_DATA and _device_class(kwargs.get("device")) and not (
                    a0 is not None and self.is_device(a0)):
                return "h2d"
        return None

    @staticmethod
    def _ri_syncs(rest, kwargs) -> bool:
        repeats = rest[0] if rest else kwargs.get("repeats")
        has_size = kwargs.get("output_size") is not None or len(rest) >= 3 and rest[2] is not None
        return isinstance(repeats, torch.Tensor) and repeats.numel() > 1 and not has_size

    def _copy_kind(self, name: str, args, kwargs) -> str | None:
        src_dev = self.is_device(args[0])
        if name == "copy_":
            src = args[1] if len(args) > 1 else kwargs.get("src")
            nb = kwargs.get("non_blocking", args[2] if len(args) > 2 else False)
            other = self.is_device(src)
            if nb or other == src_dev or not isinstance(src, torch.Tensor):
                return None
            return "h2d" if src_dev else "d2h"
        if name == "new_tensor":
            data = args[1] if len(args) > 1 else kwargs.get("data")
            dst = _device_class(kwargs["device"]) if kwargs.get("device") is not None else src_dev
            return "h2d" if dst and not self.is_device(data) else None
        dst, nb = self._to_target(name, args, kwargs)
        if nb or dst is None or dst == src_dev:
            return None
        return "h2d" if dst else "d2h"

    def _to_target(self, name: str, args, kwargs) -> tuple[bool | None, bool]:
        """(target device class or None = unchanged, non_blocking) of ``.to(...)`` / ``.cuda(...)``."""
        nb = bool(kwargs.get("non_blocking", False))
        if name == "cuda":
            if len(args) > 2:
                nb = bool(args[2])
            return True, nb
        dst = None
        for a in args[1:]:
            if isinstance(a, bool):
                nb = a
            elif isinstance(a, torch.Tensor):
                dst = self.is_device(a)
            elif _device_class(a) is not None:
                dst = _device_class(a)
        if kwargs.get("device") is not None:
            dst = _device_class(kwargs["device"])
        if isinstance(kwargs.get("other"), torch.Tensor):
            dst = self.is_device(kwargs["other"])
        return dst, nb

    # ---- the mode ----------------------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        owner, name = _name(func)
        if owner == "getter" and getattr(func, "__self__", None) is _DEVICE_DESC:
            d = func(*args, **kwargs)
            if sys._getframe(1).f_code.co_filename.endswith(_CHECKPOINT):
                return d  # checkpoint compares saved and recomputed metadata: the real device, on both sides
            return STAND_IN if d.type == "cpu" and self.is_device(args[0]) else d
        if name == "backward" and (func is torch.Tensor.backward or func is torch.autograd.backward):
            return self._backward(func, args, kwargs)
        if self._label is not None:
            kind = self._classify(owner, name, args, kwargs)
            if kind:
                self._record(kind, f"{'Tensor.' if owner == 'Tensor' else 'torch.' if owner == 'torch' else ''}{name}")
        out = func(*args, **kwargs)
        if (out is (args[0] if args else None) and owner == "Tensor" and self.is_device(out)
                and (name == "cpu" or name == "to" and self._to_target(name, args, kwargs)[0] is False)):
            out = out.view_as(out)  # on CPU a move to the host returns the tensor itself; on CUDA it is a new one
        self._propagate(owner, name, args, kwargs, out)
        return out

    def _propagate(self, owner, name, args, kwargs, out) -> None:
        outs = _tensors(out, [])
        if not outs:
            return
        if owner == "Tensor" and name in _HOST_RESULT:
            return
        if owner == "Tensor" and name in ("to", "cuda"):
            dst, _ = self._to_target(name, args, kwargs)
            dev = self.is_device(args[0]) if dst is None else dst
        elif owner == "Tensor" and name.endswith("_") and not name.startswith("__") or name == "__setitem__":
            return  # in place: the tensor stays where it is
        elif kwargs.get("device") is not None and _device_class(kwargs["device"]) is not None:
            dev = _device_class(kwargs["device"])
        else:
            dev = any(self.is_device(t) for t in _tensors((args, kwargs), []))
        if dev:
            for t in outs:
                self._tag(t)

    def _backward(self, func, args, kwargs):
        """Run autograd's engine with this mode pushed again, so that the Python code of backward functions (custom
        ``autograd.Function``s, checkpoint recomputation) is seen; a plain call would run it with the mode popped."""
        if func is torch.Tensor.backward:
            names = ("gradient", "retain_graph", "create_graph", "inputs")
            bound = dict(zip(names, args[1:]), **kwargs)
            tensors, grads = args[0], bound.get("gradient")
        else:
            names = ("grad_tensors", "retain_graph", "create_graph", "grad_variables", "inputs")
            bound = dict(zip(names, args[1:]), **kwargs)
            tensors, grads = args[0], bound.get("grad_tensors")
        try:
            from torch.autograd import _make_grads, _tensor_or_tensors_to_tuple
            from torch.autograd.graph import _engine_run_backward
        except ImportError:
            self.backward_traced = False
            return func(*args, **kwargs)
        tensors = (tensors,) if isinstance(tensors, torch.Tensor) else tuple(tensors)
        inputs = bound.get("inputs")
        inputs = () if inputs is None else (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
        create = bool(bound.get("create_graph", False))
        retain = bound.get("retain_graph")
        seeds = _make_grads(tensors, _tensor_or_tensors_to_tuple(grads, len(tensors)), is_grads_batched=False)
        for t, g in zip(tensors, seeds):
            if self.is_device(t) and isinstance(g, torch.Tensor):
                self._tag(g)
        with self:
            _engine_run_backward(tensors, seeds, create if retain is None else retain, create, inputs,
                                 allow_unreachable=True, accumulate_grad=True)
        return None


def _bool_index(index) -> bool:
    return any(t.dtype in (torch.bool, torch.uint8) for t in _tensors(index if isinstance(index, tuple) else (index,), []))


def _short(path: str) -> str:
    """A path relative to the working directory when under it (repository files), else as given."""
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return path if rel.startswith("..") else rel


# ---- a Trainer's steps ------------------------------------------------------------------------------------
class StopTraining(Exception):
    """Raised by ``watch_trainer_steps`` after the last counted step (the run stops there: no eval, no record)."""


def watch_trainer_steps(trainer, counter: HostSyncCounter, *, phase: str | None = None, skip: int = 1,
                        steps: int = 3, cuda_debug: bool = False) -> dict:
    """Count the host syncs of ``steps`` training steps of ``trainer`` (a ``bench.train.Trainer`` before ``run()``)
    after ``skip`` warm-up steps of the phase ``phase`` (None: the first phase), then stop the run with
    ``StopTraining``. A step is what lies between the method's ``before_step`` and ``after_step`` hooks, both
    included: forward, loss, backward, clipping, optimizer, scheduler; not the batch fetch (before ``before_step``)
    nor the eval (after ``after_step``). The model (its parameters and buffers) and every batch the task moves to
    the device are marked as device tensors. Run ``trainer.run()`` inside ``with counter:``.

    ``cuda_debug`` (CUDA only): also set ``torch.cuda.set_sync_debug_mode("warn")`` for the counted steps and keep
    its warnings (syncs made inside ATen too) under the returned dict's ``"cuda_warnings"``.

    Returns a dict filled as the run goes: ``labels`` (one per counted step), ``cuda_warnings`` (label -> list of
    "file:line message")."""
    method, task = trainer.method, trainer.task
    state = {"labels": [], "cuda_warnings": {}, "seen": Counter(), "active": None}
    before, after, to_device, build = method.before_step, method.after_step, task.to_device, task.build_model

    def build_model(m):
        model = build(m)
        counter.mark_device(model)
        return model

    def moved(batch, device):
        out = to_device(batch, device)
        counter.mark_device(out)
        return out

    def before_step(tr, step):
        ph = tr.phase
        state["seen"][ph] += 1
        target = phase if phase is not None else state.setdefault("first_phase", ph)
        if ph == target and state["seen"][ph] > skip:
            label = f"{ph} step {state['seen'][ph] - 1}"
            stack = contextlib.ExitStack()
            stack.enter_context(counter.counting(label))
            if cuda_debug and torch.cuda.is_available() and tr.device.type == "cuda":
                rec = stack.enter_context(warnings.catch_warnings(record=True))
                warnings.simplefilter("always")
                prev = torch.cuda.get_sync_debug_mode()
                torch.cuda.set_sync_debug_mode("warn")
                stack.callback(torch.cuda.set_sync_debug_mode, prev)
                stack.callback(lambda: state["cuda_warnings"].__setitem__(
                    label, [f"{_short(w.filename)}:{w.lineno} {str(w.message)[:80]}" for w in rec]))
            state["active"] = stack
            state["labels"].append(label)
        return before(tr, step)

    def after_step(tr, step):
        try:
            return after(tr, step)
        finally:
            stack, state["active"] = state["active"], None
            if stack is not None:
                stack.close()
                if len(state["labels"]) >= steps:
                    raise StopTraining(f"counted {steps} steps")

    method.before_step, method.after_step = before_step, after_step
    task.to_device, task.build_model = moved, build_model
    return state
