"""LRA ListOps: classify the value (0-9) of a nested MIN/MAX/MED/SM expression of up to ~2000 tokens.

Source
    Without ``--data-dir`` (or ``data.source=generate``): a seeded re-implementation (no code copied) of the
    LRA generator (google-research/long-range-arena ``lra_benchmarks/data/listops.py`` @ cd31e5c6, described
    in the shared data notes ``lra_listops/SOURCE.md``): operators ``[MIN [MAX [MED [SM`` (sum mod 10;
    FIRST/LAST disabled as in LRA), digits 0-9, closing ``]``; a node at depth < max_depth (10) is a leaf
    digit with probability 0.75, else an operator with randint(2, max_args=10) children (drawn before the
    operator, as in LRA); depth max_depth is always a leaf; a tree is kept iff
    ``min_length < length < max_length`` (500 < n < 2000, strict; length = leaves + 2 per operator = the
    number of tokens); trees are unique. Labels are the true values (MED = ``int(np.median)``, i.e. the
    lower-rounded mean of the two middle values for an even count). Cached as compressed ``.npz`` under
    ``cache_dir("lra", "listops")`` keyed by every generator parameter and the data seed.
    With ``--data-dir D`` containing ``D/lra_listops/basic_{train,val,test}.tsv`` (the LRA release files,
    header ``Source<TAB>Target``), those are read instead (``data.source=files`` insists on them).

Preprocessing
    As the LRA input pipeline: ``(`` and ``)`` stripped, whitespace-split. Vocabulary (ids): 0 pad,
    digits ``0..9`` -> 1..10, ``[MIN`` 11, ``[MAX`` 12, ``[MED`` 13, ``[SM`` 14, ``]`` 15 (``[FIRST`` 16 and
    ``[LAST`` 17 are accepted in files only) -> 18 ids used, 16 by the default generator. LRA's
    ``TokenTextEncoder`` numbers the same 15 symbols in vocabulary-build order (plus OOV); the ids differ,
    the information does not. The SPION/Skyformer config declares vocab 32 (embedding rows are unused
    beyond 18); we keep 32. Sequences are right-padded with 0 to ``max_len`` (2048 = 2000 rounded up to a
    power of two, as SPION; the original LRA config uses 2000) and truncated beyond it (never needed:
    generated lengths are < 2000).

Splits
    96 000 train / 2 000 dev / 2 000 test (LRA defaults). Deviation: LRA splits one Python ``set`` in its
    (unseeded, arbitrary) iteration order; we draw each split from its own seeded stream (test first, then
    dev, then train, each dropping trees already in an earlier split), so capping ``n_train`` takes a
    prefix of the full train split and leaves dev/test unchanged. Exact LRA data cannot be regenerated (its
    generator is unseeded); this is a statistically equivalent task. Generation is split into chunks of
    ``CHUNK`` accepted trees with per-chunk seeds (``SeedSequence([seed, split, chunk])``) and run in
    parallel processes; the result does not depend on the number of workers.

Config lineage
    ``paper`` = SPION (spion.md §4.1, the Skyformer/Nystromformer PyTorch family): 4 layers, d 64, FFN 128,
    2 heads x 32, MEAN pooling (padding included), L 2048, vocab 32, batch 256, peak lr 7e-4, OneCycle with
    1 000 warm-up steps, 30 000 steps, AdamW eps 1e-6, wd 0, clip by value 1.0, eval every 500 steps on 62
    dev batches. ``LRA_ORIGINAL`` below is the original LRA release config (4 layers 512/512/1024, 8 heads,
    CLS pooling, L 2000, batch 32, 5 000 steps, lr 0.05 with linear warm-up 1 000 then rsqrt decay).
    ``published`` = the PyTorch re-runs' lineage (``tasks.lra.common``; Nystromformer's LRA config): 2 layers,
    d 64, FFN 128, 2 heads x 32, MEAN, L 2048, batch 32, lr 1e-4, OneCycle with 1 000 warm-up steps, 5 000 steps,
    eval every 50 steps on 62 dev batches, no clipping.
"""
from __future__ import annotations

