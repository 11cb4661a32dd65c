"""Render ``results/**.json`` into ``reports/``: markdown tables and PNG/SVG figures. Reads records only.

``python run_all.py --report`` calls ``render_reports(Path("results"), Path("reports"), references)``.
One ``reports/<suite>.md`` per suite present (the suite is the first folder under ``results/``;
``kind == "kernel_sweep"`` and ``"moe_ffn_sweep"`` records are the ``kernels`` suite) plus ``reports/README.md``. Every number
comes from a record; nothing is typed in, nothing is rerun. Per scale and task, runs whose records carry a forward
cost (``cost``, a stage's ``cost``, operating points with a ``cost``) get a quality-vs-cost figure with every method
on it (``bench.cost_figure``) and a table of its points; records without cost facts (older records) add none.
Output is deterministic: two renders of the same records give byte-identical markdown (and SVGs).

Reports name no method: they group runs by the ``family`` of ``bench.method.FAMILIES`` that each record stores
(records of the legacy family "sparse" take the family of the registered method of that name). A method adds its
own section through ``Method.report_section(runs, ctx)``, called once per scale and implementation for the methods
present, after the efficiency part; it formats with the public helpers below (``fmt_num``, ``md_table``,
``fastest``, ...) and a ``SectionContext``, so a method's section looks like the rest of the report.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import matplotlib.patches
import matplotlib.ticker
from matplotlib.lines import Line2D
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from bench.config import SCALE_HELP, SCALES
from bench.cost_figure import FAMILY_MARKERS, cost_figure, plotted, points_by_task
from bench.records import atomic_write_text, load_records
from bench.registry import SUITES

NA = "–"  # no runs for this cell
NM = "n/m"  # not measured
DAGGER, DDAGGER = "†", "‡"
CHANCE_MARK, DENSE_CKPT, MIXED_HW = "◦", "§", "¤"
NEVER_SPARSE = "¶"  # a dense->sparse method's run that never switched: its value is a dense model's (``never_switched``)
MIXED_CFG, DROPPED = "≠", "∅"  # averages runs whose configs differ beyond the seed; runs without a main metric value
# chance accuracy (%) of the LRA tasks (classes: ListOps 10, Text 2, Retrieval 2, Image 10, Pathfinder 2)
CHANCE = {"lra_listops": 10.0, "lra_text": 50.0, "lra_retrieval": 50.0, "lra_image": 10.0, "lra_pathfinder": 50.0}
CHANCE_MARGIN = 2.0


# ----------------------------------------------------------------------------- formatting helpers


def _color(i: int):
    """Distinct colours for up to 20 series (the default cycle repeats after 10)."""
    return f"C{i}" if i < 10 else matplotlib.colormaps["tab20"](2 * (i % 10) + 1)  # light twin of C(i-10)

def is_missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def fmt_num(v, missing: str = NM) -> str:
    """1234, 123.4, 12.35, 0.123 (three significant digits below 1)."""
    if is_missing(v):
        return missing
    a = abs(v)
    return f"{v:.0f}" if a >= 1000 else f"{v:.1f}" if a >= 100 else f"{v:.2f}" if a >= 1 else f"{v:#.3g}"


def fmt_busy(v, missing: str = NM) -> str:
    """A GPU-busy fraction as ``0.44``."""
    return missing if is_missing(v) else f"{v:.2f}"


def fmt_ratio(v, missing: str = NM) -> str:
    return missing if is_missing(v) else f"{v:.2f}×"


def fmt_ratio_or_na(v) -> str:
    return fmt_ratio(v, NA)


def _mean_std(vals: list[float]) -> str:
    """'mean ± std (n)' with the sample std (ddof=1); one seed has no std."""
    if not vals:
        return NA
    a = np.asarray(vals, dtype=float)
    if len(a) == 1:
        return f"{fmt_num(a[0])} (1)"
    return f"{fmt_num(a.mean())} ± {fmt_num(a.std(ddof=1))} ({len(a)})"


def md_table(df: pd.DataFrame) -> str:
    return df.to_markdown(index=False, disable_numparse=True) + "\n"


def slug(*parts) -> str:
    return "_".join(re.sub(r"[^A-Za-z0-9._]+", "-", str(p)).strip("-").lower() for p in parts)


def _scale_order(scales) -> list[str]:
    return sorted(set(scales), key=lambda s: (SCALES.index(s) if s in SCALES else len(SCALES), s))


def save_figure(fig: Figure, figdir: Path, name: str) -> list[Path]:
    figdir.mkdir(parents=True, exist_ok=True)
    out = []
    with matplotlib.rc_context({"svg.hashsalt": "sparsebench", "svg.fonttype": "path"}):
        for ext, meta in (("png", {"Software": None}), ("svg", {"Date": None})):
            p = figdir / f"{name}.{ext}"
            fig.savefig(p, format=ext, metadata=meta, dpi=120, bbox_inches="tight")
            out.append(p)
    return out


def figure_links(figs: list[Path]) -> str:
    return "".join(f"![{p.stem}](figures/{p.name})\n" for p in figs if p.suffix == ".png")


# ----------------------------------------------------------------------------- records -> frames

SWEEP_KINDS = ("kernel_sweep", "moe_ffn_sweep")  # measurement records (the kernels suite), not training runs


def _suite_of(rec: dict, root: Path) -> str:
    if rec["kind"] in SWEEP_KINDS:
        return "kernels"
    parts = Path(rec["_path"]).relative_to(root).parts
    return parts[0] if len(parts) > 1 else "other"


def _main_metric(rec: dict) -> str | None:
    m = rec["budget"].get("main_metric")
    if m:
        return m
    names = [n for n in rec["metrics"] if not n.startswith("dev_")] or list(rec["metrics"])
    return names[0] if names else None


def _method_classes() -> dict[str, type]:
    """The registered methods (name -> class)."""
    from bench import registry

    registry.load_all()
    return registry.METHODS


def _family(rec: dict, classes: dict[str, type]) -> str | None:
    """The record's method family; a legacy "sparse" (records written before ``bench.method.FAMILIES``) becomes the
    family of the registered method of that name, or stays "sparse" for a method not registered (any more)."""
    fam = rec["method_info"].get("family")
    if fam == "sparse" and rec["method"] in classes:
        return getattr(classes[rec["method"]], "family", fam)
    return fam


def _runs_frame(recs: list[dict]) -> pd.DataFrame:
    """One row per run record. Columns a ``report_section`` may use: scale, task, seed, method (registered name),
    label (name [variant]), family, dense (family == "dense"), info (``method_info``), by_phase (median step ms per
    phase), steps_run, max_len, main_metric, metrics, step_ms, tok_s, mem_mib, density (per layer), mem_by_phase,
    gpu, busy (``gpu_busy_fraction``), launches (``kernel_launches_per_step``)."""
    classes = _method_classes()
    rows = []
    for r in recs:
        info, meas = r["method_info"], r["measurements"]
        variant = info.get("variant")
        family = _family(r, classes)
        rows.append(dict(
            scale=r["scale"], task=r["task"], seed=r["seed"], path=r["_path"], method=r["method"],
            label=r["method"] + (f" [{variant}]" if variant else ""),
            dense=family == "dense", family=family, info=info,
            by_phase=meas.get("train_step_ms_median_by_phase") or {}, steps_run=r["budget"].get("steps_run"),
            max_len=(r["config"].get("model") or {}).get("max_len"),
            main_metric=_main_metric(r), metrics=r["metrics"], hib=r["higher_is_better"],
            reduced=bool(r["budget"].get("reduced")), note=r["budget"].get("note") or "(no note)",
            step_ms=meas.get("train_step_ms_median"), tok_s=meas.get("infer_tokens_per_s"),
            mem_mib=meas.get("peak_mem_mib"), density=info.get("density_per_layer"),
            mem_by_phase=meas.get("peak_mem_mib_by_phase"), gpu=r["env"].get("gpu") or "CPU",
            busy=meas.get("gpu_busy_fraction"), launches=meas.get("kernel_launches_per_step"),
            cfg_key=_config_key(r.get("config") or {}), config=r.get("config") or {},
        ))
    df = pd.DataFrame(rows).sort_values(["scale", "task", "label", "seed", "path"], kind="stable")
    for c in ("step_ms", "tok_s", "mem_mib", "busy", "launches"):
        df[c] = pd.to_numeric(df[c], errors="coerce")
    return df


def _config_key(config: dict) -> str:
    """What a run's config is apart from its seed and device: runs of one label with different keys differ in a
    setting, and averaging them is marked (``MIXED_CFG``)."""
    d = {k: v for k, v in config.items() if k not in ("seed", "device")}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _flat(d, prefix: str = "") -> dict:
    out = {}
    for k, v in (d.items() if isinstance(d, dict) else ()):
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = json.dumps(v, sort_keys=True, default=str)
    return out


def config_differences(configs) -> list[str]:
    """The settings (``section.field``, seed and device left out) whose values differ among ``configs``."""
    flats = [_flat({k: v for k, v in c.items() if k not in ("seed", "device")}) for c in configs]
    keys = sorted(set().union(*flats)) if flats else []
    return [k for k in keys if len({f.get(k) for f in flats}) > 1]


def _task_metric(t: pd.DataFrame) -> tuple[str, bool]:
    """The task's main metric (the most common one among its records) and whether higher is better."""
    counts = Counter(m for m in t.main_metric if m)
    metric = min(counts, key=lambda m: (-counts[m], m)) if counts else "?"
    hib = next((h[metric] for h in t.hib if metric in h), True)
    return metric, hib


