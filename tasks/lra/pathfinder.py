"""LRA Pathfinder (32x32, ``curv_contour_length_14``): are the two marker circles joined by one dashed curve?

Source
    Without ``--data-dir`` (or ``data.source=generate``): a seeded numpy re-implementation (no code copied; the
    original is drewlinsley/pathfinder ``snakes2.py``, MIT) of the pathfinder32 ``curv_contour_length_14``
    distribution with LRA's parameters (shared data notes ``lra_pathfinder/SOURCE.md``): 32x32 window, padding
    1, antialias scale 2, two target "snakes" of ``contour_length`` = 14 paddles each (paddle length 2 px,
    thickness 0.5 px, gap ``paddle_margin`` = 1 px between consecutive paddles, each next direction drawn, as
    in snakes2, with weight ``cos(min(continuity * |turn|, pi/2))**2`` among candidates that stay in the
    window and clear of other paddles), ``num_distractor_snakes`` = 20 // 4 = 5 distractor snakes of
    ``distractor_length`` = 14 // 3 = 4 paddles, two markers of radius 1.5 px at least ``seed_distance`` = 7 px
    apart. Label 1 (p = 0.5): both markers sit on the two ends of the same target snake; label 0: one marker
    on an end of each target snake. Paddles of different snakes keep >= 1.5 px apart (checked on the
    geometry), so the only path between the markers is the target curve. Cached as ``.npz`` under
    ``cache_dir("lra", "pathfinder")`` keyed by every generator parameter and the data seed.
    With ``--data-dir D`` containing ``D/lra_pathfinder/pathfinder32/curv_contour_length_14/`` (the LRA release
    layout: ``metadata/<batch>.npy`` rows ``[imgs/<batch>, sample_<i>.png, i, label, ...]`` and
    ``imgs/<batch>/sample_<i>.png``) those images are read instead (``data.source=files`` insists on them).

Deviations of the generator (documented, not hidden): the original draws paddles with OpenCV on an
    antialiased canvas, with retry rules (``max_*_retrial``) and an occupancy raster; we place paddles on
    vector geometry with our own retry rule and render by 2x2 supersampled coverage. Interpretations where
    snakes2's parameters are ambiguous: paddle_thickness 0.5 is the half-width (lines ~1 px wide; snakes2
    draws 1 sub-pixel wide lines, fainter); each paddle starts ``GAP`` after the previous one's end (snakes2's
    pivot arithmetic differs slightly); 36 candidate directions per paddle; paddle_contrast 0.75 -> paddles drawn at 0.75 of the
    marker intensity (markers 255, paddles ~191); snake_contrast and single distractor paddles not modelled.
    The generated images are therefore a statistically similar task, not LRA's pixels.

Preprocessing
    Grayscale 0..255 flattened row-major to 1024 tokens; token = pixel value (vocab 256). Background pixels are
    0, so (Skyformer quirk, kept) they count as "padding" in ``LN(x) * mask`` before MEAN pooling; attention
    gets no padding mask (``attention_padding_mask=False``).

Splits
    LRA splits each difficulty 80/10/10 (train[:80%], val[80%:90%], test[90%:]) of 200 000 images:
    160 000 / 20 000 / 20 000, our generator default too (each split from its own seeded stream, so caps
    take prefixes). Generated in chunks of ``CHUNK`` images, vectorised over the chunk, each chunk seeded by
    ``SeedSequence([seed, split, chunk])`` and run in parallel processes, so the result is independent of the
    number of workers and a capped split is a prefix of the full one.

Config lineage
    ``paper`` = SPION §4.1: 2 layers, d 64, FFN 128, 2 heads, MEAN pooling, L 1024, vocab 512 (as SPION's
    config; rows > 255 unused), batch 256, peak lr 3e-4, OneCycle with 312 warm-up steps, 50 000 steps, eval
    every 500 steps on 156 dev batches, AdamW eps 1e-6, wd 0, clip by value 1.0, no attention padding mask.
    ``LRA_ORIGINAL`` = LRA release (4 layers, emb 32 / qkv 16 / mlp 32, 4 heads, MEAN, batch 512,
    62 400 steps (200 epochs), lr 1e-3, 1 epoch (312 steps) linear warm-up then cosine decay).
    ``published`` = the PyTorch re-runs' lineage (``tasks.lra.common``; Nystromformer's LRA config): 2 layers,
    d 64, FFN 128, 2 heads x 32, MEAN, vocab 512, batch 256, lr 1e-4, OneCycle with 312 warm-up steps, 62 400 steps,
    eval every 312 steps on 312 dev batches (more than the 20 000 dev images: the original cycles through dev,
    here the whole dev split is evaluated), no clipping, padding mask (pixel 0) in attention.
"""
from __future__ import annotations

