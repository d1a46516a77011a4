"""Exit stress: N consecutive 2-rank torchrun runs of a very short job; how many exit with code 0.

``python -m benchmarks.exit_stress [--quick] [--runs 50] [--out benchmarks/results/exit_stress.json]``

Each run is ``python -m torch.distributed.run --nproc_per_node 2 -m
brainage_hpc.cli train --config cnn_demo`` with a tiny CNN, ``train.max_steps=2``,
the ddp backend (gloo) on cached 32^3 synthetic shards, in a fresh run folder.
gloo can abort in its exit path after ``destroy_process_group`` in a share of
runs; ``brainage train`` leaves through ``clean_exit`` (barrier, destroy, flush,
``os._exit``) to avoid it. Acceptance (issue 7): all 50 runs exit 0.
Runs whose stderr mentions an abort (``terminate called``, ``Aborted``,
``SIGABRT``, ``core dumped``) are listed even if their exit code is 0.
Part of ``make bench`` (``run_all``); never run in CI.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import time

from benchmarks.common import (
    BENCH_OUT,
    REPO,
    bench_shards,
    child_env,
    finish,
    machine_info,
    make_ratio,
    make_result,
    median,
    result_path,
)
from benchmarks.ddp_scaling import train_command

__all__ = ["main"]

_ABORT_MARKERS = ("terminate called", "Aborted", "SIGABRT", "core dumped", "Signal 6")
TINY = ["model.params={depth: 2, width: 4, dropout: 0.1}", "train.lr=3e-3", "train.warmup_steps=0"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.exit_stress", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="3 runs")
    p.add_argument("--runs", type=int, default=None, help="consecutive runs (default 50; quick 3)")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=2, help="train.max_steps per run (default 2)")
    p.add_argument("--timeout", type=int, default=300, help="seconds per run before it counts as hung")
    p.add_argument("--out", default=None, help="JSON result (default benchmarks/results/exit_stress.json)")
    args = p.parse_args(argv)
    args.runs = args.runs or (3 if args.quick else 50)
    out = args.out or str(result_path("exit_stress", args.quick))
    machine = machine_info()

    shards = bench_shards(16, (32, 32, 32), 5.0)
    run_root = BENCH_OUT / "runs" / "exit_stress"
    runs = []
    for i in range(args.runs):
        run_dir = run_root / f"run{i:03d}"
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        cmd = train_command(args.nproc, run_dir, shards, [32, 32, 32], 4, args.steps, 1, extra=TINY)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=child_env(1), cwd=REPO, capture_output=True, text=True, timeout=args.timeout)
            code: int | str = proc.returncode
            stderr = proc.stderr
        except subprocess.TimeoutExpired as exc:
            code = "timeout"
            stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        wall = time.perf_counter() - t0
        aborted = any(m in stderr for m in _ABORT_MARKERS)
        rec = {"run": i, "exit_code": code, "wall_s": round(wall, 2), "abort_in_stderr": aborted}
        if code != 0 or aborted:
            rec["stderr_tail"] = stderr[-2000:]
        else:
            shutil.rmtree(run_dir, ignore_errors=True)  # keep only the failures
        runs.append(rec)
        print(f"  run {i + 1}/{args.runs}: exit {code}{' (abort in stderr)' if aborted else ''}, {wall:.1f} s",
              file=sys.stderr)

    codes = collections.Counter(str(r["exit_code"]) for r in runs)
    ok = sum(1 for r in runs if r["exit_code"] == 0 and not r["abort_in_stderr"])
    walls = [r["wall_s"] for r in runs]
    rows = [[args.runs, codes.get("0", 0), ", ".join(f"{c}: {n}" for c, n in sorted(codes.items())),
             sum(r["abort_in_stderr"] for r in runs), f"{median(walls):.1f}"]]
    ratio = make_ratio("clean exits / runs", ok / args.runs, 1.0, ">=",
                       text=f"{ok}/{args.runs} runs exited 0 without an abort (target: all)")
    result = make_result(
        "exit_stress", f"Exit stress: {args.runs} consecutive {args.nproc}-rank torchrun runs", argv, quick=args.quick,
        config={"runs": args.runs, "nproc": args.nproc, "steps": args.steps, "shards": str(shards)},
        headers=["runs", "exit 0", "exit codes", "abort in stderr", "median wall s"], rows=rows, ratio=ratio, machine=machine,
        notes=[f"`brainage train --config cnn_demo` (tiny CNN, 32^3, ddp/gloo, train.max_steps={args.steps}) under "
               f"`torchrun --nproc_per_node {args.nproc}`; failing runs keep their folders in {run_root}."],
        runs=runs,
    )
    return finish(result, out)


if __name__ == "__main__":
    sys.exit(main())
