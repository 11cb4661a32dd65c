"""LRA Text: byte-level IMDB sentiment classification (aclImdb v1.0, Maas et al. 2011), 2 classes.

Source
    ``--data-dir D`` with ``D/lra_text_imdb/`` holding one of: ``aclImdb_train.tar.xz`` + ``aclImdb_test.tar.xz``
    (the shared collection's copy), the original ``aclImdb_v1.tar.gz``, or an extracted ``aclImdb/`` directory
    (``{train,test}/{pos,neg}/<id>_<rating>.txt``; ``unsup/`` ignored). Without it (or with ``data.source=hf``):
    Hugging Face ``hub.load_dataset("imdb")`` (the same reviews); offline -> ``DataUnavailable``.
    The decoded review bytes are cached (``cache_dir("lra", "text")``, keyed by the source files' identity).

Preprocessing
    The raw file bytes (UTF-8, ``<br />`` tags kept, nothing cleaned), truncated to ``max_bytes`` (4000 as
    SPION/Skyformer; LRA's released config uses 1000, its paper says up to 4K) and right-padded to ``max_len``
    (4096 = 4000 rounded up to a power of two, as SPION). Token = byte value + 1 (ids 1..256, 0 = padding,
    vocab 257); LRA's ``ByteTextEncoder`` uses byte + 2 (two reserved ids). The paper preset keeps SPION's
    declared vocab 512 for the embedding table (rows > 256 unused). Label 1 = pos, 0 = neg.

Splits
    train = the 25 000 train reviews; dev = test = the 25 000 test reviews, as LRA does (so the best-dev
    checkpoint is selected on the test set; SPION's config also lists 25k/25k/25k). Examples are put in a
    source-independent order (sorted by content, then a fixed seed-0 permutation), so caps (``n_dev`` in the
    small preset) take a random, class-balanced-in-expectation subset, the same from tar, directory or HF.

Config lineage
    ``paper`` = SPION §4.1: 2 layers, d 64, FFN 128, 2 heads, MEAN pooling, L 4096, batch 32, peak lr 1e-4,
    OneCycle with 80 warm-up steps, 30 000 steps, eval every 200 steps on 200 dev batches, AdamW eps 1e-6,
    wd 0, clip by value 1.0. ``LRA_ORIGINAL`` = the LRA release config (4 layers 256/256/1024, 4 heads, CLS,
    L 1000, batch 32, 20 000 steps, lr 0.05, linear warm-up 8 000 then rsqrt decay).
    ``published`` = the PyTorch re-runs' lineage (``tasks.lra.common``; Nystromformer's LRA config): 2 layers,
    d 64, FFN 128, 2 heads x 32, MEAN, L 4096 (4000 bytes), batch 32, lr 1e-4, OneCycle with 8 000 warm-up steps,
    20 000 steps, eval every 500 steps on 781 dev batches, no clipping.
"""
from __future__ import annotations

import lzma
import os
import re
import tarfile
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from bench.config import TrainConfig
from bench.errors import DataUnavailable
from bench.models.lra_encoder import LRAModelConfig
from bench.registry import register_task
from bench import hub
from tasks.lra import _bytes
from tasks.lra.common import (PUBLISHED_NOTE, LRAClassificationTask, LRASplit, published_model,
                              published_train)

FOLDER = "lra_text_imdb"
_MEMBER = re.compile(r"(?:^|/)aclImdb/(train|test)/(pos|neg)/(\d+)_(\d+)\.txt$")
_CACHE_VERSION = 1


@dataclass(frozen=True)
class TextDataConfig:
    max_len: int = 4096  # padded length
    max_bytes: int = 4000  # review bytes kept (truncation)
    n_train: int = 0  # 0 = all 25 000
    n_dev: int = 0  # 0 = all 25 000 (dev = the test reviews, as LRA)
    n_test: int = 0  # 0 = all 25 000
    source: str = "auto"  # auto (files if --data-dir has lra_text_imdb/, else HF) | files | hf


