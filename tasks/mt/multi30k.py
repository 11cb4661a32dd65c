"""Multi30k German->English translation (``mt_multi30k``); IWSLT14 / WMT14 de-en by name, online only.

Data (``data.corpus``):
- ``multi30k`` (default). Offline: ``--data-dir D`` reads ``D/multi30k/{train,val,<test_set>}.{de,en}[.gz|.xz]``
  (raw, cased, one sentence per line, line i of ``.de`` <-> line i of ``.en``; the layout of the shared copy of
  github.com/multi30k/dataset ``data/task1/raw``). Splits: train (29,000), dev = ``val`` (1,014), test =
  ``data.test_set`` (default ``test_2016_flickr``, the usual "Multi30k test2016"; also test_2017_flickr,
  test_2017_mscoco, test_2018_flickr). Online (no data dir): HF ``bentrevett/multi30k`` (train/validation/test
  = test2016), columns ``de``/``en``.
- ``iwslt14`` (HF ``bbaaaa/iwslt14-de-en``, config ``de-en``, ``translation`` dicts) and ``wmt14`` (HF
  ``wmt/wmt14`` config ``de-en``): online only; with a data dir they raise ``DataUnavailable`` saying so.
  ``data.hf_dataset`` / ``data.hf_config`` override the HF names.

Metric: BLEU (sacreBLEU ``corpus_score``, default 13a tokenizer, cased) of detokenized hypotheses against the
raw references; the sacreBLEU signature of the last evaluation is ``task.bleu_signature``.
Tokenizer: one joint byte-level BPE over de+en train text (``data.bpe_vocab_size``).

Presets:
- ``tiny``: CPU, 2+2 layers d 64, capped train/dev/test (``max_train_examples``/``max_eval_examples``), greedy
  test decoding; a smoke run, not a quality number.
- ``small``: 3+3 layers, d 256, 4 heads, FFN 1024, dropout 0.1, label smoothing 0.1, 4,000 steps x 128 sentences
  (~18 epochs), lr 1e-3 cosine, 400 warm-up steps, beam 4 on test2016 -- a reduced budget vs. a Transformer-base
  run. Measured (one H100, ``eager`` method, seed 0, 2026-11-24): test2016 BLEU 40.7 (dev greedy 40.5), 218 s
  wall, 42 ms/step; ``dense`` reached 30.9 after only 600 steps (33 ms/step).
- ``paper``: AP's MT experiments (``../shared/specs/attention_pruning.md``) use fairseq's Transformer on "WMT" with
  the exact pair/architecture unverified; we use Transformer-base (6+6 layers, d 512, 8 heads, FFN 2048, dropout
  0.1, label smoothing 0.1, Adam (0.9, 0.98), rsqrt schedule with 4,000 warm-up steps, beam 4, length penalty 1.0)
  on Multi30k (the staged MT corpus); set ``data.corpus=wmt14`` online for the WMT setting.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bench.config import TrainConfig
from bench.errors import DataUnavailable
from bench.models.seq2seq import Seq2SeqConfig
from bench.registry import register_task
from bench.text import find_file, read_text
from bench import hub
from tasks.mt import Seq2SeqDataConfig, Seq2SeqTask

MULTI30K_SPLITS = {"train": "train", "dev": "val"}
MULTI30K_TESTS = ("test_2016_flickr", "test_2017_flickr", "test_2017_mscoco", "test_2018_flickr")
HF_NAMES = {  # corpus -> (dataset, config, {our split: HF split})
    "multi30k": ("bentrevett/multi30k", None, {"train": "train", "dev": "validation", "test": "test"}),
    "iwslt14": ("bbaaaa/iwslt14-de-en", "de-en", {"train": "train", "dev": "validation", "test": "test"}),
    "wmt14": ("wmt/wmt14", "de-en", {"train": "train", "dev": "validation", "test": "test"}),
}


@dataclass(frozen=True)
class MTDataConfig(Seq2SeqDataConfig):
    corpus: str = "multi30k"  # multi30k | iwslt14 (online) | wmt14 (online)
    src_lang: str = "de"
    tgt_lang: str = "en"
    test_set: str = "test_2016_flickr"  # multi30k offline: which test file is the test split
    hf_dataset: str = ""  # override the HF dataset name for data.corpus (online only)
    hf_config: str = ""
    max_eval_examples: int = 0  # cap dev/test size (0 = all); tiny only


def read_parallel(directory: Path, stem: str, src_lang: str, tgt_lang: str) -> tuple[list[str], list[str]]:
    """Line-aligned ``stem.src`` / ``stem.tgt`` (plain, .gz or .xz); errors name the file."""
    sides = []
    for lang in (src_lang, tgt_lang):
        path = find_file(directory, f"{stem}.{lang}", "one raw sentence per line, line-aligned with the other side")
        text = read_text(path)
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        sides.append((path, [ln.rstrip("\r") for ln in lines]))
    (p1, a), (p2, b) = sides
    if len(a) != len(b):
        raise DataUnavailable(f"{p1}: {len(a)} lines but {p2} has {len(b)}; the two sides must be line-aligned")
    if not a:
        raise DataUnavailable(f"{p1}: empty; expected one sentence per line")
    return a, b


@register_task("mt_multi30k", suite="mt")
class Multi30kTranslation(Seq2SeqTask):
    DATA_FOLDER = "multi30k"
    ModelConfig = Seq2SeqConfig
    DataConfig = MTDataConfig
    METRICS = {"bleu": True}
    MAIN_METRIC = "bleu"
    REFERENCE: dict[str, float] = {}

    def __init__(self, cfg, data_dir=None):
        super().__init__(cfg, data_dir)
        self.bleu_signature = ""

    @classmethod
    def presets(cls, scale: str):
        if scale == "tiny":
            return (
                Seq2SeqConfig(n_enc_layers=2, n_dec_layers=2, d_model=64, n_heads=2, d_ff=128, dropout=0.1,
                              max_src_len=64, max_tgt_len=64),
                MTDataConfig(bpe_vocab_size=1000, max_train_examples=2000, max_eval_examples=200, dev_decode_max=64,
                             beam_size=1),
                TrainConfig(steps=200, batch_size=32, lr=2e-3, warmup_steps=20, schedule="linear", eval_every=100,
                            eval_batches=4, eval_batch_size=64, weight_decay=0.0),
                ("tiny: 2+2 layers d64, <=2000 train pairs, 200 steps, <=200 dev/test sentences, greedy decoding",),
            )
        if scale == "small":
            return (
                Seq2SeqConfig(n_enc_layers=3, n_dec_layers=3, d_model=256, n_heads=4, d_ff=1024, dropout=0.1,
                              max_src_len=128, max_tgt_len=128, label_smoothing=0.1),
                MTDataConfig(bpe_vocab_size=8000, dev_decode_max=512, beam_size=4, length_penalty=1.0),
                TrainConfig(steps=4000, batch_size=128, lr=1e-3, warmup_steps=400, schedule="cosine",
                            adam_betas=(0.9, 0.98), weight_decay=0.0001, eval_every=500, eval_batches=0,
                            eval_batch_size=256),
                ("small: 3+3 layers d256 (Transformer-base is 6+6 d512), 4000 steps x 128 sentences; "
                 "dev evals decode greedily on <=512 sentences, test uses beam 4",),
            )
        if scale == "paper":
            return (
                Seq2SeqConfig(n_enc_layers=6, n_dec_layers=6, d_model=512, n_heads=8, d_ff=2048, dropout=0.1,
                              max_src_len=256, max_tgt_len=256, label_smoothing=0.1),
                MTDataConfig(bpe_vocab_size=10000, dev_decode_max=0, beam_size=4, length_penalty=1.0),
                TrainConfig(steps=20000, batch_size=128, lr=7e-4, warmup_steps=4000, schedule="rsqrt",
                            adam_betas=(0.9, 0.98), weight_decay=0.0001, eval_every=1000, eval_batch_size=256),
                (),
            )
        raise ValueError(f"unknown scale {scale!r}")

    @classmethod
    def data_available(cls, data_dir, scale):
        d = cls.presets(scale)[1]
        if data_dir is None:
            return None  # downloaded from the HF hub at prepare()
        if d.corpus != "multi30k":
            return f"{d.corpus} is only available online (HF {HF_NAMES.get(d.corpus, ('?',))[0]}); run without --data-dir"
        root = Path(data_dir) / "multi30k"
        for stem in ("train", "val", d.test_set):
            for lang in (d.src_lang, d.tgt_lang):
                try:
                    find_file(root, f"{stem}.{lang}")
                except DataUnavailable as e:
                    return str(e)
        return None

    # ---- data -------------------------------------------------------------------------------
    def load_texts(self, split: str):
        d = self.cfg.data
        if self.data_dir is not None:
            src, tgt = self._load_offline(split)
        else:
            src, tgt = self._load_online(split)
        if split != "train" and d.max_eval_examples:
            src, tgt = src[: d.max_eval_examples], tgt[: d.max_eval_examples]
        return src, tgt

    def _load_offline(self, split: str):
        d = self.cfg.data
        if d.corpus != "multi30k":
            name = d.hf_dataset or HF_NAMES.get(d.corpus, ("?",))[0]
            raise DataUnavailable(
                f"data.corpus={d.corpus}: no offline copy is supported (not in the shared data); "
                f"run without --data-dir to download HF {name}, or use data.corpus=multi30k"
            )
        if d.test_set not in MULTI30K_TESTS:
            raise DataUnavailable(f"data.test_set={d.test_set!r}: valid Multi30k test sets are {', '.join(MULTI30K_TESTS)}")
        stem = MULTI30K_SPLITS.get(split, d.test_set)
        return read_parallel(self.data_dir / "multi30k", stem, d.src_lang, d.tgt_lang)

    def _load_online(self, split: str):
        d = self.cfg.data
        if d.corpus not in HF_NAMES and not d.hf_dataset:
            raise DataUnavailable(f"data.corpus={d.corpus!r}: valid corpora are {', '.join(HF_NAMES)}")
        name, config, split_map = HF_NAMES.get(d.corpus, (d.hf_dataset, None, {"train": "train", "dev": "validation", "test": "test"}))
        name, config = d.hf_dataset or name, d.hf_config or config
        try:
            ds = hub.load_dataset(name, config, split=split_map[split]) if config else hub.load_dataset(name, split=split_map[split])
        except Exception as e:  # network, hub or format errors: one clear line
            raise DataUnavailable(
                f"HF dataset {name}{'/' + config if config else ''} split {split_map[split]}: could not be loaded "
                f"({type(e).__name__}: {str(e)[:200]}); pass --data-dir with a local multi30k/ copy"
            ) from None
        cols = ds.column_names
        if "translation" in cols:
            rows = ds["translation"]
            return [r[d.src_lang] for r in rows], [r[d.tgt_lang] for r in rows]
        if d.src_lang in cols and d.tgt_lang in cols:
            return list(ds[d.src_lang]), list(ds[d.tgt_lang])
        raise DataUnavailable(f"HF dataset {name}: expected columns {d.src_lang}/{d.tgt_lang} or translation, got {cols}")

    # ---- metric -----------------------------------------------------------------------------
    def score(self, hyps: list[str], refs: list[str]) -> dict[str, float]:
        bleu, sig = corpus_bleu(hyps, refs)
        self.bleu_signature = sig
        return {"bleu": bleu}


def corpus_bleu(hyps: list[str], refs: list[str]) -> tuple[float, str]:
    """sacreBLEU corpus BLEU (defaults: 13a tokenizer, cased, exp smoothing) and its signature string."""
    from sacrebleu.metrics import BLEU

    metric = BLEU()
    res = metric.corpus_score(hyps, [refs])
    return float(res.score), str(metric.get_signature())
