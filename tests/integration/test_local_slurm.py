"""The local 4-node SLURM cluster (slurm/local/start.sh) behaves like the real thing.

What is checked, and what it cost on the 2-core test VM (slurm 22.05.8, submitit 1.5.4,
pytest --durations):
* a 4-node sbatch job runs one srun task per node ................ ~0.5 s
* requeue: USR1 to the batch shell -> `scontrol requeue` -> PENDING/BeginTime
  (StartTime = requeue + 120 s) -> wait 2 s -> `scontrol update StartTime=now` -> 2nd run; ~4 s
* submitit: a 2-node, 1-task-per-node function job returns both results ~1 s
* submitit: a Checkpointable preempted with its signal (SIGUSR2 by default) is
  checkpointed, requeued and finishes on the 2nd run ............. ~10-12 s
  (rank 1 ignores SIGTERM under submitit, so the step waits for KillWait+SIGKILL)
Whole module: ~13-19 s with the cluster up; ~9 s to skip when no controller answers.
"""

from __future__ import annotations

import os
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from tests.integration.slurm_fixtures import (
    job_info,
    release_requeued,
    sbatch,
    wait_for,
    wait_job_done,
    wait_job_state,
)

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.timeout(150)]


def _write_script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/bash\n" + textwrap.dedent(body).lstrip())
    path.chmod(0o755)
    return path


def test_four_node_job_runs_one_task_per_node(slurm_cluster, slurm_jobs, tmp_path):
    script = _write_script(
        tmp_path / "four.sh",
        """
        srun hostname
        srun bash -c 'echo "task procid=$SLURM_PROCID nodeid=$SLURM_NODEID node=$SLURMD_NODENAME ntasks=$SLURM_NTASKS"'
        """,
    )
    out = tmp_path / "four.out"
    t0 = time.monotonic()
    jid = sbatch(["--nodes", "4", "--ntasks-per-node", "1", "-o", str(out), "--chdir", str(tmp_path), str(script)])
    slurm_jobs.append(jid)
    info = wait_job_done(jid, timeout=60)
    elapsed = time.monotonic() - t0
    text = out.read_text()
    assert info.get("JobState", "COMPLETED") == "COMPLETED", (info, text)
    tasks = [line for line in text.splitlines() if line.startswith("task ")]
    assert len(tasks) == 4, text
    assert sorted(t.split()[2] for t in tasks) == [f"nodeid={i}" for i in range(4)], text
    assert sorted(t.split()[1] for t in tasks) == [f"procid={i}" for i in range(4)], text
    assert sorted(t.split()[3] for t in tasks) == [f"node={n}" for n in slurm_cluster.nodes], text
    assert all(t.split()[4] == "ntasks=4" for t in tasks), text
    print(f"4-node job {jid}: submit -> done in {elapsed:.2f}s")


def test_requeue_cycle_after_usr1(slurm_cluster, slurm_jobs, tmp_path):
    marker = tmp_path / "marker.txt"
    script = _write_script(
        tmp_path / "requeue.sh",
        f"""
        on_usr1() {{
            echo "usr1 restart=${{SLURM_RESTART_COUNT:-0}}" >> {marker}
            kill "$child" 2>/dev/null
            scontrol requeue "$SLURM_JOB_ID"
            exit 0
        }}
        trap on_usr1 USR1
        echo "run restart=${{SLURM_RESTART_COUNT:-0}}" >> {marker}
        echo "stdout run restart=${{SLURM_RESTART_COUNT:-0}}"
        if [ "${{SLURM_RESTART_COUNT:-0}}" -ge 1 ]; then echo "done" >> {marker}; exit 0; fi
        sleep 120 & child=$!
        wait "$child"
        """,
    )
    out = tmp_path / "requeue.out"
    jid = sbatch(["--requeue", "--open-mode=append", "-o", str(out), "--chdir", str(tmp_path), str(script)])
    slurm_jobs.append(jid)
    wait_for(lambda: marker.exists() and "run restart=0" in marker.read_text(), 30, "first run to start")

    # Signals other than KILL reach the batch shell only with --batch (or --full);
    # a plain `scancel --signal=USR1 <id>` goes to job steps only (there are none here).
    t0 = time.monotonic()
    subprocess.run(["scancel", "--signal=USR1", "--batch", jid], check=True, timeout=15)
    info = wait_job_state(jid, "PENDING", timeout=30, reason="BeginTime")
    requeue_s = time.monotonic() - t0
    assert info["Restarts"] == "1", info
    # slurmctld delays a requeued batch job by 120 s (hard-coded); release it now.
    delay = time.mktime(time.strptime(info["StartTime"], "%Y-%m-%dT%H:%M:%S")) - time.time()
    assert 60 < delay <= 125, f"expected BeginTime ~120 s ahead, got {delay:.0f}s: {info}"
    release_requeued(jid)  # not at once: see its docstring (credential revoked)
    final = wait_job_done(jid, timeout=60)
    total = time.monotonic() - t0

    lines = marker.read_text().splitlines()
    assert lines == ["run restart=0", "usr1 restart=0", "run restart=1", "done"], (lines, final, out.read_text())
    stdout = out.read_text()  # --open-mode=append keeps both runs
    assert "stdout run restart=0" in stdout and "stdout run restart=1" in stdout, stdout
    if final:
        assert final["JobState"] == "COMPLETED" and final["Restarts"] == "1", final
    print(f"requeue job {jid}: USR1 -> PENDING(BeginTime) in {requeue_s:.2f}s, "
          f"release -> completed, total {total:.2f}s; BeginTime was +{delay:.0f}s")