def _find_source(data_dir: Path | None) -> tuple[str, list[Path]] | None:
    """(kind, paths) of the first IMDB layout found in ``data_dir/lra_text_imdb``, else None."""
    if data_dir is None:
        return None
    d = Path(data_dir) / FOLDER
    if (d / "aclImdb_train.tar.xz").is_file() and (d / "aclImdb_test.tar.xz").is_file():
        return "tar_split", [d / "aclImdb_train.tar.xz", d / "aclImdb_test.tar.xz"]
    if (d / "aclImdb_v1.tar.gz").is_file():
        return "tar_v1", [d / "aclImdb_v1.tar.gz"]
    if (d / "aclImdb" / "train").is_dir() and (d / "aclImdb" / "test").is_dir():
        return "dir", [d / "aclImdb"]
    return None


def _read_tar(path: Path, out: dict[str, list[tuple[bytes, int]]]) -> None:
    try:
        with tarfile.open(path, "r:*") as tf:
            for m in tf:
                mm = _MEMBER.search(m.name)
                if not (m.isfile() and mm):
                    continue
                f = tf.extractfile(m)
                out[mm.group(1)].append((f.read(), 1 if mm.group(2) == "pos" else 0))
    except (tarfile.TarError, lzma.LZMAError, EOFError, OSError, zlib.error) as e:
        raise DataUnavailable(f"{path}: not a readable tar archive ({type(e).__name__}: {e}); "
                              "expected aclImdb/{train,test}/{pos,neg}/*.txt members") from None


def _read_dir(root: Path, out: dict[str, list[tuple[bytes, int]]]) -> None:
    for split in ("train", "test"):
        for lab, sub in ((1, "pos"), (0, "neg")):
            folder = root / split / sub
            if not folder.is_dir():
                raise DataUnavailable(f"{folder}: missing; expected aclImdb/{split}/{sub}/<id>_<rating>.txt review files")
            for p in sorted(folder.iterdir()):
                if _MEMBER.search(p.as_posix()):
                    out[split].append((p.read_bytes(), lab))


def _read_files(kind: str, paths: list[Path]) -> dict[str, list[tuple[bytes, int]]]:
    out: dict[str, list[tuple[bytes, int]]] = {"train": [], "test": []}
    if kind == "dir":
        _read_dir(paths[0], out)
    else:
        for p in paths:
            _read_tar(p, out)
    for split in ("train", "test"):
        if not out[split]:
            where = paths[0] if kind != "tar_split" else paths[0 if split == "train" else 1]
            raise DataUnavailable(f"{where}: contains no aclImdb/{split}/{{pos,neg}}/<id>_<rating>.txt reviews")
        labels = {lab for _, lab in out[split]}
        if labels != {0, 1}:
            where = paths[0] if kind != "tar_split" else paths[0 if split == "train" else 1]
            raise DataUnavailable(f"{where}: aclImdb/{split} has only {'pos' if 1 in labels else 'neg'} reviews; expected pos/ and neg/")
    return out


def _read_hf() -> dict[str, list[tuple[bytes, int]]]:
    try:
        ds = hub.load_dataset("imdb")
        return {s: [(t.encode("utf-8"), int(y)) for t, y in zip(ds[s]["text"], ds[s]["label"])] for s in ("train", "test")}
    except Exception as e:  # offline, hub error, ...
        raise DataUnavailable(
            f"IMDB via Hugging Face datasets failed ({type(e).__name__}); offline: pass --data-dir pointing at a "
            f"folder containing {FOLDER}/ (aclImdb_train.tar.xz + aclImdb_test.tar.xz, aclImdb_v1.tar.gz or aclImdb/)"
        ) from None


def _canonical_order(examples: list[tuple[bytes, int]]) -> list[tuple[bytes, int]]:
    """Source-independent order: sort by (content, label), then a fixed seed-0 permutation."""
    examples = sorted(examples)
    perm = np.random.default_rng(0).permutation(len(examples))
    return [examples[i] for i in perm]