import csv
import random
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
import multiprocessing as mp

import numpy as np

from bench.config import TrainConfig
from bench.env import usable_cores
from bench.errors import DataUnavailable
from bench.models.lra_encoder import LRAModelConfig
from bench.registry import register_task
from tasks.lra import _bytes
from tasks.lra.common import (PUBLISHED_NOTE, LRAClassificationTask, LRASplit, published_model,
                              published_train)

# ---- vocabulary ------------------------------------------------------------------------------
OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")  # FIRST/LAST exist in LRA but are disabled
END = "]"
VOCAB: dict[str, int] = {str(d): d + 1 for d in range(10)}
VOCAB.update({"[MIN": 11, "[MAX": 12, "[MED": 13, "[SM": 14, END: 15, "[FIRST": 16, "[LAST": 17})
ID_TO_TOKEN = {i: t for t, i in VOCAB.items()}
VOCAB_SIZE = 18  # ids in use (incl. pad); the model config uses 32 as SPION does
_MIN, _MAX, _MED, _SM, _END = 11, 12, 13, 14, 15
CHUNK = 500  # accepted trees per generator chunk (the unit of parallelism and of seeding)
_SPLIT_INDEX = {"train": 0, "dev": 1, "test": 2}
FILE_NAMES = {"train": "basic_train.tsv", "dev": "basic_val.tsv", "test": "basic_test.tsv"}
FOLDER = "lra_listops"


@dataclass(frozen=True)
class ListOpsDataConfig:
    max_len: int = 2048  # padded sequence length
    n_train: int = 0  # 0 = all (generator: 96 000); otherwise the first n
    n_dev: int = 0  # 0 = all (generator: 2 000)
    n_test: int = 0  # 0 = all (generator: 2 000)
    source: str = "auto"  # auto (files if --data-dir has lra_listops/, else generate) | generate | files
    data_seed: int = 0  # generator seed (fixed across run seeds: all runs see the same data)
    min_length: int = 500  # generator: keep trees with min_length < length < max_length
    max_length: int = 2000
    max_depth: int = 10
    max_args: int = 10


GEN_DEFAULT_SIZES = {"train": 96000, "dev": 2000, "test": 2000}


# ---- generator -------------------------------------------------------------------------------
class _TooLong(Exception):
    pass


def _sample_tree(rnd: random.Random, depth: int, max_depth: int, max_args: int, out: list, limit: int) -> int:
    """Append one tree's token ids (prefix order: op, children..., ']') to ``out``; return its value.

    Raises ``_TooLong`` as soon as ``len(out) >= limit`` (the tree would be rejected anyway).
    """
    if depth >= max_depth or rnd.random() > 0.25:
        v = rnd.randrange(10)
        out.append(v + 1)
        return v
    n_args = rnd.randint(2, max_args)
    slot = len(out)
    out.append(0)  # operator, drawn after the children as in LRA
    vals = [_sample_tree(rnd, depth + 1, max_depth, max_args, out, limit) for _ in range(n_args)]
    op = rnd.randrange(4)
    out[slot] = 11 + op
    out.append(_END)
    if len(out) >= limit:
        raise _TooLong
    if op == 0:
        return min(vals)
    if op == 1:
        return max(vals)
    if op == 2:
        s = sorted(vals)
        m = len(s) // 2
        return s[m] if len(s) % 2 else (s[m - 1] + s[m]) // 2  # int(np.median) for non-negative ints
    return sum(vals) % 10


