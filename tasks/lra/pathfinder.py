"""LRA Pathfinder (32x32, ``curv_contour_length_14``): are the two marker circles joined by one dashed curve?

Source
    Without ``--data-dir`` (or ``data.source=generate``): a seeded numpy re-implementation (no code copied; the
    original is drewlinsley/pathfinder ``snakes2.py``, MIT) of the pathfinder32 ``curv_contour_length_14``
    distribution with LRA's parameters (shared data notes ``lra_pathfinder/SOURCE.md``): 32x32 window, padding
    1, antialias scale 2, two target "snakes" of ``contour_length`` = 14 paddles each (paddle length 2 px,
    thickness 0.5 px, gap ``paddle_margin`` = 1 px between consecutive paddles, direction change per paddle
    uniform in +-``continuity`` x 30 degrees), ``num_distractor_snakes`` = 20 // 4 = 5 distractor snakes of
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
    snakes2's parameters are ambiguous: paddle_thickness 0.5 is the half-width (lines ~1 px wide);
    continuity 1.0 -> max turn 30 degrees per paddle; paddle_contrast 0.75 -> paddles drawn at 0.75 of the
    marker intensity (markers 255, paddles ~191); snake_contrast and single distractor paddles not modelled.
    The generated images are therefore a statistically similar task, not LRA's pixels.

Preprocessing
    Grayscale 0..255 flattened row-major to 1024 tokens; token = pixel value (vocab 256). Background pixels are
    0, so (Skyformer quirk, kept) they count as "padding" in ``LN(x) * mask`` before MEAN pooling; attention
    gets no padding mask (``attention_padding_mask=False``).

Splits
    LRA splits each difficulty 80/10/10 (train[:80%], val[80%:90%], test[90%:]) of 200 000 images:
    160 000 / 20 000 / 20 000, our generator default too (each split from its own seeded stream, so caps
    take prefixes; generated in parallel processes; every image has its own ``SeedSequence([seed, split, index])``, so the result is
    independent of the number of workers and a capped split is a prefix of the full one).

Config lineage
    ``paper`` = SPION §4.1: 2 layers, d 64, FFN 128, 2 heads, MEAN pooling, L 1024, vocab 512 (as SPION's
    config; rows > 255 unused), batch 256, peak lr 3e-4, OneCycle with 312 warm-up steps, 50 000 steps, eval
    every 500 steps on 156 dev batches, AdamW eps 1e-6, wd 0, clip by value 1.0, no attention padding mask.
    ``LRA_ORIGINAL`` = LRA release (4 layers, emb 32 / qkv 16 / mlp 32, 4 heads, MEAN, batch 512,
    62 400 steps (200 epochs), lr 1e-3, 1 epoch (312 steps) linear warm-up then cosine decay).
"""
from __future__ import annotations

import math
import multiprocessing as mp
import os
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from bench.config import TrainConfig
from bench.errors import DataUnavailable
from bench.models.lra_encoder import LRAModelConfig
from bench.registry import register_task
from tasks.lra import _bytes
from tasks.lra.common import LRAClassificationTask, LRASplit

FOLDER = "lra_pathfinder"
SUBDIR = Path("pathfinder32") / "curv_contour_length_14"
CHUNK = 500  # images per parallel job (seeding is per image)
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
TURN_DEG_PER_CONTINUITY = 30.0


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
    continuity: float = 1.0  # max turn per paddle = continuity * 30 degrees


