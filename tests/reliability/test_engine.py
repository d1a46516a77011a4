"""Issue 14, engine cases: damaged checkpoints, refused resumes, one run per folder, nonsense values,
unwritable or full run folders, logs after kill -9, Ctrl-C and stop signals.

Every test names its case id and failed on the code before the fix. Runs are tiny (32^3, a few steps).
"""

from __future__ import annotations

import json
import os
import signal
import socket

import pytest
import torch

from benchmarks.fault_tools import can_mount, flip_tensor_bytes, mount_tmpfs, unmount
from tests.reliability.engine_helpers import (
    one_line_error,
    ov,
    reached_step,
    records,
    run_proc,
    snapshot,
    start_proc,
    train_cli,
    wait_for,
    weights,
)

pytestmark = pytest.mark.slow


def _ckpt(run_dir, step):
    return run_dir / f"ckpt-step{step:08d}.pt"


def _resume_steps(run_dir):
    return [r["step"] for r in records(run_dir) if r.get("event") == "resume"]


# --------------------------------------------------------------------------- D1 / S1: damaged checkpoints


def test_D1_flipped_bytes_in_newest_checkpoint_are_skipped_with_one_warning(tiny_shards, tmp_path, caplog, capsys):
    run = tmp_path / "run"
    assert train_cli(run, ov(tiny_shards, "train.max_steps=6"))[0] == 0
    flip_tensor_bytes(_ckpt(run, 6), "xor256")
    caplog.set_level("WARNING")
    code, err = train_cli(run, ov(tiny_shards, "train.max_steps=10", "train.keep_last=1"), capsys=capsys)
    assert code == 0, err[-2000:]
    warnings = [r for r in caplog.records if r.levelname == "WARNING" and "ckpt-step00000006.pt" in r.getMessage()
                and "superseded" not in r.getMessage()]
    assert len(warnings) == 1 and "digest" in warnings[0].getMessage(), [r.getMessage() for r in warnings]
    assert _resume_steps(run)[-1] == 4
    # keep_last=1, yet the checkpoint it resumed from (4) and the one before (3) survive pruning
    assert _ckpt(run, 4).exists() and _ckpt(run, 3).exists()
    assert list((run / "superseded").rglob("ckpt-step00000006.pt")), "the damaged file is set aside, not deleted"


