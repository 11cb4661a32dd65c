"""Long-document abstractive summarization (suite ``summarization``): QMSum, PubMed, arXiv.

Shared machinery in ``tasks/summarization/common.py`` (on top of ``tasks.mt.Seq2SeqTask``).
"""
