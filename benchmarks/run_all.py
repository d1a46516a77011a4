"""``make bench``: run every benchmark, then render BENCHMARKS.md and the README's numbers from their JSON results.

``python -m benchmarks.run_all [--quick] [--only loader amp ...] [--render-only]``

Each benchmark runs in its own process (a crash or an OOM in one does not stop the
rest) and writes ``benchmarks/results/<name>.json`` (committed). BENCHMARKS.md and
the block between ``<!-- benchmarks:begin -->`` and ``<!-- benchmarks:end -->`` in
README.md are rendered from whatever results exist, so a GPU result copied back
from a device machine lands in both, and no figure is copied by hand. Quick
(smoke) results go to ``bench_out/quick/`` and are never rendered.

Adding a benchmark (contract 8): ``benchmarks/<name>.py`` writes
``make_result(...)`` through ``finish(result, result_path(name, quick))``; add
``name: "what it answers"`` to :data:`BENCHMARKS` and its ``--quick`` run to
``tests/integration/test_benchmarks_smoke.py``. Nothing else: the renderer
reads the JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, RESULTS_DIR, describe_machine, markdown_table, noisy_text

__all__ = ["BENCHMARKS", "main", "render", "render_readme"]

# name -> what it answers (in run order; gpu skips itself without a GPU)
BENCHMARKS: dict[str, str] = {
    "preprocess": "subjects/s of `brainage preprocess`, 1 vs 2 workers",
    "predict_throughput": "scans/s of `brainage predict` (load / preprocess / inference), 0-2 workers vs a serial loop",
    "loader": "HDF5 loader vs nibabel / MONAI / .npy at equal batches, and vs the raw read (targets ≥ 1.0x, ≥ 50 %)",
    "trainer_overhead": "our trainer vs a bare PyTorch loop, paired bootstrap CI (target: upper bound ≤ 5 % slower)",
    "ddp_scaling": "DDP on CPU, 1 vs 2 processes at equal per-rank batch (target ≥ 1.6x), end-to-end wall time",
    "syncs": "host-device syncs per training step, counted on CPU, now and before the sync-free step (issue 17.4)",
    "amp": "fp32 vs bf16 autocast throughput on CPU",
    "exit_stress": "clean exit of 2-process gloo runs (the os._exit shutdown)",
    "gpu": "GPU throughput, memory, busy share, data wait, host-device syncs per step (needs a GPU)",
    "raw_pipeline": "raw-scan pipeline CPU s per 1 mm head on one core: N4 / registration / deepbet (target ≤ 30 s)",
    "explain_faithfulness": "attribution maps vs the planted age effect: enrichment per method, presets default/realistic (issue 18.2)",
    "faults": "fault injection: clean error or correct recovery, silent or destructive 0 (issue 14)",
    "trust_calibration": "per synthetic preset: MAE/r uncorrected vs bias-corrected vs predict-the-mean (bootstrap CIs), conformal coverage, OOD flags; 2-seed ensemble",
}

README_BEGIN = "<!-- benchmarks:begin (rendered by `python -m benchmarks.run_all --render-only` from benchmarks/results/*.json; do not edit) -->"
README_END = "<!-- benchmarks:end -->"

HEADER = """# Benchmarks

