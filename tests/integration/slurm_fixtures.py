"""Reusable helpers and fixtures for tests against the local SLURM cluster.

The cluster is started by ``slurm/local/start.sh`` (``make slurm-up``; ``make test``
does it through ``slurm/local/maybe_start.sh``).  Import what you need into a test
module::

    from tests.integration.slurm_fixtures import slurm_cluster, sbatch, wait_job_done  # noqa: F401

Tests using ``slurm_cluster`` are skipped with a visible reason when ``sinfo`` is
missing or the 4 nodes do not answer, except when ``CI=true`` or
``BRAINAGE_REQUIRE_SLURM=1``: then they fail, so CI can never silently skip them.

No slurmdbd runs, so ``sacct`` does not work: job state comes from ``squeue`` and
``scontrol show job`` (finished jobs stay visible there for MinJobAge=120 s).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
LOCAL_STATE = Path(os.environ.get("SLURM_LOCAL_STATE", REPO_ROOT / "slurm" / "local" / "state"))
EXPECTED_NODES = ["n1", "n2", "n3", "n4"]
PARTITION = "debug"
READY_STATES = {"idle", "mix", "alloc", "comp"}
FINAL_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
    "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
}


def slurm_required() -> bool:
    """True when a missing cluster must fail the tests instead of skipping them."""
    return os.environ.get("CI", "").lower() == "true" or os.environ.get(
        "BRAINAGE_REQUIRE_SLURM", ""
    ).lower() in ("1", "true", "yes")


def _run(cmd: List[str], timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} failed (rc={proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}"
        )
    return proc


def node_states() -> Dict[str, str]:
    """{'n1': 'idle', ...} for the debug partition (a '*' suffix means not responding)."""
    out = _run(["sinfo", "-h", "-N", "-p", PARTITION, "-o", "%N %t"], timeout=15).stdout
    states = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2:
            states[parts[0]] = parts[1]
    return states


def _cluster_problem(wait_s: float = 30.0) -> Optional[str]:
    """None if the 4 local nodes answer (waiting up to wait_s), else the reason."""
    if shutil.which("sinfo") is None:
        return "sinfo not found (no SLURM client; run `make slurm-up` as root)"
    if "SLURM_CONF" not in os.environ and not Path("/etc/slurm/slurm.conf").exists():
        if (LOCAL_STATE / "slurm.conf").exists():
            os.environ["SLURM_CONF"] = str(LOCAL_STATE / "slurm.conf")
        else:
            return "no slurm.conf (run `make slurm-up` as root)"
    deadline = time.monotonic() + wait_s
    last = ""
    while True:
        try:
            states = node_states()
            ready = [n for n in EXPECTED_NODES if states.get(n) in READY_STATES]
            if len(ready) == len(EXPECTED_NODES):
                return None
            last = f"nodes not ready: {states or 'none listed'}"
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            # controller not reachable: no point in waiting (sinfo itself retries ~10 s)
            return f"local SLURM cluster not available (sinfo failed: {exc}); run `make slurm-up` as root"
        if time.monotonic() >= deadline:
            return f"local SLURM cluster not available ({last}); run `make slurm-up` as root"
        time.sleep(1.0)


@dataclass
class SlurmCluster:
    nodes: List[str]
    partition: str
    conf: str


@pytest.fixture(scope="session")
def slurm_cluster() -> SlurmCluster:
    """The local 4-node cluster; skips (or fails under CI) when it is not up."""
    problem = _cluster_problem()
    if problem is not None:
        if slurm_required():
            pytest.fail(f"SLURM required (CI/BRAINAGE_REQUIRE_SLURM) but {problem}")
        pytest.skip(problem)
    conf = os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf")
    return SlurmCluster(nodes=list(EXPECTED_NODES), partition=PARTITION, conf=conf)


@pytest.fixture()
def slurm_jobs():
    """A list to append submitted job ids to; anything still queued is cancelled at teardown."""
    ids: List[str] = []
    yield ids
    for jid in ids:
        subprocess.run(["scancel", jid], capture_output=True, timeout=15)


def sbatch(args: List[str], cwd: Optional[Path] = None) -> str:
    """Submit with `sbatch --parsable ARGS`; returns the job id."""
    proc = subprocess.run(
        ["sbatch", "--parsable", *args], capture_output=True, text=True, timeout=30,
        cwd=str(cwd) if cwd else None,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"sbatch {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout.strip().split(";")[0]


def job_info(job_id: str) -> Dict[str, str]:
    """`scontrol show job -o` as a dict; {} once the job record is gone (MinJobAge)."""
    proc = subprocess.run(
        ["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True, timeout=15
    )
    if proc.returncode != 0 or not proc.stdout.strip():
        return {}
    info: Dict[str, str] = {}
    for tok in proc.stdout.split():
        if "=" in tok:
            key, _, val = tok.partition("=")
            info.setdefault(key, val)
    return info


def wait_for(pred: Callable[[], bool], timeout: float, what: str, interval: float = 0.2) -> float:
    """Poll pred() until true; returns the seconds waited, fails the test on timeout."""
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
    return time.monotonic() - t0


def wait_job_state(job_id: str, states, timeout: float, reason: Optional[str] = None) -> Dict[str, str]:
    """Wait until JobState is in `states` (and Reason == reason if given); returns job_info."""
    states = {states} if isinstance(states, str) else set(states)
    box: Dict[str, Dict[str, str]] = {}

    def ok() -> bool:
        box["info"] = info = job_info(job_id)
        return info.get("JobState") in states and (reason is None or info.get("Reason") == reason)

    wait_for(ok, timeout, f"job {job_id} to reach {sorted(states)}" + (f"/{reason}" if reason else ""))
    return box["info"]


def wait_job_done(job_id: str, timeout: float = 60) -> Dict[str, str]:
    """Wait until the job reached a final state; returns its job_info ({} if already purged)."""
    box: Dict[str, Dict[str, str]] = {}

    def done() -> bool:
        box["info"] = info = job_info(job_id)
        return not info or info.get("JobState") in FINAL_STATES

    wait_for(done, timeout, f"job {job_id} to finish")
    return box["info"]


def release_requeued(job_id: str, settle_s: float = 2.0) -> None:
    """Start a requeued job now instead of after its 120 s BeginTime.

    Wait settle_s first: slurmd revokes the job's credentials when the old
    instance is killed, with 1 s resolution, so a relaunch within the same
    second dies with "Killing non-startable batch JobId=X: Job credential
    revoked" (JobState=FAILED, ExitCode=1)."""
    time.sleep(settle_s)
    _run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], timeout=15)