def test_S1_finite_bit_flips_are_detected_and_resume_stays_exact(tiny_shards, tmp_path, capsys):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train_cli(straight, ov(tiny_shards, "train.max_steps=8"))[0] == 0
    assert train_cli(split, ov(tiny_shards, "train.max_steps=6"))[0] == 0
    flip_tensor_bytes(_ckpt(split, 6), "exponent")
    code, err = train_cli(split, ov(tiny_shards, "train.max_steps=8"), capsys=capsys)
    assert code == 0, err[-2000:]
    assert _resume_steps(split)[-1] == 4
    a, b = weights(straight / "last.pt"), weights(split / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the straight run"


def _poison(path, factor=1e30):
    """A checkpoint whose digest is valid but whose weights are wrong (damage before the digest)."""
    from brainage_hpc.engine import checkpoint as ckpt

    read = getattr(ckpt, "read_checkpoint", lambda p: torch.load(p, weights_only=True))
    save = getattr(ckpt, "save_sealed", ckpt.atomic_torch_save)  # (the code before digests had neither)
    state = read(path)
    state["model"] = {k: v * factor if v.is_floating_point() else v for k, v in state["model"].items()}
    save(state, path)


def test_D1_diverged_run_prunes_nothing_names_the_way_back_and_auto_refuses(tiny_shards, tmp_path, capsys):
    run = tmp_path / "run"
    assert train_cli(run, ov(tiny_shards, "train.max_steps=4"))[0] == 0
    _poison(_ckpt(run, 4))
    common = ov(tiny_shards, "train.max_steps=12", "train.keep_last=1", "train.nan_max=3")
    code, err = train_cli(run, common, capsys=capsys)
    assert code == 1, err[-2000:]
    assert _ckpt(run, 4).exists() and _ckpt(run, 3).exists(), sorted(p.name for p in run.iterdir())
    record = json.loads((run / "diverged.json").read_text())
    assert record["go_back"]["resumed_from"].endswith("ckpt-step00000004.pt")
    assert record["go_back"]["before_resume"].endswith("ckpt-step00000003.pt")
    before = snapshot(run)
    code, err = train_cli(run, common, capsys=capsys)  # --resume auto must not restart from the poisoned one
    assert code == 2
    lines = one_line_error(err)
    assert len(lines) == 1 and "diverged" in lines[0] and "--resume" in lines[0] and "ckpt-step00000003.pt" in lines[0], err
    assert snapshot(run) == before
    code, err = train_cli(run, common, resume=str(_ckpt(run, 3)), capsys=capsys)  # the way back works
    assert code == 0, err[-2000:]


# --------------------------------------------------------------------------- D2: resume compatibility


def test_D2_changed_model_is_refused_and_the_run_folder_is_untouched(tiny_shards, tmp_path, capsys):
    run = tmp_path / "run"
    assert train_cli(run, ov(tiny_shards, "train.max_steps=4"))[0] == 0
    before = snapshot(run)
    code, err = train_cli(run, ov(tiny_shards, "train.max_steps=6", "model.params.width=8"), capsys=capsys)
    assert code == 2
    lines = one_line_error(err)
    assert len(lines) == 1 and "model.params.width: 4 -> 8" in lines[0], err
    assert "--run-dir" in lines[0] and "--resume none" in lines[0]
    assert snapshot(run) == before, "a refused resume changed the run folder"

    code, err = train_cli(run, ov(tiny_shards, "train.max_steps=6", "train.lr=0.01"), capsys=capsys)
    assert code == 2 and "train.lr" in one_line_error(err)[0] and "--resume" in err  # tunable: only on purpose
    assert snapshot(run) == before

    # safe keys (run length, logging, workers) may change
    code, err = train_cli(run, ov(tiny_shards, "train.max_steps=6", "train.log_every_steps=2", "data.num_workers=0"), capsys=capsys)
    assert code == 0, err[-2000:]
    assert _resume_steps(run)[-1] == 4

    # --resume none starts over in the folder; the old checkpoints are set aside, not deleted
    old = {p.name for p in run.glob("ckpt-step*.pt")}
    assert train_cli(run, ov(tiny_shards, "train.max_steps=2", "model.params.width=8"), resume="none")[0] == 0
    kept = {p.name for p in (run / "superseded").rglob("ckpt-step*.pt")}
    assert old <= kept


def test_D2_explicit_resume_may_change_the_learning_rate(tiny_shards, tmp_path, capsys):
    run = tmp_path / "run"
    assert train_cli(run, ov(tiny_shards, "train.max_steps=4"))[0] == 0
    code, err = train_cli(run, ov(tiny_shards, "train.max_steps=6", "train.lr=0.001"), resume=str(_ckpt(run, 4)), capsys=capsys)
    assert code == 0, err[-2000:]
    lrs = [r["train/lr"] for r in records(run) if "train/lr" in r and r["step"] > 4]
    assert lrs and all(lr == pytest.approx(0.001) for lr in lrs)


def test_D2_extending_a_finished_run_continues_the_lr_schedule_without_a_jump(tiny_shards, tmp_path):
    run = tmp_path / "run"
    cosine = ["train.schedule=cosine", "train.warmup_steps=0"]
    assert train_cli(run, ov(tiny_shards, "train.max_steps=6", *cosine))[0] == 0
    assert train_cli(run, ov(tiny_shards, "train.max_steps=10", *cosine))[0] == 0
    lr = {r["step"]: r["train/lr"] for r in records(run) if "train/lr" in r}
    assert sorted(lr) == list(range(1, 11))
    # documented: a finished cosine schedule continues at its final value, 5 % of train.lr
    assert all(lr[s] == pytest.approx(0.05 * 3e-3) for s in range(6, 11)), lr


# --------------------------------------------------------------------------- S6: one run per folder


def test_S6_second_run_in_the_same_folder_is_refused_naming_host_and_pid(tiny_shards, tmp_path):
    run = tmp_path / "run"
    first = start_proc(run, ov(tiny_shards, "train.max_steps=40"), BRAINAGE_TEST_STEP_SLEEP_S="0.5")
    try:
        wait_for(lambda: reached_step(run, 1), first, what="the first run's first step")
        second = run_proc(run, ov(tiny_shards, "train.max_steps=40", "train.lr=0.01"))
        assert second.returncode == 2, second.stderr[-2000:]
        lines = one_line_error(second.stderr)
        assert len(lines) == 1 and f"pid {first.pid}" in lines[0] and socket.gethostname() in lines[0], second.stderr
        assert "train.lr: 0.003" not in (run / "config.yaml").read_text()
    finally:
        first.kill()  # kill -9 releases the lock
        first.wait()
    again = run_proc(run, ov(tiny_shards, "train.max_steps=3"))
    assert again.returncode == 0, again.stderr[-2000:]


# --------------------------------------------------------------------------- S7, T2, U2: nonsense values


@pytest.mark.parametrize("value", ["train.epochs=0", "train.epochs=-1"])
def test_S7_zero_or_negative_epochs_are_a_config_error(tiny_shards, tmp_path, capsys, value):
    code, err = train_cli(tmp_path / "run", [*ov(tiny_shards), value], capsys=capsys)
    assert code == 2
    lines = one_line_error(err)
    assert len(lines) == 1 and "train.epochs" in lines[0] and ">= 1" in lines[0]
    assert not list((tmp_path / "run").glob("ckpt-*"))


@pytest.mark.parametrize("value, key", [
    ("data.batch_size=0", "data.batch_size"), ("data.batch_size=-4", "data.batch_size"),
    ("train.grad_accum=0", "train.grad_accum"), ("train.lr=-1", "train.lr"), ("data.num_workers=-1", "data.num_workers"),
])
def test_T2_nonsense_values_are_one_line_errors(tiny_shards, tmp_path, capsys, value, key):
    code, err = train_cli(tmp_path / "run", [*ov(tiny_shards), value], capsys=capsys)
    assert code == 2
    lines = one_line_error(err)
    assert len(lines) == 1 and f"{key}=" in lines[0] and "must be" in lines[0], err


def test_U2_model_param_of_the_wrong_type_names_the_key(tiny_shards, tmp_path, capsys):
    code, err = train_cli(tmp_path / "run", [*ov(tiny_shards), "model.params.width=abc"], capsys=capsys)
    assert code == 2
    lines = one_line_error(err)
    assert len(lines) == 1 and "model.params.width='abc' must be an integer" in lines[0], err


# --------------------------------------------------------------------------- T3, T4: unwritable output, bad --resume


@pytest.mark.parametrize("kind", ["existing_file", "under_a_file", "read_only_fs"])
def test_T3_train_run_dir_that_cannot_be_written(tiny_shards, tmp_path, capsys, kind):
    (tmp_path / "file").write_text("x")
    mounted = None
    if kind == "existing_file":
        run = tmp_path / "file"
    elif kind == "under_a_file":
        run = tmp_path / "file" / "run"
    else:
        mounted = tmp_path / "ro"
        if can_mount() and mount_tmpfs(mounted, "1m", read_only=True):
            run = mounted / "run"
        elif os.geteuid() != 0:
            mounted.mkdir()
            mounted.chmod(0o555)
            run, mounted = mounted / "run", None
        else:
            pytest.skip("cannot mount a read-only tmpfs here")
    try:
        code, err = train_cli(run, ov(tiny_shards, "train.max_steps=2"), capsys=capsys)
    finally:
        if mounted is not None:
            unmount(mounted)
    assert code == 2
    lines = one_line_error(err)
    assert len(lines) == 1 and "run folder" in lines[0] and str(run) in lines[0], err


def test_T3_disk_full_during_a_checkpoint_keeps_earlier_ones(tiny_shards, tmp_path, capsys):
    if not can_mount():
        pytest.skip("needs root to mount a small tmpfs")
    disk = tmp_path / "disk"
    if not mount_tmpfs(disk, "4m"):
        pytest.skip("cannot mount a tmpfs here")
    try:
        run = disk / "run"
        assert train_cli(run, ov(tiny_shards, "train.max_steps=4"))[0] == 0
        size = _ckpt(run, 4).stat().st_size
        st = os.statvfs(disk)
        free = st.f_bavail * st.f_frsize
        (disk / "filler").write_bytes(b"\0" * max(free - size // 2, 0))  # room for logs, not for a checkpoint
        before = {p.name: p.read_bytes() for p in run.glob("ckpt-step*.pt")}
        code, err = train_cli(run, ov(tiny_shards, "train.max_steps=8"), capsys=capsys)
        assert code == 1
        lines = one_line_error(err)
        assert len(lines) == 1 and "No space left on device" in lines[0] and "ckpt-step00000006.pt" in lines[0], err
        assert {p.name: p.read_bytes() for p in run.glob("ckpt-step*.pt")} == before
        assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
        assert torch.load(_ckpt(run, 4), weights_only=True)["step"] == 4
    finally:
        unmount(disk)


def test_T4_resume_from_an_empty_file_is_a_one_line_error(tiny_shards, tmp_path, capsys):
    zero = tmp_path / "zero.pt"
    zero.write_bytes(b"")
    code, err = train_cli(tmp_path / "run", ov(tiny_shards, "train.max_steps=2"), resume=str(zero), capsys=capsys)
    assert code == 2
    lines = one_line_error(err)
    assert len(lines) == 1 and "zero.pt" in lines[0] and "empty" in lines[0], err


# --------------------------------------------------------------------------- U4, U5: logs after kill -9, Ctrl-C


def test_U4_kill9_then_resume_logs_each_step_once_and_leaves_no_temp_files(tiny_shards, tmp_path):
    run = tmp_path / "run"
    assert run_proc(run, ov(tiny_shards, "train.max_steps=4")).returncode == 0
    proc = start_proc(run, ov(tiny_shards, "train.max_steps=9"), BRAINAGE_CKPT_WRITE_HOLD_S="120")
    try:
        wait_for(lambda: list(run.glob("*.writing")), proc, what="a checkpoint write to start")
    finally:
        proc.kill()
        proc.wait()
    assert list(run.glob(".ckpt-step*.tmp")) and reached_step(run, 6)
    out = run_proc(run, ov(tiny_shards, "train.max_steps=9"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "samples_consumed" not in out.stderr  # the false "before the resume point" warning
    assert not list(run.glob(".*.tmp")) and not list(run.glob("*.writing"))
    steps = [r["step"] for r in records(run) if "train/loss" in r]
    assert steps == list(range(1, 10)), steps
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 10))


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_U5_ctrl_c_and_sigterm_checkpoint_and_exit_without_requeue(tiny_shards, tmp_path, sig, code):
    run = tmp_path / "run"
    proc = start_proc(run, ov(tiny_shards, "train.max_steps=40", "train.ckpt_every_steps=0"), BRAINAGE_TEST_STEP_SLEEP_S="0.3")
    wait_for(lambda: reached_step(run, 2), proc, what="step 2")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    stop = [r for r in records(run) if r.get("event") == "stop"]
    assert len(stop) == 1 and stop[0]["signal"] == signal.Signals(sig).name
    assert torch.load(run / "last.pt", weights_only=True)["step"] == stop[0]["step"]


def test_stop_exit_codes_contract():
    from brainage_hpc.engine.trainer import PREEMPT_EXIT_CODE, stop_exit_code

    assert PREEMPT_EXIT_CODE == 3
    assert stop_exit_code(signal.SIGUSR1) == 3
    assert stop_exit_code(signal.SIGTERM) == 143 and stop_exit_code(signal.SIGINT) == 130
