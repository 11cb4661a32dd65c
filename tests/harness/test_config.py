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


@pytest.mark.parametrize("kw, key", [
    ({"steps": 0}, "train.steps"), ({"eval_every": 0}, "train.eval_every"), ({"batch_size": 0}, "train.batch_size"),
    ({"lr": 0.0}, "train.lr"), ({"lr": -1e-3}, "train.lr"), ({"lr": float("nan")}, "train.lr"),
    ({"lr": float("inf")}, "train.lr"), ({"schedule": "cosin"}, "train.schedule"),
    ({"grad_clip_mode": "l2"}, "train.grad_clip_mode"), ({"amp": "fp8"}, "train.amp"),
    ({"warmup_steps": -1}, "train.warmup_steps"), ({"adam_betas": (0.9, 1.0)}, "train.adam_betas"),
    ({"grad_clip": -1.0}, "train.grad_clip"), ({"adam_eps": 0.0}, "train.adam_eps"),
])
def test_train_config_rejects_meaningless_values(kw, key):
    with pytest.raises(BenchError, match=f"invalid value for {key}"):
        TrainConfig(**kw)


def test_non_finite_and_negative_overrides_are_rejected_unless_the_field_allows_them():
    import dataclasses

    from bench.config import _convert, apply_overrides_to

    with pytest.raises(BenchError, match="expected a finite number"):
        _convert("nan", float, "x.y")
    with pytest.raises(BenchError, match="expected an integer >= 0"):
        _convert("-2", int, "x.y")
    assert _convert("-2", int, "x.y", {"negative_ok": True}) == -2

    @dataclasses.dataclass(frozen=True)
    class Sweep:
        tol: float = dataclasses.field(default=1.0, metadata={"nonfinite_ok": True})  # inf = no tolerance

    assert apply_overrides_to(Sweep(), ["tol=inf"], "sweep").tol == float("inf")


def test_each_section_is_validated_after_the_overrides():
    import dataclasses

    from bench.config import RunConfig, apply_overrides

    @dataclasses.dataclass(frozen=True)
    class Model:
        n_layers: int = 2
        d_model: int = 64
        n_heads: int = 2
        width: int = 4

        def validate(self):
            if self.width % 2:
                raise ValueError(f"width={self.width} must be even")

    @dataclasses.dataclass(frozen=True)
    class Data:
        max_len: int = 8

    @dataclasses.dataclass(frozen=True)
    class Method:
        density: float = 0.5

    cfg = RunConfig(task="t", method="m", scale="tiny", seed=0, model=Model(), data=Data(), train=TrainConfig(),
                    method_cfg=Method())
    assert apply_overrides(cfg, ["model.width=6"]).model.width == 6
    with pytest.raises(BenchError, match="invalid model config: width=5 must be even"):
        apply_overrides(cfg, ["model.width=5"])
    with pytest.raises(BenchError, match="model.n_heads: 3; it must divide model.d_model=64"):
        apply_overrides(cfg, ["model.n_heads=3"])
    with pytest.raises(BenchError, match="model.n_layers"):
        apply_overrides(cfg, ["model.n_layers=0"])
    # a preset (not an override) that is non-finite is caught too
    bad = dataclasses.replace(cfg, method_cfg=Method(density=float("nan")))
    with pytest.raises(BenchError, match="method.density"):
        apply_overrides(bad, [])


def test_a_config_check_raising_value_error_is_one_line_naming_the_key():
    import dataclasses

    from bench.config import apply_overrides_to

    @dataclasses.dataclass(frozen=True)
    class C:
        k: int = 1

        def __post_init__(self):
            if self.k == 5:
                raise ValueError("five is\nright out")

    with pytest.raises(BenchError) as e:
        apply_overrides_to(C(), ["k=5"], "sec")
    assert "sec.k" in str(e.value) and "\n" not in str(e.value)
