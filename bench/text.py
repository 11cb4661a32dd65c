"""Shared text helpers: reading (possibly compressed) data files, and a deterministic, cached BPE.

- ``find_file(dir, name)`` finds ``name``, ``name.xz`` or ``name.gz`` (in that order), raising
  ``DataUnavailable`` naming the file when none exists.
- ``read_text(path)`` reads UTF-8 text from plain, ``.xz`` or ``.gz`` files (a leading BOM is dropped),
  raising ``DataUnavailable`` naming the file when it cannot be read or decoded.
- ``train_bpe(text, vocab_size)`` trains a byte-level BPE (GPT-2 style: no unknown tokens, newlines are
  bytes like any other) with ``tokenizers`` on the given text. The result depends only on the text, the
  vocabulary size and ``BPE_VERSION``; it is cached under ``cache_dir("tokenizers", <hash>)`` so every run,
  method and seed of a task shares one tokenizer.
"""
from __future__ import annotations

import gzip
import hashlib
import lzma
import os
from pathlib import Path

from bench.errors import DataUnavailable
from bench.paths import cache_dir

BPE_VERSION = 1  # bump when the training recipe below changes (invalidates cached tokenizers)
BPE_SPECIAL_TOKENS = ("<pad>", "<eos>")  # ids 0 and 1


def find_file(directory: Path, name: str, what: str = "") -> Path:
    """``directory/name`` or its ``.xz``/``.gz`` form; ``DataUnavailable`` naming the file if absent."""
    directory = Path(directory)
    for cand in (name, name + ".xz", name + ".gz"):
        p = directory / cand
        if p.is_file():
            return p
    raise DataUnavailable(
        f"{directory / name}: file not found (also tried .xz and .gz){'; expected ' + what if what else ''}"
    )


def read_text(path: Path, encoding: str = "utf-8-sig") -> str:
    """The whole file as text; ``.xz`` and ``.gz`` are decompressed. Errors name the file."""
    path = Path(path)
    opener = {".xz": lzma.open, ".gz": gzip.open}.get(path.suffix, open)
    try:
        with opener(path, "rt", encoding=encoding, newline="") as f:
            return f.read()
    except FileNotFoundError:
        raise DataUnavailable(f"{path}: file not found") from None
    except (OSError, EOFError, lzma.LZMAError, UnicodeDecodeError) as e:
        raise DataUnavailable(f"{path}: cannot read as {encoding} text ({type(e).__name__}: {e}); "
                              f"replace it with an intact copy") from None


def text_hash(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\x00")
    return h.hexdigest()[:16]


def train_bpe(text: str, vocab_size: int, min_frequency: int = 2):
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on ``text``; cached and deterministic.

    Special tokens: ``<pad>`` = 0, ``<eos>`` = 1 (the tokenizer never emits them from text). The training
    input is split into lines (each keeping its newline) so the trainer sees the same sequence every time.
    """
    return train_bpe_pieces(text.splitlines(keepends=True), vocab_size, min_frequency, BPE_SPECIAL_TOKENS)


def train_bpe_pieces(pieces: list[str], vocab_size: int, min_frequency: int = 2,
                     specials: tuple[str, ...] = BPE_SPECIAL_TOKENS, add_prefix_space: bool = False):
    """Byte-level BPE trained on ``pieces`` (lines, sentences, documents); ``specials`` get ids 0, 1, ...

    Cached under ``cache_dir("tokenizers", <hash of the pieces and every parameter>)``, so every run, method
    and seed of a task shares one tokenizer; deterministic across processes. ``add_prefix_space`` (GPT-2
    style) makes a text-initial word tokenize like any other word.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    key = text_hash(f"bpe-v{BPE_VERSION}", str(vocab_size), str(min_frequency), "|".join(specials),
                    str(add_prefix_space), *pieces)
    path = cache_dir("tokenizers", key) / "tokenizer.json"
    if path.is_file():
        return Tokenizer.from_file(str(path))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(pieces, trainer=trainer, length=len(pieces))
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tok.save(str(tmp))
    tmp.replace(path)  # atomic: concurrent runs never read a half-written file
    return tok


def encode_lines(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` encoded line by line (lines keep their newline) and concatenated: the same
    split into lines that ``train_bpe`` trains on, so no merge spans a line break."""
    lines = text.splitlines(keepends=True)
    ids: list[int] = []
    for i in range(0, len(lines), 4096):
        for enc in tokenizer.encode_batch(lines[i : i + 4096], add_special_tokens=False):
            ids.extend(enc.ids)
    return ids
