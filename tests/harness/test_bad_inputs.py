"""Bad inputs are one-line errors, before any work.

A seeded randomized sweep of typed overrides (``train.*``, ``model.*``, ``data.*``) and method options
(``local:*``, ``bigbird:*``, ``dense:backend=*``) through the CLI's config path only
(``bench.cli.checked_run_config``: ``build_run_config`` + every pre-run check): each case either builds a config
whose values round-trip, or raises ``BenchError`` with one line naming the key; never another exception. Plus the
data-dir cases (a task folder with no usable files, truncated ListOps expressions) and the kernel's own checks.
"""
import dataclasses
import math
import random
import typing
from pathlib import Path

import pytest

from bench import registry
from bench.cli import MethodSpec, checked_run_config, parse_method_spec
from bench.config import _convert, from_dict, to_dict
from bench.errors import BenchError, DataUnavailable

ROOT = Path(__file__).resolve().parents[2]

VALUES = {
    int: ["0", "1", "-1", "2", "3", "7", "16", "48", "64", "128", "-5", "1e3", "2.5", "abc", "", "100000", "nan"],
    float: ["0", "1", "-1", "0.5", "1e-3", "3e-4", "nan", "inf", "-inf", "1e400", "abc", "", "0.999", "1.0", "2",
            "-0.0", "1e-12"],
    str: ["auto", "linear", "cosine", "off", "bf16", "fp16", "x", "", "warp", "flash", "math", "onecycle", "norm",
          "value", "mean", "cls", "generate", "files", "none"],
    bool: ["true", "false", "1", "0", "maybe", "yes"],
    "tuple": ["0.9,0.999", "0.9", "1,2", "a,b", "0.5,1.5", "nan,0.9", "(0.8, 0.95)", "0.9,0.999,0.5"],
}


def _fields(cls):
    hints = typing.get_type_hints(cls)
    return [(f.name, hints[f.name]) for f in dataclasses.fields(cls)]


def _values_for(typ):
    if typing.get_origin(typ) is tuple:
        return VALUES["tuple"]
    if typing.get_origin(typ) is not None:  # Optional[...]
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        return VALUES.get(args[0], VALUES[str]) + ["none"]
    return VALUES.get(typ, VALUES[str])


def _cases(n: int, seed: int = 10):
    registry.load_all()
    rnd = random.Random(seed)
    task = registry.get_task("lra_listops")
    model, data, train, _ = task.presets("tiny")
    sections = {"train": _fields(type(train)), "model": _fields(type(model)), "data": _fields(type(data))}
    method_fields = {m: _fields(registry.get_method(m).Config) for m in ("local", "bigbird")}
    out = []
    for _ in range(n):
        kind = rnd.choice(["train", "model", "data", "local", "bigbird", "dense", "mixed"])
        overrides, method = [], "eager"
        picks = [kind] if kind != "mixed" else rnd.sample(["train", "model", "data", "local"], 2)
        for k in picks:
            if k in sections:
                name, typ = rnd.choice(sections[k])
                overrides.append(f"{k}.{name}={rnd.choice(_values_for(typ))}")
            elif k == "dense":
                method = f"dense:backend={rnd.choice(['auto', 'cudnn', 'flash', 'efficient', 'math', 'warp', '', 'AUTO'])}"
            else:
                name, typ = rnd.choice([f for f in method_fields[k] if f[0] != "note"])
                method = f"{k}:{name}={rnd.choice(_values_for(typ))}"
        out.append((method, overrides))
    return out


def _section_of(cfg, key):
    head, field = key.split(".", 1)
    return getattr(cfg, {"method": "method_cfg"}.get(head, head)), field


CASES = _cases(600)