def fastest(t: pd.DataFrame, mask: pd.Series, hardware_of: pd.Series | None = None) -> tuple[str | None, float]:
    """Among the rows ``mask`` of one task: the label with the lowest mean step time, and that time.
    ``hardware_of`` (a row mask): only rows measured on the GPUs of those rows count, so a step time is never divided
    by one measured on other hardware (a task may hold records of several machines)."""
    if hardware_of is not None:
        mask = mask & t.gpu.isin(t[hardware_of].gpu.unique())
    g = t[mask].groupby("label", sort=True).step_ms.mean().dropna()
    return (g.idxmin(), float(g.min())) if len(g) else (None, math.nan)


def mean_density(d: pd.Series) -> float:
    """Mean over records and layers of ``density_per_layer`` (nan when none is stored)."""
    vals = [v for x in d if isinstance(x, (list, tuple)) for v in x]
    return float(np.mean(vals)) if vals else math.nan


# ----------------------------------------------------------------------------- run suites

def _quality(df: pd.DataFrame, refs: dict, extra: dict | None = None) -> tuple[str, dict, bool]:
    """methods (rows) × tasks (columns) table for one scale, published reference numbers as ``ref:`` rows below
    them (a suite has few tasks and many methods); also returns the reduced-budget notes and whether any cell is
    within ``CHANCE_MARGIN`` points of chance. ``extra``: what method sections added to the footnotes."""
    labels = sorted(df.label.unique())
    notes: dict[str, set] = {}
    near_chance = False
    rows, ref_cols, marks = [], [], set()
    mixed_cfg, dropped = [], []
    for task, t in df.groupby("task", sort=True):
        metric, hib = _task_metric(t)
        row = {"task (main metric)": f"{task} ({metric} {'↑' if hib else '↓'})"}
        for label, g in t.groupby("label", sort=True):
            vals = [m[metric] for m in g.metrics if not is_missing(m.get(metric))]
            cell = _mean_std(vals)
            if len(vals) < len(g):
                cell += f" {DROPPED}"
                dropped.append(f"{task} / {label}: {len(g) - len(vals)} of {len(g)}")
            if g.cfg_key.nunique() > 1:
                cell += f" {MIXED_CFG}"
                diff = config_differences(list(g.config))
                mixed_cfg.append(f"{task} / {label} ({', '.join(diff[:4]) + (' ...' if len(diff) > 4 else '')})")
            if g.reduced.any():
                cell += f" {DAGGER}"
                for note in g[g.reduced].note:
                    notes.setdefault(note, set()).add(f"{task} / {label}")
            if g.seed.duplicated().any():
                cell += f" {DDAGGER}"
            if any(ckpt_phase_differs(i) for i in g["info"]):
                cell += f" {DENSE_CKPT}"
                marks.add(DENSE_CKPT)
            if any(never_switched(i) for i in g["info"]):
                cell += f" {NEVER_SPARSE}"
                marks.add(NEVER_SPARSE)
            if g.gpu.nunique() > 1:
                cell += f" {MIXED_HW}"
                marks.add(MIXED_HW)
            if metric == "accuracy" and task in CHANCE and vals and abs(np.mean(vals) - CHANCE[task]) <= CHANCE_MARGIN:
                cell += f" {CHANCE_MARK}"
                near_chance = True
            row[label] = cell
        for k, v in (refs.get(task) or {}).items():
            col = f"ref: {k}"
            ref_cols += [col] if col not in ref_cols else []
            row[col] = fmt_num(v)
        rows.append(row)
    wide = pd.DataFrame(rows).set_index("task (main metric)").reindex(columns=[*labels, *ref_cols]).fillna(NA)
    table = wide.T.rename_axis("method").reset_index()
    md = md_table(table)
    if DENSE_CKPT in marks:
        md += (f"\n{DENSE_CKPT} Includes runs whose best dev checkpoint predates their switch to sparse attention and was "
               f"tested with the final sparse attention{_extra(extra, NOTE_CKPT_PHASE)}.\n")
    if NEVER_SPARSE in marks:
        md += (f"\n{NEVER_SPARSE} Includes runs of a method that switches from dense to sparse attention but never "
               "switched: their value comes from the dense phase (dense weights, tested with dense attention). Cells "
               f"without {NEVER_SPARSE} or {DENSE_CKPT} come from runs that trained and were tested sparse (or from "
               "methods without a switch).\n")
    if MIXED_HW in marks:
        md += f"\n{MIXED_HW} Averages runs from different GPUs.\n"
    if mixed_cfg:
        md += (f"\n{MIXED_CFG} Averages runs whose configs differ in more than the seed (the settings that differ in "
               f"brackets): {'; '.join(mixed_cfg)}.\n")
    if dropped:
        md += (f"\n{DROPPED} Runs without a value (NaN or missing) for the main metric are left out of the mean and "
               f"of (n): {'; '.join(dropped)}.\n")
    return md, notes, near_chance


def _efficiency(t: pd.DataFrame, extra: dict | None = None) -> str:
    """One task at one scale: step time, inference throughput, peak memory, each vs the fastest dense."""
    g = t.groupby("label", sort=True).agg(
        n=("seed", "size"), dense=("dense", "any"),
        step_ms=("step_ms", "mean"), step_min=("step_ms", "min"), step_max=("step_ms", "max"),
        tok_s=("tok_s", "mean"), mem_mib=("mem_mib", "mean"), mixed=("gpu", lambda x: x.nunique() > 1),
        busy=("busy", "mean"), launches=("launches", "mean"),
        phased=("by_phase", lambda x: any(len(d) > 1 for d in x)))
    best, _ = fastest(t, t.dense)
    out = []
    if best is not None:
        ref = g.loc[best]
        out.append(f"Ratios are to the fastest dense method here: **{best}** ({fmt_num(ref.step_ms)} ms/step).\n")
    else:
        ref = pd.Series({"step_ms": np.nan, "tok_s": np.nan, "mem_mib": np.nan})
        out.append("No dense method with a measured step time here: ratios are n/m.\n")
    table = pd.DataFrame({
        "method": [lab + (f" {MIXED_HW}" if m else "") for lab, m in zip(g.index, g.mixed)], "runs": g.n.astype(str).values,
        "train step (ms)": [fmt_num(v) for v in g.step_ms],
        # half the max-min range over seeds, relative: how far apart two runs of one config land
        "step spread": [f"±{50 * (hi - lo) / m:.1f} %" if n > 1 and m > 0 else NA
                        for n, lo, hi, m in zip(g.n, g.step_min, g.step_max, g.step_ms)],
        "step / dense": [fmt_ratio(v) for v in g.step_ms / ref.step_ms],
        "infer (tok/s)": [fmt_num(v) for v in g.tok_s], "tok/s / dense": [fmt_ratio(v) for v in g.tok_s / ref.tok_s],
        "peak mem (MiB)": [fmt_num(v) for v in g.mem_mib], "mem / dense": [fmt_ratio(v) for v in g.mem_mib / ref.mem_mib],
    })
    dens = {}
    for label, d in t.groupby("label", sort=True):
        lists = [x for x in d.density if isinstance(x, (list, tuple)) and x]
        if lists and len({len(x) for x in lists}) == 1:
            dens[label] = ", ".join(f"{v:.3g}" for v in np.mean(np.asarray(lists, dtype=float), axis=0))
    if dens:
        table["attention density per layer"] = [dens.get(label, NA) for label in g.index]
    if g.busy.notna().any():  # CUDA records (bench.measure.BusyProfiler); CPU ones store None
        table["GPU busy"] = [fmt_busy(v) for v in g.busy]
        table["kernels / step"] = [NM if is_missing(v) else f"{v:.0f}" for v in g.launches]
    out.append(md_table(table))
    if g.busy.notna().any():
        out.append("`GPU busy`: device time (union of kernel, memcpy and memset intervals) over host wall time of a "
                   "few profiled training steps from step 50 of each phase on (torch.profiler; not in the step-time "
                   "statistics), mean over runs; well below 1 means the step waits on the host (Python, launches, "
                   "syncs). Records without `gpu_busy_windows` profiled right after the 5-step timing warm-up, where a "
                   "task with a new batch shape per step (MT, GLUE) still builds kernel plans: a lower bound there.\n")
    if g.phased.any():
        out.append(f"Runs that switch attention during training ({', '.join(g.index[g.phased])}) are timed here over "
                   f"all their steps and their peak memory is the largest of any phase{_extra(extra, NOTE_PHASED)}.\n")
    if g.mixed.any():
        out.append(f"{MIXED_HW} Averages runs from different GPUs.\n")
    return "\n".join(out)


