"""Cohort report after ``brainage predict``: what was scored, how fast, and what to look at.

``OUT_report.md`` and ``OUT_report.png`` next to the CSV ``OUT``:

* counts: planned, scored, failed, not scored; the failed scans with their reason and
  the flagged ones (warnings, or any ``*_flag`` column a later step adds);
* the distribution of predicted ages;
* when the source gives true ages: predicted vs true age and the brain-age gap
  (predicted - true) overall and per site (n, mean, SD, MAE), because a site offset
  is the first thing that goes wrong when a model meets a new scanner;
* throughput from the part files' session records: scans/s of each task process and
  of the whole run (first start to last end), and the per-scan prepare/inference time.
"""

from __future__ import annotations

import datetime as _dt
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from brainage_hpc.evaluation.merge import MergeSummary, read_sessions

__all__ = ["cohort_stats", "throughput", "write_cohort_report"]

_MAX_LISTED = 50


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _flagged(row: dict[str, Any]) -> str:
    flags = [k for k, v in row.items() if k.endswith("_flag") and v not in (None, "", 0, False, "0", "False", "false")]
    parts = ([row["warnings"]] if row.get("warnings") else []) + [f"{k}" for k in flags]
    return "; ".join(parts)


def cohort_stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Predicted-age summary and, where true ages exist, brain-age gap overall and per site."""
    pred = np.array([p for r in rows if (p := _num(r.get("pred_age"))) is not None])
    stats: dict[str, Any] = {"n_pred": int(pred.size)}
    if pred.size:
        stats["pred_age"] = {"mean": float(pred.mean()), "sd": float(pred.std(ddof=1)) if pred.size > 1 else 0.0,
                             **{f"p{q}": float(np.percentile(pred, q)) for q in (5, 25, 50, 75, 95)}}
    pairs = [(a, p, r.get("site") or "(none)") for r in rows
             if (a := _num(r.get("age"))) is not None and (p := _num(r.get("pred_age"))) is not None]
    if pairs:
        age = np.array([a for a, _, _ in pairs])
        pa = np.array([p for _, p, _ in pairs])
        gap = pa - age
        stats["gap"] = _gap_stats(gap)
        varied = len(pairs) > 2 and age.std() > 0 and pa.std() > 0
        stats["gap"]["r_age_pred"] = float(np.corrcoef(age, pa)[0, 1]) if varied else None
        stats["gap"]["r_age_gap"] = float(np.corrcoef(age, gap)[0, 1]) if varied and gap.std() > 0 else None
        by_site: dict[str, list[float]] = defaultdict(list)
        for (_, _, site), g in zip(pairs, gap):
            by_site[site].append(float(g))
        stats["gap_by_site"] = {site: _gap_stats(np.array(g)) for site, g in sorted(by_site.items())}
    return stats


def _gap_stats(gap: np.ndarray) -> dict[str, Any]:
    return {"n": int(gap.size), "mean": float(gap.mean()), "sd": float(gap.std(ddof=1)) if gap.size > 1 else 0.0,
            "mae": float(np.abs(gap).mean())}


def throughput(sessions: list[dict[str, Any]]) -> dict[str, Any]:
    """Scans/s of every task run and overall, from the parts' session records.

    ``per_process_scans_per_s`` divides all scans by the summed task time (what one
    process delivers); ``run_scans_per_s`` divides them by first start to last end
    (what the whole array delivered, including queue waits and gaps between reruns).
    """
    ends = [s for s in sessions if s.get("event") == "end" and (s.get("scored", 0) + s.get("failed", 0)) > 0]
    if not ends:
        return {}
    n = sum(int(s["scored"]) + int(s["failed"]) for s in ends)
    busy = sum(float(s["elapsed_s"]) for s in ends)
    starts = [float(s["time"]) for s in sessions if s.get("event") == "start"]
    span = max(float(s["time"]) for s in ends) - min(starts) if starts else busy
    runs = [{"part": s.get("part", ""), "host": s.get("host", ""), "scans": int(s["scored"]) + int(s["failed"]),
             "seconds": float(s["elapsed_s"]), "stopped_by": s.get("stopped_by"),
             "time": _dt.datetime.fromtimestamp(float(s["time"])).isoformat(timespec="seconds")} for s in ends]
    return {
        "scans": n,
        "sessions": len(ends),
        "runs": runs,
        "busy_s": busy,
        "per_process_scans_per_s": n / busy if busy > 0 else None,
        "run_scans_per_s": n / span if span > 0 else None,
        "wall_s": span,
        "prepare_s_per_scan": sum(float(s.get("prepare_s", 0)) for s in ends) / n,
        "infer_s_per_scan": sum(float(s.get("infer_s", 0)) for s in ends) / n,
        "workers": sorted({int(s.get("workers", 0)) for s in sessions if s.get("event") == "start"}),
        "devices": sorted({str(s.get("device", "?")) for s in sessions if s.get("event") == "start"}),
    }


def _figure(rows: list[dict[str, Any]], stats: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from brainage_hpc.report import save_figure

    with_age = "gap" in stats
    n_panels = 3 if with_age else 1
    fig, axes = plt.subplots(1, n_panels, figsize=(5.2 * n_panels, 4.2), squeeze=False)
    ax = axes[0, 0]
    pred = [p for r in rows if (p := _num(r.get("pred_age"))) is not None]
    ages = [a for r in rows if (a := _num(r.get("age"))) is not None and _num(r.get("pred_age")) is not None]
    values = pred + ages
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    if hi - lo < 4.0:  # a nearly constant prediction: show it on a readable, few-years-wide axis
        mid = (hi + lo) / 2
        lo, hi = mid - 2.0, mid + 2.0
    bins = np.linspace(lo, hi, min(30, max(5, len(pred) // 4)) + 1)
    ax.hist(pred, bins=bins, color="tab:blue", alpha=0.7, label=f"predicted (n={len(pred)})")
    if ages:
        ax.hist(ages, bins=bins, histtype="step", color="black", lw=1.5, label=f"true (n={len(ages)})")
    ax.xaxis.set_major_locator(MaxNLocator(6))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("age (years)")
    ax.set_ylabel("scans")
    ax.set_title("Predicted brain age")
    ax.legend(fontsize=8)
    if with_age:
        sites = sorted({r.get("site") or "(none)" for r in rows if _num(r.get("age")) is not None and _num(r.get("pred_age")) is not None})
        ax = axes[0, 1]
        for site in sites:
            sel = [(float(r["age"]), float(r["pred_age"])) for r in rows if (r.get("site") or "(none)") == site
                   and _num(r.get("age")) is not None and _num(r.get("pred_age")) is not None]
            ax.scatter(*zip(*sel), s=12, alpha=0.7, label=site)
        lo = min(min(ages), min(pred))
        hi = max(max(ages), max(pred))
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        ax.set_xlabel("true age (years)")
        ax.set_ylabel("predicted age (years)")
        gap = stats["gap"]
        ax.set_title(f"MAE {gap['mae']:.2f} y, mean gap {gap['mean']:+.2f} y")
        if len(sites) > 1:
            ax.legend(fontsize=7, title="site")
        ax = axes[0, 2]
        data = [[float(r["pred_age"]) - float(r["age"]) for r in rows if (r.get("site") or "(none)") == site
                 and _num(r.get("age")) is not None and _num(r.get("pred_age")) is not None] for site in sites]
        ax.boxplot(data, showmeans=True)
        ax.set_xticks(range(1, len(sites) + 1), [f"{s}\n(n={len(d)})" for s, d in zip(sites, data)], fontsize=8)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_ylabel("brain-age gap, predicted - true (years)")
        ax.set_title("Brain-age gap per site")
    fig.tight_layout()
    return save_figure(fig, path)


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "n/a"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def write_cohort_report(out_csv: Path, summary: MergeSummary, parts_dir: Path) -> Path:
    """Write ``<stem>_report.md`` and ``<stem>_report.png`` next to ``out_csv``; returns the markdown path."""
    from brainage_hpc.report import atomic_path

    rows = summary.rows
    stats = cohort_stats(rows)
    stem = out_csv.name[:-4] if out_csv.name.endswith(".csv") else out_csv.name
    png = out_csv.with_name(f"{stem}_report.png")
    md = out_csv.with_name(f"{stem}_report.md")
    sessions = read_sessions(parts_dir)
    tp = throughput(sessions)
    model = next((s.get("model") for s in reversed(sessions) if s.get("model")), None)
    lines = [f"# Cohort report: {out_csv.name}", "",
             f"Written {_dt.datetime.now().isoformat(timespec='seconds')} from `{out_csv}`"
             + (f"; model `{model}`." if model else "."), "",
             "| scans | scored | failed | not scored | flagged |", "|---|---|---|---|---|",
             f"| {len(rows)} | {summary.n_ok} | {summary.n_failed} | {summary.n_missing} | "
             f"{sum(1 for r in rows if _flagged(r))} |", ""]
    if summary.missing_parts:
        lines += ["Missing part files: " + ", ".join(f"`{k}` ({v} scans)" for k, v in summary.missing_parts.items()), ""]
    if "pred_age" in stats:
        p = stats["pred_age"]
        lines += ["## Predicted age", "", "| n | mean | SD | 5 % | 25 % | median | 75 % | 95 % |", "|---|---|---|---|---|---|---|---|",
                  f"| {stats['n_pred']} | {p['mean']:.2f} | {p['sd']:.2f} | {p['p5']:.2f} | {p['p25']:.2f} | {p['p50']:.2f} "
                  f"| {p['p75']:.2f} | {p['p95']:.2f} |", ""]
    if "gap" in stats:
        g = stats["gap"]
        lines += ["## Brain-age gap (predicted - true, years; not bias-corrected)", "",
                  "| site | n | mean gap | SD | MAE |", "|---|---|---|---|---|",
                  f"| all | {g['n']} | {g['mean']:+.2f} | {g['sd']:.2f} | {g['mae']:.2f} |"]
        lines += [f"| {site} | {s['n']} | {s['mean']:+.2f} | {s['sd']:.2f} | {s['mae']:.2f} |"
                  for site, s in stats["gap_by_site"].items()]
        lines += ["", f"Correlation of true and predicted age: r = {_fmt(g.get('r_age_pred'), 3)}. "
                  f"Correlation of the gap with true age: r = {_fmt(g.get('r_age_gap'), 3)} (a strongly negative value is "
                  "the usual regression to the mean; compare gaps across groups only after bias correction).", ""]
    if rows and stats.get("n_pred"):
        _figure(rows, stats, png)
        lines += [f"![predicted ages]({png.name})", ""]
    if tp:
        import signal

        lines += ["## Throughput", "",
                  f"{tp['scans']} scans in {tp['sessions']} task run(s): {_fmt(tp['per_process_scans_per_s'])} scans/s per "
                  f"process ({tp['busy_s']:.1f} s of task time); {_fmt(tp['run_scans_per_s'])} scans/s for the whole run "
                  f"({tp['wall_s']:.1f} s from first start to last end, queue waits and reruns included). "
                  f"Per scan: prepare {tp['prepare_s_per_scan']:.3f} s (summed over workers), inference "
                  f"{tp['infer_s_per_scan']:.4f} s. Workers per task: {', '.join(map(str, tp['workers']))}; "
                  f"device: {', '.join(tp['devices'])}.", "",
                  "| part | host | ended | scans | seconds | scans/s | stopped by |", "|---|---|---|---|---|---|---|"]
        for run in tp["runs"][:_MAX_LISTED]:
            stop = signal.Signals(run["stopped_by"]).name if run["stopped_by"] else ""
            rate = run["scans"] / run["seconds"] if run["seconds"] > 0 else None
            lines.append(f"| `{run['part']}` | {run['host']} | {run['time']} | {run['scans']} | {run['seconds']:.1f} "
                         f"| {_fmt(rate)} | {stop} |")
        lines.append("")
    failed = [r for r in rows if r.get("error")]
    if failed:
        lines += [f"## Failed or not scored ({len(failed)})", "", "| file | reason |", "|---|---|"]
        lines += [f"| `{r['file']}` | {str(r['error']).replace('|', '/')} |" for r in failed[:_MAX_LISTED]]
        if len(failed) > _MAX_LISTED:
            lines.append(f"| ... | {len(failed) - _MAX_LISTED} more in the CSV |")
        lines.append("")
    flagged = [(r, f) for r in rows if (f := _flagged(r))]
    if flagged:
        lines += [f"## Flagged ({len(flagged)})", "", "| file | pred_age | flags |", "|---|---|---|"]
        lines += [f"| `{r['file']}` | {_fmt(_num(r.get('pred_age')))} | {f.replace('|', '/')} |" for r, f in flagged[:_MAX_LISTED]]
        lines.append("")
    with atomic_path(md) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return md
