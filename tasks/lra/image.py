"""LRA Image: CIFAR-10 as a sequence of 1024 grayscale pixels, 10 classes.

Source
    ``--data-dir D`` with ``D/lra_image_cifar10/`` holding ``cifar10_jpg.tar.xz`` (the shared collection's copy:
    members ``cifar10_jpg/{train,test}/<class>/NNNN.jpg``) or that tree already extracted (``cifar10_jpg/`` or
    ``train/`` + ``test/`` directly). The archive is extracted once into ``cache_dir("lra", "image")`` and read
    with Hugging Face ``datasets``' ``imagefolder`` builder, offline (labels = alphabetical class folders =
    CIFAR ids 0 airplane ... 9 truck, checked by name). Without ``--data-dir`` (or ``data.source=hf``):
    ``hub.load_dataset("cifar10")``; offline -> ``DataUnavailable``. The grayscale arrays are cached.
    **The shared copy is JPEG quality 75 (lossy)**: labels and splits are exact, pixels are not (mean PSNR
    30.5 dB); results on it are self-consistent but not numerically comparable with published LRA Image
    numbers. Runs on it carry a note saying so.

Preprocessing
    RGB -> grayscale exactly as LRA's ``tf.image.rgb_to_grayscale`` on uint8 input:
    ``g = floor((0.2989 R + 0.5870 G + 0.1140 B) * 255.5 / 255)`` (TF converts to float in [0, 1], takes the
    weighted sum, and converts back with ``x * 255.5`` then a saturating cast), flattened row-major to 1024
    tokens; token = pixel value (vocab 256, no shift). Skyformer quirk kept: a pixel of value 0 counts as
    "padding" in the final ``LN(x) * mask`` before MEAN pooling; attention itself gets no padding mask
    (``attention_padding_mask=False``).

Splits
    45 000 train / 5 000 dev / 10 000 test (SPION config; LRA: train[:90%] / train[90%:] / test). The
    original interleaved CIFAR order is not recoverable from class folders, so files are ordered by
    (within-class index, class): dev = the last 500 images of every class in file order (class-balanced);
    first extraction + indexing of the shared copy takes ~1 minute on 2 CPU cores, then the arrays are cached;
    from HF ``cifar10`` (original order) dev = the last 5 000 training images as LRA.

Config lineage
    ``paper`` = SPION §4.1: 2 layers, d 64, FFN 128, 2 heads, MEAN pooling, L 1024, vocab 256, batch 128,
    peak lr 1e-4, OneCycle with 175 warm-up steps, 10 000 steps, eval every 500 steps on 20 dev batches,
    AdamW eps 1e-6, wd 0, clip by value 1.0, no attention padding mask. ``LRA_ORIGINAL`` = LRA release
    (1 layer, emb 128 / qkv 64 / mlp 128, 8 heads, CLS, batch 256, 35 000 steps (200 epochs), lr 5e-4,
    1 epoch linear warm-up then cosine decay).
    ``published`` = the PyTorch re-runs' lineage (``tasks.lra.common``; Nystromformer's LRA config): 2 layers,
    d 64, FFN 128, 2 heads x 32, MEAN, vocab 512, batch 256, lr 1e-4, OneCycle with 175 warm-up steps, 35 000 steps,
    eval every 175 steps on 20 dev batches, no clipping, padding mask (pixel 0) in attention.
"""
from __future__ import annotations

import os
import shutil
import tarfile
import lzma
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

FOLDER = "lra_image_cifar10"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_CACHE_VERSION = 1
JPEG_NOTE = ("CIFAR-10 read from a JPEG q75 (lossy) copy: labels/splits exact, pixels not; "
             "not numerically comparable with published LRA Image numbers")


@dataclass(frozen=True)
class ImageDataConfig:
    max_len: int = 1024  # 32 x 32 pixels
    n_train: int = 45000  # first n of the 50 000 training images
    n_dev: int = 5000  # the last n_dev training images (disjoint from train; n_train + n_dev <= 50 000)
    n_test: int = 0  # 0 = all 10 000
    source: str = "auto"  # auto (files if --data-dir has lra_image_cifar10/, else HF) | files | hf


