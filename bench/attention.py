"""Dense attention primitives shared by methods: the textbook softmax (``eager_attention``), SDPA with key padding
and/or causality (``masked_sdpa``), self-attention over the real tokens only through a jagged nested tensor
(``sdpa_jagged``, for SDPA's flash kernel, which takes no mask), and the padding test (``has_padding``: answered
from the host when ``Task.to_device`` recorded the batch's masks there, ``note_host_mask``; else once per batch on
the device, ``PerMask``). ``methods/dense.py`` builds the dense baselines from them; sparse methods use them
for their dense phases or fallbacks (e.g. SPION's dense phase runs ``masked_sdpa``, the dense baseline's path).
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F


def eager_attention(q, k, v, key_padding_mask=None, causal=False, sm_scale=None):
    """Textbook softmax attention; (B, H, Lq, D) x (B, H, Lk, D). Materialises (B, H, Lq, Lk)."""
    scale = sm_scale if sm_scale is not None else q.shape[-1] ** -0.5
    s = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    allowed = torch.ones(s.shape[-2:], dtype=torch.bool, device=q.device)
    if causal:
        allowed = torch.tril(allowed, diagonal=s.shape[-1] - s.shape[-2])
    allowed = allowed[None, None]
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :]
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)  # fully masked rows -> 0, not NaN
    return torch.matmul(p.to(v.dtype), v)


class PerMask:
    """One value computed from the last padding-mask tensor seen (and an extra key): every layer of a model gets
    the same mask tensor for a batch, so the value is computed once per batch, not once per layer. A weak
    reference never matches a new tensor; the tensor's ``_version`` catches an in-place edit."""

    def __init__(self):
        self._entry: tuple = ()  # (weakref to the mask, (its _version, key), value)

    def get(self, mask: torch.Tensor, key, compute):
        e = self._entry
        if e and e[0]() is mask and e[1] == (mask._version, key):
            return e[2]
        value = compute()
        self._entry = (weakref.ref(mask), (mask._version, key), value)
        return value


_ANY_PADDING = PerMask()

# Masks whose content is known on the host: id(device tensor) -> (weakref, its _version, every entry True?)
_HOST_KNOWN: dict[int, tuple] = {}
_HOST_KNOWN_MAX = 64  # a few batches' masks (Retrieval has two per batch); dead tensors leave on their own


def note_host_mask(device_mask: torch.Tensor, host_mask: torch.Tensor) -> None:
    """Record what ``has_padding`` will be asked about ``device_mask``, read from ``host_mask`` (the CPU tensor it
    was copied from) before the batch leaves the host, so that the question costs no device-to-host sync
    (issue 15). ``Task.to_device`` calls it for every bool tensor of a batch; an in-place edit of
    ``device_mask`` afterwards (its ``_version`` moves) makes ``has_padding`` ask the device again."""
    if device_mask.dtype != torch.bool or host_mask.device.type != "cpu" or device_mask.shape != host_mask.shape:
        return
    _remember(device_mask, bool(host_mask.all()))


def same_padding(new_mask: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``new_mask`` hides a key exactly when ``mask`` does (e.g. a CLS position prepended as True): carry over what
    the host knows about ``mask``. Returns ``new_mask``."""
    known = _host_all(mask)
    if known is not None:
        _remember(new_mask, known)
    return new_mask


def _remember(mask: torch.Tensor, all_true: bool) -> None:
    i = id(mask)
    _HOST_KNOWN.pop(i, None)  # (re)inserted last: the oldest entries go first
    ref = weakref.ref(mask, lambda r, i=i: _HOST_KNOWN.pop(i, None) if _HOST_KNOWN.get(i, (None,))[0] is r else None)
    _HOST_KNOWN[i] = (ref, mask._version, all_true)
    while len(_HOST_KNOWN) > _HOST_KNOWN_MAX:
        _HOST_KNOWN.pop(next(iter(_HOST_KNOWN)))


def _host_all(mask: torch.Tensor) -> bool | None:
    """Is every entry of ``mask`` True, as recorded on the host (None: not recorded, or edited since)?"""
    e = _HOST_KNOWN.get(id(mask))
    if e is None or e[0]() is not mask or e[1] != mask._version:
        return None
    return e[2]


def has_padding(key_padding_mask) -> bool:
    """Does this (B, Lk) mask hide any key? Answered from the host when the batch's mask was recorded there
    (``note_host_mask``, done by ``Task.to_device``); otherwise a device-to-host sync, asked once per batch
    (``PerMask``)."""
    if key_padding_mask is None:
        return False
    known = _host_all(key_padding_mask)
    if known is not None:
        return not known
    return _ANY_PADDING.get(key_padding_mask, None, lambda: not bool(key_padding_mask.all()))


def masked_sdpa(q, k, v, key_padding_mask=None, causal=False, dropout_p=0.0):
    """SDPA with key padding (B, Lk) and/or causality, under whatever backend context the caller set.

    Broadcast masks only: a materialised (B, 1, Lq, Lk) mask made SDPA read O(L^2) bytes and ran padded
    dense baselines ~40 % slower (results/errata.json). Causal with Lq != Lk: the queries are the last Lq
    positions (bottom-right aligned diagonal); one new query (KV-cache decoding) sees every cached key.
    """
    Lq, Lk = q.shape[2], k.shape[2]
    causal = causal and Lq > 1
    if not has_padding(key_padding_mask):
        key_padding_mask = None  # no padding in this batch: let every backend run maskless
    if key_padding_mask is None and (not causal or Lq == Lk):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=dropout_p)
    mask = None
    if causal:
        mask = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril(diagonal=Lk - Lq)[None, None]
    if key_padding_mask is not None:
        kpm = key_padding_mask[:, None, None, :]  # (B, 1, 1, Lk)
        mask = kpm if mask is None else mask & kpm
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    # rows with no visible key come back NaN from some backends; they are padding queries
    return out.nan_to_num(0.0)


def sdpa_jagged(q, k, v, key_padding_mask):
    """Self-attention over the real tokens only, via a jagged nested tensor (flash takes no mask).
    Padding queries get 0. Assumes real tokens are a prefix or any subset: we gather them per row."""
    B, H, L, D = q.shape
    lengths = key_padding_mask.sum(1)
    idx = key_padding_mask.reshape(-1).nonzero().squeeze(1)  # flat positions of real tokens
    offsets = torch.zeros(B + 1, dtype=torch.int64, device=q.device)
    offsets[1:] = lengths.cumsum(0)

    def pack(x):  # (B, H, L, D) -> jagged (B, H, j, D)
        flat = x.transpose(1, 2).reshape(B * L, H, D)[idx]  # (T, H, D)
        return torch.nested.nested_tensor_from_jagged(flat, offsets).transpose(1, 2)

    o = F.scaled_dot_product_attention(pack(q), pack(k), pack(v))  # jagged (B, H, j, D)
    flat = o.transpose(1, 2).values()  # (T, H, D)
    out = q.new_zeros(B * L, H, D)
    out = out.index_copy(0, idx, flat)
    return out.view(B, L, H, D).transpose(1, 2)


_PerMask = PerMask  # the names methods/dense.py used before the move
_sdpa_jagged = sdpa_jagged