def _source_identity(kind: str, paths: list[Path]) -> list:
    ident = []
    for p in paths:
        st = p.stat()
        ident.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
    return [kind, ident]


def load_reviews(data_dir: Path | None, source: str) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """{"train"|"test": (flat bytes, offsets, labels)} in canonical order, cached."""
    if source not in ("auto", "files", "hf"):
        raise DataUnavailable(f"lra_text: data.source={source!r}; expected auto, files or hf")
    found = _find_source(data_dir) if source != "hf" else None
    if source == "files" and found is None:
        raise DataUnavailable(
            f"{Path(data_dir) / FOLDER if data_dir else '--data-dir …/' + FOLDER}: no IMDB files; expected "
            "aclImdb_train.tar.xz + aclImdb_test.tar.xz, aclImdb_v1.tar.gz or an extracted aclImdb/ directory"
        )
    key = {"v": _CACHE_VERSION, "source": _source_identity(*found) if found else "hf:imdb"}
    path = _bytes.cache_file("text", "imdb", key)
    z = _bytes.load_npz(path, key)
    if z is None:
        raw = _read_files(*found) if found else _read_hf()
        z = {}
        for split in ("train", "test"):
            ex = _canonical_order(raw[split])
            flat, offsets = np.frombuffer(b"".join(t for t, _ in ex), dtype=np.uint8), np.zeros(len(ex) + 1, np.int64)
            np.cumsum([len(t) for t, _ in ex], out=offsets[1:])
            z[f"{split}_flat"], z[f"{split}_offsets"] = flat, offsets
            z[f"{split}_labels"] = np.array([y for _, y in ex], dtype=np.int64)
        _bytes.save_npz(path, key, **z)
    return {s: (z[f"{s}_flat"], z[f"{s}_offsets"], z[f"{s}_labels"]) for s in ("train", "test")}


def bytes_to_tokens(flat: np.ndarray, offsets: np.ndarray, n: int, max_bytes: int, max_len: int) -> np.ndarray:
    """First ``n`` documents -> (n, max_len) int16, ids = byte + 1, truncated to ``max_bytes``, 0-padded."""
    keep = min(max_bytes, max_len)
    out = np.zeros((n, max_len), dtype=np.int16)
    for i in range(n):
        doc = flat[offsets[i] : min(offsets[i + 1], offsets[i] + keep)]
        out[i, : len(doc)] = doc.astype(np.int16) + 1
    return out


# ---- presets ---------------------------------------------------------------------------------
PAPER_MODEL = LRAModelConfig(
    vocab_size=512, n_classes=2, max_len=4096, n_layers=2, d_model=64, d_qkv=64, n_heads=2, d_ff=128,
    dropout=0.1, pooling="mean", attention_padding_mask=True,
)
PAPER_TRAIN = TrainConfig(
    steps=30000, batch_size=32, lr=1e-4, warmup_steps=80, schedule="onecycle", weight_decay=0.0,
    adam_betas=(0.9, 0.999), adam_eps=1e-6, grad_clip=1.0, grad_clip_mode="value", eval_every=200, eval_batches=200,
)
# Original LRA release config (lra_benchmarks/text_classification/configs/base_tc_config.py): (model, data, train).
LRA_ORIGINAL = (
    LRAModelConfig(vocab_size=257, n_classes=2, max_len=1000, n_layers=4, d_model=256, d_qkv=256, n_heads=4,
                   d_ff=1024, dropout=0.1, pooling="cls", attention_padding_mask=True),
    TextDataConfig(max_len=1000, max_bytes=1000),
    TrainConfig(steps=20000, batch_size=32, lr=0.05, warmup_steps=8000, schedule="rsqrt", weight_decay=0.1,
                adam_betas=(0.9, 0.98), adam_eps=1e-9, grad_clip=0.0, eval_every=100, eval_batches=0),
)