import math
import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from bench.config import TrainConfig
from bench.env import usable_cores
from bench.errors import DataUnavailable
from bench.models.lra_encoder import LRAModelConfig
from bench.registry import register_task
from tasks.lra import _bytes
from tasks.lra.common import (PUBLISHED_NOTE, LRAClassificationTask, LRASplit, published_model,
                              published_train)

FOLDER = "lra_pathfinder"
SUBDIR = Path("pathfinder32") / "curv_contour_length_14"
CHUNK = 250  # images per chunk: the unit of seeding, batching and parallelism
_SPLIT_INDEX = {"train": 0, "dev": 1, "test": 2}
GEN_DEFAULT_SIZES = {"train": 160000, "dev": 20000, "test": 20000}
_CACHE_VERSION = 1

# Fixed geometry of pathfinder32 (px of the 32x32 window); the tunable ones live in the DataConfig.
WINDOW = 32
PADDING = 1.0
AA = 2  # antialias (supersampling) scale
PADDLE_LENGTH = 2.0
HALF_WIDTH = 0.5  # paddle_thickness 0.5, read as the half-width
GAP = 1.0  # paddle_margin
MARKER_RADIUS = 1.5
SEED_DISTANCE = 7.0
MIN_SEP = 1.5  # min distance between paddles of different snakes (and non-adjacent paddles of one snake)
PADDLE_INTENSITY = 0.75


@dataclass(frozen=True)
class PathfinderDataConfig:
    max_len: int = 1024  # 32 x 32
    n_train: int = 0  # 0 = all (generator: 160 000)
    n_dev: int = 0  # 0 = all (generator: 20 000)
    n_test: int = 0  # 0 = all (generator: 20 000)
    source: str = "auto"  # auto (files if --data-dir has lra_pathfinder/pathfinder32/..., else generate) | generate | files
    data_seed: int = 0
    contour_length: int = 14  # paddles per target snake
    distractor_length: int = 4  # contour_length // 3
    num_distractor_snakes: int = 5  # 20 // distractor_length
    continuity: float = 1.0  # turn weight cos(min(continuity*|turn|, pi/2))**2, as snakes2


# ---- geometry --------------------------------------------------------------------------------
def _pt_seg(P: np.ndarray, S0: np.ndarray, S1: np.ndarray) -> np.ndarray:
    """Distance from points P to segments S0-S1 (broadcasting over leading dims; last dim 2 = (x, y))."""
    px, py, ax, ay = P[..., 0], P[..., 1], S0[..., 0], S0[..., 1]
    dx, dy = S1[..., 0] - ax, S1[..., 1] - ay
    t = np.clip(((px - ax) * dx + (py - ay) * dy) / np.maximum(dx * dx + dy * dy, 1e-12), 0.0, 1.0)
    ex, ey = ax + t * dx - px, ay + t * dy - py
    return np.sqrt(ex * ex + ey * ey)


def _orient(a, b, c):
    return (b[..., 0] - a[..., 0]) * (c[..., 1] - a[..., 1]) - (b[..., 1] - a[..., 1]) * (c[..., 0] - a[..., 0])


