"""Command line of ``run_all.py``: plan the run matrix, run it (resumably), print a comparison, render reports.

Examples
  python run_all.py                                             # quick tour: ListOps + Pathfinder, 4 methods, tiny
  python run_all.py --suite lra                                 # the LRA suite (tiny on CPU, small on a GPU)
  python run_all.py --suite lra --tasks listops                 # one task
  python run_all.py --suite lra --methods dense:backend=flash flex --seeds 0 1 2 --scale small
  python run_all.py --suite lra --dry-run                       # print the run matrix only
  python run_all.py --suite lra --resume                        # skip runs whose record exists and matches
  python run_all.py --suite lra --launcher submitit --slurm-partition gpu --slurm-time 240   # one SLURM job per run
  python run_all.py --suite lra --launcher submitit             # one local job per GPU of this box
  python run_all.py --report --out runs                         # tables and figures of your runs -> runs/reports/
  python run_all.py --suite lra --out results                   # publish: records into the committed results/
  python run_all.py --report                                    # re-render the committed reports/ from results/
  python run_all.py --suite lra train.lr=3e-4 model.n_layers=4  # overrides: section.field=value
  python run_all.py --suite lra --tasks text --methods spion_cf local:density=0.026   # fixed pattern at SPION's density
  python run_all.py --suite kernels sweep.lengths=4096 sweep.head_dims=64           # kernel sweep (GPU), one shape
  python run_all.py --suite kernels sweep.lengths= sweep.record_layouts=results/lra/<spion run>.json
                                                   # SPION's learned layouts vs equal-density patterns
  python run_all.py --suite kernels --tasks moe_ffn_sweep sweep.tokens=4096,32768   # MoE FFN (DSTI) vs dense FFN

Where things go
  Records go to --out (default runs/, which git ignores); the committed results/ and reports/ change only when you
  name them (--out results; --report, or --reports-dir). A sweep ends with a comparison table of its runs and the
  command that renders their tables and figures; with --reports-dir it renders the suites it ran there.

Records and concurrent sweeps
  A sweep checks --out (and --reports-dir) is a writable directory and every run's config before any work.
  Each run takes a lock on its record (<out>/.locks/), so two sweeps into one --out share the work: a run locked by
  another live sweep is skipped ("running in another sweep"), one it finished meanwhile is not redone. A file at a
  run's name that is not that run's record (unreadable, another schema_version, or a task/method/scale/seed/config
  hash other than its name says) is moved aside to <out>/.aside/ with a one-line note, never overwritten; so is
  the previous record when a run is redone without --resume.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.errors import BenchError, DataUnavailable

DEFAULT_METHODS = ("dense", "flex")
DEFAULT_OUT = Path("runs")  # a user's own runs: git-ignored
PUBLISHED_OUT, PUBLISHED_REPORTS = Path("results"), Path("reports")  # the committed records and their reports
# ``python run_all.py`` with no --suite/--tasks: a few runs that show what the suite is for, in minutes on a CPU
TOUR = {"suite": "lra", "tasks": ["listops", "pathfinder"], "methods": ["dense", "local", "spion_cf"]}
TOUR_OVERRIDES = {"lra_listops": ["train.steps=120", "train.eval_every=60"]}  # tiny ListOps is 300 steps


@dataclass(frozen=True)
class MethodSpec:
    name: str
    overrides: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return self.name + (":" + ",".join(self.overrides) if self.overrides else "")


def parse_method_spec(text: str) -> MethodSpec:
    """``dense:backend=flash,foo=1`` -> MethodSpec("dense", ("backend=flash", "foo=1"))."""
    name, _, rest = text.partition(":")
    return MethodSpec(name, tuple(p for p in rest.split(",") if p))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run_all.py",
        description="sparsebench: train and measure sparse-attention methods against the strongest dense "
        "baselines, write one JSON record per run under --out, and render tables and figures into reports/.",
        epilog=__doc__.split("Examples", 1)[1].join(["Examples", ""]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--suite", help="task family: lra, lm, glue, mt, summarization, kernels, all (without --suite "
                   "and --tasks: the quick tour, ListOps and Pathfinder with three methods)")
    p.add_argument("--tasks", nargs="+", help="task names (short names like 'listops' resolve within --suite)")
    p.add_argument("--methods", nargs="+", help="method names, optionally with config overrides: "
                   "'dense:backend=flash'. Default: dense and flex plus every sparse method made for the suite")
    p.add_argument("--scale", choices=["auto", "tiny", "small", "paper", "published"], default="auto",
                   help="budget preset; auto = small on a GPU, tiny on CPU; paper = the method paper's setup (LRA: "
                   "SPION's table); published = LRA only, the PyTorch re-runs' lineage (Nystromformer config) that "
                   "reaches the published accuracy")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds to run (default: 0)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    p.add_argument("--data-dir", type=Path, help="offline data root holding e.g. lra_listops/, wikitext2/, glue/")
    p.add_argument("--out", type=Path, help=f"where records go (default: {DEFAULT_OUT}/, git-ignored; with --report: "
                   f"{PUBLISHED_OUT}/); '--out {PUBLISHED_OUT}' publishes into the committed records. Several sweeps may "
                   "share one --out (see below)")
    p.add_argument("--reports-dir", type=Path, help=f"where reports go. A sweep renders the suites it ran only when "
                   f"this is given; --report defaults to {PUBLISHED_REPORTS}/ for --out {PUBLISHED_OUT}, else <out>/reports/")
    p.add_argument("--artifacts", type=Path, metavar="DIR", help="cache of stage outputs, e.g. a dense checkpoint "
                   "shared by methods; delete to retrain (sets $SPARSEBENCH_ARTIFACTS; default "
                   "~/.cache/sparsebench/artifacts)")
    p.add_argument("--resume", action="store_true", help="skip runs whose record already exists, is valid and is "
                   "the run its file name says (task, method, scale, seed, config hash); without it a finished run "
                   "is redone and its old record moved aside")
    p.add_argument("--dry-run", action="store_true", help="print the runs this command would do (the same plan, "
                   "skips included) and exit")
    p.add_argument("--report", action="store_true", help="only render reports from the records in --out (an error "
                   "if it holds none); run nothing. With --suite: that suite's report only")
    p.add_argument("--no-report", action="store_true", help="do not render reports after the sweep, even with "
                   "--reports-dir")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (they are off when not a TTY)")
    g = p.add_argument_group(
        "launching a sweep over many GPUs or nodes",
        "--launcher submitit makes every planned (task, method, seed) run one submitit job (pip install submitit,\n"
        "or pip install -e '.[launch]'). On a SLURM cluster each job is a SLURM job (--slurm-partition,\n"
        "--slurm-time, --gpus-per-job); elsewhere jobs are local processes, one per visible GPU (or group of\n"
        "--gpus-per-job GPUs), or --max-parallel at a time without a GPU. A job runs exactly what the local sweep\n"
        "runs for that run: same records, locks, --resume and --artifacts cache, so jobs and sweeps may share one\n"
        "--out. Job logs: <out>/.submitit/. A failed job prints its log path, the others go on, the exit code is 1.")
    g.add_argument("--launcher", choices=["local", "submitit"], default="local",
                   help="local (default): the runs one after another in this process; submitit: one job per run")
    g.add_argument("--slurm-partition", metavar="NAME", help="SLURM partition for the jobs (default: the cluster's)")
    g.add_argument("--slurm-time", type=int, default=720, metavar="MIN",
                   help="time limit of one job in minutes, on SLURM and for local jobs (default: 720)")
    g.add_argument("--gpus-per-job", type=int, default=1, metavar="N", help="GPUs per job (default: 1)")
    g.add_argument("--max-parallel", type=int, default=1, metavar="N",
                   help="without SLURM and without a GPU: how many local jobs run at once (default: 1)")
    g.add_argument("--submitit-executor", choices=["auto", "slurm", "local", "debug"], default="auto",
                   help=argparse.SUPPRESS)  # testing: debug runs the jobs in this process, local forces processes
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides: train.lr=3e-4, model.n_layers=4, data.n_train=1000, method.x=... "
                   "('method.' applies to every method that has the field)")
    return p


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BenchError(f"--device {name}: CUDA is not available here; use --device cpu (or auto)")
    try:
        return torch.device(name)
    except RuntimeError:
        raise BenchError(f"--device {name!r} is not a torch device; use auto, cpu or cuda[:N]") from None


def resolve_tasks(suite: str | None, tasks: list[str] | None) -> tuple[list[str], bool]:
    """(task names, explicit?) — explicit tasks fail on missing data, suite tasks are skipped with a reason."""
    from bench import registry

    registry.load_all()
    if tasks:
        out = []
        for t in tasks:
            if t not in registry.TASKS and suite:  # short name: the suite's task whose name ends in _<t>
                hits = [n for n in (registry.suite_tasks(suite) if suite != "all" else registry.TASKS)
                        if n == f"{suite}_{t}" or n.endswith(f"_{t}")]
                t = hits[0] if len(hits) == 1 else t
            registry.get_task(t)
            if suite and suite != "all" and t not in registry.suite_tasks(suite):
                raise BenchError(f"task {t!r} is not in suite {suite!r}; its tasks: {', '.join(registry.suite_tasks(suite))}")
            out.append(t)
        return out, True
    if not suite:
        raise BenchError("nothing to run: give --suite (e.g. --suite lra) and/or --tasks, or --report")
    return registry.suite_tasks(suite), False


def default_methods(suite: str | None) -> list[MethodSpec]:
    from bench import registry

    registry.load_all()
    names = list(DEFAULT_METHODS)
    for name, cls in sorted(registry.METHODS.items()):
        if suite and suite in getattr(cls, "suites", ()) and name not in names:
            names.append(name)
    return [MethodSpec(n) for n in names]


def build_run_config(task_name: str, spec: MethodSpec, scale: str, seed: int, device, overrides: list[str]):
    from bench import registry
    from bench.config import RunConfig, apply_overrides
    from bench.method import MethodContext

    task_cls = registry.get_task(task_name)
    method_cls = registry.get_method(spec.name)
    problem = scale_problem(task_cls, task_name, scale)
    if problem:
        raise BenchError(problem)
    model_cfg, data_cfg, train_cfg, notes = task_cls.presets(scale)
    ctx = MethodContext(task=task_name, suite=getattr(task_cls, "suite", None), scale=scale, model=model_cfg,
                        data=data_cfg)
    method_cfg = method_cls.default_config(ctx)
    cfg = RunConfig(task=task_name, method=spec.name, scale=scale, seed=seed, model=model_cfg, data=data_cfg,
                    train=train_cfg, method_cfg=method_cfg, device=str(device), notes=tuple(notes))
    mine = []
    for o in overrides:
        key = o.split("=", 1)[0]
        head = key.split(".", 1)[0]
        if head == "sweep":  # kernel-sweep grid only
            continue
        if head in registry.TASKS:  # e.g. lra_listops.train.steps=120 only for that task
            if head == task_name:
                o = o.split(".", 1)[1]
                key, head = o.split("=", 1)[0], o.split(".", 1)[0]
            else:
                continue
        if head in registry.METHODS:  # e.g. spion_cf.quantile=0.97 only for that method
            if head == spec.name:
                mine.append("method." + o.split(".", 1)[1])
            continue
        if head == "method":
            field = key.split(".", 1)[1] if "." in key else ""
            names = {f.name for f in dataclasses.fields(method_cfg)} if dataclasses.is_dataclass(method_cfg) else set()
            if field not in names:
                continue  # checked across all methods in check_overrides
        mine.append(o)
    mine += [f"method.{o}" for o in spec.overrides]
    return apply_overrides(cfg, mine)


def checked_run_config(task_name: str, spec: MethodSpec, scale: str, seed: int, device, overrides: list[str]):
    """``build_run_config`` plus every check a run's settings get before any work: the config sections' own
    checks (``bench.config.validate_run_config``, run by ``apply_overrides``) and the shared kernel's checks of the
    method's block size. Anything wrong is a one-line ``BenchError`` naming the option."""
    try:
        cfg = build_run_config(task_name, spec, scale, seed, device, overrides)
    except BenchError as e:
        msg = _one_line(e)
        for o in spec.overrides:  # 'local:window_blocks=-1' reached the config as method.window_blocks
            key = o.split("=", 1)[0]
            msg = msg.replace(f"method.{key}", f"{spec.name}:{key}")
        raise BenchError(msg) from None
    except (ValueError, TypeError, AssertionError) as e:  # e.g. a config's __post_init__ check
        where = " ".join([spec.label, *overrides]).strip()
        raise BenchError(f"invalid settings for {task_name} ({where}): {_one_line(e) or type(e).__name__}") from None
    check_method_kernel_args(cfg, spec)
    return cfg


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