@register_task("lra_text", suite="lra")
class Text(LRAClassificationTask):
    DATA_FOLDER = FOLDER
    DataConfig = TextDataConfig
    REFERENCE = {"LRA paper Transformer": 64.27, "Skyformer self-attn": 61.95, "Nystromformer standard": 65.02}

    @classmethod
    def presets(cls, scale: str):
        if scale == "paper":
            return PAPER_MODEL, TextDataConfig(), PAPER_TRAIN, ()
        if scale == "published":
            model = published_model(vocab_size=512, n_classes=2, max_len=4096)
            return model, TextDataConfig(), published_train("text"), (PUBLISHED_NOTE,)
        if scale == "small":
            train = replace(PAPER_TRAIN, steps=1500, eval_every=250, eval_batches=20)
            notes = ("reduced budget: 1500 of 30000 steps; dev capped to 2000 of 25000 reviews and periodic dev eval "
                     "on 20 batches (paper 200); test on all 25000",)
            return PAPER_MODEL, TextDataConfig(n_dev=2000), train, notes
        if scale == "tiny":
            model = replace(PAPER_MODEL, vocab_size=257, max_len=256, n_layers=1, d_model=32, d_qkv=32, d_ff=64)
            data = TextDataConfig(max_len=256, max_bytes=256, n_train=1500, n_dev=200, n_test=200)
            train = replace(PAPER_TRAIN, steps=100, lr=1e-3, warmup_steps=10, eval_every=50, eval_batches=0)
            notes = ("smoke-test budget: first 256 bytes per review, 1500 train / 200 dev / 200 test reviews, "
                     "1 layer d_model 32, 100 steps; accuracy is not meaningful",)
            return model, data, train, notes
        raise ValueError(f"unknown scale {scale!r}")

    @classmethod
    def data_available(cls, data_dir, scale):
        _, data, _, _ = cls.presets(scale)
        if _find_source(data_dir) is not None:
            return None
        if data.source == "files" or os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
            return (f"IMDB not available offline: pass --data-dir pointing at a folder containing {FOLDER}/ "
                    "(aclImdb_train.tar.xz + aclImdb_test.tar.xz, aclImdb_v1.tar.gz or aclImdb/)")
        return None  # downloadable from the HF hub (prepare() says so if that fails)

    @classmethod
    def data_dir_problem(cls, data_dir, cfg):
        """``--data-dir D`` with a ``D/lra_text_imdb/`` holding no usable IMDB files: refuse (the run would otherwise
        download the data while looking as if it had read the folder)."""
        if data_dir is None or cfg.data.source == "hf":
            return None
        folder = Path(data_dir) / FOLDER
        if folder.is_dir() and _find_source(data_dir) is None:
            return (f"{folder} exists but holds no usable IMDB files (expected aclImdb_train.tar.xz "
                    "+ aclImdb_test.tar.xz, aclImdb_v1.tar.gz or "
                    "aclImdb/{train,test}/); fix it, remove it to download the data from the HF hub, or pass data.source=hf")
        return None

    def data_dir_used(self) -> bool:
        return self.cfg.data.source != "hf" and _find_source(self.data_dir) is not None

    def prepare(self) -> None:
        d = self.cfg.data
        problem = self.data_dir_problem(self.data_dir, self.cfg) if d.source == "auto" else None
        if problem:
            raise DataUnavailable(problem)
        raw = load_reviews(self.data_dir, d.source)
        self.splits = {}
        for split, src, n_cap in (("train", "train", d.n_train), ("dev", "test", d.n_dev), ("test", "test", d.n_test)):
            flat, offsets, labels = raw[src]
            n = _bytes.cap(len(labels), n_cap)
            self.splits[split] = LRASplit(bytes_to_tokens(flat, offsets, n, d.max_bytes, d.max_len), labels[:n].copy())

    def load_split(self, split: str) -> LRASplit:
        if not hasattr(self, "splits"):
            self.prepare()
        return self.splits[split]
