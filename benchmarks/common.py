"""Shared helpers of the benchmarks: machine description, tables, JSON results, cached shards.

Every benchmark writes one JSON result of the same shape, which ``run_all``
turns into a section of BENCHMARKS.md::

    {"benchmark": "ddp_scaling", "title": ..., "command": ..., "date": ISO 8601,
     "machine": machine_info(), "quick": bool, "config": {...},
     "table": {"headers": [...], "rows": [[...], ...]},
     "ratio": {"label", "value", "target", "op" (">=" | "<="), "met", "text"} or None,
     "ratios": [ratio, ...]            (all headline lines; "ratio" is the first),
     "extra_tables": [{"title", "headers", "rows"}, ...],
     "load": {"loadavg_1m_start", "loadavg_1m_end", "cpu_busy_start", "cores", "noisy"},
     "notes": [str, ...], ...benchmark-specific raw numbers}

Full runs write ``benchmarks/results/<name>.json`` (committed; BENCHMARKS.md and
the README's numbers are rendered from these files), ``--quick`` smoke runs
``bench_out/quick/<name>.json`` (never rendered). Adding a benchmark: write
``benchmarks/<name>.py`` that ends with ``finish(make_result(...), result_path(name, quick))``,
list it in ``run_all.BENCHMARKS`` and add its ``--quick`` run to
``tests/integration/test_benchmarks_smoke.py``.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "REPO",
    "BENCH_OUT",
    "RESULTS_DIR",
    "cpu_busy",
    "bench_shards",
    "child_env",
    "describe_machine",
    "finish",
    "machine_info",
    "make_ratio",
    "make_result",
    "markdown_table",
    "median",
    "now_iso",
    "read_jsonl",
    "result_path",
    "set_threads",
    "sync",
]

REPO = Path(__file__).resolve().parents[1]
BENCH_OUT = REPO / "bench_out"  # scratch: cached data sets, quick results
RESULTS_DIR = REPO / "benchmarks" / "results"  # committed results of full runs
NOISY_BUSY = 0.20  # other processes used more than this share of the cores before the start: flagged noisy
_SYNTH_MM = 2.0  # voxel size of the cached synthetic cohort (fast to make; upsampled where needed)


# --------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return sorted(have & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
    except OSError:
        pass
    return []


def _ram_gb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return float("nan")


def cpu_busy(seconds: float = 1.0) -> float | None:
    """Share of all cores busy over ``seconds`` (from /proc/stat), this process sleeping meanwhile."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as fh:
            values = [int(v) for v in fh.readline().split()[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)
        return sum(values), idle

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    total = total1 - total0
    return round(1.0 - (idle1 - idle0) / total, 3) if total > 0 else None


def machine_info() -> dict[str, Any]:
    """CPU model and flags, cores, RAM, load (1-min average and the busy share over 1 s), versions, GPU."""
    import torch

    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_gb": _ram_gb(),
        "loadavg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "cpu_busy": cpu_busy(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "gpu": None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": props.name, "count": torch.cuda.device_count(),
                       "memory_gb": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda}
    return info


def describe_machine(m: dict[str, Any]) -> str:
    """One line: ``AMD EPYC ..., 2 cores, 23.4 GB RAM, load 1.2, torch 2.13.0, Python 3.11.9; GPU: ...``."""
    if not m:
        return "unknown machine"
    busy = m.get("cpu_busy")
    busy_text = f", CPU {100 * busy:.0f} % busy before the start" if busy is not None else ""
    text = (f"{m.get('cpu', '?')}, {m.get('cores_usable', m.get('cores', '?'))} cores, {m.get('ram_gb', '?')} GB RAM, "
            f"load {m.get('loadavg_1m', '?')} at start{busy_text}, torch {m.get('torch', '?')}, Python {m.get('python', '?')}")
    gpu = m.get("gpu")
    text += f"; GPU: {gpu['count']}x {gpu['name']} ({gpu['memory_gb']} GB, CUDA {gpu['cuda']})" if gpu else "; no GPU"
    return text


def now_iso() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