Rendered by `python -m benchmarks.run_all` (`make bench`) from the JSON results in
[`benchmarks/results/`](benchmarks/results/); every section gives the exact command, the
machine, its load at the start and the date. A run whose machine was busy with other
work is marked **NOISY**: its timings are not a measurement of this code alone.
Speed targets are checked here, never by timing asserts in tests.
"""


def _ratios(r: dict[str, Any]) -> list[dict[str, Any]]:
    return list(r.get("ratios") or ([r["ratio"]] if r.get("ratio") else []))


def _load_line(r: dict[str, Any]) -> str | None:
    load = r.get("load") or {}
    return f"**NOISY**: {noisy_text(load)}." if load.get("noisy") else None


def _section(r: dict[str, Any], path: Path) -> list[str]:
    lines = [f"## {r['title']}", "", f"- command: `{r['command']}`", f"- date: {r['date']}",
             f"- machine: {describe_machine(r.get('machine', {}))}", f"- result: `{_shown(path)}`"]
    if r.get("config"):
        lines.append("- config: " + ", ".join(f"{k}={v}" for k, v in r["config"].items()))
    noisy = _load_line(r)
    lines += ["", *([noisy, ""] if noisy else [])]
    lines += [markdown_table(r["table"]["headers"], r["table"]["rows"]), ""]
    for table in r.get("extra_tables", []):
        lines += [f"{table['title']}:", "", markdown_table(table["headers"], table["rows"]), ""]
    lines += [f"**{x['text']}**\n" for x in _ratios(r)]
    lines += [f"{n}\n" for n in r.get("notes", [])]
    return lines


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)


def _results(results_dir: Path) -> list[tuple[str, Path, dict[str, Any] | None]]:
    """(name, path, result or None) for every registered benchmark, then any other JSON in the folder."""
    names = list(BENCHMARKS) + sorted(p.stem for p in results_dir.glob("*.json") if p.stem not in BENCHMARKS)
    out = []
    for name in names:
        path = results_dir / f"{name}.json"
        out.append((name, path, json.loads(path.read_text()) if path.is_file() else None))
    return out


def render(results_dir: Path = RESULTS_DIR, out: Path = REPO / "BENCHMARKS.md") -> Path:
    """Write BENCHMARKS.md from ``results_dir/*.json`` (quick results are refused)."""
    lines = [HEADER]
    for name, path, r in _results(results_dir):
        if r is None:
            lines += [f"## {name}", "", f"Not run yet: `python -m benchmarks.{name}` ({BENCHMARKS.get(name, '')}).", ""]
        elif r.get("quick"):
            lines += [f"## {r.get('title', name)}", "", "Only a `--quick` smoke run exists: not a measurement.", ""]
        else:
            lines += _section(r, path)
    _write(out, "\n".join(lines).rstrip() + "\n")
    return out


def _readme_block(results_dir: Path) -> str:
    rows = []
    for name, _, r in _results(results_dir):
        if r is None or r.get("quick"):
            rows.append([f"`{name}`", "not run yet", "", ""])
            continue
        load = r.get("load") or {}
        when = str(r.get("date", ""))[:10] + (" (noisy machine)" if load.get("noisy") else "")
        heads = _ratios(r)
        if not heads:  # a one-column status table (the GPU benchmark without a GPU) says it; else the title
            table = r.get("table") or {}
            status = len(table.get("headers", [])) == 1 and table.get("rows")
            rows.append([f"`{name}`", str(table["rows"][0][0]) if status else r.get("title", name), "", when])
        for x in heads:
            verdict = {True: "met", False: "NOT met", None: ""}[x.get("met")]
            rows.append([f"`{name}`", x["text"].rsplit(": ", 1)[0] if verdict else x["text"], verdict, when])
    table = markdown_table(["benchmark", "headline (from benchmarks/results/)", "verdict", "measured on"], rows)
    return f"{README_BEGIN}\n{table}\n\nFull tables, commands, machines and load: [BENCHMARKS.md](BENCHMARKS.md).\n{README_END}"


def render_readme(results_dir: Path = RESULTS_DIR, readme: Path = REPO / "README.md") -> Path:
    """Rewrite the README's marked benchmark block from the same results (nothing else in the README changes)."""
    text = readme.read_text(encoding="utf-8")
    begin, end = text.find("<!-- benchmarks:begin"), text.find(README_END)
    if begin < 0 or end < begin:
        raise ValueError(f"{readme}: no '<!-- benchmarks:begin ... -->' ... '{README_END}' block to render into")
    _write(readme, text[:begin] + _readme_block(results_dir) + text[end + len(README_END):])
    return readme


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run_all", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke runs of every benchmark (results not rendered)")
    p.add_argument("--only", nargs="+", choices=list(BENCHMARKS), help="run only these")
    p.add_argument("--render-only", action="store_true", help="do not run anything, only rebuild BENCHMARKS.md and the README block")
    args = p.parse_args(argv)
    failed = []
    if not args.render_only:
        for name in args.only or list(BENCHMARKS):
            cmd = [sys.executable, "-m", f"benchmarks.{name}", *(["--quick"] if args.quick else [])]
            print(f"\n$ {' '.join(cmd[1:])}", flush=True)
            rc = subprocess.run(cmd, cwd=REPO).returncode
            if rc != 0:
                failed.append(f"{name} (exit {rc})")
    print(f"\nwritten {render()} and {render_readme()}")
    if failed:
        print("benchmarks that failed: " + ", ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