def test_randomized_bad_inputs_are_one_line_benchererrors():
    """Hundreds of override combinations: valid and round-tripping, or a one-line BenchError naming the key."""
    n_valid = n_rejected = 0
    for method, overrides in CASES:
        spec = parse_method_spec(method)
        keys = [o.split("=", 1)[0] for o in overrides] + [f"method.{o.split('=', 1)[0]}" for o in spec.overrides]
        values = [o.split("=", 1)[1] for o in overrides] + [o.split("=", 1)[1] for o in spec.overrides]
        case = f"{method} {' '.join(overrides)}"
        try:
            cfg = checked_run_config("lra_listops", spec, "tiny", 0, "cpu", list(overrides))
        except BenchError as e:
            msg = str(e)
            assert "\n" not in msg and "Traceback" not in msg, case
            assert any(k.split(".")[-1] in msg for k in keys) or spec.name in msg, (case, msg)
            n_rejected += 1
            continue
        except Exception as e:  # noqa: BLE001 - the point of the test
            pytest.fail(f"{case}: {type(e).__name__} instead of BenchError: {e}")
        n_valid += 1
        for key, value in zip(keys, values):
            section, field = _section_of(cfg, key)
            typ = typing.get_type_hints(type(section))[field]
            got = getattr(section, field)
            assert got == _convert(value, typ, key), case  # the typed value, as given
            if isinstance(got, float):
                assert math.isfinite(got), case
        for attr in ("model", "data", "train", "method_cfg"):
            sec = getattr(cfg, attr)
            if dataclasses.is_dataclass(sec):
                assert from_dict(type(sec), to_dict(sec)) == sec, case  # round-trips through the record
    assert n_valid > 50 and n_rejected > 100, (n_valid, n_rejected)


@pytest.mark.parametrize("method, overrides, needle", [
    ("eager", ["train.steps=0"], "train.steps"),
    ("eager", ["train.eval_every=0"], "train.eval_every"),
    ("eager", ["train.batch_size=-3"], "train.batch_size"),
    ("eager", ["train.lr=0"], "train.lr"),
    ("eager", ["train.lr=-1e-3"], "train.lr"),
    ("eager", ["train.lr=nan"], "train.lr"),
    ("eager", ["train.lr=inf"], "train.lr"),
    ("eager", ["train.schedule=cosin"], "train.schedule"),
    ("eager", ["train.grad_clip_mode=l2"], "train.grad_clip_mode"),
    ("eager", ["train.amp=fp8"], "train.amp"),
    ("eager", ["model.n_layers=0"], "model.n_layers"),
    ("eager", ["model.n_heads=3"], "model.n_heads"),
    ("eager", ["model.n_heads=0"], "model.n_heads"),
    ("eager", ["model.dropout=1"], "model.dropout"),
    ("eager", ["model.dropout=-0.1"], "model.dropout"),
    ("eager", ["data.max_len=4096"], "data.max_len"),
    ("eager", ["data.n_train=-1"], "data.n_train"),
    ("local:window_blocks=-1", [], "local:window_blocks"),
    ("local:density=nan", [], "local:density"),
    ("bigbird:density=inf", [], "bigbird:density"),
    ("local:block_size=48", [], "block_size"),
    ("bigbird:block_size=8", [], "block_size"),
    ("dense:backend=warp", [], "backend"),
])
def test_meaningless_settings_are_rejected(method, overrides, needle):
    with pytest.raises(BenchError) as e:
        checked_run_config("lra_listops", parse_method_spec(method), "tiny", 0, "cpu", overrides)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_every_preset_passes_the_checks():
    registry.load_all()
    for t, cls in registry.TASKS.items():
        if getattr(cls, "KIND", "run") != "run":
            continue
        for scale in ("tiny", "small", "paper"):
            for m in ("eager", "dense", "local", "bigbird", "spion_cf"):
                if m in registry.METHODS:
                    checked_run_config(t, MethodSpec(m), scale, 0, "cpu", [])


def _run_all(*args):
    """run_all.py in this process (``bench.cli.main``): what a subprocess would print and return, in a fraction of
    its start-up time."""
    from test_cli import run_all

    return run_all(*args)


def test_cli_prints_bad_method_options_as_one_line(tmp_path):
    r = _run_all("--suite", "lra", "--tasks", "listops", "--methods", "local:block_size=48", "--out", str(tmp_path),
                 "--no-progress")
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: ") and "block_size" in r.stderr and "48" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.rglob("*.json"))


# ---- --data-dir: a task folder with nothing usable is never silently replaced by generated data ------------------
def test_empty_task_folder_in_data_dir_is_an_error(tmp_path):
    (tmp_path / "data" / "lra_listops").mkdir(parents=True)
    (tmp_path / "data" / "lra_listops" / "README").write_text("oops, forgot the files")
    r = _run_all("--suite", "lra", "--tasks", "listops", "--methods", "eager", "--data-dir", str(tmp_path / "data"),
                 "--out", str(tmp_path / "r"), "--no-progress", "--no-report")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "lra_listops" in r.stderr and "no usable ListOps files" in r.stderr and "remove it" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not list((tmp_path / "r").rglob("*.json"))


