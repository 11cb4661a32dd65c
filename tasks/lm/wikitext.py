"""WikiText-2 causal language modelling (suite ``lm``), perplexity.

Data. Offline (``--data-dir D``): ``D/wikitext2/{train,valid,test}.txt`` (``.xz``/``.gz`` accepted), the
pytorch/examples copy of WikiText-2 v1 (tokenized, rare words as ``<unk>``; byte-identical to
``wiki.{train,valid,test}.tokens``, which are also accepted). ``data.variant=raw`` reads
``D/wikitext2/wiki.{train,valid,test}.raw`` instead. Online (no ``--data-dir``): Hugging Face
``Salesforce/wikitext``, config ``wikitext-2-v1`` (variant v1, the default: same text as the offline copy)
or ``wikitext-2-raw-v1`` (variant raw, the SEA / attention-pruning follow-up setting). Splits: train, dev =
valid, test = test.

Tokens. With ``model.pretrained`` (an HF causal LM: local path or hub id, e.g. OPT-125M) its tokenizer and
weights are used and its attention is routed through the method (``bench.models.hf_bert.HFCausalLM``).
Otherwise a byte-level BPE with ``data.vocab_size`` tokens is trained on the train split
(``bench.text.train_bpe``: deterministic, cached) and a GPT-style decoder (``bench.models.decoder``) is
trained from scratch. Each split is encoded line by line (lines keep their newline) and concatenated into
one token stream.

Training batches: ``batch_size`` windows of ``data.ctx`` + 1 tokens at uniformly random offsets of the
train stream (nanoGPT style), inputs = first ctx tokens, targets = next-token shift.

Perplexity protocol. The split's stream of N tokens is scored once, every token except the first:
- default (``data.eval_stride=0``): non-overlapping windows of ``ctx`` inputs (the last one shorter, padded
  and masked); each token is predicted from the tokens before it in its window (0..ctx-1 of context);
- ``data.eval_stride=S`` (0 < S <= ctx): sliding windows of ctx inputs starting every S tokens; each window
  scores only the targets no earlier window scored, so every token (after the first ctx) has at least
  ctx - S tokens of context (the Hugging Face "perplexity of fixed-length models" recipe).
Metrics (``evaluate``): ``loss`` = mean NLL per scored token (nats); ``ppl_token = exp(loss)`` (per tokenizer
token; the main metric, comparable only between runs with the same tokenizer); ``ppl_word`` =
exp(total NLL / number of words), words = whitespace-separated words of the split plus one ``<eos>`` per line
(the standard word-level WikiText convention: 217,646 valid / 245,569 test words in v1), so it is comparable
across tokenizers and with published word-level numbers.

Measured (H100, ``dense``, small preset, seed 0): test ppl_token 38.5, ppl_word 122 (valid 42.6 / 132) after 81 s
of training; dev was still improving at the last step, so more steps would lower it. When ``max_batches`` limits the evaluation to part
of the split, the NLL is extrapolated to the whole split at the measured per-token rate.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F

from bench.config import TrainConfig
from bench.errors import BenchError, DataUnavailable
from bench.models.decoder import DecoderConfig, GPTDecoder
from bench.registry import register_task
from bench.task import Task
from bench.text import encode_lines, find_file, read_text, train_bpe
from bench import hub

SPLIT_FILES = {"train": "train", "dev": "valid", "test": "test"}
IGNORE = -100


@dataclass(frozen=True)
class LMModelConfig:
    pretrained: str = ""  # HF causal LM (path or hub id): its tokenizer + weights; "" = GPTDecoder from scratch
    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 2
    d_ff: int = 256
    dropout: float = 0.0


@dataclass(frozen=True)
class LMDataConfig:
    variant: str = "v1"  # v1 (tokenized, <unk>; the offline copy) | raw (wikitext-2-raw-v1)
    ctx: int = 64  # context length of training and evaluation windows
    vocab_size: int = 512  # BPE vocabulary (ignored with model.pretrained)
    eval_stride: int = 0  # 0 = non-overlapping windows; S = sliding windows advancing S tokens
    max_train_chars: int = 0  # 0 = whole split; >0 keeps the first N characters (whole lines) of train
    max_eval_chars: int = 0  # likewise for valid and test


def _file_names(variant: str, split: str) -> list[str]:
    s = SPLIT_FILES[split]
    if variant == "v1":
        return [f"{s}.txt", f"wiki.{s}.tokens"]
    if variant == "raw":
        return [f"wiki.{s}.raw"]
    raise BenchError(f"data.variant={variant!r}: valid are v1, raw")


def count_words(text: str) -> int:
    """Whitespace-separated words plus one ``<eos>`` per line (WikiText word-level convention)."""
    return len(text.split()) + len(text.splitlines())


def _truncate(text: str, max_chars: int) -> str:
    if max_chars <= 0 or len(text) <= max_chars:
        return text
    cut = text.rfind("\n", 0, max_chars)
    return text[: cut + 1] if cut >= 0 else text[:max_chars]


def eval_windows(n_tokens: int, ctx: int, stride: int = 0) -> list[tuple[int, int, int]]:
    """Windows over a stream of ``n_tokens``: (start, n_inputs, first_scored) with inputs
    ``ids[start:start+n_inputs]``, targets ``ids[start+1:start+n_inputs+1]``, and only targets at offsets
    ``>= first_scored`` within the window scored. Every target 1..n_tokens-1 is scored exactly once."""
    stride = stride or ctx
    if not 0 < stride <= ctx:
        raise BenchError(f"data.eval_stride={stride}: must be 0 (non-overlapping) or between 1 and ctx={ctx}")
    out, scored_until, start = [], 0, 0  # scored_until: highest target index already scored
    while scored_until < n_tokens - 1:
        n_in = min(ctx, n_tokens - 1 - start)
        first = max(0, scored_until - start)  # target offset j scores token start + j + 1
        out.append((start, n_in, first))
        scored_until = start + n_in
        start += stride
    return out


@register_task("wikitext2", suite="lm")
class WikiText2(Task):
    DATA_FOLDER = "wikitext2"
    ModelConfig = LMModelConfig
    DataConfig = LMDataConfig
    METRICS = {"ppl_token": False, "ppl_word": False}
    MAIN_METRIC = "ppl_token"
    REFERENCE = {}  # from-scratch small models have no published counterpart; SEA's OPT-125M numbers need pretrained

    @classmethod
    def presets(cls, scale: str):
        if scale == "tiny":
            return (
                LMModelConfig(n_layers=2, d_model=64, n_heads=2, d_ff=256, dropout=0.0),
                LMDataConfig(ctx=64, vocab_size=512, max_train_chars=300_000, max_eval_chars=30_000),
                TrainConfig(steps=100, batch_size=16, lr=3e-3, warmup_steps=10, schedule="cosine",
                            weight_decay=0.0, eval_every=50, eval_batches=0),
                ("tiny: 2-layer d64 decoder, ctx 64, 512-token BPE, first 300k chars of train and 30k of "
                 "valid/test, 100 steps: a smoke test, not a result",),
            )
        if scale == "small":
            return (
                LMModelConfig(n_layers=6, d_model=384, n_heads=6, d_ff=1536, dropout=0.2),
                LMDataConfig(ctx=512, vocab_size=8192),
                TrainConfig(steps=2500, batch_size=32, lr=1e-3, warmup_steps=200, schedule="cosine",
                            weight_decay=0.1, adam_betas=(0.9, 0.95), eval_every=250, eval_batches=0,
                            amp="auto"),
                ("small: 6-layer d384 GPT decoder trained from scratch on WikiText-2 (8k BPE, ctx 512, "
                 "2500 steps x 32 x 512 tokens, ~15 epochs) instead of the paper's pretrained OPT-125M",),
            )
        if scale == "paper":
            return (
                LMModelConfig(n_layers=12, d_model=768, n_heads=12, d_ff=3072, dropout=0.1),
                LMDataConfig(ctx=1024, vocab_size=16384),
                TrainConfig(steps=10_000, batch_size=32, lr=6e-4, warmup_steps=500, schedule="cosine",
                            weight_decay=0.1, adam_betas=(0.9, 0.95), eval_every=500, eval_batches=0),
                ("paper: OPT-125M-sized decoder (12L/768/12H, ctx 1024) trained from scratch with a 16k BPE; "
                 "SEA fine-tunes pretrained OPT-125M instead: model.pretrained=facebook/opt-125m data.ctx=2048",),
            )
        raise BenchError(f"unknown scale {scale!r}; valid: tiny, small, paper")

    @classmethod
    def data_available(cls, data_dir: Path | None, scale: str) -> str | None:
        if data_dir is None:
            return None  # downloaded from the HF hub in prepare(); DataUnavailable there if offline
        d = Path(data_dir) / "wikitext2"
        for split in SPLIT_FILES:
            names = _file_names("v1", split)
            if not any((d / (n + ext)).is_file() for n in names for ext in ("", ".xz", ".gz")):
                return f"wikitext2: {d / names[0]} (or .xz/.gz) not found"
        return None

    # ---- data ----------------------------------------------------------------------------
    def _load_texts(self) -> dict[str, str]:
        dc = self.cfg.data
        if self.data_dir is not None:
            d = self.data_dir / "wikitext2"
            texts = {}
            for split in SPLIT_FILES:
                names = _file_names(dc.variant, split)
                path = None
                for n in names:
                    try:
                        path = find_file(d, n)
                        break
                    except DataUnavailable:
                        continue
                if path is None:
                    raise DataUnavailable(
                        f"{d / names[0]}: not found (also tried {', '.join(names[1:] + ['.xz', '.gz'])}); "
                        f"expected WikiText-2 {dc.variant} text, one paragraph per line; pass --data-dir D with "
                        f"D/wikitext2/{names[0]}[.xz]"
                    )
                texts[split] = read_text(path)
                if not texts[split].strip():
                    raise DataUnavailable(f"{path}: empty; expected WikiText-2 text")
            return texts
        config = {"v1": "wikitext-2-v1", "raw": "wikitext-2-raw-v1"}[dc.variant] if dc.variant in ("v1", "raw") else None
        if config is None:
            raise BenchError(f"data.variant={dc.variant!r}: valid are v1, raw")
        try:
            ds = hub.load_dataset("Salesforce/wikitext", config)
            hf_split = {"train": "train", "dev": "validation", "test": "test"}
            return {s: "".join(r if r.endswith("\n") else r + "\n" for r in ds[hf_split[s]]["text"]) for s in SPLIT_FILES}
        except Exception as e:  # offline, hub errors, ...
            raise DataUnavailable(
                f"wikitext-2: offline and no --data-dir ({type(e).__name__}); pass --data-dir D with "
                f"D/wikitext2/train.txt[.xz], valid.txt[.xz], test.txt[.xz] (WikiText-2 v1 tokens)"
            ) from None

    def prepare(self) -> None:
        dc, mc = self.cfg.data, self.cfg.model
        texts = self._load_texts()
        texts["train"] = _truncate(texts["train"], dc.max_train_chars)
        for s in ("dev", "test"):
            texts[s] = _truncate(texts[s], dc.max_eval_chars)
        self.n_words = {s: count_words(t) for s, t in texts.items()}
        if mc.pretrained:
            from transformers import AutoTokenizer

            from bench.models.hf_bert import quiet_transformers, resolve_pretrained

            try:
                with quiet_transformers():
                    tok = AutoTokenizer.from_pretrained(resolve_pretrained(mc.pretrained))
            except (OSError, ValueError) as e:
                raise BenchError(f"cannot load the tokenizer of model.pretrained={mc.pretrained!r}: {e}") from None
            enc = lambda t: sum(tok(t.splitlines(keepends=True), add_special_tokens=False)["input_ids"], [])  # noqa: E731
            self.vocab_size = len(tok)
        else:
            tok = train_bpe(texts["train"], dc.vocab_size)
            enc = lambda t: encode_lines(tok, t)  # noqa: E731
            self.vocab_size = tok.get_vocab_size()
        self.tokenizer = tok
        self.ids = {s: torch.tensor(enc(t), dtype=torch.int64) for s, t in texts.items()}
        for s, ids in self.ids.items():
            if len(ids) < 2 or (s == "train" and len(ids) < dc.ctx + 1):
                raise DataUnavailable(f"wikitext2 {s} split: only {len(ids)} tokens, fewer than ctx+1={dc.ctx + 1}; "
                                      f"use a larger file or a smaller data.ctx")

    # ---- batches -------------------------------------------------------------------------
    def train_batches(self, generator: torch.Generator) -> Iterator[dict]:
        ids, ctx, bs = self.ids["train"], self.cfg.data.ctx, self.cfg.train.batch_size
        offs = torch.arange(ctx + 1)
        while True:
            starts = torch.randint(0, len(ids) - ctx, (bs,), generator=generator)
            w = ids[starts[:, None] + offs]  # (B, ctx + 1)
            yield {"tokens": w[:, :-1].contiguous(), "labels": w[:, 1:].contiguous()}

    def eval_batches(self, split: str) -> Iterable[dict]:
        ids, ctx = self.ids[split], self.cfg.data.ctx
        bs = self.cfg.train.eval_batch_size or self.cfg.train.batch_size
        wins = eval_windows(len(ids), ctx, self.cfg.data.eval_stride)
        for i in range(0, len(wins), bs):
            chunk = wins[i : i + bs]
            tokens = torch.zeros(len(chunk), ctx, dtype=torch.int64)
            labels = torch.full((len(chunk), ctx), IGNORE, dtype=torch.int64)
            for r, (start, n_in, first) in enumerate(chunk):
                tokens[r, :n_in] = ids[start : start + n_in]
                labels[r, first:n_in] = ids[start + 1 + first : start + 1 + n_in]
            yield {"tokens": tokens, "labels": labels}

    def batch_size_tokens(self, batch: dict) -> tuple[int, int]:
        return batch["tokens"].shape[0], batch["tokens"].numel()

    # ---- model, loss, metrics ------------------------------------------------------------
    def build_model(self, method):
        mc, dc = self.cfg.model, self.cfg.data
        if mc.pretrained:
            from bench.models.hf_bert import HFCausalLM

            return HFCausalLM(mc.pretrained, method, max_len=dc.ctx)
        cfg = DecoderConfig(vocab_size=self.vocab_size, max_len=dc.ctx, n_layers=mc.n_layers, d_model=mc.d_model,
                            n_heads=mc.n_heads, d_ff=mc.d_ff, dropout=mc.dropout)
        return GPTDecoder(cfg, method)

    def loss(self, model, batch: dict):
        logits = model(batch["tokens"])
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE)
        return loss, logits

    @torch.no_grad()
    def evaluate(self, model, split: str, max_batches: int = 0) -> dict[str, float]:
        device = next(model.parameters()).device
        nll, n, n_seq = 0.0, 0, 0
        for i, batch in enumerate(self.eval_batches(split)):
            if max_batches and i >= max_batches:
                break
            batch = self.to_device(batch, device)
            logits = model(batch["tokens"]).float()
            nll += F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE,
                                   reduction="none").double().sum().item()  # fp64 accumulation
            n += int((batch["labels"] != IGNORE).sum())
            n_seq += batch["tokens"].shape[0]
        return {**perplexity_metrics(nll, n, len(self.ids[split]), self.n_words[split]), "n_examples": n_seq}


def perplexity_metrics(nll_sum: float, n_scored: int, n_tokens: int, n_words: int) -> dict[str, float]:
    """Metrics from the summed NLL over ``n_scored`` targets of a split with ``n_tokens`` tokens, ``n_words`` words."""
    loss = nll_sum / max(n_scored, 1)
    total_nll = loss * max(n_tokens - 1, 1)  # extrapolated to the whole split (exact when fully scored)
    return {
        "loss": loss,
        "ppl_token": math.exp(min(loss, 700.0)),
        "ppl_word": math.exp(min(total_nll / max(n_words, 1), 700.0)),
        "n_tokens": n_scored,
        "tokens_per_word": n_tokens / max(n_words, 1),
    }
