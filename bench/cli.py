"""Command line of ``run_all.py``: build the run matrix, run it (resumably), render reports.

Examples
  python run_all.py --suite lra --tasks listops                 # tiny on CPU, small on a GPU
  python run_all.py --suite lra --methods dense:backend=flash flex --seeds 0 1 2 --scale small
  python run_all.py --suite lra --dry-run                       # print the run matrix only
  python run_all.py --suite lra --resume                        # skip runs whose record exists
  python run_all.py --report                                    # render reports/ from results/ only
  python run_all.py --suite lra train.lr=3e-4 model.n_layers=4  # overrides: section.field=value
  python run_all.py --suite lra --tasks text --methods spion_cf local:density=0.026   # fixed pattern at SPION's density
  python run_all.py --suite kernels sweep.lengths=4096 sweep.head_dims=64           # kernel sweep (GPU), one shape
  python run_all.py --suite kernels sweep.lengths= sweep.record_layouts=results/lra/<spion run>.json
                                                   # SPION's learned layouts vs equal-density patterns
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.errors import BenchError, DataUnavailable

DEFAULT_METHODS = ("dense", "flex")


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
    p.add_argument("--suite", help="task family: lra, lm, glue, mt, summarization, kernels, all")
    p.add_argument("--tasks", nargs="+", help="task names (short names like 'listops' resolve within --suite)")
    p.add_argument("--methods", nargs="+", help="method names, optionally with config overrides: "
                   "'dense:backend=flash'. Default: dense and flex plus every sparse method made for the suite")
    p.add_argument("--scale", choices=["auto", "tiny", "small", "paper"], default="auto",
                   help="budget preset; auto = small on a GPU, tiny on CPU")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds to run (default: 0)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    p.add_argument("--data-dir", type=Path, help="offline data root holding e.g. lra_listops/, wikitext2/, glue/")
    p.add_argument("--out", type=Path, default=Path("results"), help="where records go (default: results/)")
    p.add_argument("--reports-dir", type=Path, default=Path("reports"), help="where reports go (default: reports/)")
    p.add_argument("--resume", action="store_true", help="skip runs whose record already exists and is valid")
    p.add_argument("--dry-run", action="store_true", help="print the run matrix and exit")
    p.add_argument("--report", action="store_true", help="only render reports from --out; run nothing")
    p.add_argument("--no-report", action="store_true", help="do not render reports after the sweep")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (they are off when not a TTY)")
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
    try:
        return _main(args)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
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


def _main(args) -> int:
    from bench import registry
    from bench.records import is_finished, record_filename, write_record

    if args.report:
        return render(args.out, args.reports_dir)
    if args.data_dir is not None and not args.data_dir.is_dir():
        raise BenchError(f"--data-dir {args.data_dir} does not exist or is not a directory")
    device = resolve_device(args.device)
    scale = args.scale if args.scale != "auto" else ("small" if device.type == "cuda" else "tiny")
    tasks, explicit = resolve_tasks(args.suite, args.tasks)
    # without --methods each task gets the dense baselines plus the methods made for its own suite
    # (kernel sweeps and other non-training tasks take no methods, so they add none)
    suites_used = sorted({registry.get_task(t).suite or "" for t in tasks
                          if getattr(registry.get_task(t), "KIND", "run") == "run"})
    methods = [parse_method_spec(m) for m in args.methods] if args.methods else list(dict.fromkeys(
        m for s in suites_used for m in default_methods(s)))
    for m in methods:
        registry.get_method(m.name)
    check_overrides(args.overrides, methods)
    unusable = {m.name: registry.get_method(m.name).unavailable_reason(device) for m in methods}
    for name, reason in unusable.items():
        if reason:
            if args.methods and not args.dry_run:
                raise BenchError(f"method {name}: {reason}")
            print(f"skip method {name}: {reason}")
    if not args.dry_run:
        methods = [m for m in methods if not unusable[m.name]]

    plan, skipped = [], []
    for t in tasks:
        task_cls = registry.get_task(t)
        if getattr(task_cls, "KIND", "run") == "run":
            reason = task_cls.data_available(args.data_dir, scale)
            if reason:
                if explicit:
                    raise BenchError(f"{t}: {reason}")
                skipped.append((t, reason))
                continue
        if getattr(task_cls, "KIND", "run") != "run":
            task_methods = [MethodSpec(t)]
        elif args.methods:
            task_methods = methods
        else:
            task_methods = [m for m in default_methods(task_cls.suite) if m in methods]
        for m in task_methods:
            for seed in args.seeds:
                cfg = build_run_config(t, m, scale, seed, device, args.overrides) if m.name != t else None
                suite = task_cls.suite or "misc"
                if cfg is not None:
                    path = args.out / suite / record_filename(t, m.name, scale, seed, cfg.hash)
                else:  # kernel sweep: name by the grid it measures
                    import hashlib

                    grid = hashlib.sha256(repr(sorted(o for o in args.overrides if o.startswith("sweep."))).encode())
                    path = args.out / suite / f"{t}__{scale}__s{seed}__{grid.hexdigest()[:10]}.json"
                plan.append((t, m, seed, cfg, path))
    for t, reason in skipped:
        print(f"skip {t}: {reason}")
    if args.dry_run:
        print(f"{len(plan)} runs at scale {scale} on {device}:")
        for t, m, seed, cfg, path in plan:
            state = "done" if is_finished(path) else "todo"
            print(f"  [{state}] {t:<22} {m.label:<28} seed {seed}  -> {path}")
        return 0
    if not plan:
        raise BenchError("no runs left: every selected task was skipped (see the reasons above)")
    for stale in args.out.rglob(".*.tmp") if args.out.is_dir() else []:
        stale.unlink()  # debris of a write killed mid-way (the target file itself is never half-written)
    progress = not args.no_progress and sys.stderr.isatty()
    from tqdm.auto import tqdm

    done, data_failed = 0, set()
    sweep = tqdm(plan, desc="sweep", unit="run", disable=not progress)
    for i, (t, m, seed, cfg, path) in enumerate(sweep, 1):
        tag = f"[{i}/{len(plan)}] {t} {m.label} seed {seed}"
        if args.resume and is_finished(path):
            print(f"{tag}: done already ({path})" + _other_hardware_note(path, device))
            continue
        if t in data_failed:
            continue
        t0 = time.perf_counter()
        try:
            record = run_one(t, m, seed, cfg, device, args.data_dir, scale, progress, args.overrides)
        except DataUnavailable as e:
            if explicit:
                raise
            data_failed.add(t)  # a suite goes on without the task, saying why in one line
            print(f"skip {t}: {e}")
            continue
        write_record(record, path)
        done += 1
        main_metric = record.budget.get("main_metric")
        val = record.metrics.get(main_metric)
        shown = f"{main_metric}={val:.4g}" if isinstance(val, float) else "ok"
        print(f"{tag}: {shown} ({time.perf_counter() - t0:.1f} s) -> {path}")
    if not args.no_report:
        render(args.out, args.reports_dir)
    return 0


def run_one(task_name, spec: MethodSpec, seed, cfg, device, data_dir, scale, progress, overrides=()):
    from bench import registry
    from bench.train import Trainer

    task_cls = registry.get_task(task_name)
    if cfg is None:  # a measurement-only task (kernel sweep)
        sweep = [o for o in overrides if o.startswith("sweep.")]
        return task_cls(scale=scale, seed=seed, device=device, progress=progress, overrides=sweep).run()
    task = task_cls(cfg, data_dir)
    method = registry.get_method(spec.name)(cfg.method_cfg, task)
    if spec.overrides:
        method.variant = ",".join(spec.overrides)
    record = Trainer(cfg, task, method, device, progress=progress).run()
    folder = task_cls.data_folder(scale) if data_dir else None
    if folder and (Path(data_dir) / folder).is_dir():  # offline data: say which copy (generated data: its notes)
        from bench.records import data_fingerprint

        record.budget["data_files"] = {"folder": folder, "sha256_16": data_fingerprint(Path(data_dir) / folder)}
    return record


def render(results: Path, reports: Path) -> int:
    from bench import registry
    from bench.report import render_reports

    registry.load_all()
    refs = {name: dict(getattr(cls, "REFERENCE", {}) or {}) for name, cls in registry.TASKS.items()}
    # without --data-dir: a task that cannot be had anywhere (e.g. LRA Retrieval's AAN) says so in its report
    suite_tasks = {suite: {t: registry.TASKS[t].data_available(None, "paper") for t in names}
                   for suite, names in registry.SUITES.items() if suite != "kernels"}
    paths = render_reports(results, reports, refs, suite_tasks)
    print(f"reports: {len(paths)} files under {reports}/")
    return 0
