"""Reading a model's per-layer attention probabilities and hidden states (teachers, distillation, statistics).

``with Probe(model, method) as p: out = forward()`` records, for that forward:

- ``p.attention[i]``: the attention probabilities (B, H, Lq, Lk) of attention core ``i`` (``p.cores[i]``, the
  model's ``AttentionCore`` modules in module order, which is the order ``method.cores`` were built in), from its
  last call; ``p.attention_calls[i]`` has every call (a core runs twice per forward in LRA Retrieval, once per step
  when decoding). None for a core that did not run or gave no probabilities.
- ``p.hidden[i]``: the output (B, L, d) of block ``i`` of ``blocks_of(model)`` (its last call; ``p.hidden_calls[i]``
  has every call).

Tensors keep their autograd graph (a distillation loss can go through the student's probabilities); pass
``detach=True`` to store detached copies (statistics, teachers).

How cores give their probabilities: while the probe is active every core has ``core.probe`` set to a callable
(``AttentionCore.probe`` is None otherwise). A core that can probe calls ``self.probe(probs)`` with its
(B, H, Lq, Lk) probabilities; the simplest way is ``probed_attention(self, q, k, v, key_padding_mask)`` (below) when
``self.probe is not None``, the textbook softmax of ``bench.attention.eager_attention`` that also hands its
probabilities over. A core that does not call ``self.probe``: with ``fallback="dense"`` (default) and a core of a
dense-family method (or a core with ``probe_dense = True``), the probe computes the probabilities itself from the
call's q, k and mask (``attention_probs``), which is exact for a dense core (it attends to every allowed pair);
``fallback="eager"`` does this for every core (the dense softmax a sparse core approximates: not what it computed);
``fallback="none"`` never. Cores left without probabilities are listed in ``p.missing``.

``frozen_teacher(model)``: a deep copy in eval mode, every parameter ``requires_grad=False``, that puts itself back in
eval mode before each forward (a teacher held inside a student model stays frozen when the Trainer calls
``model.train()``). Run the teacher's forward under ``torch.no_grad()`` to save memory.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from bench.method import AttentionCore

BLOCK_LIST_NAMES = ("blocks", "layers", "layer", "enc", "dec", "h")


def attention_probs(q: torch.Tensor, k: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                    causal: bool = False, sm_scale: float | None = None) -> torch.Tensor:
    """Softmax attention probabilities (B, H, Lq, Lk) in fp32, as ``eager_attention`` computes them: masked keys
    get -inf (probability 0), causal diagonal aligned bottom-right (query i sees keys ``<= i + Lk - Lq``), a row
    with no visible key is all 0 (not NaN)."""
    scale = sm_scale if sm_scale is not None else q.shape[-1] ** -0.5
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    Lq, Lk = s.shape[-2:]
    allowed = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device)
    if causal:
        allowed = torch.tril(allowed, diagonal=Lk - Lq)
    allowed = allowed[None, None]
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :].bool()
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, -1).nan_to_num(0.0)


def probed_attention(core: AttentionCore, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     key_padding_mask: torch.Tensor | None = None, sm_scale: float | None = None) -> torch.Tensor:
    """Eager attention for ``core`` (its ``spec.causal``) that hands its probabilities to ``core.probe`` when set;
    returns the output (B, H, Lq, D) in ``v``'s dtype. For a core's ``forward``:
    ``if self.probe is not None: return probed_attention(self, q, k, v, key_padding_mask)``."""
    spec = getattr(core, "spec", None)
    p = attention_probs(q, k, key_padding_mask, bool(getattr(spec, "causal", False)), sm_scale)
    if getattr(core, "probe", None) is not None:
        core.probe(p)
    return torch.matmul(p.to(v.dtype), v)


def cores_of(model: nn.Module) -> list[AttentionCore]:
    """The model's attention cores in module order (the build order of ``method.cores``; same for a deep copy)."""
    return [m for m in model.modules() if isinstance(m, AttentionCore)]


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """The model's Transformer blocks in order: the elements of every ``nn.ModuleList`` named one of
    ``BLOCK_LIST_NAMES`` (LRA/GPT ``blocks``, seq2seq ``enc`` then ``dec``, HF BERT ``encoder.layer``, OPT
    ``decoder.layers``) whose elements hold attention (an ``AttentionCore`` or a module with ``layer_idx``), not
    nested in another such list."""
    found: list[nn.Module] = []
    inside: set[int] = set()
    for name, m in model.named_modules():
        if id(m) in inside or not isinstance(m, nn.ModuleList) or not len(m):
            continue
        if name.rsplit(".", 1)[-1] not in BLOCK_LIST_NAMES:
            continue
        if not all(any(isinstance(s, AttentionCore) or hasattr(s, "layer_idx") for s in blk.modules()) for blk in m):
            continue
        found.extend(m)
        inside.update(id(s) for s in m.modules())
    return found


