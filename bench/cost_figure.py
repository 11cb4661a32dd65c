"""Quality vs cost: one figure per task with every method on it (forward FLOPs per token vs the main metric).

``points_from_records(records) -> (points, notes)`` turns run records (dicts as ``bench.records`` loads them) into
points; ``points_by_task(records)`` splits them per task (one metric per task) with that task's notes;
``cost_figure(points, title, metric_name, higher_is_better)`` draws them on a ``matplotlib.figure.Figure`` (no pyplot:
``bench.report`` saves it as PNG + SVG next to its other figures), ``quality_vs_cost_figure(points, path, ...)`` draws
and saves one PNG; ``quality_vs_cost_figures(records, out_dir)`` does both per task.

Where a record's cost comes from (``bench.cost.forward_cost``'s dict): its ``cost`` field, else the ``cost`` of the
last entry of its ``stages`` list that has one (the stage whose model was evaluated). A record with neither is
skipped with a note. Operating points: ``operating_points``, a list of ``{"point": ..., "metrics": {...},
"cost": {...}}``; the metric of a point is read under the record's main metric name ``m`` as ``m``, else
``test_m``, else ``dev_m`` (said in a note), an operating point without cost or metric is skipped with a note.

Seeds are averaged per (task, method, variant) and, for operating points, per point too: ``metric`` is the mean,
``metric_std`` the sample standard deviation (None with one seed), ``flops_per_token`` the mean, ``seeds`` the count.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

FAMILY_MARKERS = {"dense": "o", "fixed_pattern": "s", "learned_pattern": "^", "token_pooling": "D",
                  "estimated": "v", "ffn_sparsity": "P"}
OTHER_MARKER = "X"
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")  # 8


def _main_metric(rec: dict) -> str | None:
    m = (rec.get("budget") or {}).get("main_metric")
    if m:
        return m
    names = [n for n in rec.get("metrics", {}) if not n.startswith("dev_")] or list(rec.get("metrics", {}))
    return names[0] if names else None


def record_cost(rec: dict) -> dict | None:
    """The record's forward cost: ``cost``, else the last stage's ``cost`` (``stages``: list of dicts)."""
    c = rec.get("cost")
    if isinstance(c, dict) and c.get("flops_per_token") is not None:
        return c
    for st in reversed(rec.get("stages") or []):
        c = st.get("cost") if isinstance(st, dict) else None
        if isinstance(c, dict) and c.get("flops_per_token") is not None:
            return c
    return None


def _label(rec: dict) -> tuple[str, str]:
    variant = (rec.get("method_info") or {}).get("variant") or ""
    return rec["method"] + (f" [{variant}]" if variant else ""), variant


def _point_metric(metrics: dict, m: str) -> tuple[float | None, str | None]:
    for key in (m, f"test_{m}", f"dev_{m}"):
        v = metrics.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            return float(v), key
    return None, None


def _mean_std(xs: list[float]) -> tuple[float, float | None]:
    mu = sum(xs) / len(xs)
    if len(xs) < 2:
        return mu, None
    return mu, math.sqrt(sum((x - mu) ** 2 for x in xs) / (len(xs) - 1))


def points_from_records(records: list[dict]) -> tuple[list[dict], list[str]]:
    """Points ``{"task", "method" (label: name [variant]), "family", "flops_per_token", "metric", "metric_std",
    "metric_name", "higher_is_better", "kind": "run"|"operating_point", "point", "seeds"}`` and notes (one line
    each) about what was skipped."""
    groups: dict[tuple, dict] = {}
    notes: list[str] = []
    dev_notes: set[str] = set()
    for rec in records:
        if rec.get("kind", "run") != "run":
            continue
        label, _ = _label(rec)
        task, seed = rec.get("task", "?"), rec.get("seed")
        who = f"{task} / {label} / seed {seed}"
        m = _main_metric(rec)
        if m is None:
            notes.append(f"{who}: no metric; skipped")
            continue
        family = (rec.get("method_info") or {}).get("family") or "other"
        hib = bool((rec.get("higher_is_better") or {}).get(m, True))
        base = dict(task=task, method=label, family=family, metric_name=m, higher_is_better=hib)
        cost = record_cost(rec)
        v = (rec.get("metrics") or {}).get(m)
        if cost is None:
            notes.append(f"{who}: no cost in the record (no 'cost', no stage cost); run point skipped")
        elif not isinstance(v, (int, float)) or not math.isfinite(v):
            notes.append(f"{who}: metric {m!r} missing or not finite; run point skipped")
        else:
            g = groups.setdefault((task, label, "run", None), dict(base, kind="run", point=None, xs=[], ys=[]))
            g["xs"].append(float(cost["flops_per_token"]))
            g["ys"].append(float(v))
        for op in rec.get("operating_points") or []:
            pt = op.get("point")
            pkey = json.dumps(pt, sort_keys=True, default=str)
            c = op.get("cost") if isinstance(op.get("cost"), dict) else None
            y, key = _point_metric(op.get("metrics") or {}, m)
            if c is None or c.get("flops_per_token") is None:
                notes.append(f"{who}: operating point {pkey} has no cost; skipped")
                continue
            if y is None:
                notes.append(f"{who}: operating point {pkey} has no {m!r} metric; skipped")
                continue
            if key.startswith("dev_"):
                dev_notes.add(f"{task} / {label}: operating points use {key} (no test metric)")
            g = groups.setdefault((task, label, "operating_point", pkey),
                                  dict(base, kind="operating_point", point=pt, xs=[], ys=[]))
            g["xs"].append(float(c["flops_per_token"]))
            g["ys"].append(y)
    points = []
    for g in groups.values():
        xs, ys = g.pop("xs"), g.pop("ys")
        mu, sd = _mean_std(ys)
        points.append(dict(g, flops_per_token=sum(xs) / len(xs), metric=mu, metric_std=sd, seeds=len(ys)))
    points.sort(key=lambda p: (p["task"], p["family"], p["method"], p["kind"], p["flops_per_token"]))
    return points, notes + sorted(dev_notes)


def plotted(points: list[dict]) -> list[dict]:
    """The points a figure can show: a positive cost and a finite metric (x is on a log scale)."""
    return [p for p in points if p.get("flops_per_token") and p["flops_per_token"] > 0
            and isinstance(p.get("metric"), (int, float)) and math.isfinite(p["metric"])]


LINESTYLES = ("-", "--", ":", "-.")


def curve_of(point) -> str:
    """The curve an operating point belongs to: its non-numeric fields (``{"rule": "dyn_cum", "tau": 0.5}`` ->
    ``"dyn_cum"``); points that differ only in numbers lie on one curve."""
    if not isinstance(point, dict):
        return ""
    return ", ".join(str(v) for k, v in sorted(point.items()) if isinstance(v, str))


def cost_figure(points: list[dict], title: str, metric_name: str, higher_is_better: bool = True):
    """Draw ``points`` (``{"method", "family", "flops_per_token", "metric", "metric_std"?, "kind"}``): x = forward
    GFLOPs per token (log), y = the metric; one marker shape per family, one colour per method (8 colours, reused
    with another marker beyond 8), a method's operating points joined by a line in cost order, its run point a
    larger black-edged marker; a dotted line at the best dense run. Returns the ``matplotlib.figure.Figure``."""
    from matplotlib.figure import Figure

    pts = plotted(points)
    methods = sorted({(p.get("family") or "other", p["method"]) for p in pts},
                     key=lambda fm: (list(FAMILY_MARKERS).index(fm[0]) if fm[0] in FAMILY_MARKERS else 99, fm[1]))
    colour = {m: COLOURS[i % len(COLOURS)] for i, (_, m) in enumerate(methods)}
    fig = Figure(figsize=(6, 4), dpi=150)
    ax = fig.subplots()
    for fam, m in methods:
        marker = FAMILY_MARKERS.get(fam, OTHER_MARKER)
        mine = [p for p in pts if p["method"] == m]
        ops = sorted((p for p in mine if p.get("kind") == "operating_point"), key=lambda p: p["flops_per_token"])
        runs = [p for p in mine if p.get("kind") != "operating_point"]
        first = True
        curves: dict = {}  # one line per selection rule (a point's non-numeric fields, e.g. DSTI's dyn_cum/dyn_max)
        for p in ops:
            curves.setdefault(curve_of(p.get("point")), []).append(p)
        for i, (curve, cps) in enumerate(sorted(curves.items())):
            ax.errorbar([p["flops_per_token"] / 1e9 for p in cps], [p["metric"] for p in cps],
                        yerr=[p.get("metric_std") or 0.0 for p in cps], color=colour[m], marker=marker,
                        markersize=4, linewidth=1.2, capsize=2, linestyle=LINESTYLES[i % len(LINESTYLES)],
                        label=m + (f" ({curve})" if len(curves) > 1 else ""))
            first = False
        for p in runs:
            ax.errorbar([p["flops_per_token"] / 1e9], [p["metric"]], yerr=[p.get("metric_std") or 0.0],
                        color=colour[m], marker=marker, markersize=7, markeredgecolor="black",
                        markeredgewidth=0.6, linestyle="none", capsize=2, label=m if first else None)
            first = False
    dense_runs = [p for p in pts if p.get("family") == "dense" and p.get("kind") != "operating_point"]
    if dense_runs:
        best = (max if higher_is_better else min)(p["metric"] for p in dense_runs)
        ax.axhline(best, color="grey", linestyle=":", linewidth=1, label="best dense")
    ax.set_xscale("log")
    xs = [p["flops_per_token"] / 1e9 for p in pts]
    if xs:
        from matplotlib.ticker import FuncFormatter, NullFormatter

        fmt = FuncFormatter(lambda v, _: f"{v:.3g}")
        ax.xaxis.set_major_formatter(fmt)
        def minor(v, _):  # 2, 3 and 5 times a power of ten: every minor label would overlap its neighbours
            return fmt(v, _) if v > 0 and round(v / 10 ** math.floor(math.log10(v)), 6) in (2, 3, 5) else ""

        # under about a decade the major ticks are too few: label some minor ones too
        ax.xaxis.set_minor_formatter(FuncFormatter(minor) if max(xs) / min(xs) < 20 else NullFormatter())
        ax.tick_params(axis="x", which="both", labelsize=7)
    ax.set_xlabel("forward GFLOPs per token")
    ax.set_ylabel(f"{metric_name} ({'higher' if higher_is_better else 'lower'} is better)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    if not pts:
        ax.text(0.5, 0.5, "no runs with a cost", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7, frameon=False, borderaxespad=0)
    return fig


def quality_vs_cost_figure(points: list[dict], path, title: str, metric_name: str,
                           higher_is_better: bool = True) -> Path:
    """``cost_figure`` saved as one PNG at ``path`` (its folder made). Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cost_figure(points, title, metric_name, higher_is_better).savefig(path, bbox_inches="tight")
    return path