def seg_seg_dist(P: np.ndarray, Q: np.ndarray, A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Distances between segments P[..., k, :]Q[..., k, :] and A[..., i, :]B[..., i, :] -> (..., K, m);
    0 where they cross. Leading (batch) dims broadcast."""
    P, Q, A, B = P[..., :, None, :], Q[..., :, None, :], A[..., None, :, :], B[..., None, :, :]
    d = np.minimum(np.minimum(_pt_seg(P, A, B), _pt_seg(Q, A, B)), np.minimum(_pt_seg(A, P, Q), _pt_seg(B, P, Q)))
    crossing = (_orient(P, Q, A) * _orient(P, Q, B) < 0) & (_orient(A, B, P) * _orient(A, B, Q) < 0)
    return np.where(crossing, 0.0, d)


_N_DIR = 36  # candidate directions per paddle (snakes2: one per pixel of arc, ~20 at this step length)
_TURNS = np.linspace(-math.pi, math.pi, _N_DIR, endpoint=False)
_LO, _HI = PADDING + HALF_WIDTH, WINDOW - PADDING - HALF_WIDTH


def _inside(X: np.ndarray) -> np.ndarray:
    return ((X >= _LO) & (X <= _HI)).all(-1)


def _grow_batch(rng: np.random.Generator, others: np.ndarray, n: int, continuity: float, seed_tries: int = 8):
    """Grow one snake of ``n`` paddles in each of b images, avoiding ``others`` ((b, S, 2, 2)).

    As snakes2: the first paddle has a uniform position and orientation; each next paddle starts ``GAP``
    after the previous one's end, its direction drawn among ``_N_DIR`` candidates with weight
    ``cos(min(continuity * |turn|, pi/2))**2``; candidates leaving the window or coming closer than
    ``MIN_SEP`` to another snake (or to a non-adjacent paddle of this snake) get weight 0. A snake with no
    valid candidate fails. Returns (segments (b, n, 2, 2), ok (b,))."""
    b = len(others)
    oA, oB = others[:, :, 0], others[:, :, 1]
    segs = np.zeros((b, n, 2, 2))
    th = np.zeros(b)
    ok = np.zeros(b, dtype=bool)
    pending = np.arange(b)
    for _ in range(seed_tries):
        if not len(pending):
            break
        p = rng.uniform(_LO, _HI, (len(pending), 2))
        t = rng.uniform(-math.pi, math.pi, len(pending))
        q = p + PADDLE_LENGTH * np.stack([np.cos(t), np.sin(t)], -1)
        valid = _inside(q)
        if others.shape[1]:
            valid &= seg_seg_dist(p[:, None], q[:, None], oA[pending], oB[pending]).min((1, 2)) >= MIN_SEP
        take = pending[valid]
        segs[take, 0, 0], segs[take, 0, 1], th[take], ok[take] = p[valid], q[valid], t[valid], True
        pending = pending[~valid]
    w0 = np.cos(np.minimum(continuity * np.abs(_TURNS), math.pi / 2)) ** 2
    for j in range(1, n):
        idx = np.nonzero(ok)[0]
        if not len(idx):
            break
        dirs = th[idx, None] + _TURNS[None]
        u = np.stack([np.cos(dirs), np.sin(dirs)], -1)  # (a, K, 2)
        P = segs[idx, j - 1, 1][:, None] + GAP * u
        Q = P + PADDLE_LENGTH * u
        w = (w0[None] > 0) & _inside(P) & _inside(Q)
        if others.shape[1]:
            w &= seg_seg_dist(P, Q, oA[idx], oB[idx]).min(-1) >= MIN_SEP
        if j > 1:
            w &= seg_seg_dist(P, Q, segs[idx, : j - 1, 0], segs[idx, : j - 1, 1]).min(-1) >= MIN_SEP
        w = w * w0[None]
        tot = w.sum(1)
        dead = tot <= 0
        # inverse-CDF draw; k always lands on a positive-weight candidate (cum[k-1] <= thr < cum[k])
        cum = np.cumsum(w, 1)
        thr = rng.random(len(idx)) * tot
        last = _N_DIR - 1 - np.argmax(w[:, ::-1] > 0, 1)
        k = np.minimum((cum <= thr[:, None]).sum(1), last)
        r = np.arange(len(idx))
        segs[idx, j, 0], segs[idx, j, 1], th[idx] = P[r, k], Q[r, k], dirs[r, k]
        ok[idx[dead]] = False
    return segs, ok


def _generate_batch(rng: np.random.Generator, labels: np.ndarray, cfg: tuple, max_rounds: int = 50):
    """Geometry of len(labels) images: segments (b, S, 2, 2) (S = 2 targets + distractors), snake id per
    segment (S,), markers (b, 2, 2), the snake id each marker sits on (b, 2)."""
    contour_length, distractor_length, n_distractors, continuity = cfg
    b = len(labels)
    S = 2 * contour_length + n_distractors * distractor_length
    segs = np.zeros((b, S, 2, 2))
    markers = np.zeros((b, 2, 2))
    todo = np.arange(b)
    for _ in range(max_rounds):
        if not len(todo):
            break
        a, ok = _grow_batch(rng, np.zeros((len(todo), 0, 2, 2)), contour_length, continuity)
        bb, ok_b = _grow_batch(rng, a, contour_length, continuity)
        ok &= ok_b
        ends_a = np.stack([a[:, 0, 0], a[:, -1, 1]], 1)  # (t, 2 ends, 2)
        ends_b = np.stack([bb[:, 0, 0], bb[:, -1, 1]], 1)
        r = np.arange(len(todo))
        pos = labels[todo] == 1
        ea, eb = rng.integers(0, 2, len(todo)), rng.integers(0, 2, len(todo))
        m0 = np.where(pos[:, None], ends_a[:, 0], ends_a[r, ea])
        m1 = np.where(pos[:, None], ends_a[:, 1], ends_b[r, eb])
        ok &= np.hypot(*(m0 - m1).T) >= SEED_DISTANCE
        cur = np.concatenate([a, bb], 1)
        for _d in range(n_distractors):
            got = np.zeros((len(todo), distractor_length, 2, 2))
            have = np.zeros(len(todo), dtype=bool)
            for _try in range(20):
                need = np.nonzero(ok & ~have)[0]
                if not len(need):
                    break
                g, gok = _grow_batch(rng, cur[need], distractor_length, continuity)
                got[need[gok]], have[need[gok]] = g[gok], True
            ok &= have
            cur = np.concatenate([cur, got], 1)
        done = todo[ok]
        segs[done], markers[done] = cur[ok], np.stack([m0, m1], 1)[ok]
        todo = todo[~ok]
    if len(todo):
        raise RuntimeError("pathfinder: could not place the snakes; parameters too crowded")
    sid = np.concatenate([np.zeros(contour_length, int), np.ones(contour_length, int),
                          np.repeat(np.arange(n_distractors) + 2, distractor_length)])
    mids = np.stack([np.zeros(b, int), np.where(labels == 1, 0, 1)], 1)
    return segs, sid, markers, mids


_PATCH = 12  # sub-pixels per side of the local window rendered around each paddle / marker
_PAD = _PATCH
_OFF = np.arange(_PATCH)


def render_batch(segs: np.ndarray, markers: np.ndarray) -> np.ndarray:
    """(b, m, 2, 2) segments + (b, 2, 2) marker centres -> uint8 (b, 32, 32).

    Coverage of each paddle (a capsule of half-width ``HALF_WIDTH``) and marker disc on a 2x2 supersampled
    grid (``clip((r - distance) * AA + 0.5, 0, 1)``), paddles at ``PADDLE_INTENSITY``, combined by max, then
    averaged over each 2x2 block. Each shape is evaluated on a local ``_PATCH``-square window only."""
    b, m = segs.shape[:2]
    side = WINDOW * AA
    canvas = np.zeros((b, side + 2 * _PAD, side + 2 * _PAD))

    def splat(centre: np.ndarray, value_fn):
        # centre: (b, k, 2) in px; local sub-pixel windows starting at floor(centre*AA) - _PATCH//2
        o = np.floor(centre * AA).astype(int) - _PATCH // 2  # (b, k, 2) sub-pixel origin (x, y)
        gx = (o[..., 0, None] + _OFF + 0.5) / AA  # (b, k, P) sub-pixel centres in px
        gy = (o[..., 1, None] + _OFF + 0.5) / AA
        val = value_fn(gx[..., None, :], gy[..., :, None])  # (b, k, Py, Px)
        rows = (o[..., 1, None] + _OFF + _PAD)[..., :, None]
        cols = (o[..., 0, None] + _OFF + _PAD)[..., None, :]
        bi = np.arange(b)[:, None, None, None]
        np.maximum.at(canvas, (np.broadcast_to(bi, val.shape), np.broadcast_to(rows, val.shape),
                               np.broadcast_to(cols, val.shape)), val)

    A, B = segs[:, :, 0], segs[:, :, 1]

    def paddle(gx, gy):
        P = np.stack(np.broadcast_arrays(gx, gy), -1)
        d = _pt_seg(P, A[:, :, None, None], B[:, :, None, None])
        return np.clip((HALF_WIDTH - d) * AA + 0.5, 0, 1) * PADDLE_INTENSITY

    def marker(gx, gy):
        d = np.sqrt((gx - markers[:, :, None, None, 0]) ** 2 + (gy - markers[:, :, None, None, 1]) ** 2)
        return np.clip((MARKER_RADIUS - d) * AA + 0.5, 0, 1)

    splat((A + B) / 2, paddle)
    splat(markers, marker)
    sub = canvas[:, _PAD:_PAD + side, _PAD:_PAD + side]
    img = sub.reshape(b, WINDOW, AA, WINDOW, AA).mean((2, 4))
    return np.round(img * 255).astype(np.uint8)


def render(segs: np.ndarray, markers: np.ndarray) -> np.ndarray:
    """One image: (m,2,2) segments + (2,2) marker centres -> uint8 (32, 32)."""
    return render_batch(segs[None], markers[None])[0]


def _gen_chunk(args: tuple):
    """CHUNK images of chunk ``chunk`` of a split's stream (``SeedSequence([seed, split, chunk])``)."""
    seed, split_idx, chunk, cfg, with_geometry = args
    rng = np.random.default_rng(np.random.SeedSequence([seed, split_idx, chunk]))
    labels = rng.integers(0, 2, CHUNK).astype(np.int64)
    segs, sid, markers, mids = _generate_batch(rng, labels, cfg)
    imgs = render_batch(segs, markers).reshape(CHUNK, -1)
    geoms = [(segs[i], sid, markers[i], mids[i]) for i in range(CHUNK)] if with_geometry else []
    return imgs, labels, geoms


def generate_pathfinder(n: int, split: str = "train", seed: int = 0, contour_length: int = 14, distractor_length: int = 4,
                        num_distractor_snakes: int = 5, continuity: float = 1.0, workers: int | None = None,
                        with_geometry: bool = False):
    """First ``n`` images of a split's stream -> (uint8 (n, 1024), labels (n,), geometry list or None).

    Geometry per image (``with_geometry``): (segments (m,2,2), snake id per segment (0, 1 = targets),
    markers (2,2), the snake id each marker sits on). Deterministic in the arguments, independent of
    ``workers``; a smaller ``n`` gives a prefix."""
    cfg = (contour_length, distractor_length, num_distractor_snakes, continuity)
    jobs = [(seed, _SPLIT_INDEX[split], c, cfg, with_geometry) for c in range(-(-n // CHUNK))]
    workers = min(usable_cores() if workers is None else workers, len(jobs))
    if workers <= 1:
        parts = [_gen_chunk(j) for j in jobs]
    else:
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as ex:
            parts = list(ex.map(_gen_chunk, jobs))
    imgs = np.concatenate([p[0] for p in parts])[:n] if parts else np.zeros((0, WINDOW * WINDOW), np.uint8)
    labels = np.concatenate([p[1] for p in parts])[:n] if parts else np.zeros(0, np.int64)
    geoms = [g for p in parts for g in p[2]][:n] if with_geometry else None
    return imgs, labels, geoms


# ---- the LRA release files -------------------------------------------------------------------
def _files_root(data_dir: Path | None) -> Path | None:
    if data_dir is None:
        return None
    root = Path(data_dir) / FOLDER / SUBDIR
    return root if (root / "metadata").is_dir() else None


def read_release(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """All images of an LRA-release difficulty folder, in metadata order (files sorted numerically)."""
    from PIL import Image

    meta_dir = root / "metadata"
    files = sorted(meta_dir.glob("*.npy"), key=lambda p: (int(p.stem) if p.stem.isdigit() else 1 << 60, p.name))
    if not files:
        raise DataUnavailable(f"{meta_dir}: no *.npy metadata files; expected the LRA release pathfinder32 layout")
    rows: list[tuple[str, int]] = []
    for f in files:
        try:
            try:
                meta = np.load(f, allow_pickle=False)
            except ValueError:  # object arrays
                meta = np.load(f, allow_pickle=True)
        except Exception as e:
            raise DataUnavailable(f"{f}: not a readable .npy ({type(e).__name__}); expected rows "
                                  "[imgs/<batch>, sample_<i>.png, i, label, ...]") from None
        meta = np.asarray(meta)
        if meta.ndim != 2 or meta.shape[1] < 4:
            raise DataUnavailable(f"{f}: metadata has shape {meta.shape}; expected rows [imgs/<batch>, sample_<i>.png, i, label, ...]")
        for r, row in enumerate(meta):
            try:
                label = int(float(row[3]))
            except ValueError:
                label = -1
            if label not in (0, 1):
                raise DataUnavailable(f"{f} row {r}: expected label 0 or 1 in column 4, got {str(row[3])[:20]!r}")
            rows.append((f"{row[0]}/{row[1]}", label))
    imgs = np.zeros((len(rows), WINDOW * WINDOW), dtype=np.uint8)
    for i, (rel, _) in enumerate(rows):
        p = root / rel
        try:
            with Image.open(p) as im:
                arr = np.asarray(im.convert("L"))
        except Exception as e:
            raise DataUnavailable(f"{p}: not a readable image ({type(e).__name__}); expected a 32x32 grayscale PNG") from None
        if arr.shape != (WINDOW, WINDOW):
            raise DataUnavailable(f"{p}: image is {arr.shape[1]}x{arr.shape[0]}; expected 32x32")
        imgs[i] = arr.reshape(-1)
    return imgs, np.array([lab for _, lab in rows], dtype=np.int64)


def _release_split(n: int, split: str) -> slice:
    """LRA: train[:80%], val[80%:90%], test[90%:] (TFDS percent slicing rounds to whole examples)."""
    a, b = int(round(n * 0.8)), int(round(n * 0.9))
    return {"train": slice(0, a), "dev": slice(a, b), "test": slice(b, n)}[split]


# ---- presets ---------------------------------------------------------------------------------
PAPER_MODEL = LRAModelConfig(
    vocab_size=512, n_classes=2, max_len=1024, n_layers=2, d_model=64, d_qkv=64, n_heads=2, d_ff=128,
    dropout=0.1, pooling="mean", attention_padding_mask=False,
)
PAPER_TRAIN = TrainConfig(
    steps=50000, batch_size=256, lr=3e-4, warmup_steps=312, schedule="onecycle", weight_decay=0.0,
    adam_betas=(0.9, 0.999), adam_eps=1e-6, grad_clip=1.0, grad_clip_mode="value", eval_every=500, eval_batches=156,
)
# Original LRA release config (lra_benchmarks/image/configs/pathfinder32/base_pathfinder32_config.py).
LRA_ORIGINAL = (
    LRAModelConfig(vocab_size=256, n_classes=2, max_len=1024, n_layers=4, d_model=32, d_qkv=16, n_heads=4,
                   d_ff=32, dropout=0.2, pooling="mean", attention_padding_mask=False),
    PathfinderDataConfig(),
    TrainConfig(steps=62400, batch_size=512, lr=1e-3, warmup_steps=312, schedule="cosine", weight_decay=0.0,
                adam_betas=(0.9, 0.98), adam_eps=1e-9, grad_clip=0.0, eval_every=312, eval_batches=0),
)


@register_task("lra_pathfinder", suite="lra")
class Pathfinder(LRAClassificationTask):
    DATA_FOLDER = FOLDER
    DataConfig = PathfinderDataConfig
    REFERENCE = {"LRA paper Transformer": 71.40, "Skyformer self-attn": 65.26, "Nystromformer standard": 74.16}

    @classmethod
    def presets(cls, scale: str):
        if scale == "paper":
            return PAPER_MODEL, PathfinderDataConfig(), PAPER_TRAIN, ()
        if scale == "published":
            model = published_model(vocab_size=512, n_classes=2, max_len=1024)
            return model, PathfinderDataConfig(), published_train("pathfinder"), (PUBLISHED_NOTE,)
        if scale == "small":
            train = replace(PAPER_TRAIN, steps=2000, batch_size=128, warmup_steps=100, eval_every=250, eval_batches=20)
            data = PathfinderDataConfig(n_train=20000, n_dev=2000, n_test=5000)
            notes = ("reduced budget: 2000 of 50000 steps at batch 128 (paper 256); 20000 of 160000 generated train "
                     "images, 2000 dev, 5000 test",)
            return PAPER_MODEL, data, train, notes
        if scale == "tiny":
            model = replace(PAPER_MODEL, vocab_size=256, n_layers=1, d_model=32, d_qkv=32, d_ff=64)
            data = PathfinderDataConfig(n_train=1000, n_dev=64, n_test=64)
            # 1024 tokens: the CPU block-sparse reference is ~10x eager dense here, so keep the smoke test short
            train = replace(PAPER_TRAIN, steps=40, batch_size=8, lr=1e-3, warmup_steps=4, eval_every=20, eval_batches=0)
            notes = ("smoke-test budget: 1000 train / 64 dev / 64 test generated images, 1 layer d_model 32, "
                     "40 steps at batch 8; accuracy is not meaningful",)
            return model, data, train, notes
        raise ValueError(f"unknown scale {scale!r}")

    @classmethod
    def data_available(cls, data_dir, scale):
        _, data, _, _ = cls.presets(scale)
        if data.source == "files" and _files_root(data_dir) is None:
            return f"Pathfinder files not found: pass --data-dir with {FOLDER}/{SUBDIR.as_posix()}/metadata/*.npy + imgs/"
        return None

    @classmethod
    def data_dir_problem(cls, data_dir, cfg):
        """``--data-dir D`` with a ``D/lra_pathfinder/`` lacking the release layout: refuse (the run would otherwise
        generate images while looking as if it had read the folder)."""
        if data_dir is None or cfg.data.source == "generate":
            return None
        folder = Path(data_dir) / FOLDER
        if folder.is_dir() and _files_root(data_dir) is None:
            return (f"{folder} exists but holds no usable Pathfinder files (expected {SUBDIR.as_posix()}/metadata/*.npy "
                    "+ imgs/); fix it, remove it to use generated data, or pass data.source=generate")
        return None

    def data_dir_used(self) -> bool:
        return self._use_files()

    def _use_files(self) -> bool:
        d = self.cfg.data
        if d.source not in ("auto", "generate", "files"):
            raise DataUnavailable(f"lra_pathfinder: data.source={d.source!r}; expected auto, generate or files")
        if d.source == "generate":
            return False
        problem = self.data_dir_problem(self.data_dir, self.cfg) if d.source == "auto" else None
        if problem:
            raise DataUnavailable(problem)
        root = _files_root(self.data_dir)
        if d.source == "files" and root is None:
            where = Path(self.data_dir) / FOLDER / SUBDIR / "metadata" if self.data_dir else f"--data-dir …/{FOLDER}"
            raise DataUnavailable(f"{where}: not found; expected the LRA release layout "
                                  f"{SUBDIR.as_posix()}/metadata/*.npy + imgs/<batch>/sample_<i>.png")
        return root is not None

    def prepare(self) -> None:
        d = self.cfg.data
        caps = {"train": d.n_train, "dev": d.n_dev, "test": d.n_test}
        if self._use_files():
            root = _files_root(self.data_dir)
            files = sorted((root / "metadata").glob("*.npy"))
            key = {"v": _CACHE_VERSION, "root": str(root.resolve()),
                   "meta": [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]}
            cache = _bytes.cache_file("pathfinder", "release", key)
            z = _bytes.load_npz(cache, key)
            if z is None:
                imgs, labels = read_release(root)
                z = {"imgs": imgs, "labels": labels}
                _bytes.save_npz(cache, key, **z)
            n = len(z["labels"])
            self.splits = {}
            for split in self.SPLITS:
                sl = _release_split(n, split)
                x, y = z["imgs"][sl], z["labels"][sl]
                k = _bytes.cap(len(y), caps[split])
                self.splits[split] = LRASplit(x[:k], y[:k])
            self.data_notes = ()
        else:
            self.splits = {s: self._generated(s, caps[s] or GEN_DEFAULT_SIZES[s]) for s in self.SPLITS}
            # Data provenance for the record (the Trainer may append ``task.data_notes`` to the budget note).
            self.data_notes = ("Pathfinder generated by sparsebench's numpy re-implementation of pathfinder32 "
                               "curv_contour_length_14 (statistically similar task, not the LRA release images)",)

    def _generated(self, split: str, n: int) -> LRASplit:
        d = self.cfg.data
        params = {"v": _CACHE_VERSION, "seed": d.data_seed, "split": split, "n": n, "chunk": CHUNK,
                  "contour_length": d.contour_length, "distractor_length": d.distractor_length,
                  "num_distractor_snakes": d.num_distractor_snakes, "continuity": d.continuity,
                  "geometry": [WINDOW, PADDING, AA, PADDLE_LENGTH, HALF_WIDTH, GAP, MARKER_RADIUS, SEED_DISTANCE,
                               MIN_SEP, PADDLE_INTENSITY]}
        cache = _bytes.cache_file("pathfinder", split, params)
        z = _bytes.load_npz(cache, params)
        if z is None:
            imgs, labels, _ = generate_pathfinder(n, split, d.data_seed, d.contour_length, d.distractor_length,
                                                  d.num_distractor_snakes, d.continuity)
            z = {"imgs": imgs, "labels": labels}
            _bytes.save_npz(cache, params, **z)
        return LRASplit(z["imgs"], z["labels"])

    def load_split(self, split: str) -> LRASplit:
        if not hasattr(self, "splits"):
            self.prepare()
        return self.splits[split]