def _run_figures(df: pd.DataFrame, suite: str, scale: str, figdir: Path) -> list[Path]:
    tasks = sorted(df.task.unique())
    labels = sorted(df.label.unique())
    colors = {lab: _color(i) for i, lab in enumerate(labels)}
    written = []
    # main metric, one panel per task (metrics differ in units), one bar per method
    fig = Figure(figsize=(max(4.0, 2.6 * len(tasks)), 3.4), layout="constrained")
    axes = fig.subplots(1, len(tasks), squeeze=False)[0]
    for ax, task in zip(axes, tasks):
        t = df[df.task == task]
        metric, _ = _task_metric(t)
        for i, lab in enumerate(labels):
            vals = [m[metric] for m in t[t.label == lab].metrics if not is_missing(m.get(metric))]
            if vals:
                sd = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
                ax.bar(i, float(np.mean(vals)), yerr=sd, color=colors[lab], capsize=3, label=lab)
        ax.set_title(f"{task}", fontsize=9)
        ax.set_ylabel(metric, fontsize=8)
        ax.set_xticks([])
    handles = [matplotlib.patches.Patch(color=colors[lab], label=lab) for lab in labels]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(4, len(labels)), fontsize=8)
    fig.suptitle(f"{suite} ({scale}): main metric, mean ± std over seeds", fontsize=10)
    written += save_figure(fig, figdir, slug(suite, scale, "quality"))
    # train step time relative to the fastest dense method of each task: a small multiple per task (horizontal bars,
    # only that task's methods, names on the axis), coloured by family, with the family key below the panels
    if not (df.dense & df.step_ms.notna()).any():
        return written
    families = sorted({f or "?" for f in df.family})
    fam_color = {f: ("0.35" if f == "dense" else _color(i)) for i, f in enumerate(x for x in families)}
    ncols = min(2, len(tasks))
    nrows = -(-len(tasks) // ncols)
    per_task = [sorted(df[df.task == task].label.unique()) for task in tasks]
    rows_h = max(len(x) for x in per_task)
    fig = Figure(figsize=(5.4 * ncols, 0.9 + nrows * (0.6 + 0.26 * rows_h)), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for idx, (task, labs) in enumerate(zip(tasks, per_task)):
        ax = axes[idx // ncols][idx % ncols]
        t = df[df.task == task]
        g = t.groupby("label").agg(step=("step_ms", "mean"), dense=("dense", "any"),
                                   family=("family", lambda x: x.iloc[0] or "?"))
        best_label, best = fastest(t, t.dense)
        one_gpu = t.gpu.nunique() == 1
        for i, lab in enumerate(labs):
            if not one_gpu:  # each label against the fastest dense on its own hardware
                _, best = fastest(t, t.dense, hardware_of=t.label == lab)
            if not is_missing(best) and not is_missing(g.step[lab]):
                r = g.step[lab] / best
                ax.barh(i, r, 0.7, color=fam_color[g.family[lab]])
                ax.text(r, i, f" {r:.2f}", va="center", fontsize=7)
        ax.axvline(1.0, color="k", lw=0.8, ls="--")
        ax.set_yticks(range(len(labs)), labs, fontsize=7)
        ax.set_ylim(rows_h - 0.5, -0.5)  # first method on top; panels of one height
        ax.margins(x=0.18)
        ax.tick_params(axis="x", labelsize=7)
        ax.set_title(f"{task} (1 = {best_label})" if best_label and one_gpu else
                     f"{task} (1 = fastest dense on the same GPU)" if best_label else task, fontsize=8)
        if idx // ncols == nrows - 1 or idx + ncols >= len(tasks):
            ax.set_xlabel("train step time / fastest dense", fontsize=8)
    for idx in range(len(tasks), nrows * ncols):
        axes[idx // ncols][idx % ncols].set_visible(False)
    handles = [matplotlib.patches.Patch(color=fam_color[f], label=f) for f in families]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(6, len(families)), fontsize=7)
    fig.suptitle(f"{suite} ({scale}): train step time relative to the fastest dense method of each task", fontsize=9)
    written += save_figure(fig, figdir, slug(suite, scale, "step_time"))
    return written


def _step_vs_length(s: pd.DataFrame, suite: str, scale: str, figdir: Path) -> list[Path]:
    """Train step time relative to each task's fastest dense method vs that task's sequence length."""
    pts = []
    for task, t in s[s.max_len.notna()].groupby("task", sort=True):
        for label, g in t.groupby("label", sort=True):
            _, dense_ms = fastest(t, t.dense, hardware_of=t.label == label)
            if not is_missing(dense_ms) and g.step_ms.notna().any():
                pts.append((label, int(g.max_len.iloc[0]), task, g.step_ms.mean() / dense_ms))
    p = pd.DataFrame(pts, columns=["label", "L", "task", "ratio"]).sort_values(["label", "L", "task"])
    if p.L.nunique() < 2:  # one length: nothing to plot against
        return []
    markers = {task: m for task, m in zip(sorted(p.task.unique()), "osD^vP*Xph")}
    fig = Figure(figsize=(8, 3.8), layout="constrained")
    ax = fig.subplots()
    handles = []
    for i, (label, g) in enumerate(p.groupby("label", sort=True)):
        ax.plot(g.L, g.ratio, "-", lw=0.8, color=_color(i))
        for row in g.itertuples():
            ax.plot(row.L, row.ratio, markers[row.task], color=_color(i), ms=5)
        handles.append(Line2D([], [], color=_color(i), label=label))
    handles += [Line2D([], [], ls="", marker=m, color="k", label=task) for task, m in markers.items()]
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    fmt = matplotlib.ticker.StrMethodFormatter("{x:.2g}")
    ax.yaxis.set_major_formatter(fmt)
    ax.yaxis.set_minor_formatter(fmt)
    ax.tick_params(axis="y", which="both", labelsize=7)
    ax.set_xticks(sorted(p.L.unique()), [str(L) for L in sorted(p.L.unique())])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel("sequence length (model.max_len)")
    ax.set_ylabel("train step time / fastest dense")
    fig.legend(handles=handles, loc="outside right upper", fontsize=7)
    ax.set_title(f"{suite} ({scale}): step time vs sequence length\nacross different tasks (different models): "
                 "indicative only", fontsize=9)
    return save_figure(fig, figdir, slug(suite, scale, "step_time_vs_length"))


# ----------------------------------------------------------------------------- quality vs cost (bench/cost_figure.py)

def _point_name(point) -> str:
    """An operating point as the table shows it: ``{"tau": 0.5}`` -> ``tau=0.5``."""
    if isinstance(point, dict):
        return ", ".join(f"{k}={json.dumps(v, sort_keys=True, default=str)}" for k, v in sorted(point.items())) or "{}"
    return json.dumps(point, sort_keys=True, default=str)


def _cost_sections(recs: list[dict], suite: str, scale: str, figdir: Path) -> tuple[list[str], list[Path]]:
    """One scale's runs: per task with at least one record that has a forward cost (``cost``, a stage's ``cost``,
    or operating points with a ``cost``), the quality-vs-cost figure (every method on it, ``bench.cost_figure``),
    a table of its points, and the notes on what was left out. Tasks without cost facts get nothing."""
    classes = _method_classes()
    # the family as the rest of the report shows it (a legacy "sparse" becomes the registered method's family)
    recs = [dict(r, method_info={**r["method_info"], "family": _family(r, classes)}) for r in recs]
    tasks, _ = points_by_task(recs)
    tasks = {task: t for task, t in tasks.items() if plotted(t["points"])}
    if not tasks:
        return [], []
    md = ["### Quality vs cost\n",
          "Per task, every method with a recorded forward cost: x = forward FLOPs per token of the evaluated model "
          "(`bench/cost.py`: 2 FLOPs per multiply-add of the Linears and attention products), y = the main metric "
          "(mean ± sample std over seeds, (n) = seeds). A `run` point is the run's reported model (its `cost`, else "
          "the last stage with one); the other points are the operating points a run evaluated (a line per method "
          "in the figure). `FLOPs / dense` is relative to the dense run with the fewest FLOPs per token of the "
          "task.\n"]
    written = []
    order = list(FAMILY_MARKERS)
    for task, t in tasks.items():
        pts = sorted(plotted(t["points"]), key=lambda p: (
            order.index(p["family"]) if p["family"] in order else len(order), p["family"], p["method"],
            p["kind"] != "run", p["flops_per_token"], _point_name(p["point"])))
        metric, hib = t["metric"], t["higher_is_better"]
        md.append(f"#### {task}\n")
        dense = [p for p in pts if p["family"] == "dense" and p["kind"] == "run"]
        ref = min(dense, key=lambda p: (p["flops_per_token"], p["method"])) if dense else None
        if ref is None:
            md.append("No dense run with a recorded cost here: `FLOPs / dense` is n/m.\n")
        else:
            md.append(f"Dense reference: **{ref['method']}** ({fmt_num(ref['flops_per_token'] / 1e9)} GFLOPs per "
                      "token).\n")
        fig = cost_figure(pts, f"{suite} ({scale}) {task}: quality vs forward cost", metric, hib)
        figs = save_figure(fig, figdir, slug(suite, scale, task, "quality_vs_cost"))
        written += figs
        md.append(figure_links(figs))
        md.append(md_table(pd.DataFrame({
            "method": [p["method"] for p in pts], "family": [p["family"] for p in pts],
            "operating point": ["run" if p["kind"] == "run" else _point_name(p["point"]) for p in pts],
            "GFLOPs / token": [fmt_num(p["flops_per_token"] / 1e9) for p in pts],
            "FLOPs / dense": [fmt_ratio(p["flops_per_token"] / ref["flops_per_token"]) if ref else NM for p in pts],
            f"{metric} {'↑' if hib else '↓'}": [
                fmt_num(p["metric"]) + (f" ± {fmt_num(p['metric_std'])}" if p.get("metric_std") is not None else "")
                + f" ({p['seeds']})" for p in pts],
        })))
        if t["notes"]:
            md.append("Notes (records or points left out, metrics read from another field):\n")
            md.append("".join(f"- {n}\n" for n in t["notes"]))
    return md, written


# ----------------------------------------------------------------------------- method sections (Method.report_section)

NOTE_CKPT_PHASE = "ckpt_phase"  # appended to the quality table's footnote on DENSE_CKPT (``ckpt_phase_differs``)
NOTE_PHASED = "phased"  # appended to the efficiency note on runs that switch attention during training


@dataclass
class SectionContext:
    """What ``Method.report_section(runs, ctx)`` gets besides ``runs`` (one scale's frame, every method of the suite,
    columns as in ``_runs_frame``): the suite, the scale, where figures go, the registered names that share this
    section (``methods``: select a method's own runs with ``runs.method.isin(ctx.methods)``), and ``add_note`` to
    extend the generic footnotes of the quality and efficiency parts, which the report places before the section."""

    suite: str
    scale: str
    figdir: Path
    methods: tuple[str, ...] = ()
    notes: dict[str, list[str]] = field(default_factory=dict)

    def save(self, fig: Figure, *name) -> list[Path]:
        """Write ``fig`` as ``figures/<suite>_<scale>_<name...>.{png,svg}``; link the result with ``figure_links``."""
        return save_figure(fig, self.figdir, slug(self.suite, self.scale, *name))

    def add_note(self, key: str, text: str) -> None:
        """Append ``text`` verbatim (bring its leading separator) to the generic footnote ``key`` (``NOTE_*``),
        before its final full stop; the same text is added once."""
        texts = self.notes.setdefault(key, [])
        if text not in texts:
            texts.append(text)


def _extra(extra: dict | None, key: str) -> str:
    return "".join((extra or {}).get(key, ()))


def layout_figure(layouts: list, title: str) -> Figure:
    """One binary block-layout panel per layer (black = computed block)."""
    fig = Figure(figsize=(2.2 * len(layouts), 2.6), layout="constrained")
    for i, (ax, lay) in enumerate(zip(fig.subplots(1, len(layouts), squeeze=False)[0], layouts)):
        a = np.asarray(lay, dtype=float)
        ax.imshow(a, cmap="binary", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"layer {i}: density {a.mean():.3g}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    return fig


def best_ckpt_phase(info: dict) -> str | None:
    """The phase whose dev eval picked the reported checkpoint."""
    return info.get("best_checkpoint_eval_phase") or (info.get("best_checkpoint") or {}).get("phase")


def ckpt_phase_differs(info: dict) -> bool:
    """The reported test ran with another attention than the phase whose dev eval picked its checkpoint (a run that
    switches attention and keeps an earlier phase's best checkpoint): both are recorded (``best_checkpoint`` or
    ``best_checkpoint_eval_phase``, and ``tested_with``) and differ."""
    phase, tested = best_ckpt_phase(info), info.get("tested_with")
    return phase is not None and tested is not None and phase != tested


def never_switched(info: dict) -> bool:
    """A run of a method that switches from dense to sparse attention (it records ``tested_with``) that never did:
    the test ran with dense attention, so the reported value is a dense model's."""
    return info.get("tested_with") == "dense"


def _method_sections(s: pd.DataFrame, suite: str, scale: str, figdir: Path,
                     extra: dict[str, list[str]]) -> tuple[list[str], list[Path]]:
    """Each registered implementation's ``report_section`` for the methods of this scale's runs ``s``: once per
    distinct function (names registered to one implementation, e.g. variants of one class, share one section),
    in the order of the first of its names present (sorted). ``extra`` collects their footnote additions."""
    from bench.method import Method

    classes = _method_classes()
    base = Method.report_section.__func__
    groups: dict = {}  # function -> the class to call it on
    for name in sorted(set(s.method)):
        cls = classes.get(name)
        fn = getattr(getattr(cls, "report_section", None), "__func__", None)
        if fn is not None and fn is not base:
            groups.setdefault(fn, cls)
    md, written = [], []
    for fn, cls in groups.items():
        names = tuple(sorted(n for n, c in classes.items()
                             if getattr(getattr(c, "report_section", None), "__func__", None) is fn))
        ctx = SectionContext(suite=suite, scale=scale, figdir=figdir, methods=names, notes=extra)
        sec, figs = cls.report_section(s, ctx)
        md += list(sec)
        written += list(figs)
    return md, written


def _run_sections(recs: list[dict], suite: str, refs: dict, figdir: Path) -> tuple[list[str], list[Path]]:
    df = _runs_frame(recs)
    md, written = [], []
    for scale in _scale_order(df.scale):
        s = df[df.scale == scale]
        md.append(f"## Scale: {scale}\n")
        if scale == "published":
            md.append(f"Config lineage: {SCALE_HELP[scale]} (benchmarks_and_baselines.md 1.2), not the `paper` "
                      "scale's; its runs are never averaged with another scale's.\n")
        md.append("### Quality\n")
        md.append("Main test metric per task, mean ± sample std (ddof=1) over seeds, (n) = number of runs. "
                  "`ref:` rows are published numbers, not runs of this suite.\n")
        # method sections come after the efficiency part but run first: they may extend the footnotes before them
        extra: dict[str, list[str]] = {}
        sections, section_figs = _method_sections(s, suite, scale, figdir, extra)
        table, notes, near_chance = _quality(s, refs, extra)
        md.append(table)
        if near_chance:
            md.append(f"{CHANCE_MARK} Within {CHANCE_MARGIN:g} points of chance accuracy: the run did not learn "
                      "the task at this budget.\n")
        if notes:
            md.append(f"{DAGGER} Reduced budget (not the paper setup):\n")
            md.append("".join(f"- {note} ({', '.join(sorted(cells))})\n" for note, cells in sorted(notes.items())))
        if s.groupby(["task", "label"]).seed.apply(lambda x: x.duplicated().any()).any():
            md.append(f"{DDAGGER} Several records (separate runs) share a seed; all of them are averaged.\n")
        figs = _run_figures(s, suite, scale, figdir)
        written += figs
        md.append(figure_links(figs))
        md.append("### Efficiency\n")
        md.append("Means over seeds of the per-run median train step time, inference throughput and peak memory "
                  "(n/m = not measured). `step spread` is half the range of the step time over a method's runs, "
                  "relative to their mean: runs are separate trainings, so a step-time ratio within a few times "
                  "that spread of 1 is not a difference; for attention alone see the kernels report.\n")
        for task, t in s.groupby("task", sort=True):
            by_gpu = list(t.groupby("gpu", sort=True))
            for gpu, tg in by_gpu:  # ratios only between runs on the same hardware
                md.append(f"#### {task}" + (f" ({gpu})" if len(by_gpu) > 1 else "") + "\n")
                md.append(_efficiency(tg, extra))
        figs = _step_vs_length(s, suite, scale, figdir)
        written += figs
        md += [figure_links(figs)] if figs else []
        sec, figs = _cost_sections([r for r in recs if r["scale"] == scale], suite, scale, figdir)
        md += sec
        written += figs
        md += sections
        written += section_figs
    return md, written


# ----------------------------------------------------------------------------- kernel sweeps

KEYS = ["scale", "gpu", "dtype", "B", "H", "L", "D"]
TIMES = ["fwd_ms", "fwdbwd_ms"]
NUM = [*TIMES, "fwd_tflops_eff", "fwdbwd_tflops_eff", "lut_build_ms", "peak_extra_mib", "io_tensors_mib"]


def _kernel_frame(recs: list[dict]) -> pd.DataFrame:
    """All sweep rows (plus the record's scale and GPU); repeated measurements of one point are averaged."""
    rows = [{"scale": r["scale"], "gpu": r["env"].get("gpu") or "CPU", **row}
            for r in recs for row in r["measurements"].get("rows", [])]
    df = pd.DataFrame(rows)
    df = df.reindex(columns=sorted(set(df.columns) | set(NUM) | {"density_target", "memory_check", "source_record"}))
    df["source_record"] = df.source_record.astype(object).fillna("")  # "" = the generic grid; else a run's learned layouts
    df[NUM] = df[NUM].apply(pd.to_numeric, errors="coerce")
    df["density"] = df.density.astype(float).round(6)
    # the nominal density names a line across L (the realised one varies a little); dense kernels have none
    df["density_target"] = pd.to_numeric(df.density_target, errors="coerce").fillna(df.density.round(2))
    df["memory_check"] = df.memory_check.astype(object).fillna(False).astype(bool)
    keys = [*KEYS, "source_record", "memory_check", "kernel", "pattern", "density", "density_target"]
    return df.groupby(keys, as_index=False, dropna=False)[NUM].mean()


def _tname(t: str) -> str:
    return {"fwd_ms": "fwd", "fwdbwd_ms": "fwd+bwd"}[t]


def _is_dense(df: pd.DataFrame) -> pd.Series:
    return df.kernel.str.startswith("sdpa") | ((df.kernel == "flex") & (df.pattern == "dense"))


def _kernel_speedups(k: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """Adds speedup columns to one (scale, gpu, dtype, B, H, L, D) slice; returns it and the best dense rows."""
    k = k.copy()
    dense = k[_is_dense(k)]
    best = {t: (dense.loc[dense[t].idxmin()] if dense[t].notna().any() else None) for t in TIMES}
    # two nominal densities can round to the same layout (e.g. a 1-block window): one Flex time per layout
    flex = k[k.kernel == "flex"].groupby(["pattern", "density"])[list(TIMES)].mean()
    bs = k.kernel.str.startswith("block_sparse")
    for t in TIMES:
        k[f"x_dense_{t}"] = np.where(bs, best[t][t] / k[t], np.nan) if best[t] is not None else np.nan
        k[f"x_flex_{t}"] = [flex[t].get((p, d), np.nan) / v if b else np.nan
                            for p, d, v, b in zip(k.pattern, k.density, k[t], bs)]
    return k, best


def _kernel_table(k: pd.DataFrame) -> str:
    return md_table(pd.DataFrame({
        "kernel": k.kernel, "pattern": k.pattern, "density": [f"{d:.3g}" for d in k.density],
        "fwd ms": k.fwd_ms.map(fmt_num), "fwd+bwd ms": k.fwdbwd_ms.map(fmt_num),
        "fwd × dense": k.x_dense_fwd_ms.map(fmt_ratio_or_na), "fwd+bwd × dense": k.x_dense_fwdbwd_ms.map(fmt_ratio_or_na),
        "fwd × flex": k.x_flex_fwd_ms.map(fmt_ratio_or_na), "fwd+bwd × flex": k.x_flex_fwdbwd_ms.map(fmt_ratio_or_na),
        "eff. TFLOP/s fwd": k.fwd_tflops_eff.map(fmt_num), "eff. TFLOP/s fwd+bwd": k.fwdbwd_tflops_eff.map(fmt_num),
        "LUT build ms": [fmt_num(v, NA) for v in k.lut_build_ms],
    }))


# a sweep of a run's learned layouts names them "<prefix>_layerN" (the prefix from the run's method, kernels/benchmark.py)
# and each equal-density comparison pattern "<pattern>@<prefix>_layerN"
_LEARNED = re.compile(r"(.+)_layer\d+")


def _learned_prefixes(patterns) -> list[str]:
    return sorted({m[1] for p in patterns for m in [_LEARNED.fullmatch(p.split("@")[-1])] if m})


def _time_vs_density(k: pd.DataFrame, title: str) -> Figure:
    """Log-log time vs density: colour = layout pattern, line style = kernel (so each block-sparse line sits
    next to Flex on the same layouts); dense kernels as horizontal lines."""
    fig = Figure(figsize=(9, 3.6), layout="constrained")

    def family(p: str) -> str:  # learned layouts ("<run's method>_layerN"): one colour for all layers
        p = p.split("@")[0]
        m = _LEARNED.fullmatch(p)
        return f"{m[1]} (learned)" if m else p

    patterns = sorted({family(p) for p in k.pattern.unique() if p != "dense"})
    sparse_kernels = sorted(k[k.pattern != "dense"].kernel.unique())
    dense_kernels = sorted(k[k.pattern == "dense"].kernel.unique())
    styles, markers = ["-", "--", ":", "-."], ["o", "x", "^", "s"]
    for ax, t in zip(fig.subplots(1, 2), TIMES):
        for (kern, pat), g in k.groupby(["kernel", "pattern"], sort=True):
            g = g.dropna(subset=[t])
            if g.empty:
                continue
            if pat == "dense":
                ax.axhline(g[t].min(), lw=1, ls=styles[dense_kernels.index(kern) % 4], color="0.4")
            else:
                i = sparse_kernels.index(kern)
                ax.plot(g.density, g[t], marker=markers[i % 4], ms=4, ls=styles[i % 4],
                        color=_color(patterns.index(family(pat))))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("density (kept blocks)")
        ax.set_ylabel(f"{_tname(t)} time (ms)")
    handles = [Line2D([], [], color=_color(i), marker="o", label=p) for i, p in enumerate(patterns)]
    handles += [Line2D([], [], color="k", ls=styles[i % 4], marker=markers[i % 4], label=kn)
                for i, kn in enumerate(sparse_kernels)]
    handles += [Line2D([], [], color="0.4", ls=styles[i % 4], label=f"{kn} (dense)") for i, kn in enumerate(dense_kernels)]
    fig.legend(handles=handles, loc="outside right center", fontsize=7)
    fig.suptitle(title, fontsize=10)
    return fig


def _speedup_vs_length(g: pd.DataFrame, title: str) -> Figure:
    """Speedup of one block-sparse kernel over the best dense kernel vs L: a panel per (pass, D), a line per
    (pattern, nominal density); colour = density (one ordered scale, at most 8 colours), marker and line style =
    pattern, so the legend reads as two short keys; log y so that the slowdowns (< 1) stay readable."""
    dims = sorted(g.D.unique())
    fig = Figure(figsize=(4.2 * len(dims) + 2.0, 6.4), layout="constrained")
    axes = fig.subplots(2, len(dims), squeeze=False, sharex=True)
    patterns = sorted(set(g.pattern))
    densities = sorted(set(g.density_target))
    cmap = matplotlib.colormaps["viridis"]
    dcolor = {d: cmap(0.9 * i / max(1, len(densities) - 1)) for i, d in enumerate(densities)}
    pstyle = {p: (m, ls) for p, m, ls in zip(patterns, "os^Dvx" * 4, ["-", "--", ":", "-."] * 6)}
    for row, t in enumerate(TIMES):
        for col, D in enumerate(dims):
            ax = axes[row][col]
            for (pat, d), line in g[g.D == D].groupby(["pattern", "density_target"], sort=True):
                line = line.dropna(subset=[f"x_dense_{t}"]).sort_values("L")
                if len(line):
                    marker, ls = pstyle[pat]
                    ax.plot(line.L, line[f"x_dense_{t}"], ls=ls, marker=marker, ms=4, lw=1.2, color=dcolor[d])
            ax.axhline(1.0, color="k", lw=0.8, ls="--")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{_tname(t)}, D={D}", fontsize=9)
            if row == 1:
                ax.set_xlabel("sequence length L")
            if col == 0:
                ax.set_ylabel("speedup over best dense")
    handles = [Line2D([], [], color=dcolor[d], lw=3, label=f"{d:.3g}") for d in densities]
    fig.legend(handles=handles, loc="outside right upper", fontsize=7, title="density (colour)", title_fontsize=7)
    handles = [Line2D([], [], color="0.3", ls=ls, marker=m, label=p) for p, (m, ls) in pstyle.items()]
    fig.legend(handles=handles, loc="outside right lower", fontsize=7, title="pattern (marker)", title_fontsize=7)
    fig.suptitle(title, fontsize=10)
    return fig


def _kernel_sections(recs: list[dict], figdir: Path) -> tuple[list[str], list[Path]]:
    if not any(r["measurements"].get("rows") for r in recs):
        return ["(no kernel sweep rows)\n"], []
    df = _kernel_frame(recs)
    md, written, speed = [], [], []
    md.append("Times are per call (ms); speedups are of the block-sparse kernels (`block_sparse_triton`; "
              "`block_sparse_torch` is the CPU reference) over the best dense kernel "
              "(min over `sdpa_*` and `flex` with the dense pattern) and over `flex` with the same layout; "
              "eff. TFLOP/s count kept blocks only.\n")
    notes = sorted({f"- {r['scale']}: " + "; ".join(filter(None, [
        r["measurements"].get("timing"), f"reduced budget: {r['budget'].get('note') or '(no note)'}"
        if r["budget"].get("reduced") else ""])) for r in recs})
    md.append("\n".join(notes) + "\n")
    for key, k in df[~df.memory_check].groupby([*KEYS, "source_record"], sort=True):
        scale, gpu, dtype, B, H, L, D, src = key
        k, best = _kernel_speedups(k.sort_values(["kernel", "pattern", "density"]))
        if not src:  # learned layouts sit at one L each: not part of the speedup-vs-L lines
            speed.append(k)
        md.append(f"## {gpu}, {dtype}, {scale}: L={L}, D={D} (B={B}, H={H})\n")
        if src:
            prefix = "|".join(_learned_prefixes(k.pattern)) or "<learned>"
            md.append(f"Learned layouts of run `{src}` at that run's attention shape; `<pattern>@{prefix}_layerN` is "
                      "that pattern built at the same density as layer N's layout (equal-density comparison).\n")
        md.append("Best dense: " + "; ".join(
            f"{_tname(t)} {b.kernel} {fmt_num(b[t])} ms" if b is not None else f"{_tname(t)} none measured"
            for t, b in best.items()) + ".\n")
        md.append(_kernel_table(k))
        fig = _time_vs_density(k, f"{gpu} {dtype} ({scale}): L={L}, D={D}, B={B}, H={H}")
        figs = save_figure(fig, figdir, slug("kernels", scale, gpu, dtype, f"L{L}", f"D{D}", f"B{B}", f"H{H}",
                                        *([src] if src else []), "time_vs_density"))
        written += figs
        md.append(figure_links(figs))
    md.append("## Speedup over the best dense kernel vs sequence length\n")
    sp = pd.concat(speed) if speed else df.iloc[:0].assign(**{f"x_dense_{t}": [] for t in TIMES})
    sp = sp[sp.kernel.str.startswith("block_sparse") & sp[[f"x_dense_{t}" for t in TIMES]].notna().any(axis=1)]
    for (scale, gpu, dtype, kern), g in sp.groupby(["scale", "gpu", "dtype", "kernel"], sort=True):
        figs = save_figure(_speedup_vs_length(g, f"{kern} on {gpu} {dtype} ({scale})"),
                     figdir, slug("kernels", scale, gpu, dtype, kern, "speedup_vs_L"))
        written += figs
        md.append(figure_links(figs))
    if sp.empty:
        md.append("(no block-sparse kernel rows with a measured dense baseline)\n")
    mem = df[df.memory_check]
    if len(mem):
        md.append("## Long-sequence memory check (block_sparse_triton fwd+bwd)\n")
        md.append(md_table(pd.DataFrame({
            "scale": mem.scale, "gpu": mem.gpu, "L": mem.L.astype(str), "D": mem.D.astype(str),
            "H": mem.H.astype(str), "density": [f"{d:.3g}" for d in mem.density],
            "peak extra MiB": mem.peak_extra_mib.map(fmt_num), "O + dQ/dK/dV MiB": mem.io_tensors_mib.map(fmt_num)})))
    return md, written


# ----------------------------------------------------------------------------- MoE FFN sweeps (kernels/moe_ffn.py)

MOE_KEYS = ["scale", "gpu", "dtype", "model", "d_model", "d_ff"]
MOE_MAIN = ("moe_triton", "moe_torch", "moe_triton_pairs")  # the kernel a table shows, first one measured


def _moe_frames(recs: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(MoE rows, dense rows) of every ``moe_ffn_sweep`` record, with its scale and GPU; repeats of one point (several
    records or seeds) are averaged."""
    rows = [{"scale": r["scale"], "gpu": r["env"].get("gpu") or "CPU", **row}
            for r in recs for row in r["measurements"].get("rows", [])]
    df = pd.DataFrame(rows)
    df = df.reindex(columns=sorted(set(df.columns) | {"ms", "graph_ms", "speedup_vs_dense", "graph_speedup_vs_dense",
                                                      "skipped", "fraction_target", "d_e", "E", "kernel", *MOE_KEYS}))
    for c in ("ms", "graph_ms", "speedup_vs_dense", "graph_speedup_vs_dense"):
        df[c] = pd.to_numeric(df[c], errors="coerce")
    df["skipped"] = df.skipped.astype(object).where(df.skipped.notna(), "")
    is_dense = df.kernel.astype(str).str.startswith("dense")
    dense = df[is_dense].groupby([*MOE_KEYS, "T"], as_index=False)[["ms", "graph_ms"]].mean()
    moe = df[~is_dense].copy()
    moe["d_e"], moe["E"] = moe.d_e.astype(int), moe.E.astype(int)
    moe["fraction_target"] = moe.fraction_target.astype(float).round(6)
    keys = [*MOE_KEYS, "d_e", "E", "kernel", "T", "fraction_target"]
    num = moe.groupby(keys, as_index=False)[["ms", "speedup_vs_dense", "graph_speedup_vs_dense"]].mean()
    skip = moe.groupby(keys)["skipped"].agg(lambda v: sorted(x for x in v if x)[0] if any(v) else "")
    num["skipped"] = [skip[tuple(k)] for k in num[keys].itertuples(index=False)]
    return num, dense


def _best_point(g: pd.DataFrame, col: str) -> str:
    b = g.loc[g[col].idxmax()]
    return f"{fmt_ratio(b[col])} at T = {int(b['T'])}, f = {b['fraction_target']:g}"


def _wins(g: pd.DataFrame, col: str) -> str:
    """Where the speedup (``col``) of one (model, d_e, kernel) grid exceeds 1: per f, 'from T = X' when it does at
    X and every larger T measured, 'only at T = a, b' when not monotone; fs with the same answer share a clause;
    '' when it never does."""
    g = g.dropna(subset=[col])
    clauses: list[tuple[str, list[float]]] = []
    for f, line in g.groupby("fraction_target", sort=True):
        line = line.sort_values("T")
        ts, wins = list(line["T"].astype(int)), [int(t) for t, v in zip(line["T"], line[col]) if v > 1.0]
        what = ("never" if not wins else "at every T" if wins == ts else f"from T = {wins[0]}"
                if wins == ts[-len(wins):] else "only at T = " + ", ".join(map(str, wins)))
        if clauses and clauses[-1][0] == what:
            clauses[-1][1].append(f)
        else:
            clauses.append((what, [f]))
    if all(what == "never" for what, _ in clauses):
        return ""
    return "; ".join(f"{what} at f = {', '.join(f'{f:g}' for f in fs)}" if what == "never" else
                     f"f = {', '.join(f'{f:g}' for f in fs)} {what}" for what, fs in clauses)


def _break_even(g: pd.DataFrame, col: str) -> str:
    """The sentence on one (model, d_e) grid of the shown kernel: from which T / f its speedup (``col``) exceeds 1,
    or that it never does; with the answer of plain calls too when ``col`` is the graph replay's and it differs."""
    wins = _wins(g, col)
    out = (f"the FLOP saving becomes a wall-clock saving (speedup > 1) at {wins}" if wins else
           "the FLOP saving never becomes a wall-clock saving in this grid")
    out += f" (best {_best_point(g.dropna(subset=[col]), col)})"
    if col != "speedup_vs_dense" and g.speedup_vs_dense.notna().any():
        plain = _wins(g, "speedup_vs_dense")
        if plain != wins:
            out += f"; plain calls: {plain or 'never'}"
    return out


def _has(g: pd.DataFrame, kernel: str) -> bool:
    return bool(g[g.kernel == kernel].speedup_vs_dense.notna().any())


def _moe_table(g: pd.DataFrame, dense: pd.DataFrame, kernels: list[str]) -> str:
    """Speedup over dense of ``kernels`` on one (model, d_e) grid: a row per (kernel, T), a column per f; a kernel
    with graph replays shows 'plain / graph' in each cell (and in the dense time)."""
    fs = sorted(g.fraction_target.unique())
    cols = [f"f = {f:g}" for f in fs]
    table = []
    for k in kernels:
        gk = g[g.kernel == k]
        graph = gk.graph_speedup_vs_dense.notna().any()
        for T in sorted(gk["T"].unique()):
            dense_ms = fmt_num(dense.ms.get(T), NA) + (f" / {fmt_num(dense.graph_ms.get(T), NA)}" if graph else "")
            row = {"kernel": k + (" (plain / graph)" if graph else ""), "T": str(int(T)), "dense ms": dense_ms}
            for f, name in zip(fs, cols):
                c = gk[(gk["T"] == T) & (gk.fraction_target == f)]
                if c.empty:
                    row[name] = NA
                elif is_missing(c.speedup_vs_dense.iloc[0]):
                    row[name] = "skip" if c.skipped.iloc[0] else NM
                else:
                    row[name] = fmt_ratio(c.speedup_vs_dense.iloc[0]) + (
                        f" / {fmt_ratio(c.graph_speedup_vs_dense.iloc[0])}" if graph else "")
            table.append(row)
    return md_table(pd.DataFrame(table, columns=["kernel", "T", "dense ms", *cols]))


def _moe_sections(recs: list[dict]) -> list[str]:
    """``moe_ffn_sweep`` records: per hardware (GPU, dtype, scale) and (model, d_e), the speedup table of the main
    MoE kernel (``MOE_MAIN``: the Triton one on CUDA, the torch backend on CPU) and ``torch._grouped_mm``, one
    break-even sentence, and one line on the other kernels and skipped points of the rows."""
    md = ["## MoE FFN sweep (`kernels/moe_ffn.py`)\n",
          "Speedup = dense FFN time / MoE FFN time at the same point of one record (dense: two `F.linear`, cuBLAS on "
          "CUDA); rows are tokens T, columns the target executed fraction f (each (token, expert) pair selected with "
          "probability f, ragged per token). Where a cell has two values, the first is of plain calls (launched from "
          "the host each time), the second of CUDA-graph replays of both (no host launch overhead); the break-even "
          "sentence then uses the second. `grouped_mm` is `torch._grouped_mm`.\n"]
    notes = sorted({f"- {r['scale']} ({r['env'].get('gpu') or 'CPU'}): " + "; ".join(filter(None, [
        r["measurements"].get("timing"), f"reduced: {r['budget'].get('note') or '(no note)'}"
        if r["budget"].get("reduced") else ""])) for r in recs})
    md.append("\n".join(notes) + "\n")
    if not any(r["measurements"].get("rows") for r in recs):
        return md + ["(no MoE FFN sweep rows)\n"]
    moe, dense = _moe_frames(recs)
    for (scale, gpu, dtype), hw in moe.groupby(["scale", "gpu", "dtype"], sort=True):
        md.append(f"### MoE FFN: {gpu}, {dtype}, {scale}\n")
        if gpu == "CPU":
            md.append("CPU timings (toy sizes) show how the sweep measures; they are not performance numbers: "
                      "the comparisons that count come from a GPU record (`--scale small`).\n")
        hw_dense = dense[(dense.scale == scale) & (dense.gpu == gpu) & (dense.dtype == dtype)]
        for (model, D, d_ff, de, E), g in hw.groupby(["model", "d_model", "d_ff", "d_e", "E"], sort=True):
            md.append(f"#### {model} (d_model = {int(D)}, d_ff = {int(d_ff)}), d_e = {de} ({E} experts)\n")
            main = next((k for k in MOE_MAIN if _has(g, k)), None)
            shown = [k for k in (main, "grouped_mm") if k and _has(g, k)]
            d = hw_dense[(hw_dense.model == model) & (hw_dense.d_model == D) & (hw_dense.d_ff == d_ff)].set_index("T")
            if shown:
                md.append(_moe_table(g, d, shown))
            if main:
                gm = g[g.kernel == main]
                col = "graph_speedup_vs_dense" if gm.graph_speedup_vs_dense.notna().any() else "speedup_vs_dense"
                mode = "CUDA graph" if col.startswith("graph") else "plain calls"
                md.append(f"**{model}, d_e = {de}** (`{main}`, {mode}): {_break_even(gm, col)}.\n")
            else:
                md.append(f"**{model}, d_e = {de}**: no MoE kernel was measured.\n")
            extra = [f"`{k}` best {_best_point(g[g.kernel == k], 'speedup_vs_dense')} (plain calls)"
                     for k in sorted(set(g.kernel) - set(shown)) if _has(g, k)]
            for k in sorted(set(g.kernel)):
                why = sorted({w for w in g[g.kernel == k].skipped if w})
                if why:
                    n = int((g[g.kernel == k].skipped != "").sum())
                    extra.append(f"`{k}` skipped at {n} point(s) ({why[0]}" + (", ..." if len(why) > 1 else "") + ")")
            if extra:
                md.append("Also in the rows: " + "; ".join(extra) + ".\n")
    return md


# ----------------------------------------------------------------------------- env + entry point

def _env_footer(recs: list[dict]) -> str:
    def distinct(f):
        return ", ".join(sorted({str(f(r)) for r in recs}))

    def commit(r):
        c = (r["git"].get("commit") or "unknown")[:10]
        errata = "".join(f" (erratum {i})" for i in r.get("_errata", ()))  # e.g. a stale git field
        return c + ("-dirty" if r["git"].get("dirty") else "") + errata

    return ("## Environment\n\n"
            f"- GPU: {distinct(lambda r: r['env'].get('gpu') or 'CPU (' + str(r['env'].get('cpu')) + ')')}\n"
            f"- torch: {distinct(lambda r: r['env'].get('torch'))}\n"
            f"- triton: {distinct(lambda r: r['env'].get('triton'))}\n"
            f"- CUDA: {distinct(lambda r: r['env'].get('cuda'))}\n"
            f"- git commit: {distinct(commit)}\n"
            f"- records: {len(recs)}\n")


def _load_errata(results_dir: Path) -> tuple[list[dict], str | None]:
    """``results/errata.json``: known defects of committed records (records themselves are never edited). A file
    that cannot be read (invalid JSON, a malformed entry) does not stop the report: ``([], why)``, and every
    report then says that errata are not marked."""
    from bench.errors import BenchError
    from bench.records import load_errata

    try:
        return load_errata(results_dir), None
    except (BenchError, OSError) as e:
        why = " ".join(str(e).split())
        print(f"warning: errata not applied: {why}")
        return [], why


def _mark_erratum(rec: dict, results_dir: Path, errata: list[dict]) -> None:
    """Label an affected record's method 'erratum N' wherever it is shown, so no table hides the defect."""
    rel = Path(rec["_path"]).resolve().relative_to(results_dir.resolve()).as_posix()
    for e in errata:
        if rel in e["records"]:
            rec.setdefault("_errata", []).append(e["id"])
            if e.get("label_in_tables", True):  # False for provenance-only errata: listed, not in every cell
                info = rec["method_info"]
                info["variant"] = "; ".join(v for v in (info.get("variant", ""), f"erratum {e['id']}") if v)


def _missing_tasks(recs: list[dict], tasks: dict[str, str | None]) -> list[str]:
    have = {r["task"] for r in recs}
    lines = [f"- `{t}`: " + (f"data not available ({why})" if why else "not run yet")
             for t, why in sorted(tasks.items()) if t not in have]
    return ["Tasks of this suite without records:\n", *lines, ""] if lines else []


def _errata_section(recs: list[dict], errata: list[dict]) -> list[str]:
    ids = sorted({i for r in recs for i in r.get("_errata", ())})
    if not ids:
        return []
    out = ["## Errata\n"]
    for e in errata:
        if e["id"] in ids:
            n = sum(e["id"] in r.get("_errata", ()) for r in recs)
            out.append(f"- **erratum {e['id']}** ({e['affects']}; {n} record(s) here): {e['note']}")
    return out + [""]


def _without_copies(recs: list[dict]) -> list[dict]:
    """Each run once: a file that holds the same run record as another (task, method, scale, seed, config hash and
    date all equal: a copy or a rename of one measurement, not a second run) is left out with a one-line warning,
    so it is never averaged twice. The file whose name is the record's own name is the one kept."""
    from bench.records import record_filename

    def own_name(r):
        return Path(r["_path"]).name == record_filename(r["task"], r["method"], r["scale"], r["seed"],
                                                        r["config_hash"])

    kept: dict[tuple, dict] = {}
    for r in sorted(recs, key=lambda r: (r.get("kind") != "run" or not own_name(r), r["_path"])):
        if r.get("kind") != "run":
            kept[("path", r["_path"])] = r
            continue
        key = (r["task"], r["method"], r["scale"], r["seed"], r["config_hash"], r.get("date"))
        if key in kept:
            print(f"warning: skipping {r['_path']}: a copy of {kept[key]['_path']} (the same run: {r['task']} "
                  f"{r['method']} seed {r['seed']}, recorded {r.get('date')}); counted once")
            continue
        kept[key] = r
    return sorted(kept.values(), key=lambda r: r["_path"])


def render_reports(results_dir: Path, reports_dir: Path,
                   task_reference: dict[str, dict[str, float]] | None = None,
                   suite_tasks: dict[str, dict[str, str | None]] | None = None,
                   suites: set[str] | None = None) -> list[Path]:
    """Render every record under ``results_dir`` into ``reports_dir``; returns the written paths.

    ``suite_tasks`` (suite -> task -> reason its data is unavailable, or None) lets a report name the
    suite's tasks that have no records, and why, instead of silently leaving them out. ``suites``: render only
    these suites' reports (and the index); the others' files are left as they are."""
    results_dir, reports_dir = Path(results_dir), Path(reports_dir)
    refs = task_reference or {}
    figdir = reports_dir / "figures"
    by_suite: dict[str, list[dict]] = {}
    errata, errata_problem = _load_errata(results_dir)
    for rec in _without_copies(load_records(results_dir) if results_dir.exists() else []):
        _mark_erratum(rec, results_dir, errata)
        by_suite.setdefault(_suite_of(rec, results_dir), []).append(rec)
    written: list[Path] = []
    for suite, recs in sorted(by_suite.items()):
        if suites is not None and suite not in suites:
            continue
        published = results_dir.name == "results"
        cmd = "python run_all.py --report" + ("" if published else f" --out {results_dir}")
        md = [f"# {suite}\n", f"Rendered from {len(recs)} record(s) under `{results_dir.name}/{suite}/`; "
              f"regenerate with `{cmd}`.\n"]
        if errata_problem:
            md.append(f"**Known defects are not marked here**: `errata.json` could not be read ({errata_problem}).\n")
        md += _errata_section(recs, errata)
        md += _missing_tasks(recs, (suite_tasks or {}).get(suite, {}))
        runs = [r for r in recs if r["kind"] not in SWEEP_KINDS]
        sweeps = [r for r in recs if r["kind"] == "kernel_sweep"]
        moe_sweeps = [r for r in recs if r["kind"] == "moe_ffn_sweep"]
        if runs:
            sec, figs = _run_sections(runs, suite, refs, figdir)
            md += sec
            written += figs
        if sweeps:
            sec, figs = _kernel_sections(sweeps, figdir)
            md += sec
            written += figs
        if moe_sweeps:
            md += _moe_sections(moe_sweeps)
        md.append(_env_footer(recs))
        path = reports_dir / f"{suite}.md"
        atomic_write_text(path, "\n".join(md))
        written.append(path)
    index = ["# sparsebench reports\n",
             "Generated from `results/**.json` by `python run_all.py --report`; do not edit by hand.\n"]
    rows = [{"suite": s, "records": str(len(by_suite.get(s, []))),
             "report": f"[{s}.md]({s}.md)" if s in by_suite else "(no records)"}
            for s in sorted(set(SUITES) | set(by_suite))]
    index.append(md_table(pd.DataFrame(rows, columns=["suite", "records", "report"])))
    path = reports_dir / "README.md"
    atomic_write_text(path, "\n".join(index))
    written.append(path)
    return sorted(written)


# ----------------------------------------------------------------------------- a sweep's closing comparison

def summary_table(recs: list[dict]) -> str:
    """The comparison a sweep prints when it ends: per task and scale, one row per method (label) with its main
    metric (mean over its runs, n), median train step time, that time over the fastest dense method's of the same
    table, and the attention density (1 for dense; mean over layers of ``density_per_layer`` otherwise)."""
    runs = [r for r in recs if r.get("kind") == "run"]
    if not runs:
        return ""
    df = _runs_frame(runs)
    out = []
    for (scale, task), t in df.groupby(["scale", "task"], sort=True):
        metric, hib = _task_metric(t)
        best, best_ms = fastest(t, t.dense)
        rows = []
        for label, g in t.groupby("label", sort=True):
            vals = [m[metric] for m in g.metrics if not is_missing(m.get(metric))]
            dropped = len(g) - len(vals)
            ms = g.step_ms.mean()
            dens = 1.0 if g.dense.all() else mean_density(g.density)
            rows.append({"method": label,
                         f"{metric} {'↑' if hib else '↓'}": _mean_std(vals) + (f" ({dropped} NaN left out)" if dropped else ""),
                         "train step (ms)": fmt_num(ms), "step / fastest dense": fmt_ratio(ms / best_ms) if best else NM,
                         "attention density": NA if is_missing(dens) else f"{dens:.3g}"})
        head = f"{task} ({scale})" + (f": ratios to {best}" if best else ": no dense run, no ratios")
        out.append(head + "\n" + md_table(pd.DataFrame(rows)))
    return "\n".join(out)