def _is_dense(method) -> bool:
    return getattr(method, "family", None) == "dense"


class Probe:
    """Context manager recording per-layer attention probabilities and hidden states (see the module docstring).

    ``Probe(model, method=None, attention=True, hidden=True, detach=False, fallback="dense")``; ``method`` tells
    the fallback whether the cores are dense (``method.family == "dense"``)."""

    def __init__(self, model: nn.Module, method: Any = None, attention: bool = True, hidden: bool = True,
                 detach: bool = False, fallback: str = "dense"):
        if fallback not in ("dense", "eager", "none"):
            raise ValueError(f"Probe: fallback={fallback!r}; valid: dense, eager, none")
        self.model, self.method = model, method
        self.want_attention, self.want_hidden, self.detach, self.fallback = attention, hidden, detach, fallback
        self.cores = cores_of(model) if attention else []
        self.blocks = blocks_of(model) if hidden else []
        self._handles: list = []
        self._saved: list = []
        self.clear()

    # ---- results ---------------------------------------------------------------------------------------------
    def clear(self) -> None:
        self.attention_calls: list[list[torch.Tensor]] = [[] for _ in self.cores]
        self.hidden_calls: list[list[torch.Tensor]] = [[] for _ in self.blocks]
        self._core_ran = [0] * len(self.cores)

    @property
    def attention(self) -> list[torch.Tensor | None]:
        return [c[-1] if c else None for c in self.attention_calls]

    @property
    def hidden(self) -> list[torch.Tensor | None]:
        return [c[-1] if c else None for c in self.hidden_calls]

    @property
    def missing(self) -> list[int]:
        """Indices of cores that ran but gave no probabilities."""
        return [i for i, (ran, c) in enumerate(zip(self._core_ran, self.attention_calls)) if ran and not c]

    def _keep(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach() if self.detach else t

    # ---- hooks -----------------------------------------------------------------------------------------------
    def _fallback_ok(self, core) -> bool:
        if self.fallback == "eager":
            return True
        return self.fallback == "dense" and (getattr(core, "probe_dense", False) or _is_dense(self.method))

    def __enter__(self) -> "Probe":
        self.clear()
        try:
            for i, core in enumerate(self.cores):
                self._saved.append((core, core.__dict__.get("probe", _UNSET)))
                core.probe = self._receiver(i)
                self._handles.append(core.register_forward_pre_hook(self._core_pre(i)))
                self._handles.append(core.register_forward_hook(self._core_post(i), with_kwargs=True))
            for i, blk in enumerate(self.blocks):
                self._handles.append(blk.register_forward_hook(self._block_post(i)))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        for core, old in self._saved:
            if old is _UNSET:
                core.__dict__.pop("probe", None)
            else:
                core.probe = old
        self._saved = []

    def _receiver(self, i: int):
        def receive(probs: torch.Tensor) -> None:
            self.attention_calls[i].append(self._keep(probs))
            self._got = True
        return receive

    def _core_pre(self, i: int):
        def hook(mod, args):
            self._got = False
        return hook

    def _core_post(self, i: int):
        def hook(mod, args, kwargs, out):
            self._core_ran[i] += 1
            if self._got or not self._fallback_ok(mod):
                return
            vals = dict(zip(("q", "k", "v", "key_padding_mask"), args))
            vals.update({n: kwargs[n] for n in ("q", "k", "v", "key_padding_mask") if n in kwargs})
            q, k = vals.get("q"), vals.get("k")
            if q is None or k is None:
                return
            causal = bool(getattr(getattr(mod, "spec", None), "causal", False))
            self.attention_calls[i].append(self._keep(attention_probs(q, k, vals.get("key_padding_mask"), causal)))
        return hook

    def _block_post(self, i: int):
        def hook(mod, args, out):
            x = out[0] if isinstance(out, (tuple, list)) else out
            if isinstance(x, torch.Tensor):
                self.hidden_calls[i].append(self._keep(x))
        return hook


_UNSET = object()


def _stay_in_eval(module: nn.Module, args) -> None:  # forward pre-hook of a frozen teacher
    if module.training:
        module.eval()


def frozen_teacher(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in eval mode with every parameter frozen (``requires_grad=False``). A forward
    pre-hook puts it back in eval mode should an owner's ``train()`` have switched it (a teacher held inside the
    student model), so its dropout never runs; the hook is a module-level function (the teacher pickles)."""
    teacher = copy.deepcopy(model)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher.register_forward_pre_hook(_stay_in_eval)
    teacher.sparsebench_frozen_teacher = True
    return teacher
