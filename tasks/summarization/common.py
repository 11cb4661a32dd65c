"""Long-document abstractive summarization on the shared encoder-decoder machinery (``tasks.mt.Seq2SeqTask``).

- Model: ``bench.models.seq2seq`` (pre-LN, sinusoidal positions so 2k-16k source tokens work). The encoder
  asks the method for every core with ``AttentionSpec(kind="self", stack="encoder", max_len=max_src_len)``;
  blockwise/local encoder attention is a *method* (block-sparse kernel in ``kernels/``), never done here.
  Token-dropping methods (top-k pooling / Pyramidion) plug in through the encoder pooling hook
  (``method.make_pooler(PoolerSpec)``, see ``bench/models/seq2seq.py``).
- Sources longer than ``model.max_src_len`` tokens are truncated (head kept); source batches are padded up to a
  multiple of ``data.src_pad_multiple`` so block-sparse layouts tile them (pad keys are masked).
- Targets: reference sentences joined by newlines (so the model can learn sentence breaks and ROUGE-Lsum
  has them); targets longer than ``model.max_tgt_len - 1`` tokens are truncated for training only --
  metrics always use the full reference.
- Metrics: ``rouge_score`` F-measures x 100 with the Porter stemmer (``use_stemmer=True``), averaged over
  documents: ROUGE-1, ROUGE-2, ROUGE-L (sentence-level LCS over the whole text) and ROUGE-Lsum (summary-level
  LCS over newline-split sentences, what most long-summarization papers call R-L). rouge_score's default
  tokenizer lowercases and keeps only ``[a-z0-9]`` tokens. ``MAIN_METRIC = "rougeL"``: less noisy than R-2
  at small budgets and defined without sentence splitting, so dev-checkpoint selection does not depend on
  the model emitting newlines.
- Decoding: greedy on at most ``data.dev_decode_max`` dev documents during training; beam search
  (``data.beam_size``, ``data.length_penalty``, ``data.min_len``) on test. Output length:
  ``min(model.max_tgt_len - 1, max_len_b)`` tokens (``max_len_a = 0``).
"""
from __future__ import annotations

from dataclasses import dataclass

from bench.config import TrainConfig
from bench.models.seq2seq import Seq2SeqConfig
from tasks.mt import Seq2SeqDataConfig, Seq2SeqTask

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


@dataclass(frozen=True)
class SummarizationDataConfig(Seq2SeqDataConfig):
    bpe_vocab_size: int = 16000
    max_len_a: float = 0.0  # summary length does not scale with the source
    max_len_b: int = 256
    src_pad_multiple: int = 128
    max_eval_examples: int = 0  # cap dev/test documents (0 = all)
    src_char_limit: int = 16  # sources are cut to max_src_len * this many characters before BPE (speed only)


