import pytest

from bench.cli import build_run_config, parse_method_spec
from bench.config import TrainConfig, config_hash, from_dict
from bench.errors import BenchError


def _cfg(*overrides):
    return build_run_config("lra_listops", parse_method_spec("dense"), "tiny", 0, "cpu", list(overrides))


def test_overrides_are_typed_and_change_the_hash():
    base = _cfg()
    cfg = _cfg("train.lr=3e-4", "model.n_layers=3", "steps=7", "adam_betas=0.8,0.9", "method.backend=math")
    assert cfg.train.lr == 3e-4 and cfg.model.n_layers == 3 and cfg.train.steps == 7
    assert cfg.train.adam_betas == (0.8, 0.9) and cfg.method_cfg.backend == "math"
    assert config_hash(cfg) != config_hash(base)
    assert config_hash(_cfg()) == config_hash(base)  # deterministic


def test_device_does_not_change_the_hash():
    a = build_run_config("lra_listops", parse_method_spec("dense"), "tiny", 0, "cpu", [])
    b = build_run_config("lra_listops", parse_method_spec("dense"), "tiny", 0, "cuda", [])
    assert a.hash == b.hash


@pytest.mark.parametrize("bad, msg", [
    ("train.nope=1", "has no field 'nope'"),
    ("train.lr=fast", "invalid value for train.lr"),
    ("model.n_layers=2.5", "invalid value for model.n_layers"),
    ("lr", "expected key=value"),
    ("train=3", "names a section"),
])
def test_bad_overrides_fail_clearly(bad, msg):
    with pytest.raises(BenchError, match=msg):
        _cfg(bad)


def test_method_spec_overrides_apply_to_that_method_only():
    cfg = build_run_config("lra_listops", parse_method_spec("dense:backend=flash"), "tiny", 0, "cpu", [])
    assert cfg.method_cfg.backend == "flash"


def test_config_roundtrip():
    t = TrainConfig(lr=0.5, adam_betas=(0.1, 0.2))
    assert from_dict(TrainConfig, _cfg().to_dict()["train"]).batch_size == _cfg().train.batch_size
    assert from_dict(TrainConfig, {"lr": 0.5, "adam_betas": [0.1, 0.2]}) == t