def points_by_task(records: list[dict]) -> tuple[dict[str, dict], list[str]]:
    """``points_from_records`` split per task: ``({task: {"points", "metric", "higher_is_better", "notes"}}, notes)``
    for the tasks with at least one point. A task's metric is the most common main metric among its points (ties:
    the first name); points of another metric are left out with a note. A task's ``notes`` are those about its
    records (they start with ``"<task> / "``); ``notes`` (the second value) has every note, the tasks without a
    point included."""
    points, notes = points_from_records(records)
    by_task: dict[str, list[dict]] = defaultdict(list)
    for p in points:
        by_task[p["task"]].append(p)
    out = {}
    for task, pts in sorted(by_task.items()):
        names: dict[tuple, int] = defaultdict(int)
        for p in pts:
            names[(p["metric_name"], p["higher_is_better"])] += 1
        (metric, hib), _ = min(names.items(), key=lambda kv: (-kv[1], kv[0][0], not kv[0][1]))
        mine = [n for n in notes if n.startswith(f"{task} / ")]
        other = sorted({p["method"] for p in pts if p["metric_name"] != metric})
        if other:
            mine.append(f"{task} / {', '.join(other)}: main metric is not {metric!r}; left out")
        out[task] = dict(points=[p for p in pts if p["metric_name"] == metric], metric=metric,
                         higher_is_better=hib, notes=mine)
    return out, notes


def quality_vs_cost_figures(records: list[dict], out_dir, prefix: str = "quality_vs_cost") -> tuple[dict, list[str]]:
    """One figure per task of ``records`` (``<out_dir>/<prefix>_<task>.png``): ``({task: path}, notes)``; a task
    whose records have no cost gets no figure (its notes say why)."""
    tasks, notes = points_by_task(records)
    paths = {}
    for task, t in tasks.items():
        paths[task] = quality_vs_cost_figure(t["points"], Path(out_dir) / f"{prefix}_{task}.png",
                                             f"{task}: quality vs forward cost", t["metric"], t["higher_is_better"])
    return paths, notes
