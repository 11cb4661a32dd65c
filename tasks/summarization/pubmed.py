"""arXiv / PubMed long-document summarization (Cohan et al., NAACL 2018): ``sum_pubmed`` and ``sum_arxiv``.

Offline (``--data-dir D``): the release format, one JSON object per line with ``article_text`` (list of
sentences) and ``abstract_text`` (list of sentences wrapped in ``<S> ... </S>``), files
``D/<data.subdir>/{train,val|validation,test}.txt`` (plain, ``.xz`` or ``.gz``). ``sum_pubmed`` defaults to
``summarization_pubmed_sample`` (the shared 80/10/10-paper SAMPLE: enough to exercise the pipeline, not to
reproduce published numbers; point ``data.subdir`` at a full ``pubmed-dataset`` copy for that); ``sum_arxiv``
to ``arxiv-dataset`` (not staged in the shared data).
Online (no data dir): HF ``ccdv/pubmed-summarization`` / ``ccdv/arxiv-summarization`` (``article`` /
``abstract`` strings, newline-separated; splits train/validation/test).

Source = article sentences joined by spaces; reference = abstract sentences (``<S>``/``</S>`` stripped) joined
by newlines. Documents with an empty article or abstract are dropped from train only.

Published context (``../shared/specs/topk_pooling.md``; not set as ``REFERENCE`` because they are R-1/R-2 of
sparse/pooled models, not dense ROUGE-L): DeepPyramidion R-1/R-2 47.81/21.14 (PubMed), 47.15/19.99 (arXiv);
the authors' blockwise baseline 46.85/19.39 (arXiv).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from bench.errors import DataUnavailable
from bench.registry import register_task
from bench.text import find_file, read_text
from bench import hub
from tasks.summarization.common import SummarizationDataConfig, SummarizationTask

SPLIT_FILES = {"train": ("train.txt",), "dev": ("val.txt", "validation.txt"), "test": ("test.txt",)}
HF_SPLITS = {"train": "train", "dev": "validation", "test": "test"}


def clean_abstract_sentence(s: str) -> str:
    return s.replace("<S>", " ").replace("</S>", " ").strip()


def parse_cohan_jsonl(text: str, source: str) -> tuple[list[str], list[str]]:
    """(articles, abstracts) from the Cohan et al. JSON-lines text; errors name ``source`` and the line."""
    arts, abss = [], []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            art, ab = d["article_text"], d["abstract_text"]
            if not isinstance(art, list) or not isinstance(ab, list):
                raise TypeError("article_text/abstract_text are not lists")
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataUnavailable(
                f"{source}: line {n} is not a Cohan et al. record ({type(e).__name__}: {e}); expected one JSON "
                f"object per line with article_text and abstract_text lists of sentences"
            ) from None
        arts.append(" ".join(s.strip() for s in art if s.strip()))
        abss.append("\n".join(c for c in (clean_abstract_sentence(s) for s in ab) if c))
    if not arts:
        raise DataUnavailable(f"{source}: no records; expected one JSON object per line")
    return arts, abss


@dataclass(frozen=True)
class PubMedDataConfig(SummarizationDataConfig):
    subdir: str = "summarization_pubmed_sample"
    hf_dataset: str = "ccdv/pubmed-summarization"


@dataclass(frozen=True)
class ArxivDataConfig(SummarizationDataConfig):
    subdir: str = "arxiv-dataset"
    hf_dataset: str = "ccdv/arxiv-summarization"


class CohanSummarization(SummarizationTask):
    SRC_LENGTHS = (512, 2048, 8192)

    @classmethod
    def data_available(cls, data_dir, scale):
        if data_dir is None:
            return None  # HF download at prepare()
        root = Path(data_dir) / cls.presets(scale)[1].subdir
        for split, names in SPLIT_FILES.items():
            if not any((root / f).is_file() or (root / (f + ".xz")).is_file() or (root / (f + ".gz")).is_file() for f in names):
                return f"{root / names[0]}: file not found (also tried .xz/.gz{', ' + ', '.join(names[1:]) if names[1:] else ''})"
        return None

    def _find(self, root: Path, split: str) -> Path:
        names = SPLIT_FILES[split]
        for name in names[1:]:
            try:
                return find_file(root, name)
            except DataUnavailable:
                pass
        return find_file(root, names[0], "Cohan et al. JSON lines (article_text, abstract_text)")

    def load_documents(self, split: str):
        d = self.cfg.data
        if self.data_dir is not None:
            path = self._find(self.data_dir / d.subdir, split)
            arts, abss = parse_cohan_jsonl(read_text(path), str(path))
        else:
            arts, abss = self._load_online(split)
        if split == "train":
            keep = [i for i in range(len(arts)) if arts[i].strip() and abss[i].strip()]
            arts, abss = [arts[i] for i in keep], [abss[i] for i in keep]
        return arts, abss

    def _load_online(self, split: str):
        name = self.cfg.data.hf_dataset
        try:
            ds = hub.load_dataset(name, split=HF_SPLITS[split])
        except Exception as e:  # network, hub or format errors: one clear line
            raise DataUnavailable(
                f"HF dataset {name} split {HF_SPLITS[split]}: could not be loaded ({type(e).__name__}: {str(e)[:200]}); "
                f"pass --data-dir D with D/{self.cfg.data.subdir}/{{train,val,test}}.txt in the Cohan et al. format"
            ) from None
        if "article" not in ds.column_names or "abstract" not in ds.column_names:
            raise DataUnavailable(f"HF dataset {name}: expected columns article/abstract, got {ds.column_names}")
        arts = [" ".join(a.split("\n")) for a in ds["article"]]
        abss = ["\n".join(s.strip() for s in a.split("\n") if s.strip()) for a in ds["abstract"]]
        return arts, abss


@register_task("sum_pubmed", suite="summarization")
class PubMed(CohanSummarization):
    DataConfig = PubMedDataConfig


@register_task("sum_arxiv", suite="summarization")
class Arxiv(CohanSummarization):
    DataConfig = ArxivDataConfig