def test_task_folder_problems_are_reported_by_each_lra_task(tmp_path):
    from bench.cli import build_run_config

    registry.load_all()
    for task, folder in (("lra_listops", "lra_listops"), ("lra_pathfinder", "lra_pathfinder"),
                         ("lra_text", "lra_text_imdb"), ("lra_image", "lra_image_cifar10")):
        cls = registry.get_task(task)
        cfg = build_run_config(task, MethodSpec("eager"), "tiny", 0, "cpu", [])
        assert cls.data_dir_problem(tmp_path, cfg) is None  # no folder: generate / download as before
        (tmp_path / folder).mkdir()
        why = cls.data_dir_problem(tmp_path, cfg)
        assert why and str(tmp_path / folder) in why and "no usable" in why, task
        with pytest.raises(DataUnavailable, match="no usable"):
            cls(cfg, tmp_path).prepare()
        source = "generate" if task in ("lra_listops", "lra_pathfinder") else "hf"
        other = build_run_config(task, MethodSpec("eager"), "tiny", 0, "cpu", [f"data.source={source}"])
        assert cls.data_dir_problem(tmp_path, other) is None  # asked not to read files: the folder is not used
        assert not cls(other, tmp_path).data_dir_used()


def test_generated_data_is_not_fingerprinted_as_if_read(tmp_path):
    import torch

    from bench.cli import build_run_config, run_one

    (tmp_path / "lra_listops").mkdir()
    (tmp_path / "lra_listops" / "notes.txt").write_text("x")
    spec = MethodSpec("eager")
    cfg = build_run_config("lra_listops", spec, "tiny", 0, "cpu", [
        "data.source=generate", "train.steps=2", "train.eval_every=2", "data.n_train=32", "data.n_dev=16",
        "data.n_test=16"])
    rec = run_one("lra_listops", spec, 0, cfg, torch.device("cpu"), tmp_path, "tiny", False)
    assert "data_files" not in rec.budget


@pytest.mark.parametrize("source, needle", [
    ("( ( ( [MAX 4 ) 3 )", "never closed"),  # truncated: the closing ] ) missing
    ("( ( ( [MAX 4 ) 3 ) ] ) ( [MIN", "after the end"),  # two lines run together
    ("( [MAX 4 ] ) ]", "closes no operator"),
    ("( [MAX 4 ] ) 5", "after the end"),
    ("( [MIN ] )", "no arguments"),
    ("( ( ( ( [SM 9 ) ( ( ( [MIN 1 ) 2 ) ] ) ) 5", "never closed"),  # cut mid-line
    ("( ( [SM 9 ) ( ( [MIN 1 ) 2 ) ] )", "never closed"),  # parens balanced, the outer ] lost
])
def test_truncated_listops_expressions_name_file_and_line(tmp_path, source, needle):
    from tasks.lra import listops as L

    p = tmp_path / "basic_train.tsv"
    p.write_text(f"Source\tTarget\n( ( ( [MAX 4 ) 3 ) ] )\t4\n{source}\t4\n")
    with pytest.raises(DataUnavailable) as e:
        L.read_tsv(p, max_len=32)
    assert str(p) in str(e.value) and "line 3" in str(e.value) and needle in str(e.value)


# ---- the kernel's own argument checks (another change adds some of them) -----------------------------------------
def _qkv(L=64, D=16):
    import torch

    q = torch.randn(1, 1, L, D)
    return q, q.clone(), q.clone()


def _layout(nb):
    import torch

    return torch.ones(1, nb, nb, dtype=torch.bool)


def _one_line_error(fn):
    with pytest.raises((ValueError, TypeError)) as e:
        fn()
    assert "\n" not in str(e.value).strip() and str(e.value).strip()
    return str(e.value)


def test_kernel_rejects_unsupported_block_size():
    from kernels.block_sparse_attention import block_sparse_attention

    q, k, v = _qkv(96)
    msg = _one_line_error(lambda: block_sparse_attention(q, k, v, _layout(2), block_size=48, backend="torch"))
    assert "block_size" in msg


@pytest.mark.parametrize("kwargs, needle", [
    ({"block_size": 64.0}, "block_size"),
    ({"block_size": True}, "block_size"),
    ({"causal": "yes"}, "causal"),
    ({"causal": 1.5}, "causal"),
])
def test_kernel_rejects_badly_typed_arguments(kwargs, needle):
    from kernels.block_sparse_attention import block_sparse_attention

    q, k, v = _qkv(64)
    args = {"block_size": 64, **kwargs}
    msg = _one_line_error(lambda: block_sparse_attention(q, k, v, _layout(1), backend="torch", **args))
    assert needle in msg
