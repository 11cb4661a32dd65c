"""Machine translation (suite ``mt``) and the encoder-decoder task machinery shared with ``tasks/summarization``.

``Seq2SeqTask`` holds everything an encoder-decoder task needs besides where its text comes from and how it
is scored: a deterministic byte-level BPE (``tokenizers``; one joint vocabulary for source and target,
trained on the train split and cached under ``cache_dir("tokenizers", <hash of texts + params>)``),
length-bucketed batches, the ``bench.models.seq2seq`` backbone, label-smoothed cross-entropy, and decoding
(greedy for periodic dev evals on at most ``data.dev_decode_max`` examples; beam search with
``data.beam_size`` / ``data.length_penalty`` on the test split). A subclass provides
``load_texts(split) -> (sources, references)`` (raw strings) and ``score(hyps, refs) -> {metric: value}``.

Token ids: ``<pad>`` 0, ``<s>`` 1 (BOS), ``</s>`` 2 (EOS); task-specific specials (``EXTRA_SPECIALS``) follow.
Sources get EOS appended (fairseq convention); targets are ``BOS y`` in and ``y EOS`` out.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

from bench.errors import DataUnavailable
from bench.models.seq2seq import Seq2SeqConfig, Seq2SeqTransformer, label_smoothed_nll
from bench.text import train_bpe_pieces
from bench.task import Task

PAD, BOS, EOS = 0, 1, 2
SPECIALS = ("<pad>", "<s>", "</s>")


@dataclass(frozen=True)
class Seq2SeqDataConfig:
    """Fields every encoder-decoder task shares; task DataConfigs extend this."""

    bpe_vocab_size: int = 8000  # joint source+target byte-level BPE
    bpe_min_frequency: int = 2
    max_train_examples: int = 0  # 0 = all (tiny presets cap it)
    dev_decode_max: int = 0  # examples decoded in a dev eval (0 = all of the batches evaluated)
    decode_batch_size: int = 0  # 0 = train.eval_batch_size or train.batch_size
    beam_size: int = 4  # test split; dev evals decode greedily
    length_penalty: float = 1.0  # fairseq-style: score / len ** length_penalty
    max_len_a: float = 1.5  # max output tokens = min(model.max_tgt_len - 1, a * src_len + b)
    max_len_b: int = 10
    min_len: int = 0
    bucket_factor: int = 50  # train batches are drawn from pools of bucket_factor * batch_size sorted by length
    src_pad_multiple: int = 0  # pad source batches to a multiple of this length (block-sparse layouts); 0 = off


def train_seq2seq_bpe(texts: list[str], vocab_size: int, min_frequency: int = 2, specials: tuple[str, ...] = SPECIALS):
    """Joint byte-level BPE for source and target (prefix space added, lossless decoding); see
    ``bench.text.train_bpe_pieces``."""
    return train_bpe_pieces(texts, vocab_size, min_frequency, specials, add_prefix_space=True)


def encode_texts(tokenizer, texts: list[str], max_len: int, append_eos: bool) -> list[list[int]]:
    """Token ids per text, truncated so that with the optional EOS at most ``max_len`` ids remain."""
    out = []
    keep = max_len - (1 if append_eos else 0)
    for i in range(0, len(texts), 2048):
        for enc in tokenizer.encode_batch(texts[i : i + 2048], add_special_tokens=False):
            ids = enc.ids[:keep]
            out.append(ids + [EOS] if append_eos else ids)
    return out


def pad_batch(seqs: list[list[int]], pad: int = PAD, multiple: int = 0) -> torch.Tensor:
    L = max(1, max(len(s) for s in seqs))
    if multiple > 1:
        L = -(-L // multiple) * multiple
    out = torch.full((len(seqs), L), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


@dataclass
class Seq2SeqSplit:
    sources: list[str]  # raw text (after task-side preparation, e.g. query + transcript)
    references: list[str]  # raw target text, what metrics compare against
    src_ids: list[list[int]]  # ends with EOS
    tgt_ids: list[list[int]]  # no BOS/EOS

    def __len__(self) -> int:
        return len(self.sources)


class Seq2SeqTask(Task):
    """Base for encoder-decoder tasks; see the module docstring."""

    ModelConfig = Seq2SeqConfig
    SPLITS = ("train", "dev", "test")
    EXTRA_SPECIALS: tuple[str, ...] = ()

    # ---- subclass API ----------------------------------------------------------------------
    def load_texts(self, split: str) -> tuple[list[str], list[str]]:
        """(sources, references) raw strings for ``split`` (train/dev/test); raise ``DataUnavailable``."""
        raise NotImplementedError

    def score(self, hyps: list[str], refs: list[str]) -> dict[str, float]:
        raise NotImplementedError

    def tokenizer_texts(self, train_src: list[str], train_tgt: list[str]) -> list[str]:
        return list(train_src) + list(train_tgt)

    # ---- data --------------------------------------------------------------------------------
    @property
    def specials(self) -> tuple[str, ...]:
        return SPECIALS + tuple(self.EXTRA_SPECIALS)

    def prepare(self) -> None:
        d, m = self.cfg.data, self.cfg.model
        raw = {s: self.load_texts(s) for s in self.SPLITS}
        src, tgt = raw["train"]
        if d.max_train_examples:
            src, tgt = src[: d.max_train_examples], tgt[: d.max_train_examples]
        keep = [i for i in range(len(src)) if src[i].strip() and tgt[i].strip()]  # drop empty training pairs
        raw["train"] = ([src[i] for i in keep], [tgt[i] for i in keep])
        self.tokenizer = train_seq2seq_bpe(
            self.tokenizer_texts(*raw["train"]), d.bpe_vocab_size, d.bpe_min_frequency, self.specials
        )
        self.vocab_size = self.tokenizer.get_vocab_size()
        self.splits = {}
        for s, (srcs, refs) in raw.items():
            self.splits[s] = Seq2SeqSplit(
                srcs, refs,
                encode_texts(self.tokenizer, srcs, m.max_src_len, append_eos=True),
                encode_texts(self.tokenizer, refs, m.max_tgt_len - 1, append_eos=False),
            )
        if len(self.splits["train"]) < self.cfg.train.batch_size:
            raise DataUnavailable(
                f"{type(self).__name__}: train split has {len(self.splits['train'])} usable pairs, fewer than "
                f"batch_size={self.cfg.train.batch_size}; check the data files"
            )

    def detokenize(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def _collate(self, split: Seq2SeqSplit, idx: list[int]) -> dict:
        src = pad_batch([split.src_ids[i] for i in idx], multiple=self.cfg.data.src_pad_multiple)
        tgt_in = pad_batch([[BOS] + split.tgt_ids[i] for i in idx])
        tgt_out = pad_batch([split.tgt_ids[i] + [EOS] for i in idx])
        return {"src": src, "src_mask": src != PAD, "tgt_in": tgt_in, "tgt_out": tgt_out,
                "idx": torch.tensor(idx, dtype=torch.long)}

    def train_batches(self, generator: torch.Generator) -> Iterator[dict]:
        """Epochs of a seeded permutation; pools of ``bucket_factor * batch_size`` examples are sorted by
        length and cut into batches, which are then shuffled (less padding, same sampling distribution)."""
        split, bs = self.splits["train"], self.cfg.train.batch_size
        pool = max(1, self.cfg.data.bucket_factor) * bs
        lengths = [len(a) + len(b) for a, b in zip(split.src_ids, split.tgt_ids)]
        while True:
            perm = torch.randperm(len(split), generator=generator).tolist()
            batches = []
            for p in range(0, len(perm), pool):
                chunk = sorted(perm[p : p + pool], key=lambda i: lengths[i])
                batches += [chunk[i : i + bs] for i in range(0, len(chunk) - bs + 1, bs)]
            for j in torch.randperm(len(batches), generator=generator).tolist():
                yield self._collate(split, batches[j])

    def _eval_bs(self) -> int:
        return self.cfg.train.eval_batch_size or self.cfg.train.batch_size

    def eval_batches(self, split_name: str) -> Iterable[dict]:
        split, bs = self.splits[split_name], self._eval_bs()
        for i in range(0, len(split), bs):
            yield self._collate(split, list(range(i, min(i + bs, len(split)))))

    def batch_size_tokens(self, batch: dict) -> tuple[int, int]:
        return batch["src"].shape[0], int(batch["src_mask"].sum()) + int((batch["tgt_out"] != PAD).sum())

    # ---- model, loss -------------------------------------------------------------------------
    def build_model(self, method) -> Seq2SeqTransformer:
        return Seq2SeqTransformer(self.cfg.model, method, vocab_size=self.vocab_size, pad_id=PAD, bos_id=BOS, eos_id=EOS)

    def loss(self, model, batch: dict):
        logits = model(batch["src"], batch["src_mask"], batch["tgt_in"])
        return label_smoothed_nll(logits, batch["tgt_out"], self.cfg.model.label_smoothing, PAD), logits

    # ---- decoding and metrics ----------------------------------------------------------------
    def generate(self, model, split_name: str, indices: list[int], beam_size: int) -> list[str]:
        """Decode ``indices`` of a split (sorted by source length for speed; returned in input order)."""
        split, d = self.splits[split_name], self.cfg.data
        device = next(model.parameters()).device
        bs = d.decode_batch_size or self._eval_bs()
        order = sorted(indices, key=lambda i: len(split.src_ids[i]))
        out: dict[int, str] = {}
        for p in range(0, len(order), bs):
            idx = order[p : p + bs]
            src = pad_batch([split.src_ids[i] for i in idx], multiple=d.src_pad_multiple).to(device)
            mask = src != PAD
            src_len = int(mask.sum(1).max())
            max_len = max(1, min(self.cfg.model.max_tgt_len - 1, int(d.max_len_a * src_len + d.max_len_b))) + 1
            if beam_size > 1:
                ids = model.beam_search(src, mask, beam_size, max_len, d.length_penalty, d.min_len)
            else:
                ids = model.greedy(src, mask, max_len, d.min_len)
            for i, seq in zip(idx, ids):
                out[i] = self.detokenize(seq)
        return [out[i] for i in indices]

    @torch.no_grad()
    def evaluate(self, model, split: str, max_batches: int = 0) -> dict[str, float]:
        """Teacher-forced loss on the first ``max_batches`` eval batches (0 = all), then decoding of those
        examples (at most ``data.dev_decode_max`` outside the test split): greedy except on ``test``, which
        uses beam search with ``data.beam_size``. Metrics compare detokenized output with the raw references."""
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        eps = self.cfg.model.label_smoothing
        loss_sum, tok_sum, n = 0.0, 0, 0
        for i, batch in enumerate(self.eval_batches(split)):
            if max_batches and i >= max_batches:
                break
            batch = self.to_device(batch, device)
            logits = model(batch["src"], batch["src_mask"], batch["tgt_in"])
            ntok = int((batch["tgt_out"] != PAD).sum())
            loss_sum += label_smoothed_nll(logits, batch["tgt_out"], eps, PAD).item() * ntok
            tok_sum += ntok
            n += batch["src"].shape[0]
        indices = list(range(n))
        if split != "test" and self.cfg.data.dev_decode_max:
            indices = indices[: self.cfg.data.dev_decode_max]
        beam = self.cfg.data.beam_size if split == "test" else 1
        hyps = self.generate(model, split, indices, beam)
        refs = [self.splits[split].references[i] for i in indices]
        metrics = self.score(hyps, refs)
        metrics.update(loss=loss_sum / max(tok_sum, 1), n_examples=len(indices))
        self.last_outputs = {"split": split, "hypotheses": hyps[:20], "references": refs[:20]}
        model.train(was_training)
        return metrics
