"""LRA Retrieval: does one ACL Anthology Network (AAN) paper cite the other? Byte-level, two documents, 2 classes.

Source
    Only the LRA release files: ``--data-dir D`` with ``D/lra_retrieval_aan/new_aan_pairs.{train,eval,test}.tsv``
    (from ``lra_release/tsv_data/``): no header, tab-separated columns ``label, id1, id2, text1, text2``
    (label written as ``0``/``1`` or ``0.0``/``1.0``). There is no download and no substitute: without the
    files ``data_available`` and ``prepare`` say so (``DataUnavailable``); another task is never run under
    this name. Tokenised arrays are cached under ``cache_dir("lra", "retrieval")`` keyed by the files' identity.

Preprocessing
    Each text's UTF-8 bytes, truncated to ``max_bytes`` (4000, as LRA and SPION) and right-padded to ``max_len``
    (4096, SPION's power of two); token = byte + 1 (vocab 257; LRA's ``ByteTextEncoder`` uses byte + 2; the
    paper preset keeps SPION's declared vocab 512). The two documents go through one shared encoder
    (``LRAModelConfig(dual=True)``); the classifier sees ``[x0, x1, x0*x1, x0-x1]``.

Splits
    train = ``.train.tsv`` (~147 086 pairs), dev = ``.eval.tsv`` (~18 090), test = ``.test.tsv`` (~17 437), in
    file order; ``n_*`` caps take the first n rows.

Config lineage
    ``paper`` = SPION §4.1: 2 layers, d 64, FFN 128, 2 heads, MEAN pooling, L 4096 per document, batch 32,
    peak lr 3e-4, OneCycle with 800 warm-up steps, 40 000 steps, eval every 200 steps on 300 dev batches,
    AdamW eps 1e-6, wd 0, clip by value 1.0. ``LRA_ORIGINAL`` = LRA release (4 layers 128/128/512, 4 heads,
    CLS, L 4000, batch 32, 5 000 steps, lr 0.05, linear warm-up 8 000 then rsqrt decay).
    ``published`` = the PyTorch re-runs' lineage (``tasks.lra.common``; Nystromformer's LRA config): 2 layers,
    d 64, FFN 128, 2 heads x 32, MEAN, L 4096 per document, batch 32, lr 1e-4, OneCycle with 800 warm-up steps,
    30 000 steps, eval every 300 steps on 565 dev batches, no clipping.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from bench.config import TrainConfig
from bench.errors import DataUnavailable
from bench.models.lra_encoder import LRAModelConfig
from bench.registry import register_task
from tasks.lra import _bytes
from tasks.lra.common import (PUBLISHED_NOTE, LRAClassificationTask, LRASplit, published_model,
                              published_train)

FOLDER = "lra_retrieval_aan"
FILE_NAMES = {"train": "new_aan_pairs.train.tsv", "dev": "new_aan_pairs.eval.tsv", "test": "new_aan_pairs.test.tsv"}
UNAVAILABLE = f"AAN data not available: pass --data-dir with {FOLDER}/new_aan_pairs.*.tsv"
_CACHE_VERSION = 1


@dataclass(frozen=True)
class RetrievalDataConfig:
    max_len: int = 4096  # padded length per document
    max_bytes: int = 4000  # bytes kept per document
    n_train: int = 0  # 0 = all
    n_dev: int = 0
    n_test: int = 0
    source: str = "files"  # files only (the LRA release TSVs)


def read_pairs_tsv(path: Path, max_bytes: int, max_len: int, n_cap: int = 0) -> LRASplit:
    """Read one ``new_aan_pairs.*.tsv``; malformed rows raise ``DataUnavailable`` naming file and line."""
    if not path.is_file():
        raise DataUnavailable(f"{path}: file not found; expected the LRA release AAN pairs TSV "
                              "(columns label, id1, id2, text1, text2)")
    docs1: list[np.ndarray] = []
    docs2: list[np.ndarray] = []
    labels: list[int] = []
    keep = min(max_bytes, max_len)
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip(b"\r\n")
            if not line.strip():
                continue
            cols = line.split(b"\t")
            if len(cols) != 5:
                raise DataUnavailable(f"{path} line {lineno}: expected 5 tab-separated columns "
                                      f"'label, id1, id2, text1, text2', got {len(cols)}")
            try:
                label = float(cols[0])
            except ValueError:
                label = -1.0
            if label not in (0.0, 1.0):
                raise DataUnavailable(f"{path} line {lineno}: expected label 0 or 1, got {cols[0][:20].decode(errors='replace')!r}")
            docs1.append(np.frombuffer(cols[3][:keep], dtype=np.uint8).astype(np.int16) + 1)
            docs2.append(np.frombuffer(cols[4][:keep], dtype=np.uint8).astype(np.int16) + 1)
            labels.append(int(label))
            if n_cap and len(labels) >= n_cap:
                break
    if not labels:
        raise DataUnavailable(f"{path}: no rows; expected 'label<TAB>id1<TAB>id2<TAB>text1<TAB>text2' lines")
    return LRASplit(_bytes.pad_sequences(docs1, max_len), np.array(labels, dtype=np.int64), _bytes.pad_sequences(docs2, max_len))


# ---- presets ---------------------------------------------------------------------------------
PAPER_MODEL = LRAModelConfig(
    vocab_size=512, n_classes=2, max_len=4096, n_layers=2, d_model=64, d_qkv=64, n_heads=2, d_ff=128,
    dropout=0.1, pooling="mean", dual=True, attention_padding_mask=True,
)
PAPER_TRAIN = TrainConfig(
    steps=40000, batch_size=32, lr=3e-4, warmup_steps=800, schedule="onecycle", weight_decay=0.0,
    adam_betas=(0.9, 0.999), adam_eps=1e-6, grad_clip=1.0, grad_clip_mode="value", eval_every=200, eval_batches=300,
)
# Original LRA release config (lra_benchmarks/matching/configs/base_match_config.py): (model, data, train).
LRA_ORIGINAL = (
    LRAModelConfig(vocab_size=257, n_classes=2, max_len=4000, n_layers=4, d_model=128, d_qkv=128, n_heads=4,
                   d_ff=512, dropout=0.1, pooling="cls", dual=True, attention_padding_mask=True),
    RetrievalDataConfig(max_len=4000, max_bytes=4000),
    TrainConfig(steps=5000, batch_size=32, lr=0.05, warmup_steps=8000, schedule="rsqrt", weight_decay=0.1,
                adam_betas=(0.9, 0.98), adam_eps=1e-9, grad_clip=0.0, eval_every=100, eval_batches=0),
)


@register_task("lra_retrieval", suite="lra")
class Retrieval(LRAClassificationTask):
    DATA_FOLDER = FOLDER
    DataConfig = RetrievalDataConfig
    REFERENCE = {"LRA paper Transformer": 57.46, "Skyformer self-attn": 80.69, "Nystromformer standard": 79.35}

    @classmethod
    def presets(cls, scale: str):
        if scale == "paper":
            return PAPER_MODEL, RetrievalDataConfig(), PAPER_TRAIN, ()
        if scale == "published":
            model = published_model(vocab_size=512, n_classes=2, max_len=4096, dual=True)
            return model, RetrievalDataConfig(), published_train("retrieval"), (PUBLISHED_NOTE,)
        if scale == "small":
            train = replace(PAPER_TRAIN, steps=1500, eval_every=250, eval_batches=20)
            notes = ("reduced budget: 1500 of 40000 steps; dev capped to 2000 pairs, periodic dev eval on 20 batches "
                     "(paper 300)",)
            return PAPER_MODEL, RetrievalDataConfig(n_dev=2000), train, notes
        if scale == "tiny":
            model = replace(PAPER_MODEL, vocab_size=257, max_len=256, n_layers=1, d_model=32, d_qkv=32, d_ff=64)
            data = RetrievalDataConfig(max_len=256, max_bytes=256, n_train=1500, n_dev=200, n_test=200)
            train = replace(PAPER_TRAIN, steps=100, lr=1e-3, warmup_steps=10, eval_every=50, eval_batches=0)
            notes = ("smoke-test budget: first 256 bytes per document, 1500 train / 200 dev / 200 test pairs, 1 layer "
                     "d_model 32, 100 steps; accuracy is not meaningful",)
            return model, data, train, notes
        raise ValueError(f"unknown scale {scale!r}")

    @classmethod
    def data_available(cls, data_dir, scale):
        if data_dir is None:
            return UNAVAILABLE
        d = Path(data_dir) / FOLDER
        missing = [n for n in FILE_NAMES.values() if not (d / n).is_file()]
        return None if not missing else f"{UNAVAILABLE} (missing {', '.join(missing)})"

    def load_split(self, split: str) -> LRASplit:
        d = self.cfg.data
        if d.source != "files":
            raise DataUnavailable(f"lra_retrieval: data.source={d.source!r}; only 'files' (the LRA release TSVs) exists")
        if self.data_dir is None:
            raise DataUnavailable(UNAVAILABLE)
        path = Path(self.data_dir) / FOLDER / FILE_NAMES[split]
        if not path.is_file():
            raise DataUnavailable(f"{path}: not found; {UNAVAILABLE}")
        n_cap = {"train": d.n_train, "dev": d.n_dev, "test": d.n_test}[split]
        st = path.stat()
        key = {"v": _CACHE_VERSION, "file": str(path.resolve()), "size": st.st_size, "mtime": st.st_mtime_ns,
               "max_bytes": d.max_bytes, "max_len": d.max_len, "n": n_cap}
        cache = _bytes.cache_file("retrieval", split, key)
        z = _bytes.load_npz(cache, key)
        if z is not None:
            return LRASplit(z["tokens"], z["labels"], z["tokens2"])
        s = read_pairs_tsv(path, d.max_bytes, d.max_len, n_cap)
        if s.tokens.size > 1_000_000:  # only worth caching for real-size files
            _bytes.save_npz(cache, key, tokens=s.tokens, labels=s.labels, tokens2=s.tokens2)
        return s
