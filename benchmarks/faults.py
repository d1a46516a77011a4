"""Fault injection in a loop: every case ends in a clean error or a correct recovery, never silently.

    python -m benchmarks.faults [--quick] [--repeat N] [--only D1 S6 ...] [--out FILE]

Each case damages something the way issue 14 found it (flipped checkpoint bytes,
a changed config on resume, two runs in one folder, nonsense values, a full or
read-only disk, kill -9, Ctrl-C...) on tiny data and classifies what the toolkit did:

* ``clean error``: the documented exit code and one line naming the problem, nothing in the run folder changed;
* ``recovery``: the run went on correctly (e.g. resumed from the previous, verified checkpoint);
* ``silent``: a wrong result without a word; ``destructive``: a good checkpoint lost or overwritten;
* ``other``: a traceback or anything else unexpected.

The headline is ``faults injected N, clean error or correct recovery N, silent or destructive 0``.

Other parts add cases in ``benchmarks/faults_<area>.py`` with the :func:`fault` decorator;
this script imports every such module, so they run in the same loop and the same table.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import logging
import os
import pkgutil
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from benchmarks.common import REPO, bench_shards, child_env, finish, make_ratio, make_result, result_path
from benchmarks.fault_tools import can_mount, flip_tensor_bytes, mount_tmpfs, unmount

__all__ = ["FAULTS", "Context", "FaultCase", "Verdict", "fault", "main"]

Outcome = Literal["clean error", "recovery", "silent", "destructive", "other"]
GOOD: tuple[Outcome, ...] = ("clean error", "recovery")


@dataclass
class Verdict:
    outcome: Outcome
    detail: str = ""


@dataclass
class Context:
    """What a case gets: tiny shards, a fresh folder, and ways to run ``brainage train``."""

    shards: Path
    workdir: Path

    def overrides(self, *extra: str) -> list[str]:
        return [
            f"data.shards={self.shards}", "data.shape=[32,32,32]", "data.batch_size=8", "data.num_workers=0",
            "data.pin_memory=false", "data.persistent_workers=false", "data.augment.enabled=false", "data.val_split=",
            "model.name=cnn3d", "model.task=regress", "model.params={depth: 2, width: 4, dropout: 0.1}",
            "train.backend=single", "train.precision=32", "train.epochs=100", "train.deterministic=true",
            "train.lr=3e-3", "train.schedule=constant", "train.warmup_steps=0", "train.log_every_steps=1",
            "train.ckpt_every_steps=2", "train.progress=false", *extra,
        ]

    def train(self, run_dir: Path, *extra: str, resume: str = "auto") -> tuple[int | None, list[str]]:
        """``brainage train`` in this process: (exit code or None after a traceback, the error lines)."""
        from brainage_hpc.cli import main

        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                code: int | None = main(["train", "--config", "cnn_demo", "--run-dir", str(run_dir), "--resume", resume,
                                         *self.overrides(*extra)])
            except BaseException as exc:  # a traceback is an outcome here, not a crash of the benchmark
                logging.getLogger(__name__).debug("traceback", exc_info=True)
                return None, [f"{type(exc).__name__}: {exc}"]
        return code, [line for line in err.getvalue().splitlines() if line.startswith("brainage ")]

    def command(self, run_dir: Path, *extra: str, resume: str = "auto") -> list[str]:
        return [sys.executable, "-m", "brainage_hpc.cli", "train", "--config", "cnn_demo", "--run-dir", str(run_dir),
                "--resume", resume, *self.overrides(*extra)]

    def spawn(self, run_dir: Path, *extra: str, **env: str) -> subprocess.Popen:
        return subprocess.Popen(self.command(run_dir, *extra), env=child_env(1, BRAINAGE_NO_PROGRESS="1", **env),
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@dataclass
class FaultCase:
    case_id: str
    area: str
    description: str
    run: Callable[[Context], Verdict]
    quick: bool = False


FAULTS: dict[str, FaultCase] = {}


def fault(case_id: str, area: str, description: str, quick: bool = False) -> Callable[[Callable[[Context], Verdict]], Callable[[Context], Verdict]]:
    """Register a fault case (``case_id`` unique, e.g. ``"D1-flip"``); ``quick`` ones run in ``--quick``."""
    def register(fn: Callable[[Context], Verdict]) -> Callable[[Context], Verdict]:
        if case_id in FAULTS:
            raise ValueError(f"fault case {case_id!r} registered twice")
        FAULTS[case_id] = FaultCase(case_id, area, description, fn, quick)
        return fn
    return register


# --------------------------------------------------------------------------- engine helpers


def _ckpt(run: Path, step: int) -> Path:
    return run / f"ckpt-step{step:08d}.pt"


def _records(run: Path) -> list[dict[str, Any]]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _resumed_at(run: Path) -> int | None:
    steps = [r["step"] for r in _records(run) if r.get("event") == "resume"]
    return steps[-1] if steps else None


def _snapshot(run: Path) -> dict[str, bytes]:
    return {p.relative_to(run).as_posix(): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and (p.name.startswith("ckpt-step") or p.name in ("best.pt", "last.pt", "config.yaml"))}


def _refused(code: int | None, lines: list[str], want_code: int, *needles: str) -> Verdict:
    if code is None:
        return Verdict("other", f"traceback: {lines[0][:120] if lines else ''}")
    if code == want_code and len(lines) == 1 and all(n in lines[0] for n in needles):
        return Verdict("clean error", lines[0][:160])
    if code == 0:
        return Verdict("silent", "exit 0: the fault was not noticed")
    return Verdict("other", f"exit {code}: {' | '.join(lines)[:160]}")


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


# --------------------------------------------------------------------------- engine cases (issue 14)


@fault("D1-flip", "engine", "newest checkpoint: 256 bytes XOR 0xFF inside its largest tensor")
def _d1_flip(ctx: Context) -> Verdict:
    run = ctx.workdir / "run"
    ctx.train(run, "train.max_steps=6")
    flip_tensor_bytes(_ckpt(run, 6), "xor256")
    code, lines = ctx.train(run, "train.max_steps=10", "train.keep_last=1")
    if not (_ckpt(run, 4).exists() and _ckpt(run, 3).exists()):
        return Verdict("destructive", "the verified checkpoints before the damaged one were pruned")
    if code == 0 and _resumed_at(run) == 4:
        return Verdict("recovery", "skipped the damaged checkpoint, resumed from step 4")
    return Verdict("silent" if code == 0 else "other", f"exit {code}, resumed at {_resumed_at(run)}")


@fault("S1-exponent", "engine", "newest checkpoint: exponent bit of 512 floats flipped (finite wrong values)")
def _s1_exponent(ctx: Context) -> Verdict:
    straight, split = ctx.workdir / "straight", ctx.workdir / "split"
    ctx.train(straight, "train.max_steps=8")
    ctx.train(split, "train.max_steps=6")
    flip_tensor_bytes(_ckpt(split, 6), "exponent")
    code, lines = ctx.train(split, "train.max_steps=8")
    if code != 0:
        return Verdict("other", f"exit {code}: {' | '.join(lines)[:120]}")
    a, b = _weights(straight / "last.pt"), _weights(split / "last.pt")
    if all(torch.equal(a[k], b[k]) for k in a):
        return Verdict("recovery", "resumed from step 4; weights bit-identical to the straight run")
    return Verdict("silent", "weights differ from the straight run")


@fault("D1-diverge", "engine", "checkpoint with a valid digest but poisoned weights (x1e30): divergence")
def _d1_diverge(ctx: Context) -> Verdict:
    from brainage_hpc.engine.checkpoint import read_checkpoint, save_sealed

    run = ctx.workdir / "run"
    ctx.train(run, "train.max_steps=4")
    state = read_checkpoint(_ckpt(run, 4))
    state["model"] = {k: v * 1e30 if v.is_floating_point() else v for k, v in state["model"].items()}
    save_sealed(state, _ckpt(run, 4))
    extra = ("train.max_steps=12", "train.keep_last=1", "train.nan_max=3")
    code, _ = ctx.train(run, *extra)
    if not (_ckpt(run, 3).exists() and _ckpt(run, 4).exists()):
        return Verdict("destructive", "the way back (steps 3, 4) was pruned")
    if code != 1:
        return Verdict("silent" if code == 0 else "other", f"exit {code} after divergence")
    before = _snapshot(run)
    code, lines = ctx.train(run, *extra)
    verdict = _refused(code, lines, 2, "diverged", "--resume")
    if verdict.outcome == "clean error" and _snapshot(run) != before:
        return Verdict("destructive", "the refused restart changed the run folder")
    return verdict


@fault("D2-model", "engine", "resume the same --run-dir with model.params.width changed")
def _d2_model(ctx: Context) -> Verdict:
    run = ctx.workdir / "run"
    ctx.train(run, "train.max_steps=4")
    before = _snapshot(run)
    code, lines = ctx.train(run, "train.max_steps=6", "model.params.width=8")
    if _snapshot(run) != before:
        return Verdict("destructive", "checkpoints, best.pt or config.yaml changed")
    return _refused(code, lines, 2, "model.params.width", "--resume none")


@fault("D2-lr-auto", "engine", "resume --auto with train.lr changed (a shared launcher folder)")
def _d2_lr(ctx: Context) -> Verdict:
    run = ctx.workdir / "run"
    ctx.train(run, "train.max_steps=4")
    before = _snapshot(run)
    code, lines = ctx.train(run, "train.max_steps=6", "train.lr=0.01")
    if _snapshot(run) != before:
        return Verdict("destructive", "the run folder changed")
    return _refused(code, lines, 2, "train.lr")


@fault("S6-lock", "engine", "a second training in the same run folder while the first runs")
def _s6_lock(ctx: Context) -> Verdict:
    run = ctx.workdir / "run"
    first = ctx.spawn(run, "train.max_steps=60", BRAINAGE_TEST_STEP_SLEEP_S="0.5")
    try:
        t0 = time.time()
        while not any("train/loss" in r for r in _records(run)):
            if first.poll() is not None or time.time() - t0 > 300:
                return Verdict("other", "the first run did not start")
            time.sleep(0.1)
        code, lines = ctx.train(run, "train.max_steps=60", "train.lr=0.01")
    finally:
        first.kill()
        first.wait()
    return _refused(code, lines, 2, f"pid {first.pid}", socket.gethostname())


def _value_case(case_id: str, value: str, key: str) -> None:
    @fault(case_id, "engine", f"`{value}`", quick=True)
    def _case(ctx: Context) -> Verdict:
        code, lines = ctx.train(ctx.workdir / "run", value)
        return _refused(code, lines, 2, key, "must be")


for _id, _value, _key in [
    ("S7-epochs0", "train.epochs=0", "train.epochs"), ("S7-epochs-1", "train.epochs=-1", "train.epochs"),
    ("T2-batch0", "data.batch_size=0", "data.batch_size"), ("T2-batch-4", "data.batch_size=-4", "data.batch_size"),
    ("T2-accum0", "train.grad_accum=0", "train.grad_accum"), ("T2-lr-1", "train.lr=-1", "train.lr"),
    ("T2-workers-1", "data.num_workers=-1", "data.num_workers"), ("U2-width-abc", "model.params.width=abc", "model.params.width"),
]:
    _value_case(_id, _value, _key)


@fault("T3-file", "engine", "--run-dir is an existing file", quick=True)
def _t3_file(ctx: Context) -> Verdict:
    path = ctx.workdir / "file"
    path.write_text("x")
    return _refused(*ctx.train(path), 2, "run folder")


@fault("T3-under-file", "engine", "--run-dir under a file")
def _t3_under(ctx: Context) -> Verdict:
    (ctx.workdir / "file").write_text("x")
    return _refused(*ctx.train(ctx.workdir / "file" / "run"), 2, "run folder")


@fault("T3-read-only", "engine", "--run-dir on a read-only file system")
def _t3_ro(ctx: Context) -> Verdict:
    mnt = ctx.workdir / "ro"
    if not (can_mount() and mount_tmpfs(mnt, "1m", read_only=True)):
        return Verdict("clean error", "skipped: cannot mount a read-only tmpfs here")
    try:
        return _refused(*ctx.train(mnt / "run"), 2, "run folder")
    finally:
        unmount(mnt)


@fault("T3-enospc", "engine", "disk full while writing a checkpoint (small tmpfs)")
def _t3_enospc(ctx: Context) -> Verdict:
    disk = ctx.workdir / "disk"
    if not (can_mount() and mount_tmpfs(disk, "4m")):
        return Verdict("clean error", "skipped: cannot mount a tmpfs here")
    try:
        run = disk / "run"
        ctx.train(run, "train.max_steps=4")
        st = os.statvfs(disk)
        (disk / "filler").write_bytes(b"\0" * max(st.f_bavail * st.f_frsize - _ckpt(run, 4).stat().st_size // 2, 0))
        before = {n: b for n, b in _snapshot(run).items() if n.startswith("ckpt-step")}
        code, lines = ctx.train(run, "train.max_steps=8")
        after = {n: b for n, b in _snapshot(run).items() if n.startswith("ckpt-step")}
        if any(after.get(n) != b for n, b in before.items()) or any(p.name.endswith(".tmp") for p in run.iterdir()):
            return Verdict("destructive", "earlier checkpoints changed or a temp file was left")
        return _refused(code, lines, 1, "No space left on device", "ckpt-step00000006.pt")
    finally:
        unmount(disk)


@fault("T4-empty", "engine", "--resume zero.pt (an empty file)", quick=True)
def _t4_empty(ctx: Context) -> Verdict:
    zero = ctx.workdir / "zero.pt"
    zero.write_bytes(b"")
    return _refused(*ctx.train(ctx.workdir / "run", resume=str(zero)), 2, "zero.pt")


@fault("T4-truncated", "engine", "--resume a truncated checkpoint")
def _t4_truncated(ctx: Context) -> Verdict:
    run = ctx.workdir / "run"
    ctx.train(run, "train.max_steps=2")
    bad = ctx.workdir / "cut.pt"
    bad.write_bytes(_ckpt(run, 2).read_bytes()[:500])
    return _refused(*ctx.train(ctx.workdir / "run2", resume=str(bad)), 2, "cut.pt")


@fault("U4-kill9", "engine", "kill -9 while a checkpoint is written, then --resume auto")
def _u4_kill9(ctx: Context) -> Verdict:
    run = ctx.workdir / "run"
    ctx.train(run, "train.max_steps=4")
    proc = ctx.spawn(run, "train.max_steps=9", BRAINAGE_CKPT_WRITE_HOLD_S="120")
    t0 = time.time()
    while not list(run.glob("*.writing")) and proc.poll() is None and time.time() - t0 < 300:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    code, lines = ctx.train(run, "train.max_steps=9")
    steps = [r["step"] for r in _records(run) if "train/loss" in r]
    if code != 0:
        return Verdict("other", f"exit {code}: {' | '.join(lines)[:120]}")
    if steps != list(range(1, 10)) or list(run.glob(".*.tmp")):
        return Verdict("silent", f"steps logged {steps}; temp files {[p.name for p in run.glob('.*.tmp')]}")
    return Verdict("recovery", "resumed from step 4, each step logged once, no temp file left")


def _signal_case(case_id: str, sig: signal.Signals, want: int) -> None:
    @fault(case_id, "engine", f"{sig.name} during training: checkpoint, exit {want}")
    def _case(ctx: Context) -> Verdict:
        run = ctx.workdir / "run"
        proc = ctx.spawn(run, "train.max_steps=60", "train.ckpt_every_steps=0", BRAINAGE_TEST_STEP_SLEEP_S="0.3")
        t0 = time.time()
        while not any(r.get("step", 0) >= 2 and "train/loss" in r for r in _records(run)):
            if proc.poll() is not None or time.time() - t0 > 300:
                proc.kill()
                return Verdict("other", "the run did not reach step 2")
            time.sleep(0.05)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=300)
        if "Traceback" in err:
            return Verdict("other", "traceback")
        stops = [r for r in _records(run) if r.get("event") in ("stop", "preempt")]
        last = run / "last.pt"
        saved = torch.load(last, weights_only=True)["step"] if last.exists() else None
        if proc.returncode == want and stops and saved == stops[-1]["step"]:
            return Verdict("recovery", f"checkpointed at step {saved}, exit {want}")
        return Verdict("other", f"exit {proc.returncode}, checkpoint at {saved}")


for _id, _sig, _want in [("U5-ctrl-c", signal.SIGINT, 130), ("SIGTERM", signal.SIGTERM, 143), ("SIGUSR1", signal.SIGUSR1, 3)]:
    _signal_case(_id, _sig, _want)


# --------------------------------------------------------------------------- the loop


def _load_plugins() -> None:
    """Import ``benchmarks/faults_<area>.py``: other parts register their cases there."""
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if info.name.startswith("faults_"):
            importlib.import_module(f"benchmarks.{info.name}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.faults", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="only the fast cases, once (a smoke run)")
    p.add_argument("--repeat", type=int, default=1, help="run every case this many times (default 1)")
    p.add_argument("--only", nargs="*", default=None, help="case ids (prefix match), e.g. D1 S6")
    p.add_argument("--out", default=None, help="JSON result (default benchmarks/results/faults.json; quick: bench_out/quick/)")
    args = p.parse_args(argv)
    out = args.out or str(result_path("faults", args.quick))
    log_file = Path(tempfile.gettempdir()) / f"brainage-faults-{os.getpid()}.log"
    logging.basicConfig(level=logging.INFO, filename=log_file, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("BRAINAGE_NO_PROGRESS", "1")
    _load_plugins()
    cases = [c for c in FAULTS.values() if (c.quick or not args.quick)
             and (not args.only or any(c.case_id.startswith(o) for o in args.only))]
    shards = bench_shards(24, (32, 32, 32), 6.0)
    tally: dict[str, Counter[str]] = {c.case_id: Counter() for c in cases}
    details: dict[str, str] = {}
    t0 = time.time()
    for rep in range(1 if args.quick else max(args.repeat, 1)):
        for case in cases:
            work = Path(tempfile.mkdtemp(prefix=f"fault-{case.case_id}-"))
            try:
                verdict = case.run(Context(shards, work))
            except Exception as exc:  # the harness itself must survive a case that crashes
                verdict = Verdict("other", f"case crashed: {type(exc).__name__}: {exc}"[:160])
            finally:
                shutil.rmtree(work, ignore_errors=True)
            tally[case.case_id][verdict.outcome] += 1
            details[case.case_id] = verdict.detail
            print(f"[{rep + 1}] {case.case_id:16s} {verdict.outcome:12s} {verdict.detail}", flush=True)
    total = sum(sum(c.values()) for c in tally.values())
    good = sum(c[o] for c in tally.values() for o in GOOD)
    bad = sum(c["silent"] + c["destructive"] for c in tally.values())
    other = total - good - bad
    headline = f"faults injected {total}, clean error or correct recovery {good}, silent or destructive {bad}"
    if other:
        headline += f", other (traceback or unexpected) {other}"
    rows = [[c.case_id, c.area, c.description, sum(tally[c.case_id].values()),
             ", ".join(f"{o} {n}" for o, n in sorted(tally[c.case_id].items())), details.get(c.case_id, "")] for c in cases]
    result = make_result(
        "faults", "Fault injection: clean error or correct recovery, never silent", argv, quick=args.quick,
        config={"repeat": args.repeat, "cases": [c.case_id for c in cases], "shards": "24 synthetic subjects, 32^3, 6 mm"},
        headers=["case", "area", "fault", "runs", "outcomes", "last detail"], rows=rows,
        ratio=make_ratio("clean error or correct recovery", good / max(total, 1), 1.0, ">=", text=headline),
        notes=[headline, f"wall time {time.time() - t0:.0f} s; log {log_file}"],
        injected=total, clean_or_recovered=good, silent_or_destructive=bad, other=other,
    )
    finish(result, out)
    return 0 if good == total else 1


if __name__ == "__main__":
    sys.exit(main())