def rgb_to_gray_tf(rgb: np.ndarray) -> np.ndarray:
    """uint8 (..., 3) -> uint8 (...), as ``tf.image.rgb_to_grayscale`` on uint8 images."""
    x = rgb.astype(np.float32) / 255.0
    g = x[..., 0] * np.float32(0.2989) + x[..., 1] * np.float32(0.5870) + x[..., 2] * np.float32(0.1140)
    return np.clip(np.floor(g * np.float32(255.5)), 0, 255).astype(np.uint8)


def _find_source(data_dir: Path | None) -> tuple[str, Path] | None:
    if data_dir is None:
        return None
    d = Path(data_dir) / FOLDER
    if (d / "cifar10_jpg.tar.xz").is_file():
        return "tar", d / "cifar10_jpg.tar.xz"
    for root in (d / "cifar10_jpg", d):
        if (root / "train").is_dir() and (root / "test").is_dir():
            return "dir", root
    return None


def _extraction_name(tar_path: Path) -> str:
    st = tar_path.stat()
    return "extracted_" + _bytes.params_key({"file": str(tar_path.resolve()), "size": st.st_size, "mtime": st.st_mtime_ns})


def _extract(tar_path: Path) -> Path:
    dest = _bytes.cache_dir("lra", "image", _extraction_name(tar_path))
    done = dest / ".complete"
    if not done.exists():
        try:
            with tarfile.open(tar_path, "r:*") as tf:
                members = [m for m in tf.getmembers() if m.isfile() or m.isdir()]
                if not any(m.name.lower().endswith((".jpg", ".jpeg", ".png")) for m in members):
                    raise DataUnavailable(f"{tar_path}: contains no images; expected cifar10_jpg/{{train,test}}/<class>/NNNN.jpg")
                try:
                    tf.extractall(dest, members=members, filter="data")
                except TypeError:  # Python without extraction filters
                    tf.extractall(dest, members=members)
        except (tarfile.TarError, lzma.LZMAError, EOFError, OSError) as e:
            raise DataUnavailable(f"{tar_path}: not a readable tar archive ({type(e).__name__}: {e}); "
                                  "expected cifar10_jpg/{train,test}/<class>/NNNN.jpg") from None
        done.touch()
    for root in (dest / "cifar10_jpg", dest):
        if (root / "train").is_dir() and (root / "test").is_dir():
            return root
    raise DataUnavailable(f"{tar_path}: expected members cifar10_jpg/train/<class>/*.jpg and cifar10_jpg/test/<class>/*.jpg")