def rouge_scores(hyps: list[str], refs: list[str]) -> dict[str, float]:
    """Mean ROUGE F-measures x 100 (rouge_score, Porter stemming); newlines separate sentences for rougeLsum."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    tot = {k: 0.0 for k in ROUGE_TYPES}
    for h, r in zip(hyps, refs):
        s = scorer.score(r, h)  # score(target, prediction)
        for k in ROUGE_TYPES:
            tot[k] += s[k].fmeasure
    n = max(len(hyps), 1)
    return {k: 100.0 * v / n for k, v in tot.items()}


def summarization_presets(tiny_src: int = 512, small_src: int = 2048, paper_src: int = 8192):
    """(model, data-kwargs, train, notes) per scale for the long-document summarization tasks."""
    return {
        "tiny": (
            Seq2SeqConfig(n_enc_layers=2, n_dec_layers=2, d_model=64, n_heads=2, d_ff=128, dropout=0.1,
                          max_src_len=tiny_src, max_tgt_len=64, label_smoothing=0.1),
            dict(bpe_vocab_size=2000, max_len_b=48, beam_size=2, dev_decode_max=4, max_eval_examples=8,
                 max_train_examples=64, src_pad_multiple=64),
            TrainConfig(steps=40, batch_size=4, lr=2e-3, warmup_steps=5, schedule="linear", eval_every=20,
                        eval_batches=2, eval_batch_size=4),
            (f"tiny: 2+2 layers d64, sources cut to {tiny_src} tokens, <=64 train / 8 eval documents, 40 steps",),
        ),
        "small": (
            Seq2SeqConfig(n_enc_layers=3, n_dec_layers=3, d_model=256, n_heads=4, d_ff=1024, dropout=0.1,
                          max_src_len=small_src, max_tgt_len=256, label_smoothing=0.1),
            dict(bpe_vocab_size=16000, max_len_b=255, beam_size=4, length_penalty=1.0, min_len=0,
                 dev_decode_max=32, max_eval_examples=500, src_pad_multiple=128),
            TrainConfig(steps=2000, batch_size=16, lr=1e-3, warmup_steps=200, schedule="cosine",
                        adam_betas=(0.9, 0.98), weight_decay=0.0001, eval_every=500, eval_batches=2,
                        eval_batch_size=16),
            (f"small: 3+3 layers d256, sources cut to {small_src} tokens, summaries to 255, 2000 steps x 16 docs, "
             "<=500 test documents, beam 4",),
        ),
        "paper": (
            # Pyramidion/DeepPyramidion (topk_pooling.md): pyramidion_base d512 FFN 2048 8 heads, 6+6 layers,
            # n0 = 8192, lr 5e-4 polynomial, 5k warm-up, beam 16, length penalty 1, min length 72, max-len-b 966.
            Seq2SeqConfig(n_enc_layers=6, n_dec_layers=6, d_model=512, n_heads=8, d_ff=2048, dropout=0.1,
                          max_src_len=paper_src, max_tgt_len=968, label_smoothing=0.0),
            dict(bpe_vocab_size=32000, max_len_b=966, beam_size=16, length_penalty=1.0, min_len=72,
                 dev_decode_max=64, max_eval_examples=0, src_pad_multiple=512),
            TrainConfig(steps=300000, batch_size=16, lr=5e-4, warmup_steps=5000, schedule="linear",
                        adam_betas=(0.9, 0.98), eval_every=5000, eval_batches=4, eval_batch_size=8),
            ("paper: reference used 16 docs/GPU x update-freq 16 (256/update); no gradient accumulation here, "
             "so 16 docs per update; byte-level BPE 32k instead of the (unshipped) SentencePiece model",),
        ),
    }


class SummarizationTask(Seq2SeqTask):
    """A subclass provides ``load_texts(split) -> (sources, references)`` and its presets (via
    ``summarization_presets``) with its own DataConfig (a ``SummarizationDataConfig`` subclass)."""

    ModelConfig = Seq2SeqConfig
    METRICS = {k: True for k in ROUGE_TYPES}
    MAIN_METRIC = "rougeL"

    @classmethod
    def data_folder(cls, scale: str) -> str | None:
        return cls.presets(scale)[1].subdir
    SRC_LENGTHS = (512, 2048, 8192)

    @classmethod
    def presets(cls, scale: str):
        table = summarization_presets(*cls.SRC_LENGTHS)
        if scale not in table:
            raise ValueError(f"unknown scale {scale!r}")
        model, data_kw, train, notes = table[scale]
        return model, cls.DataConfig(**data_kw), train, notes

    def prepare(self) -> None:
        try:
            import rouge_score  # noqa: F401  (fail before training, not at the first eval)
        except ImportError:
            from bench.errors import BenchError

            raise BenchError(f"{self.name}: the rouge-score package is needed for ROUGE; pip install rouge-score") from None
        super().prepare()

    def load_texts(self, split: str):
        src, ref = self.load_documents(split)
        cap = self.cfg.data.max_eval_examples
        if split != "train" and cap:
            src, ref = src[:cap], ref[:cap]
        limit = self.cfg.model.max_src_len * self.cfg.data.src_char_limit
        return [s[:limit] for s in src], ref

    def load_documents(self, split: str) -> tuple[list[str], list[str]]:
        raise NotImplementedError

    def tokenizer_texts(self, train_src, train_tgt):
        return list(dict.fromkeys(train_src)) + list(train_tgt)  # each distinct source once

    def score(self, hyps, refs):
        return rouge_scores(hyps, refs)