def _gen_chunk(args: tuple) -> tuple[list[bytes], list[int]]:
    """CHUNK accepted trees for (seed, split, chunk) as token-id byte strings, and their values."""
    seed, split_idx, chunk, min_length, max_length, max_depth, max_args, n = args
    ss = np.random.SeedSequence([seed, split_idx, chunk])
    rnd = random.Random(int(ss.generate_state(2, np.uint64)[0]))
    trees: list[bytes] = []
    values: list[int] = []
    while len(trees) < n:
        out: list[int] = []
        try:
            v = _sample_tree(rnd, 1, max_depth, max_args, out, max_length)
        except _TooLong:
            continue
        if min_length < len(out) < max_length:
            trees.append(bytes(out))
            values.append(v)
    return trees, values


def _run_chunks(jobs: list[tuple], workers: int) -> list[tuple[list[bytes], list[int]]]:
    workers = min(workers, len(jobs))
    if workers <= 1:
        return [_gen_chunk(j) for j in jobs]
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as ex:
        return list(ex.map(_gen_chunk, jobs))


def generate_listops(
    sizes: dict[str, int],
    seed: int = 0,
    min_length: int = 500,
    max_length: int = 2000,
    max_depth: int = 10,
    max_args: int = 10,
    workers: int | None = None,
) -> dict[str, tuple[list[bytes], np.ndarray]]:
    """Generate unique trees per split -> {split: (token-id byte strings, values)}.

    Splits are filled in the order test, dev, train, each from its own chunk stream; a tree already in an
    earlier split (or earlier in the same split) is skipped. Deterministic in (sizes, seed, parameters),
    independent of ``workers``; a split's first n trees do not depend on its requested size.
    """
    workers = usable_cores() if workers is None else workers
    seen: dict[bytes, None] = {}  # insertion-ordered set across splits
    result: dict[str, tuple[list[bytes], np.ndarray]] = {}
    for split in ("test", "dev", "train"):
        need = sizes.get(split, 0)
        trees: list[bytes] = []
        vals: list[int] = []
        next_chunk = 0
        while len(trees) < need:
            n_chunks = -(-(need - len(trees)) // CHUNK)
            jobs = [
                (seed, _SPLIT_INDEX[split], c, min_length, max_length, max_depth, max_args, CHUNK)
                for c in range(next_chunk, next_chunk + n_chunks)
            ]
            next_chunk += n_chunks
            for ts, vs in _run_chunks(jobs, workers):
                for t, v in zip(ts, vs):
                    if len(trees) < need and t not in seen:
                        seen[t] = None
                        trees.append(t)
                        vals.append(v)
        result[split] = (trees, np.array(vals, dtype=np.int64))
    return result


def to_lra_string(ids: bytes | list[int]) -> str:
    """Render a tree as the LRA release text: ``( ( ( [MAX 4 ) 3 ) ] )`` (left-nested binary tuples)."""

    def render(pos: int) -> tuple[str, int]:
        t = ids[pos]
        if t <= 10:
            return ID_TO_TOKEN[t], pos + 1
        s, pos = ID_TO_TOKEN[t], pos + 1
        while ids[pos] != _END:
            child, pos = render(pos)
            s = f"( {s} {child} )"
        return f"( {s} {END} )", pos + 1

    s, end = render(0)
    if end != len(ids):
        raise ValueError("token ids do not form one complete tree")
    return s


def write_tsv(path: Path, trees: list[bytes], values) -> None:
    """Write trees in the LRA release format (header ``Source<TAB>Target``)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["Source", "Target"])
        for t, v in zip(trees, values):
            w.writerow([to_lra_string(t), int(v)])


def _structure_problem(ids: np.ndarray) -> str | None:
    """Why a Source expression is not one complete ListOps tree (None if it is): every operator must be closed by a
    ``]`` that follows at least one argument, and nothing may follow the root's end. (Parentheses are not checked:
    the LRA pipeline strips them and they carry nothing; a truncated line loses its closing ``]``.)"""
    stack: list[int] = []  # arguments seen so far by each open operator
    for pos, t in enumerate(ids.tolist()):
        if t == _END and not stack:
            return "a ']' closes no operator"
        if not stack and pos:
            return f"tokens after the end of the expression (at token {pos + 1} of {len(ids)})"
        if t == _END:
            if stack.pop() == 0:
                return "an operator with no arguments"
            if stack:
                stack[-1] += 1
        elif t > 10:  # an operator
            stack.append(0)
        else:  # a digit
            if stack:
                stack[-1] += 1
            elif len(ids) > 1:
                return "tokens after the end of the expression (at token 2)"
    if stack:
        return f"unbalanced brackets ({len(stack)} operator(s) never closed by ']')"
    return None


def read_tsv(path: Path, max_len: int, n_cap: int = 0) -> LRASplit:
    """Read an LRA release ListOps TSV; any deviation raises ``DataUnavailable`` naming file and line."""
    if not path.is_file():
        raise DataUnavailable(f"{path}: file not found; expected the LRA release ListOps TSV (header 'Source<TAB>Target')")
    seqs: list[np.ndarray] = []
    labels: list[int] = []
    strip = str.maketrans("", "", "()")
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            cols = line.split("\t")
            if lineno == 1:
                if [c.strip() for c in cols] != ["Source", "Target"]:
                    raise DataUnavailable(f"{path} line 1: expected the header 'Source<TAB>Target', got {line[:60]!r}")
                continue
            if not line.strip():
                continue
            if len(cols) != 2:
                raise DataUnavailable(
                    f"{path} line {lineno}: expected 2 tab-separated columns 'Source<TAB>Target', got {len(cols)}"
                )
            src, tgt = cols
            try:
                label = int(tgt)
            except ValueError:
                label = -1
            if not 0 <= label <= 9:
                raise DataUnavailable(f"{path} line {lineno}: expected an integer Target 0-9, got {tgt[:20]!r}")
            try:
                ids = np.array([VOCAB[t] for t in src.translate(strip).split()], dtype=np.uint8)
            except KeyError as e:
                raise DataUnavailable(
                    f"{path} line {lineno}: unknown ListOps token {e.args[0]!r} (expected digits, [MIN [MAX [MED [SM ], ( ))"
                ) from None
            if len(ids) == 0:
                raise DataUnavailable(f"{path} line {lineno}: empty Source expression")
            problem = _structure_problem(ids)
            if problem:
                raise DataUnavailable(f"{path} line {lineno}: {problem}; the expression looks truncated or corrupt "
                                      f"(expected one complete expression like '( ( ( [MAX 4 ) 3 ) ] )')")
            seqs.append(ids)
            labels.append(label)
            if n_cap and len(labels) >= n_cap:
                break
    if not labels:
        raise DataUnavailable(f"{path}: no examples after the header; expected 'Source<TAB>Target' rows")
    return LRASplit(_bytes.pad_sequences(seqs, max_len, dtype=np.uint8), np.array(labels, dtype=np.int64))


# ---- presets ---------------------------------------------------------------------------------
PAPER_MODEL = LRAModelConfig(
    vocab_size=32, n_classes=10, max_len=2048, n_layers=4, d_model=64, d_qkv=64, n_heads=2, d_ff=128,
    dropout=0.1, pooling="mean", attention_padding_mask=True,
)
PAPER_TRAIN = TrainConfig(
    steps=30000, batch_size=256, lr=7e-4, warmup_steps=1000, schedule="onecycle", weight_decay=0.0,
    adam_betas=(0.9, 0.999), adam_eps=1e-6, grad_clip=1.0, grad_clip_mode="value", eval_every=500, eval_batches=62,
)
# Original LRA release config (lra_benchmarks/listops/configs/base_listops_config.py + the shared base
# config: weight decay 0.1; Flax Adam beta2 0.98, eps 1e-9, no clipping -- optimiser details from the LRA
# train scripts, not re-verified here). (model, data, train); select by building a RunConfig from it or by
# overrides (model.d_model=512 model.d_qkv=512 model.n_heads=8 model.d_ff=1024 model.pooling=cls ...).
LRA_ORIGINAL = (
    LRAModelConfig(vocab_size=32, n_classes=10, max_len=2000, n_layers=4, d_model=512, d_qkv=512, n_heads=8,
                   d_ff=1024, dropout=0.1, pooling="cls", attention_padding_mask=True),
    ListOpsDataConfig(max_len=2000),
    TrainConfig(steps=5000, batch_size=32, lr=0.05, warmup_steps=1000, schedule="rsqrt", weight_decay=0.1,
                adam_betas=(0.9, 0.98), adam_eps=1e-9, grad_clip=0.0, eval_every=500, eval_batches=0),
)


@register_task("lra_listops", suite="lra")
class ListOps(LRAClassificationTask):
    DATA_FOLDER = FOLDER
    DataConfig = ListOpsDataConfig
    REFERENCE = {"LRA paper Transformer": 36.37, "Skyformer self-attn": 38.37, "Nystromformer standard": 37.10}

    @classmethod
    def presets(cls, scale: str):
        if scale == "paper":
            return PAPER_MODEL, ListOpsDataConfig(), PAPER_TRAIN, ()
        if scale == "published":
            model = published_model(vocab_size=32, n_classes=10, max_len=2048)
            return model, ListOpsDataConfig(), published_train("listops"), (PUBLISHED_NOTE,)
        if scale == "small":
            train = replace(PAPER_TRAIN, steps=2000, batch_size=64, warmup_steps=100, eval_every=250, eval_batches=20)
            data = ListOpsDataConfig(n_train=20000)
            notes = ("reduced budget: 2000 of 30000 steps at batch 64 (paper 256); 20000 of 96000 train examples; "
                     "periodic dev eval on 20 batches of 64 (paper 62 of 256)",)
            return PAPER_MODEL, data, train, notes
        if scale == "tiny":
            model = replace(PAPER_MODEL, max_len=128, n_layers=2, d_model=32, d_qkv=32, d_ff=64)
            data = ListOpsDataConfig(max_len=128, n_train=1500, n_dev=200, n_test=200, min_length=30, max_length=120)
            # 300 steps at 3e-3: enough to leave the majority class (~17 %) on CPU in seconds (dense: ~33 %)
            train = replace(PAPER_TRAIN, steps=300, batch_size=32, lr=3e-3, warmup_steps=30, eval_every=100, eval_batches=0)
            notes = ("smoke-test budget: expressions of 31-119 tokens padded to 128, 2 layers d_model 32, "
                     "1500 train examples, 300 steps; not comparable with published accuracy",)
            return model, data, train, notes
        raise ValueError(f"unknown scale {scale!r}")

    @classmethod
    def _files_dir(cls, data_dir: Path | None) -> Path | None:
        if data_dir is None:
            return None
        d = Path(data_dir) / FOLDER
        return d if (d / FILE_NAMES["train"]).exists() else None

    @classmethod
    def data_available(cls, data_dir, scale):
        _, data, _, _ = cls.presets(scale)
        if data.source == "files" and cls._files_dir(data_dir) is None:
            return f"ListOps files not found: pass --data-dir with {FOLDER}/basic_{{train,val,test}}.tsv"
        return None  # generated otherwise

    @classmethod
    def data_dir_problem(cls, data_dir, cfg):
        """``--data-dir D`` with a ``D/lra_listops/`` lacking ``basic_train.tsv``: refuse (the run would otherwise
        generate data while looking as if it had read the folder)."""
        if data_dir is None or cfg.data.source == "generate":
            return None
        folder = Path(data_dir) / FOLDER
        if folder.is_dir() and cls._files_dir(data_dir) is None:
            return (f"{folder} exists but holds no usable ListOps files (expected basic_{{train,val,test}}.tsv); "
                    "fix it, remove it to use generated data, or pass data.source=generate")
        return None

    def data_dir_used(self) -> bool:
        return self._use_files()

    def _use_files(self) -> bool:
        d = self.cfg.data
        if d.source not in ("auto", "generate", "files"):
            raise DataUnavailable(f"lra_listops: data.source={d.source!r}; expected auto, generate or files")
        if d.source == "generate":
            return False
        problem = self.data_dir_problem(self.data_dir, self.cfg) if d.source == "auto" else None
        if problem:
            raise DataUnavailable(problem)
        found = self._files_dir(self.data_dir)
        if d.source == "files" and found is None:
            where = (Path(self.data_dir) / FOLDER / FILE_NAMES["train"]) if self.data_dir else f"--data-dir …/{FOLDER}"
            raise DataUnavailable(f"{where}: not found; expected the LRA release ListOps TSVs "
                                  f"basic_{{train,val,test}}.tsv; pass --data-dir or use data.source=generate")
        return found is not None

    def _cap(self, split: str) -> int:
        d = self.cfg.data
        return {"train": d.n_train, "dev": d.n_dev, "test": d.n_test}[split]

    def prepare(self) -> None:
        files = self._use_files()
        # Data provenance for the record (the Trainer may append ``task.data_notes`` to the budget note).
        self.data_notes = () if files else (
            "ListOps generated by sparsebench's seeded re-implementation of the LRA generator, not the LRA release files",)
        super().prepare()

    def load_split(self, split: str) -> LRASplit:
        d = self.cfg.data
        if self._use_files():
            return read_tsv(Path(self.data_dir) / FOLDER / FILE_NAMES[split], d.max_len, self._cap(split))
        return self._generated(split)

    def _generated(self, split: str) -> LRASplit:
        d = self.cfg.data
        n = self._cap(split) or GEN_DEFAULT_SIZES[split]
        return load_or_generate(split, n, d)


def _gen_params(d: ListOpsDataConfig) -> dict:
    return {"v": 1, "seed": d.data_seed, "min_length": d.min_length, "max_length": d.max_length,
            "max_depth": d.max_depth, "max_args": d.max_args, "chunk": CHUNK}


def load_or_generate(split: str, n: int, d: ListOpsDataConfig) -> LRASplit:
    """One generated split (first ``n`` trees), from the cache or freshly generated (then cached).

    Dev/test depend only on the generator parameters; train additionally excludes dev/test trees, so
    its cache entry records the dev/test sizes it was deduplicated against (the LRA defaults 2 000 each
    unless capped to fewer; a prefix of the default dev/test never changes)."""
    params = _gen_params(d)
    sizes = {"test": d.n_test or GEN_DEFAULT_SIZES["test"], "dev": d.n_dev or GEN_DEFAULT_SIZES["dev"]}
    if split == "train":
        sizes["train"] = n
    elif split == "dev":
        sizes = {"test": sizes["test"], "dev": n}
    else:
        sizes = {"test": n}
    key = {**params, "split": split, "sizes": sizes}
    path = _bytes.cache_file("listops", split, key)
    z = _bytes.load_npz(path, key)
    if z is None:
        t0 = time.perf_counter()
        gen = generate_listops(sizes, seed=d.data_seed, min_length=d.min_length, max_length=d.max_length,
                               max_depth=d.max_depth, max_args=d.max_args)
        trees, values = gen[split]
        flat = np.frombuffer(b"".join(trees), dtype=np.uint8)
        offsets = np.zeros(len(trees) + 1, dtype=np.int64)
        np.cumsum([len(t) for t in trees], out=offsets[1:])
        z = {"flat": flat, "offsets": offsets, "labels": values,
             "seconds": np.array(time.perf_counter() - t0)}
        _bytes.save_npz(path, key, **z)
    tokens = _bytes.unflatten_padded(z["flat"], z["offsets"], d.max_len, dtype=np.uint8)
    return LRASplit(tokens, z["labels"].astype(np.int64))