# ---- geometry --------------------------------------------------------------------------------
def _seg_dist(p: np.ndarray, q: np.ndarray, A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Distances between segment pq and each segment A[i]B[i] ((n, 2) arrays)."""
    if len(A) == 0:
        return np.zeros(0)

    def pt_seg(P, S0, S1):
        d = S1 - S0
        t = np.clip(((P - S0) * d).sum(-1) / np.maximum((d * d).sum(-1), 1e-12), 0.0, 1.0)
        return np.hypot(*(S0 + t[..., None] * d - P).T)

    d = np.minimum.reduce([
        pt_seg(p[None], A, B), pt_seg(q[None], A, B),
        pt_seg(A, p[None], q[None]), pt_seg(B, p[None], q[None]),
    ])

    def orient(a, b, c):
        return (b[..., 0] - a[..., 0]) * (c[..., 1] - a[..., 1]) - (b[..., 1] - a[..., 1]) * (c[..., 0] - a[..., 0])

    o1, o2 = orient(p[None], q[None], A), orient(p[None], q[None], B)
    o3, o4 = orient(A, B, p[None]), orient(A, B, q[None])
    crossing = (o1 * o2 < 0) & (o3 * o4 < 0)
    return np.where(crossing, 0.0, d)


def _grow_snake(rng: np.random.Generator, n: int, others: np.ndarray, max_turn: float, tries: int = 6):
    """Place ``n`` paddles as one snake avoiding ``others`` ((m, 2, 2) segments); (n, 2, 2) or None."""
    lo, hi = PADDING + HALF_WIDTH, WINDOW - PADDING - HALF_WIDTH
    p = rng.uniform(lo, hi, 2)
    theta = rng.uniform(0, 2 * math.pi)
    segs: list[np.ndarray] = []
    for k in range(n):
        placed = False
        for _ in range(tries):
            th = theta if k == 0 else theta + rng.uniform(-max_turn, max_turn)
    
            u = np.array([math.cos(th), math.sin(th)])
            q = p + PADDLE_LENGTH * u
            if not (lo <= q[0] <= hi and lo <= q[1] <= hi and lo <= p[0] <= hi and lo <= p[1] <= hi):
                continue
            if len(others) and _seg_dist(p, q, others[:, 0], others[:, 1]).min() < MIN_SEP:
                continue
            if len(segs) > 1:
                own = np.asarray(segs[:-1])
                if _seg_dist(p, q, own[:, 0], own[:, 1]).min() < MIN_SEP:
                    continue
            placed = True
            break
        if not placed:
            return None
        segs.append(np.stack([p, q]))
        theta = th
        p = q + GAP * u
    return np.asarray(segs)


def _one_image(rng: np.random.Generator, label: int, cfg: tuple, max_attempts: int = 200):
    """Geometry of one image: (segments (m,2,2), snake id per segment, markers (2,2), marker snake ids)."""
    contour_length, distractor_length, n_distractors, continuity = cfg
    max_turn = math.radians(TURN_DEG_PER_CONTINUITY * continuity)
    empty = np.zeros((0, 2, 2))
    for _ in range(max_attempts):
        a = _grow_snake(rng, contour_length, empty, max_turn)
        if a is None:
            continue
        b = _grow_snake(rng, contour_length, a, max_turn)
        if b is None:
            continue
        ends_a = (a[0, 0], a[-1, 1])
        ends_b = (b[0, 0], b[-1, 1])
        if label == 1:
            m0, m1 = ends_a
            ids = (0, 0)
        else:
            m0, m1 = ends_a[rng.integers(2)], ends_b[rng.integers(2)]
            ids = (0, 1)
        if np.hypot(*(m0 - m1)) < SEED_DISTANCE:
            continue
        segs, sid = [a, b], [np.zeros(len(a), int), np.ones(len(b), int)]
        allseg = np.concatenate(segs)
        for j in range(n_distractors):
            d = None
            for _ in range(20):
                d = _grow_snake(rng, distractor_length, allseg, max_turn)
                if d is not None:
                    break
            if d is None:
                break
            segs.append(d)
            sid.append(np.full(len(d), 2 + j))
            allseg = np.concatenate(segs)
        else:
            return allseg, np.concatenate(sid), np.stack([m0, m1]), np.array(ids)
    raise RuntimeError("pathfinder: could not place the snakes; parameters too crowded")


_SUB = (np.arange(WINDOW * AA) + 0.5) / AA
_GRID = np.stack(np.meshgrid(_SUB, _SUB, indexing="xy"), -1).reshape(-1, 2)  # (x, y) of each sub-pixel


def render(segs: np.ndarray, markers: np.ndarray) -> np.ndarray:
    """(m,2,2) segments + (2,2) marker centres -> uint8 (32, 32), 2x2 supersampled coverage."""
    P = _GRID[:, None, :]
    A, B = segs[None, :, 0], segs[None, :, 1]
    d = B - A
    t = np.clip(((P - A) * d).sum(-1) / np.maximum((d * d).sum(-1), 1e-12), 0, 1)
    dist = np.linalg.norm(A + t[..., None] * d - P, axis=-1).min(1)
    paddle = np.clip((HALF_WIDTH - dist) * AA + 0.5, 0, 1) * PADDLE_INTENSITY
    mdist = np.linalg.norm(_GRID[:, None, :] - markers[None], axis=-1).min(1)
    marker = np.clip((MARKER_RADIUS - mdist) * AA + 0.5, 0, 1)
    sub = np.maximum(paddle, marker).reshape(WINDOW * AA, WINDOW * AA)
    img = sub.reshape(WINDOW, AA, WINDOW, AA).mean((1, 3))
    return np.round(img * 255).astype(np.uint8)


def _gen_range(args: tuple):
    """Images ``start..stop-1`` of a split's stream; image i uses its own ``SeedSequence([seed, split, i])``."""
    seed, split_idx, start, stop, cfg, with_geometry = args
    imgs = np.zeros((stop - start, WINDOW * WINDOW), dtype=np.uint8)
    labels = np.zeros(stop - start, dtype=np.int64)
    geoms = []
    for k, i in enumerate(range(start, stop)):
        rng = np.random.default_rng(np.random.SeedSequence([seed, split_idx, i]))
        labels[k] = rng.integers(0, 2)
        segs, sid, markers, mids = _one_image(rng, int(labels[k]), cfg)
        imgs[k] = render(segs, markers).reshape(-1)
        if with_geometry:
            geoms.append((segs, sid, markers, mids))
    return imgs, labels, geoms


def _n_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1


def generate_pathfinder(n: int, split: str = "train", seed: int = 0, contour_length: int = 14, distractor_length: int = 4,
                        num_distractor_snakes: int = 5, continuity: float = 1.0, workers: int | None = None,
                        with_geometry: bool = False):
    """First ``n`` images of a split's stream -> (uint8 (n, 1024), labels (n,), geometry list or None).

    Geometry per image (``with_geometry``): (segments (m,2,2), snake id per segment (0, 1 = targets),
    markers (2,2), the snake id each marker sits on). Deterministic in the arguments, independent of
    ``workers``; a smaller ``n`` gives a prefix."""
    cfg = (contour_length, distractor_length, num_distractor_snakes, continuity)
    jobs = [(seed, _SPLIT_INDEX[split], a, min(a + CHUNK, n), cfg, with_geometry) for a in range(0, n, CHUNK)]
    workers = min(_n_workers() if workers is None else workers, len(jobs))
    if workers <= 1:
        parts = [_gen_range(j) for j in jobs]
    else:
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as ex:
            parts = list(ex.map(_gen_range, jobs))
    imgs = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, WINDOW * WINDOW), np.uint8)
    labels = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int64)
    geoms = [g for p in parts for g in p[2]] if with_geometry else None
    return imgs, labels, geoms