# ----------------------------------------------------------------- submitit

def _wait_submitit(job, timeout: float):
    """job.results() can block forever here: without slurmdbd, sacct fails and
    submitit only notices the end through result pickles.  Poll with a bound."""
    t0 = time.monotonic()
    while not job.done():
        if time.monotonic() - t0 > timeout:
            logs = ""
            for p in sorted(Path(job.paths.folder).glob("*_log.*")):
                logs += f"\n--- {p.name}\n{p.read_text()[-2000:]}"
            job.cancel(check=False)
            pytest.fail(f"submitit job {job.job_id} not done after {timeout:.0f}s "
                        f"(scontrol: {job_info(job.job_id).get('JobState')}){logs}")
        time.sleep(0.2)
    return job.results()


def test_submitit_two_node_function(slurm_cluster, slurm_jobs, tmp_path):
    submitit = pytest.importorskip("submitit")

    # Defined inside the test so cloudpickle ships it by value (the job's python
    # need not be able to import this test module).
    def where(x):
        env = submitit.JobEnvironment()
        return x * 2, env.global_rank, env.num_tasks, os.environ.get("SLURMD_NODENAME")

    ex = submitit.AutoExecutor(folder=tmp_path / "submitit" / "%j")
    assert ex.cluster == "slurm"
    ex.update_parameters(slurm_partition=slurm_cluster.partition, nodes=2, tasks_per_node=1, timeout_min=10)
    t0 = time.monotonic()
    job = ex.submit(where, 21)
    slurm_jobs.append(job.job_id)
    # Multi-task jobs: job.result() asserts; use results() (one entry per task) or job.task(0).result().
    results = _wait_submitit(job, timeout=60)
    elapsed = time.monotonic() - t0
    assert sorted(r[:3] for r in results) == [(42, 0, 2), (42, 1, 2)], results
    assert len({r[3] for r in results}) == 2, f"tasks should run on 2 different nodes: {results}"
    assert job.task(0).result()[0] == 42
    print(f"submitit 2-node job {job.job_id}: submit -> results in {elapsed:.2f}s")


def test_submitit_checkpointable_preemption_requeue(slurm_cluster, slurm_jobs, tmp_path):
    submitit = pytest.importorskip("submitit")
    from submitit.slurm.slurm import SlurmJobEnvironment

    sig = SlurmJobEnvironment.USR_SIG  # "USR2" unless SUBMITIT_PREEMPT_SIGNAL was set before import
    marker = tmp_path / "runs.txt"

    class Resumable(submitit.helpers.Checkpointable):
        def __init__(self, marker_path):
            self.marker_path = str(marker_path)
            self.runs = 0

        def __call__(self):
            import time as _time

            self.runs += 1  # state survives the requeue through checkpoint()
            env = submitit.JobEnvironment()
            with open(self.marker_path, "a") as f:
                f.write(f"run={self.runs} rank={env.global_rank}\n")
            if self.runs == 1:
                _time.sleep(120)
            return self.runs

    ex = submitit.AutoExecutor(folder=tmp_path / "submitit" / "%j")
    # timeout_min must be large: submitit calls any signal before
    # min(0.8*timeout, timeout-10min) a "preemption", after it a "timeout";
    # with timeout_min < 10 every signal counts as a timeout (max_num_timeout).
    # The job's submitit must listen to the signal we send: pin it (another module of this
    # process, e.g. brainage_hpc.launch, may have set SUBMITIT_PREEMPT_SIGNAL after submitit's import).
    ex.update_parameters(slurm_partition=slurm_cluster.partition, nodes=2, tasks_per_node=1, timeout_min=60,
                         slurm_setup=[f"export SUBMITIT_PREEMPT_SIGNAL={sig}"])
    job = ex.submit(Resumable(marker))
    slurm_jobs.append(job.job_id)
    wait_for(lambda: marker.exists() and marker.read_text().count("run=1") == 2, 30, "both ranks to start")

    t0 = time.monotonic()
    # No --batch: submitit's sbatch uses --signal=<SIG>@90 (steps only); the python
    # processes run inside the srun step, the batch shell must not get it.
    subprocess.run(["scancel", f"--signal={sig}", job.job_id], check=True, timeout=15)
    info = wait_job_state(job.job_id, "PENDING", timeout=60, reason="BeginTime")
    requeue_s = time.monotonic() - t0
    assert info["Restarts"] == "1", info
    release_requeued(job.job_id)
    results = _wait_submitit(job, timeout=60)
    total = time.monotonic() - t0
    assert results == [2, 2], results
    log0 = Path(job.paths.folder) / f"{job.job_id}_0_log.err"
    assert "this job is preempted" in log0.read_text()
    print(f"submitit preemption {job.job_id}: SIG{sig} -> requeued in {requeue_s:.2f}s, "
          f"finished 2nd run {total:.2f}s after the signal")