# --------------------------------------------------------------------------- numbers and tables


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; cells are written with ``str`` (format numbers before)."""
    lines = ["| " + " | ".join(str(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        cells = [str(c).replace("|", "\\|").replace("\n", " ") for c in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def make_ratio(label: str, value: float, target: float | None, op: str = ">=", text: str | None = None) -> dict[str, Any]:
    """A ratio and whether it meets its target (``op`` ``>=`` or ``<=``; no target: ``met`` is None)."""
    if op not in (">=", "<="):
        raise ValueError(f"op={op!r}: use '>=' or '<='")
    met: bool | None = None
    if target is not None and value == value:  # NaN never meets a target
        met = value >= target if op == ">=" else value <= target
    elif target is not None:
        met = False
    if text is None:
        goal = f" (target {'≥' if op == '>=' else '≤'} {target:g})" if target is not None else ""
        text = f"{label} = {value:.3g}{goal}"
    verdict = {True: "met", False: "NOT met", None: "no target"}[met]
    return {"label": label, "value": value, "target": target, "op": op, "met": met, "text": f"{text}: {verdict}"}


def make_result(name: str, title: str, argv: Sequence[str] | None, *, quick: bool, config: dict[str, Any],
                headers: Sequence[str], rows: Sequence[Sequence[Any]], ratio: dict[str, Any] | None,
                notes: Sequence[str] = (), machine: dict[str, Any] | None = None, **raw: Any) -> dict[str, Any]:
    """The JSON result every benchmark writes (see the module docstring)."""
    args = list(sys.argv[1:] if argv is None else argv)
    machine = machine if machine is not None else machine_info()
    raw.setdefault("ratios", [ratio] if ratio else [])
    raw.setdefault("extra_tables", [])
    return {
        "benchmark": name,
        "title": title,
        "command": " ".join(["python -m", f"benchmarks.{name}", *args]),
        "date": now_iso(),
        "machine": machine,
        "load": load_record(machine),
        "quick": quick,
        "config": config,
        "table": {"headers": list(headers), "rows": [list(r) for r in rows]},
        "ratio": ratio,
        "notes": list(notes),
        **raw,
    }


def load_record(machine: dict[str, Any]) -> dict[str, Any]:
    """Load at the start (from ``machine``) and now, and whether the run is flagged noisy.

    Noisy: other processes kept more than ``NOISY_BUSY`` of the cores busy in the
    second before the start, or the 1-min load average exceeded the core count.
    """
    cores = machine.get("cores_usable") or machine.get("cores") or 1
    start, busy = machine.get("loadavg_1m"), machine.get("cpu_busy")
    noisy = bool((busy is not None and busy > NOISY_BUSY) or (start is not None and start > cores))
    end = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    return {"loadavg_1m_start": start, "loadavg_1m_end": end, "cpu_busy_start": busy, "cores": cores, "noisy": noisy}


def result_path(name: str, quick: bool) -> Path:
    """Where a benchmark writes its JSON: ``benchmarks/results/`` for full runs, ``bench_out/quick/`` for smoke runs."""
    return (BENCH_OUT / "quick" if quick else RESULTS_DIR) / f"{name}.json"


def finish(result: dict[str, Any], out: str | Path) -> int:
    """Print the tables and the headline lines, write the JSON; return the exit code 0."""
    result["load"] = load_record(result.get("machine", {}))  # the end of the run is now
    print(f"\n## {result['title']}{' (quick)' if result.get('quick') else ''}\n")
    print(f"{describe_machine(result.get('machine', {}))}\n")
    if result["load"]["noisy"]:
        print(f"NOISY: {noisy_text(result['load'])}\n")
    print(markdown_table(result["table"]["headers"], result["table"]["rows"]))
    for table in result.get("extra_tables", []):
        print(f"\n{table['title']}\n\n{markdown_table(table['headers'], table['rows'])}")
    for note in result.get("notes", []):
        print(f"\n{note}")
    for r in result.get("ratios") or ([result["ratio"]] if result.get("ratio") else []):
        print(f"\nratio: {r['text']}")
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"\nwritten {path}")
    return 0


def noisy_text(load: dict[str, Any]) -> str:
    """One sentence saying how loaded the machine was."""
    busy = load.get("cpu_busy_start")
    busy_text = f"{100 * busy:.0f} % of the {load.get('cores')} cores busy with other work" if busy is not None else "busy"
    return (f"the machine was {busy_text} before the start (1-min load average {load.get('loadavg_1m_start')} at the start, "
            f"{load.get('loadavg_1m_end')} at the end): timings are noisy, rerun on a quiet machine")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl`` (bad lines skipped)."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


# --------------------------------------------------------------------------- processes and threads


def set_threads(n: int) -> None:
    """Fix torch intra-op threads to ``n`` and inter-op threads to 1 (when still allowed)."""
    import torch

    os.environ["OMP_NUM_THREADS"] = str(n)
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or parallel work already started
        pass


def sync(device: Any) -> None:
    """Wait for queued device work (no-op on CPU)."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize()