def _read_imagefolder(root: Path, origin: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Index ``root/{train,test}/<class>/*`` with datasets' imagefolder (offline), decode with PIL."""
    import datasets
    from PIL import Image

    for split in ("train", "test"):
        names = sorted(p.name for p in (root / split).iterdir() if p.is_dir())
        if names != sorted(CLASSES):
            raise DataUnavailable(f"{origin}: {split}/ has class folders {names[:12]}; expected the 10 CIFAR-10 classes {list(CLASSES)}")
    was_enabled = datasets.utils.logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset("imagefolder", data_dir=str(root), cache_dir=str(_bytes.cache_dir("lra", "image", "hf")))
    except Exception as e:
        raise DataUnavailable(f"{origin}: datasets imagefolder could not read it ({type(e).__name__}: {e})") from None
    finally:
        if was_enabled:
            datasets.enable_progress_bars()
    out = {}
    for split in ("train", "test"):
        d = ds[split].cast_column("image", datasets.Image(decode=False))
        names = d.features["label"].names
        rows = []
        for item, lab in zip(d["image"], d["label"]):
            cls = names[lab]
            stem = Path(item["path"]).stem
            idx = int(stem) if stem.isdigit() else stem
            rows.append((idx, CLASSES.index(cls), item["path"]))
        rows.sort(key=lambda r: (r[0] if isinstance(r[0], int) else -1, r[1], str(r[0]), r[2]))
        pix = np.zeros((len(rows), 1024), dtype=np.uint8)
        for i, (_, _, path) in enumerate(rows):
            try:
                with Image.open(path) as im:
                    arr = np.asarray(im.convert("RGB"))
            except Exception as e:
                raise DataUnavailable(f"{path}: not a readable image ({type(e).__name__}); expected a 32x32 RGB JPEG/PNG") from None
            if arr.shape != (32, 32, 3):
                raise DataUnavailable(f"{path}: image is {arr.shape[1]}x{arr.shape[0]}; expected 32x32")
            pix[i] = rgb_to_gray_tf(arr).reshape(-1)
        out[split] = (pix, np.array([r[1] for r in rows], dtype=np.int64))
    return out


def _read_hf() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    try:
        ds = hub.load_dataset("cifar10")
        out = {}
        for split in ("train", "test"):
            col = "img" if "img" in ds[split].column_names else "image"
            imgs = np.stack([np.asarray(im.convert("RGB")) for im in ds[split][col]])
            out[split] = (rgb_to_gray_tf(imgs).reshape(len(imgs), -1), np.asarray(ds[split]["label"], dtype=np.int64))
        return out
    except Exception as e:
        raise DataUnavailable(
            f"CIFAR-10 via Hugging Face datasets failed ({type(e).__name__}); offline: pass --data-dir pointing at a "
            f"folder containing {FOLDER}/cifar10_jpg.tar.xz"
        ) from None


def load_cifar_gray(data_dir: Path | None, source: str) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], bool]:
    """({"train"|"test": (uint8 (N, 1024), labels)}, lossy_jpeg) from files or HF, cached."""
    if source not in ("auto", "files", "hf"):
        raise DataUnavailable(f"lra_image: data.source={source!r}; expected auto, files or hf")
    found = _find_source(data_dir) if source != "hf" else None
    if source == "files" and found is None:
        raise DataUnavailable(f"{Path(data_dir) / FOLDER if data_dir else '--data-dir …/' + FOLDER}: no CIFAR-10 files; "
                              "expected cifar10_jpg.tar.xz or an extracted {train,test}/<class>/ image tree")
    if found:
        st = found[1].stat()
        key = {"v": _CACHE_VERSION, "source": [found[0], str(found[1].resolve()), st.st_size, st.st_mtime_ns]}
    else:
        key = {"v": _CACHE_VERSION, "source": "hf:cifar10"}
    path = _bytes.cache_file("image", "cifar10_gray", key)
    z = _bytes.load_npz(path, key)
    if z is None:
        if found:
            root = _extract(found[1]) if found[0] == "tar" else found[1]
            data = _read_imagefolder(root, found[1])
            lossy = any(p.suffix.lower() in (".jpg", ".jpeg") for p in (root / "train" / CLASSES[0]).iterdir())
            if found[0] == "tar":  # the cached arrays replace the extracted tree
                shutil.rmtree(_bytes.cache_dir("lra", "image", _extraction_name(found[1])), ignore_errors=True)
        else:
            data, lossy = _read_hf(), False
        z = {"lossy": np.array(lossy)}
        for s, (pix, lab) in data.items():
            z[f"{s}_pixels"], z[f"{s}_labels"] = pix, lab
        _bytes.save_npz(path, key, **z)
    return {s: (z[f"{s}_pixels"], z[f"{s}_labels"]) for s in ("train", "test")}, bool(z["lossy"])


# ---- presets ---------------------------------------------------------------------------------
PAPER_MODEL = LRAModelConfig(
    vocab_size=256, n_classes=10, max_len=1024, n_layers=2, d_model=64, d_qkv=64, n_heads=2, d_ff=128,
    dropout=0.1, pooling="mean", attention_padding_mask=False,
)
PAPER_TRAIN = TrainConfig(
    steps=10000, batch_size=128, lr=1e-4, warmup_steps=175, schedule="onecycle", weight_decay=0.0,
    adam_betas=(0.9, 0.999), adam_eps=1e-6, grad_clip=1.0, grad_clip_mode="value", eval_every=500, eval_batches=20,
)
# Original LRA release config (lra_benchmarks/image/configs/cifar10/base_cifar10_config.py): (model, data, train).
LRA_ORIGINAL = (
    LRAModelConfig(vocab_size=256, n_classes=10, max_len=1024, n_layers=1, d_model=128, d_qkv=64, n_heads=8,
                   d_ff=128, dropout=0.3, pooling="cls", attention_padding_mask=False),
    ImageDataConfig(),
    TrainConfig(steps=35000, batch_size=256, lr=5e-4, warmup_steps=175, schedule="cosine", weight_decay=0.0,
                adam_betas=(0.9, 0.98), adam_eps=1e-9, grad_clip=0.0, eval_every=175, eval_batches=0),
)


@register_task("lra_image", suite="lra")
class Image(LRAClassificationTask):
    DATA_FOLDER = FOLDER
    DataConfig = ImageDataConfig
    REFERENCE = {"LRA paper Transformer": 42.44, "Skyformer self-attn": 40.57, "Nystromformer standard": 38.20}

    @classmethod
    def presets(cls, scale: str):
        if scale == "paper":
            return PAPER_MODEL, ImageDataConfig(), PAPER_TRAIN, ()
        if scale == "published":
            model = published_model(vocab_size=512, n_classes=10, max_len=1024)
            return model, ImageDataConfig(), published_train("image"), (PUBLISHED_NOTE,)
        if scale == "small":
            train = replace(PAPER_TRAIN, steps=1500, eval_every=250, eval_batches=20)
            return PAPER_MODEL, ImageDataConfig(), train, ("reduced budget: 1500 of 10000 steps",)
        if scale == "tiny":
            model = replace(PAPER_MODEL, n_layers=1, d_model=32, d_qkv=32, d_ff=64)
            data = ImageDataConfig(n_train=1500, n_dev=64, n_test=64)
            # 1024 tokens: the CPU block-sparse reference is ~10x eager dense here, so keep the smoke test short
            train = replace(PAPER_TRAIN, steps=40, batch_size=8, lr=1e-3, warmup_steps=4, eval_every=20, eval_batches=0)
            notes = ("smoke-test budget: 1500 train / 64 dev / 64 test images, 1 layer d_model 32, 40 steps at "
                     "batch 8; accuracy is not meaningful",)
            return model, data, train, notes
        raise ValueError(f"unknown scale {scale!r}")

    @classmethod
    def data_available(cls, data_dir, scale):
        _, data, _, _ = cls.presets(scale)
        if _find_source(data_dir) is not None:
            return None
        if data.source == "files" or os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
            return f"CIFAR-10 not available offline: pass --data-dir pointing at a folder containing {FOLDER}/cifar10_jpg.tar.xz"
        return None

    @classmethod
    def data_dir_problem(cls, data_dir, cfg):
        """``--data-dir D`` with a ``D/lra_image_cifar10/`` holding no usable CIFAR-10 files: refuse (the run would otherwise
        download the data while looking as if it had read the folder)."""
        if data_dir is None or cfg.data.source == "hf":
            return None
        folder = Path(data_dir) / FOLDER
        if folder.is_dir() and _find_source(data_dir) is None:
            return (f"{folder} exists but holds no usable CIFAR-10 files (expected "
                    "cifar10_jpg.tar.xz or cifar10_jpg/{train,test}/); fix it, remove it to download the data from the "
                    "HF hub, or pass data.source=hf")
        return None

    def data_dir_used(self) -> bool:
        return self.cfg.data.source != "hf" and _find_source(self.data_dir) is not None

    def prepare(self) -> None:
        d = self.cfg.data
        problem = self.data_dir_problem(self.data_dir, self.cfg) if d.source == "auto" else None
        if problem:
            raise DataUnavailable(problem)
        data, self.lossy = load_cifar_gray(self.data_dir, d.source)
        (tr_x, tr_y), (te_x, te_y) = data["train"], data["test"]
        n_dev = min(d.n_dev, len(tr_y))
        n_train = _bytes.cap(len(tr_y) - n_dev, d.n_train)
        if n_dev <= 0:
            raise DataUnavailable(f"lra_image: data.n_dev={d.n_dev}; the dev split needs at least one image")
        n_test = _bytes.cap(len(te_y), d.n_test)
        self.splits = {
            "train": LRASplit(tr_x[:n_train], tr_y[:n_train]),
            "dev": LRASplit(tr_x[len(tr_y) - n_dev :], tr_y[len(tr_y) - n_dev :]),
            "test": LRASplit(te_x[:n_test], te_y[:n_test]),
        }
        # Data provenance for the record (the Trainer may append ``task.data_notes`` to the budget note).
        self.data_notes = (JPEG_NOTE,) if self.lossy else ()

    def load_split(self, split: str) -> LRASplit:
        if not hasattr(self, "splits"):
            self.prepare()
        return self.splits[split]
