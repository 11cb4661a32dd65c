import socket

import pytest

from bench import hub


@pytest.fixture(autouse=True)
def fresh_cache():
    hub.hub_unreachable.cache_clear()
    yield
    hub.hub_unreachable.cache_clear()


def test_offline_mode_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConnectionError, match="offline mode"):
        hub.load_dataset("imdb")


def test_unresolvable_hub_fails_fast(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example.invalid")

    def no_dns(host, *a, **kw):
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    with pytest.raises(ConnectionError, match="hub.example.invalid cannot be resolved"):
        hub.load_dataset("imdb")