def child_env(threads: int, **extra: str) -> dict[str, str]:
    """Environment for a child ``brainage`` process: no inherited rank variables, fixed threads."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "MASTER_", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK"))}
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "BRAINAGE_NO_PROGRESS": "1",
                "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)})
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
    env.update(extra)
    return env


def _cli(args: list[str], workers: int) -> None:
    cmd = [sys.executable, "-m", "brainage_hpc.cli", *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=child_env(1), cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    print(f"  {' '.join(args[:1])}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)


# --------------------------------------------------------------------------- cached synthetic shards


def _unique_cohort(root: Path, unique: int, workers: int) -> Path:
    cohort = root / f"cohort_u{unique}_{_SYNTH_MM:g}mm"
    if (cohort / "truth.json").is_file():
        return cohort
    print(f"benchmarks: synthesising {unique} subjects into {cohort} (once; cached)", file=sys.stderr)
    tmp = cohort.with_name(cohort.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    _cli(["synth", "--out", str(tmp), "--n-subjects", str(unique), "--voxel-mm", str(_SYNTH_MM),
          "--workers", str(workers), "--no-progress"], workers)
    shutil.rmtree(cohort, ignore_errors=True)
    tmp.rename(cohort)
    return cohort


def _replicated_cohort(src: Path, dst: Path, n: int) -> None:
    """``n`` subjects: the unique ones, then copies under new IDs (hard links; loading cost is the same)."""
    from brainage_hpc.ingest.hcp import T1W_RELPATH

    dst.mkdir(parents=True)
    for name in ("unrestricted.csv", "restricted.csv"):
        with open(src / name, newline="") as fh:
            reader = csv.DictReader(fh)
            fields, rows = list(reader.fieldnames or []), list(reader)
        out_rows = []
        for k in range(n):
            row = dict(rows[k % len(rows)])
            if k >= len(rows):
                row["Subject"] = f"9{k:05d}"
            out_rows.append(row)
            if name == "unrestricted.csv":
                target = dst / row["Subject"] / T1W_RELPATH
                target.parent.mkdir(parents=True, exist_ok=True)
                origin = src / rows[k % len(rows)]["Subject"] / T1W_RELPATH
                try:
                    os.link(origin, target)
                except OSError:
                    shutil.copyfile(origin, target)
        with open(dst / name, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=fields)
            w.writeheader()
            w.writerows(out_rows)


# Code whose change makes a cached data set stale (synthesis and preprocessing).
_CACHE_SOURCES = ("brainage_hpc/ingest", "brainage_hpc/data/shards.py", "brainage_hpc/data/checksum.py")


def cache_stamp() -> str:
    """sha256 of the code that produced cached data sets (first 16 hex digits)."""
    import hashlib

    h = hashlib.sha256()
    for rel in _CACHE_SOURCES:
        path = REPO / rel
        for f in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            h.update(f.relative_to(REPO).as_posix().encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def fresh_cache(root: str | Path) -> Path:
    """``root/<cache_stamp()>``: cached data sets made by the code as it is now.

    Why: a cache keyed by shape alone once served shards of an older format to a
    benchmark after a format change (a stale-cache failure, not a slow one).
    Sibling caches of other code versions (marked by ``.brainage-bench-cache``)
    are removed; nothing else under ``root`` is touched.
    """
    root = Path(root)
    stamp = cache_stamp()
    if root.is_dir():
        for old in root.iterdir():
            if old.name != stamp and (old / ".brainage-bench-cache").is_file():
                print(f"benchmarks: removing {old} (made by other code)", file=sys.stderr)
                shutil.rmtree(old, ignore_errors=True)
    here = root / stamp
    here.mkdir(parents=True, exist_ok=True)
    (here / ".brainage-bench-cache").touch()
    return here


def bench_shards(n_subjects: int, shape: Sequence[int], voxel_mm: float, *, unique: int = 8, workers: int = 2,
                 shard_size: int = 32, root: str | Path | None = None) -> Path:
    """A cached shard folder of ``n_subjects`` synthetic subjects, all in the ``train`` split.

    ``unique`` distinct subjects are synthesised once (2 mm) and replicated under
    new IDs up to ``n_subjects``; each shape/voxel size is preprocessed once and
    reused (``bench_out/data/shards_n<N>_<D>x<H>x<W>_<mm>mm``). Throughput does
    not depend on image content, so copies cost nothing in realism.

    Returns:
        The shard folder (holds ``manifest.json``).
    """
    root = fresh_cache(Path(root) if root is not None else BENCH_OUT / "data")
    dims = "x".join(str(int(s)) for s in shape)
    shards = root / f"shards_n{n_subjects}_{dims}_{voxel_mm:g}mm"
    if (shards / "manifest.json").is_file():
        return shards
    unique = min(unique, n_subjects)
    src = _unique_cohort(root, unique, workers)
    cohort = root / f"cohort_n{n_subjects}_from_u{unique}"
    if not (cohort / "restricted.csv").is_file():
        shutil.rmtree(cohort, ignore_errors=True)
        _replicated_cohort(src, cohort, n_subjects)
    print(f"benchmarks: preprocessing {n_subjects} subjects to {dims} @ {voxel_mm:g} mm into {shards} (once; cached)",
          file=sys.stderr)
    tmp = shards.with_name(shards.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    _cli(["preprocess", "--hcp-root", str(cohort), "--out", str(tmp), "--shape", *[str(int(s)) for s in shape],
          "--voxel-mm", str(voxel_mm), "--workers", str(workers), "--shard-size", str(shard_size),
          "--split-fractions", "1", "0", "0", "--no-progress"], workers)
    shutil.rmtree(shards, ignore_errors=True)
    tmp.rename(shards)
    return shards
