"""Loading Hugging Face datasets by name, failing fast when the hub cannot be reached.

Without this, ``datasets.load_dataset`` on an offline machine retries with back-off for about half a minute
per task and prints a warning per try, before the task can say "pass --data-dir".
"""
from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse


@functools.lru_cache(maxsize=1)
def hub_unreachable() -> str | None:
    """None if the hub's host resolves (or offline mode is not set), else why it cannot be used."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return "Hugging Face offline mode is set (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)"
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError as e:
        return f"{host} cannot be resolved ({e.strerror or e})"
    return None


def load_dataset(name: str, *args, **kwargs):
    """``datasets.load_dataset(name, ...)`` for hub datasets; raises ConnectionError at once when offline."""
    reason = hub_unreachable()
    if reason:
        raise ConnectionError(reason)
    import datasets

    return datasets.load_dataset(name, *args, **kwargs)
