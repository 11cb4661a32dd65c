"""The ``published`` scale of the LRA tasks (the PyTorch re-runs' lineage, benchmarks_and_baselines.md 1.2) beside
the ``paper`` one (SPION's table, spion.md §4.1), which must stay as it was."""
import re
from pathlib import Path

import pytest

from bench.cli import build_parser, build_run_config, parse_method_spec, plan_runs
from bench.errors import BenchError
from bench.registry import get_task, load_all

load_all()
ROOT = Path(__file__).resolve().parents[2]
TASKS = ("listops", "text", "retrieval", "image", "pathfinder")

# benchmarks_and_baselines.md 1.2, Nystromformer's config: "2 layers, emb 64, FFN 128, 2 heads x 32, learned
# pos-emb, mean pooling, dropout 0.1, lr 1e-4 linear decay, wd 0. bs / steps / warmup: ListOps 32 / 5 000 / 1 000;
# Text (len 4000) 32 / 20 000 / 8 000; Retrieval (len 4000) 32 / 30 000 / 800; Image 256 / 35 000 / 175;
# Pathfinder-32 256 / 62 400 / 312." Lengths padded to a power of two (its run_tasks.py; ListOps 2K, Image and
# Pathfinder 1K in its table).
SPEC_BUDGET = {"listops": (32, 5000, 1000), "text": (32, 20000, 8000), "retrieval": (32, 30000, 800),
               "image": (256, 35000, 175), "pathfinder": (256, 62400, 312)}
SPEC_LEN = {"listops": 2048, "text": 4096, "retrieval": 4096, "image": 1024, "pathfinder": 1024}
# spion.md §4.1 (the paper preset): layers, batch, lr, warm-up, steps, eval_every, eval batches
SPION_TABLE = {"listops": (4, 256, 7e-4, 1000, 30000, 500, 62), "text": (2, 32, 1e-4, 80, 30000, 200, 200),
               "retrieval": (2, 32, 3e-4, 800, 40000, 200, 300), "image": (2, 128, 1e-4, 175, 10000, 500, 20),
               "pathfinder": (2, 256, 3e-4, 312, 50000, 500, 156)}


def _task(key):
    return get_task(f"lra_{key}")


@pytest.mark.parametrize("key", TASKS)
def test_published_preset_is_the_spec_table(key):
    model, data, train, notes = _task(key).presets("published")
    bs, steps, warmup = SPEC_BUDGET[key]
    assert (train.batch_size, train.steps, train.warmup_steps) == (bs, steps, warmup)
    assert train.lr == 1e-4 and train.weight_decay == 0.0 and train.schedule == "onecycle"  # OneCycle, linear anneal
    assert train.grad_clip == 0.0 and train.adam_eps == 1e-6 and train.adam_betas == (0.9, 0.999)
    assert (model.n_layers, model.d_model, model.d_ff, model.n_heads, model.d_qkv // model.n_heads) == (2, 64, 128, 2, 32)
    assert model.pooling == "mean" and model.dropout == 0.1 and model.attention_padding_mask
    assert model.max_len == data.max_len == SPEC_LEN[key] and model.dual == (key == "retrieval")
    if key in ("text", "retrieval"):
        assert data.max_bytes == 4000  # "len 4000"
    assert notes and "published lineage" in notes[0]


def test_published_budgets_match_the_spec_file():
    """The same numbers read from the spec itself, where this checkout has it."""
    spec = next((p for p in (ROOT.parent / "shared", ROOT / "shared") if (p / "specs").is_dir()), None)
    if spec is None:
        pytest.skip("no shared/specs here")
    text = (spec / "specs" / "benchmarks_and_baselines.md").read_text(encoding="utf-8")
    sec = text.split("### 1.2", 1)[1].split("bs / steps / warmup:", 1)[1].split("Softmax", 1)[0]
    found = {}
    for name, a, b, c in re.findall(r"(ListOps|Text|Retrieval|Image|Pathfinder)(?:-32)?(?: \(len \d+\))? "
                                    r"(\d[\d ]*) / (\d[\d ]*) / (\d[\d ]*)",
                                    " ".join(sec.split())):
        found[name.lower()] = tuple(int(x.replace(" ", "")) for x in (a, b, c))
    assert found == SPEC_BUDGET
    assert "lr 1e-4 linear decay, wd 0" in " ".join(text.split())


@pytest.mark.parametrize("key", TASKS)
def test_paper_preset_is_still_spions_table(key):
    model, _, train, notes = _task(key).presets("paper")
    layers, bs, lr, warmup, steps, every, batches = SPION_TABLE[key]
    assert (model.n_layers, train.batch_size, train.lr, train.warmup_steps, train.steps) == (layers, bs, lr, warmup, steps)
    assert (train.eval_every, train.eval_batches, train.grad_clip, train.grad_clip_mode) == (every, batches, 1.0, "value")
    assert notes == ()


def test_scales_are_declared():
    from bench.config import FULL_BUDGET_SCALES, SCALES

    assert "published" in SCALES and FULL_BUDGET_SCALES == ("paper", "published")
    assert all("published" in _task(k).SCALES for k in TASKS)
    assert "published" not in get_task("wikitext2").SCALES


def test_records_name_the_lineage():
    cfg = build_run_config("lra_listops", parse_method_spec("dense"), "published", 0, "cpu", [])
    assert cfg.scale == "published" and cfg.to_dict()["scale"] == "published"
    assert "published lineage" in cfg.notes[0]
    paper = build_run_config("lra_listops", parse_method_spec("dense"), "paper", 0, "cpu", [])
    assert paper.hash != cfg.hash


def _plan(tmp_path, *argv):
    args = build_parser().parse_args([*argv, "--out", str(tmp_path), "--dry-run"])
    return plan_runs(args)


def test_dry_run_accepts_published(tmp_path):
    from tests.harness.test_cli import run_all

    r = run_all("--suite", "lra", "--tasks", "listops", "pathfinder", "--methods", "dense", "spion_cf",
                "--scale", "published", "--out", str(tmp_path), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "4 runs at scale published" in r.stdout and r.stdout.count("[todo]") == 4
    assert "lra_listops__spion_cf__published__s0__" in r.stdout
    plan = _plan(tmp_path, "--suite", "lra", "--tasks", "image", "--methods", "dense", "--scale", "published")
    assert plan.runs[0].cfg.train.batch_size == 256 and plan.runs[0].cfg.train.steps == 35000


def test_tasks_without_the_scale_fail_in_one_line(tmp_path):
    from tests.harness.test_cli import run_all

    r = run_all("--tasks", "wikitext2", "--scale", "published", "--out", str(tmp_path), "--dry-run")
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "wikitext2: no 'published' scale (its scales: tiny, small, paper); 'published' is LRA only" in r.stderr
    # a suite's tasks without it are skipped with that reason; the LRA ones still run
    plan = _plan(tmp_path, "--suite", "all", "--methods", "dense", "--scale", "published")
    assert {r.task for r in plan.runs} <= {f"lra_{k}" for k in TASKS} and plan.runs
    assert any(what == "wikitext2" and "no 'published' scale" in why for what, why in plan.skipped)
    with pytest.raises(BenchError, match="no 'published' scale"):
        build_run_config("wikitext2", parse_method_spec("dense"), "published", 0, "cpu", [])