_KERNEL_CHECKED: dict[object, str | None] = {}


def check_method_kernel_args(cfg, spec: MethodSpec) -> None:
    """A method config with a ``block_size`` runs on the shared block-sparse kernel: let the kernel's own argument
    check (``kernels.block_sparse_attention``) judge that block size now, on a one-block CPU input, instead of at
    the first training step."""
    bs = getattr(cfg.method_cfg, "block_size", None)
    if bs is None:
        return
    key = (spec.name, type(bs), bs)
    if key not in _KERNEL_CHECKED:
        _KERNEL_CHECKED[key] = _kernel_block_size_problem(bs)
    if _KERNEL_CHECKED[key]:
        raise BenchError(f"invalid value for {spec.name}:block_size={bs!r} (the block-sparse kernel's check): "
                         f"{_KERNEL_CHECKED[key]}")


def _kernel_block_size_problem(bs) -> str | None:
    try:
        import torch

        from kernels.block_sparse_attention import block_sparse_attention
    except ImportError:  # pragma: no cover
        return None
    L = bs if isinstance(bs, int) and not isinstance(bs, bool) and 0 < bs <= 1024 else 16
    q = torch.zeros(1, 1, L, 16)
    nb = max(1, -(-L // bs)) if isinstance(bs, int) and not isinstance(bs, bool) and bs > 0 else 1
    try:
        block_sparse_attention(q, q, q, torch.ones(1, nb, nb, dtype=torch.bool), block_size=bs, backend="torch")
    except (ValueError, TypeError, ZeroDivisionError) as e:
        return _one_line(e) or type(e).__name__
    return None


def check_overrides(overrides: list[str], methods: list[MethodSpec]) -> None:
    """A 'method.x' override must fit at least one selected method."""
    from bench import registry

    for o in overrides:
        key = o.split("=", 1)[0]
        if key.startswith("method."):
            field = key.split(".", 1)[1]
            if not any(field in {f.name for f in dataclasses.fields(registry.get_method(m.name).Config)} for m in methods):
                raise BenchError(f"invalid override key {key!r}: none of the selected methods "
                                 f"({', '.join(m.name for m in methods)}) has a config field {field!r}")


def sweep_overrides(task_cls, task_name: str, overrides) -> list[str]:
    """The ``sweep.<field>=value`` overrides one measurement task (kernel sweep) takes: those named for it
    (``<task>.sweep.<field>=``, passed on as ``sweep.<field>=``) and the generic ``sweep.<field>=`` ones whose field
    its grid has (the task's ``SWEEP_CONFIG`` dataclass; a task without one takes every generic one). The tasks of
    ``--suite kernels`` sweep different grids: ``sweep.lengths=`` reaches the block-sparse sweep, not the MoE one."""
    grid = getattr(task_cls, "SWEEP_CONFIG", None)
    names = {f.name for f in dataclasses.fields(grid)} if grid is not None else None
    out = []
    for o in overrides:
        key = o.split("=", 1)[0].strip()
        if key.startswith(f"{task_name}.sweep."):
            out.append(o.split(".", 1)[1])
        elif key.startswith("sweep.") and (names is None or key.split(".")[1] in names):
            out.append(o)
    return out


def check_sweep_overrides(overrides: list[str], tasks: list[str]) -> None:
    """A generic ``sweep.<field>=`` override must reach at least one selected measurement task (else a typo or a
    field of an unselected sweep would be silently ignored)."""
    from bench import registry

    sweeps = [t for t in tasks if getattr(registry.get_task(t), "KIND", "run") != "run"]
    if not sweeps:  # training runs ignore sweep.* overrides (build_run_config)
        return
    for o in overrides:
        key = o.split("=", 1)[0].strip()
        if not key.startswith("sweep."):
            continue
        if not any(o in sweep_overrides(registry.get_task(t), t, [o]) for t in sweeps):
            grids = {t: getattr(registry.get_task(t), "SWEEP_CONFIG", None) for t in sweeps}
            have = "; ".join(f"{t}: {', '.join(sorted(f.name for f in dataclasses.fields(g)))}"
                             for t, g in grids.items() if g is not None)
            raise BenchError(f"invalid override key {key!r}: none of the selected sweeps has a field "
                             f"{key.split('.')[1]!r} ({have})")


def _split_overrides(args) -> None:
    """``--tasks a b key=v`` would swallow trailing overrides into the list; move them back."""
    for attr, is_override in (("tasks", lambda x: "=" in x), ("methods", lambda x: "=" in x and ":" not in x)):
        items = getattr(args, attr) or []
        keep = [x for x in items if not is_override(x)]
        args.overrides = [x for x in items if is_override(x)] + list(args.overrides)
        setattr(args, attr, keep or None)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _split_overrides(args)
    if not _rank0():  # a torchrun rank > 0: no plan, progress, summary (errors still go to stderr)
        import os

        sys.stdout = open(os.devnull, "w")
    try:
        return _main(args)
    except BenchError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: finished runs are saved; rerun the same command with --resume to complete the rest",
              file=sys.stderr)
        return 130


def _other_hardware_note(path: Path, device) -> str:
    """Record file names do not include the GPU: say so when --resume keeps a record made on other hardware."""
    import json

    import torch

    here = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    there = (json.loads(path.read_text()).get("env") or {}).get("gpu")
    if here == there:
        return ""
    return (f"; NOTE: it was measured on {there or 'CPU'}, this machine is {here or 'CPU'}: rerun without --resume "
            f"to replace it, or use another --out")


def _is_published(path: Path, published: Path) -> bool:
    try:
        return Path(path).resolve() == published.resolve()
    except OSError:
        return False


def _report_dirs(args) -> tuple[Path, Path]:
    """``--report``: (records, reports). Without --out: the committed results/ -> reports/; any other --out renders
    into <out>/reports/ unless --reports-dir says otherwise (a user's runs never land in the committed reports/)."""
    out = args.out if args.out is not None else PUBLISHED_OUT
    if args.reports_dir is not None:
        return out, args.reports_dir
    return out, PUBLISHED_REPORTS if _is_published(out, PUBLISHED_OUT) else out / "reports"


def _main(args) -> int:
    if args.artifacts is not None:
        _set_artifacts_dir(args.artifacts)
    if args.report:
        out, reports = _report_dirs(args)
        _check_has_records(out)
        _check_writable_dir(reports, "--reports-dir")
        suites = None
        if args.suite and args.suite != "all":
            from bench import registry

            registry.load_all()
            registry.suite_tasks(args.suite)  # unknown suite: one line
            suites = {args.suite}
        return render(out, reports, suites)
    if args.out is None:
        args.out = DEFAULT_OUT
    if args.reports_dir is not None and not args.no_report:
        _check_writable_dir(args.reports_dir, "--reports-dir")
    plan = plan_runs(args)
    for line in plan.messages:
        print(line)
    if args.dry_run:
        print(f"{len(plan.runs)} runs at scale {plan.scale} on {plan.device}:")
        for r in plan.runs:
            state, why = r.state()
            note = f"  (the file there is {state}: {why}; it would be moved aside)" if why else ""
            print(f"  [{'done' if state == 'done' else 'todo'}] {r.task:<22} {r.method.label:<28} seed {r.seed}  "
                  f"-> {r.path}{note}")
        return 0
    return _sweep(args, plan)


def _set_artifacts_dir(path: Path) -> None:
    import os

    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise BenchError(f"--artifacts {path} is an existing file, not a directory; pass a directory")
    os.environ["SPARSEBENCH_ARTIFACTS"] = str(path.resolve())


@dataclass
class PlannedRun:
    task: str
    method: MethodSpec
    seed: int
    cfg: object  # RunConfig, or None for a measurement-only task (kernel sweep)
    path: Path
    expected: dict

    def state(self) -> tuple[str, str]:
        from bench.records import record_state

        return record_state(self.path, self.expected)


@dataclass
class Plan:
    scale: str
    device: object
    explicit: bool  # tasks named on the command line (missing data stops the run instead of skipping the task)
    runs: list
    skipped: list  # (task or "method <name>", reason)
    messages: list  # lines to print before running (skips, the tour's note)
    tour: bool = False

    @property
    def suites(self) -> set[str]:
        return {r.path.parent.name for r in self.runs}


def plan_runs(args) -> Plan:
    """The runs a command will do, in order, with everything skipped and why: one function for ``--dry-run`` and
    the sweep, so the dry run lists exactly what the sweep runs. Every run's settings are checked here (one-line
    ``BenchError``), before any work."""
    from bench import registry
    from bench.records import record_filename

    messages: list[str] = []
    tour = not args.suite and not args.tasks
    if tour:
        args.suite, args.tasks = TOUR["suite"], list(TOUR["tasks"])
        args.methods = args.methods or list(TOUR["methods"])
        args.overrides = [f"{t}.{o}" for t, os_ in TOUR_OVERRIDES.items() for o in os_] + list(args.overrides)
    if args.data_dir is not None and not args.data_dir.is_dir():
        raise BenchError(f"--data-dir {args.data_dir} does not exist or is not a directory")
    device = resolve_device(args.device)
    scale = args.scale if args.scale != "auto" else ("small" if device.type == "cuda" else "tiny")
    tasks, explicit = resolve_tasks(args.suite, args.tasks)
    if tour:
        messages.append(f"quick tour ({scale} scale): {', '.join(tasks)} x {', '.join(args.methods)}, seed "
                        f"{' '.join(map(str, args.seeds))}. The full LRA suite: python run_all.py --suite lra "
                        "(every suite: --suite all; options: --help)")
    # without --methods each task gets the dense baselines plus the methods made for its own suite
    # (kernel sweeps and other non-training tasks take no methods, so they add none)
    suites_used = sorted({registry.get_task(t).suite or "" for t in tasks
                          if getattr(registry.get_task(t), "KIND", "run") == "run"})
    methods = [parse_method_spec(m) for m in args.methods] if args.methods else list(dict.fromkeys(
        m for s in suites_used for m in default_methods(s)))
    for m in methods:
        registry.get_method(m.name)
    check_overrides(args.overrides, methods)
    skipped = []
    unusable = {m.name: registry.get_method(m.name).unavailable_reason(device) for m in methods}
    for name, reason in unusable.items():
        if reason:
            if args.methods and not tour:  # named on the command line: stop, in dry runs too
                raise BenchError(f"method {name}: {reason}")
            skipped.append((f"method {name}", reason))
    methods = [m for m in methods if not unusable.get(m.name)]

    check_sweep_overrides(args.overrides, tasks)
    runs = []
    for t in tasks:
        task_cls = registry.get_task(t)
        reason = scale_problem(task_cls, t, scale)
        if reason:
            if explicit and not tour:
                raise BenchError(reason)
            skipped.append((t, reason.split(": ", 1)[1]))
            continue
        if getattr(task_cls, "KIND", "run") == "run":
            reason = task_cls.data_available(args.data_dir, scale)
            if reason:
                if explicit and not tour:
                    raise BenchError(f"{t}: {reason}")
                skipped.append((t, reason))
                continue
        if getattr(task_cls, "KIND", "run") != "run":
            task_methods = [MethodSpec(t)]
        elif args.methods:
            task_methods = methods
        else:
            task_methods = [m for m in default_methods(task_cls.suite) if m in methods]
        task_plan, problem = [], None
        for m in task_methods:
            for seed in args.seeds:
                cfg = checked_run_config(t, m, scale, seed, device, args.overrides) if m.name != t else None
                suite = task_cls.suite or "misc"
                if cfg is not None:
                    check_method_device(cfg, m, device)
                    problem = problem or getattr(task_cls, "data_dir_problem", lambda d, c: None)(args.data_dir, cfg)
                    path = args.out / suite / record_filename(t, m.name, scale, seed, cfg.hash)
                    expected = {"task": t, "method": m.name, "scale": scale, "seed": seed, "config_hash": cfg.hash}
                else:  # kernel sweep: name by the grid it measures
                    import hashlib

                    grid = hashlib.sha256(repr(sorted(sweep_overrides(task_cls, t, args.overrides))).encode())
                    path = args.out / suite / f"{t}__{scale}__s{seed}__{grid.hexdigest()[:10]}.json"
                    expected = {"task": t, "scale": scale, "seed": seed}
                task_plan.append(PlannedRun(t, m, seed, cfg, path, expected))
        if problem:  # --data-dir has the task's folder but nothing usable in it: never fall back silently
            if explicit:
                raise BenchError(f"{t}: {problem}")
            skipped.append((t, problem))
            continue
        runs += task_plan
    messages += [f"skip {what}: {reason}" for what, reason in skipped]
    if not runs:
        why = "; ".join(f"{what}: {reason}" for what, reason in skipped) or "no task or method selected"
        raise BenchError(f"nothing to run: every selected run was skipped ({why})")
    return Plan(scale, device, explicit, runs, skipped, messages, tour)


def scale_problem(task_cls, name: str, scale: str) -> str | None:
    """``"<task>: <why>"`` if the task has no preset of ``scale`` (``Task.SCALES``), else None."""
    from bench.config import SCALE_HELP

    have = tuple(getattr(task_cls, "SCALES", ("tiny", "small", "paper")))
    if scale in have:
        return None
    return (f"{name}: no '{scale}' scale (its scales: {', '.join(have)}); '{scale}' is "
            f"{SCALE_HELP.get(scale, 'not a scale of this task')}")


_DEVICE_CHECKED: dict[tuple, str | None] = {}


def check_method_device(cfg, spec: MethodSpec, device) -> None:
    """A method option that cannot run on this device (e.g. ``dense:backend=cudnn`` or ``flash`` on a CPU) is a
    one-line error now, not a traceback at the first training step: the method's ``unavailable_reason`` hook judges
    the method; its attention core, built from this config, is tried once on a one-block input on ``device`` (a CPU
    only: a GPU run has its own checks) and a failure that names a backend or CUDA stops the run."""
    if getattr(device, "type", "cpu") == "cuda" or not spec.overrides:
        return
    key = (spec.label, str(device), repr(cfg.method_cfg))
    if key not in _DEVICE_CHECKED:
        _DEVICE_CHECKED[key] = _attention_device_problem(cfg, spec, device)
    if _DEVICE_CHECKED[key]:
        raise BenchError(f"method {spec.label} cannot run on {device}: {_DEVICE_CHECKED[key]}")


def _attention_device_problem(cfg, spec: MethodSpec, device) -> str | None:
    import torch

    from bench import registry
    from bench.method import AttentionSpec

    import logging
    import warnings

    quiet = logging.getLogger("torch")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # torch logs why each SDPA kernel was not used; the one line below says it all
    try:
        method = registry.get_method(spec.name)(cfg.method_cfg, None)
        n_heads = getattr(cfg.model, "n_heads", 1) or 1
        core = method.make_attention(AttentionSpec(layer=0, n_heads=n_heads, head_dim=16, max_len=64))
        q = torch.randn(2, n_heads, 64, 16, device=device, requires_grad=True)
        mask = torch.ones(2, 64, dtype=torch.bool, device=device)
        mask[1, 40:] = False  # padded like a real batch (some backends take another path with padding)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            core(q, q, q, mask).sum().backward()
    except RuntimeError as e:
        msg = _one_line(e)
        if "backend" in msg.lower() or "cuda" in msg.lower():
            first = msg.split(". ")[0][:160]
            return f"the attention backend it selects needs CUDA ({first}); run it on a GPU, or leave the option out"
    except Exception:  # noqa: BLE001 - the probe only looks for device problems; anything else the run reports
        return None
    finally:
        quiet.setLevel(level)
    return None


def _check_writable_dir(path: Path, flag: str) -> None:
    """``path`` is (or can be made) a directory this process can create files in; else a one-line BenchError."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise BenchError(f"{flag} {path} is an existing file, not a directory; pass a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path, prefix=".write-check."):
            pass
    except OSError as e:
        raise BenchError(f"{flag} {path} is not writable ({e.strerror or type(e).__name__}); pass another "
                         "directory or fix its permissions") from None


def _check_has_records(out: Path) -> None:
    from bench.records import has_records

    if not Path(out).is_dir():
        raise BenchError(f"--out {out} does not exist: nothing to report (a typo? published records are under "
                         f"{PUBLISHED_OUT}/, your runs under {DEFAULT_OUT}/)")
    if not has_records(out):
        raise BenchError(f"--out {out} holds no readable records: nothing to report")


def _busy_note() -> str | None:
    """One line when other processes keep the CPUs busy (CPU step times then grow and scatter)."""
    import os

    from bench.env import usable_cores

    try:
        load = os.getloadavg()[0]
        cores = usable_cores()
    except OSError:
        return None
    if load > 0.75 * cores:
        return (f"note: the CPUs are busy (load {load:.1f} on {cores} core(s)): runs take longer and their step "
                "times are not comparable")
    return None


def _fmt_s(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def _sweep(args, plan: Plan) -> int:
    from bench import locks

    device, scale, explicit = plan.device, plan.scale, plan.explicit
    # everything that could fail without training is checked first
    _check_writable_dir(args.out, "--out")
    for parent in sorted({r.path.parent for r in plan.runs}):
        _check_writable_dir(parent, "--out")
    try:
        locks.ensure_lock_dir(args.out)
    except OSError as e:
        raise BenchError(f"--out {args.out}: cannot create its lock folder ({e.strerror or e})") from None
    locks.remove_dead_tmp(args.out)  # debris of writes killed mid-way (files of live writers stay)
    # what each planned name held when this sweep started: a record that appears or changes later was written by
    # another sweep sharing --out, and is not redone
    at_start = {r.path: _stat(r.path) for r in plan.runs}
    tty = sys.stderr.isatty()
    progress = not args.no_progress and tty and _rank0()
    if device.type == "cpu":
        busy = _busy_note()
        if busy:
            print(busy)
    settings = SweepSettings(args.out, args.resume, device, args.data_dir, scale, progress, tuple(args.overrides),
                             stop_on_missing_data=explicit and not plan.tour)
    if args.launcher == "submitit":
        from bench.launch import submitit_sweep

        done_paths, elsewhere, data_failed, failed = submitit_sweep(args, plan, settings, at_start)
    else:
        done_paths, elsewhere, data_failed = _local_sweep(plan, settings, at_start, tty)
        failed = 0
    if failed:
        print(f"{failed} of {len(plan.runs)} jobs failed (each one's log path is in its line above)", file=sys.stderr)
        if not done_paths:
            return 1
    if not done_paths and not elsewhere:
        why = "; ".join(f"{t}: data not available" for t in sorted(data_failed)) or "see the lines above"
        raise BenchError(f"nothing ran: no run of this sweep produced a record ({why})")
    if _rank0():
        _closing_summary(args, plan, done_paths, device)
    return 1 if failed else 0


def _rank0() -> bool:
    from bench import distributed as distmod

    return distmod.is_main()


@dataclass(frozen=True)
class SweepSettings:
    """What every run of a sweep shares (picklable: a submitit job gets it with its ``PlannedRun``)."""
    out: Path
    resume: bool
    device: object
    data_dir: Path | None
    scale: str
    progress: bool
    overrides: tuple
    stop_on_missing_data: bool  # tasks named on the command line: missing data stops the sweep (raises)


@dataclass
class RunOutcome:
    """What ``execute_run`` did: ``status`` is ran (record written), done (a finished record kept), elsewhere
    (locked by another live sweep) or data (the task's data is not available); ``line`` is its one-line result and
    ``notes`` the lines it printed before (a record moved aside)."""
    status: str
    path: Path
    line: str
    seconds: float | None = None
    notes: list = dataclasses.field(default_factory=list)


def execute_run(r: PlannedRun, s: SweepSettings, tag: str, at_start, announce: str | None = None) -> RunOutcome:
    """One planned run, exactly as a sweep does it: skipped if --resume finds its record done; else its record's
    lock is taken (a run locked by another live sweep is skipped), a record another sweep finished meanwhile is kept
    (``at_start`` is the record file's ``_stat`` when the sweep began), a file that is not this run's record is moved
    aside, the run is trained and its record written atomically. The local loop and every submitit job call this."""
    from bench import locks
    from bench.records import move_aside, record_state, write_record_keeping

    path, notes = r.path, []
    if not _rank0():  # a torchrun rank > 0 trains its share of the run; rank 0 takes the lock and writes the record
        if s.resume and record_state(path, r.expected)[0] == "done":
            return RunOutcome("done", path, "")
        run_one(r.task, r.method, r.seed, r.cfg, s.device, s.data_dir, s.scale, s.progress, list(s.overrides))
        return RunOutcome("ran", path, "")
    if s.resume and record_state(path, r.expected)[0] == "done":
        return RunOutcome("done", path, f"{tag}: done already ({path})" + _other_hardware_note(path, s.device))
    lock = locks.RecordLock(s.out, path)
    if not lock.acquire():
        return RunOutcome("elsewhere", path, f"{tag}: running in another sweep, skipped ({path})")
    try:
        locks.remove_record_tmp(path)  # ours now: a temporary file of it with no live writer is debris
        state, why = record_state(path, r.expected)
        if state == "done" and (s.resume or _stat(path) != at_start):
            return RunOutcome("done", path, f"{tag}: done by another sweep ({path})")
        if state in ("unreadable", "mismatch"):
            dest = move_aside(path, s.out, state)
            notes.append(f"{tag}: {path} is not this run's record ({why}); moved it aside to {dest}")
            print(notes[-1])
        if announce:
            print(announce, flush=True)
        t0 = time.perf_counter()
        try:
            record = run_one(r.task, r.method, r.seed, r.cfg, s.device, s.data_dir, s.scale, s.progress,
                             list(s.overrides))
        except DataUnavailable as e:
            if s.stop_on_missing_data:
                raise
            return RunOutcome("data", path, f"skip {r.task}: {_one_line(e)}", notes=notes)
        old = write_record_keeping(record, path, s.out)  # redone without --resume: the old one is kept
        kept = f"; the previous record is kept as {old}" if old else ""
    finally:
        lock.release()
    seconds = time.perf_counter() - t0
    main_metric = record.budget.get("main_metric")
    val = record.metrics.get(main_metric)
    shown = f"{main_metric}={val:.4g}" if isinstance(val, float) else "ok"
    return RunOutcome("ran", path, f"{tag}: {shown} ({seconds:.1f} s) -> {path}{kept}", seconds, notes)


def _local_sweep(plan: Plan, s: SweepSettings, at_start: dict, tty: bool) -> tuple[list[Path], int, set]:
    """``--launcher local``: the planned runs one after another in this process."""
    from tqdm.auto import tqdm

    data_failed = set()
    done_paths: list[Path] = []  # records of this sweep's runs (new or kept), for the closing comparison
    durations: list[float] = []
    elsewhere = 0  # runs another live sweep holds
    sweep = tqdm(plan.runs, desc="sweep", unit="run", disable=not s.progress)
    n = len(plan.runs)
    for i, r in enumerate(sweep, 1):
        tag = f"[{i}/{n}] {r.task} {r.method.label} seed {r.seed}"
        if r.task in data_failed:
            continue
        announce = None
        if not tty:  # no progress bar: say what runs now and when the sweep should end
            left = n - i + 1
            eta = f"; about {_fmt_s(left * sum(durations) / len(durations))} left" if durations else ""
            announce = f"{tag}: running{eta}"
        o = execute_run(r, s, tag, at_start[r.path], announce)
        if o.status == "data":
            data_failed.add(r.task)  # a suite goes on without the task, saying why in one line
        elif o.status == "elsewhere":
            elsewhere += 1
        else:
            done_paths.append(o.path)
        if o.seconds is not None:
            durations.append(o.seconds)
        print(o.line, flush=True)
    return done_paths, elsewhere, data_failed


def _closing_summary(args, plan: Plan, paths: list[Path], device) -> None:
    """The comparison of this sweep's runs, then where their reports are or how to render them."""
    from bench.records import read_record
    from bench.report import summary_table

    recs = []
    for p in dict.fromkeys(paths):
        try:
            rec = read_record(p)
        except (BenchError, OSError):
            continue
        rec["_path"] = str(p)
        recs.append(rec)
    text = summary_table(recs)
    if text:
        print("\n" + text)
    if device.type == "cpu":
        print("CPU timings show how the suite measures, they are not performance numbers: the comparisons that count "
              "run on a GPU (--scale small or paper).")
    if plan.tour:
        print("Next: the full LRA suite, python run_all.py --suite lra (every suite: --suite all); see --help.")
    suites = sorted(plan.suites)
    if args.reports_dir is not None and not args.no_report:
        render(args.out, args.reports_dir, set(suites))
        return
    render_cmd = ["python run_all.py --report --out", str(args.out)]
    if len(suites) == 1:
        render_cmd += ["--suite", suites[0]]
    where = PUBLISHED_REPORTS if _is_published(args.out, PUBLISHED_OUT) else Path(args.out) / "reports"
    print(f"records: {args.out}/; tables and figures: {' '.join(render_cmd)}   (writes {where}/)")


def _stat(path: Path):
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


# settings that set a run's budget: an override of one of them is said in the record's budget note
_BUDGET_KEYS = ("train.steps", "train.batch_size", "train.eval_every", "train.eval_batches", "data.n_train",
                "data.n_dev", "data.n_test", "data.max_len", "model.n_layers", "model.d_model", "model.max_len")


def budget_overrides(cfg, preset) -> list[str]:
    """``key=value (preset p)`` for every budget setting (``_BUDGET_KEYS``) where ``cfg`` differs from ``preset``."""
    out = []
    a, b = cfg.to_dict(), preset.to_dict()
    sections = {"train": "train", "data": "data", "model": "model"}
    for key in _BUDGET_KEYS:
        sec, name = key.split(".")
        x, y = (a.get(sections[sec]) or {}), (b.get(sections[sec]) or {})
        if isinstance(x, dict) and isinstance(y, dict) and name in x and x.get(name) != y.get(name):
            out.append(f"{key}={x[name]} (preset {y.get(name)})")
    return out


def _note_budget_overrides(record, cfg, task_name, spec, scale) -> None:
    """The budget note is the preset's; overrides that changed the budget are added to it (and a paper- or
    published-scale run with such overrides is a reduced budget). The config hash is not touched: the note lives in
    the record only."""
    from bench.config import FULL_BUDGET_SCALES

    try:
        preset = build_run_config(task_name, spec, scale, cfg.seed, cfg.device, [])
    except BenchError:
        return
    changed = budget_overrides(cfg, preset)
    if not changed:
        return
    note = record.budget.get("note") or ""
    record.budget["note"] = "; ".join(x for x in (note, "overrides: " + ", ".join(changed)) if x)
    record.budget["overrides"] = changed
    if scale in FULL_BUDGET_SCALES:
        record.budget["reduced"] = True


def run_one(task_name, spec: MethodSpec, seed, cfg, device, data_dir, scale, progress, overrides=()):
    from bench import registry
    from bench.train import Trainer

    task_cls = registry.get_task(task_name)
    if cfg is None:  # a measurement-only task (kernel sweep)
        sweep = sweep_overrides(task_cls, task_name, overrides)
        return task_cls(scale=scale, seed=seed, device=device, progress=progress, overrides=sweep).run()
    task = task_cls(cfg, data_dir)
    method = registry.get_method(spec.name)(cfg.method_cfg, task)
    if spec.overrides:
        method.variant = ",".join(spec.overrides)
    record = Trainer(cfg, task, method, device, progress=progress).run()
    if record is None:  # a torchrun rank > 0
        return None
    _note_budget_overrides(record, cfg, task_name, spec, scale)
    folder = task_cls.data_folder(scale) if data_dir else None
    # offline data: say which copy, only if it was read (generated or downloaded data: its notes say so)
    if folder and (Path(data_dir) / folder).is_dir() and task.data_dir_used():
        from bench.records import data_fingerprint

        record.budget["data_files"] = {"folder": folder, "sha256_16": data_fingerprint(Path(data_dir) / folder)}
    return record


def render(results: Path, reports: Path, suites: set[str] | None = None) -> int:
    """Render the records under ``results`` into ``reports`` (only ``suites``' reports, plus the index, if given)."""
    from bench import registry
    from bench.report import render_reports

    registry.load_all()
    refs = {name: dict(getattr(cls, "REFERENCE", {}) or {}) for name, cls in registry.TASKS.items()}
    # without --data-dir: a task that cannot be had anywhere (e.g. LRA Retrieval's AAN) says so in its report
    suite_tasks = {suite: {t: registry.TASKS[t].data_available(None, "paper") for t in names}
                   for suite, names in registry.SUITES.items() if suite != "kernels"}
    paths = render_reports(results, reports, refs, suite_tasks, suites=suites)
    what = f" ({', '.join(sorted(suites))})" if suites else ""
    print(f"reports{what}: {len(paths)} files under {reports}/")
    return 0
