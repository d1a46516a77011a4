"""Score scans: a pool of preprocessing workers feeding batched inference on one device.

Workers (a ``torch.utils.data.DataLoader``) load and prepare scans while the main
process runs the model on the previous batch; each batch's records are appended to
the task's part file as soon as it is scored, so an interruption loses at most the
scans in flight. Anything that goes wrong with one scan, in a worker or in the
model, becomes that scan's ``error``; a batch whose inference fails is retried one
scan at a time, so one bad volume never costs the others.

Signals (contract 1, as for training): SIGUSR1 (time limit or preemption warning)
and SIGTERM/SIGINT (scancel, Ctrl-C) stop the loop between batches; the caller turns
USR1 into exit 3 (requeue wanted) and the others into 128 + signum (no requeue).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any

import numpy as np
import torch

from brainage_hpc.evaluation.parts import PartWriter
from brainage_hpc.evaluation.scan_input import one_line_error, prepare_input
from brainage_hpc.evaluation.scans import ScanRecord, scan_key

__all__ = ["HOLD_ENV", "ScoreOptions", "ScoreOutcome", "StopRequest", "score_scans"]

log = logging.getLogger(__name__)
# Test hook: sleep this many seconds after each batch is written (to kill or signal a run mid-way).
HOLD_ENV = "BRAINAGE_PREDICT_HOLD_S"
_STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


@dataclass(frozen=True)
class ScoreOptions:
    """How to score: batch size, preprocessing workers, the sex to assume, progress bar.

    Attributes:
        batch_size: scans per forward pass (>= 1).
        workers: preprocessing processes (0 = prepare in the main process, between batches).
        sex: ``"M"``, ``"F"`` or ``"unknown"`` for scans whose source gives no sex; unknown
            averages the predictions for both.
        progress: show a tqdm bar (scans/s and ETA) on stderr.
        bias_correct: add ``brain_age_corrected``/``brain_age_gap_corrected`` (calibration's bias
            correction) for scans whose true age is given.
    """

    batch_size: int = 4
    workers: int = 1
    sex: str = "unknown"
    progress: bool = True
    bias_correct: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.workers < 0:
            raise ValueError(f"--workers must be >= 0, got {self.workers}")
        if self.sex not in ("M", "F", "unknown"):
            raise ValueError(f"sex={self.sex!r} is not valid. Valid: M, F, unknown")


@dataclass
class ScoreOutcome:
    """Counts and times of one call of :func:`score_scans`."""

    scored: int = 0
    failed: int = 0
    stopped_by: int | None = None
    elapsed_s: float = 0.0
    prepare_s: float = 0.0
    infer_s: float = 0.0


class StopRequest:
    """Context manager: SIGUSR1/SIGTERM/SIGINT set ``signum`` instead of killing; old handlers come back on exit."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._pid = os.getpid()
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:  # a forked preprocessing worker inherited the handler: the main process decides
            return
        if self.signum is None:
            self.signum = signum
            print(f"brainage predict: got {signal.Signals(signum).name}: stopping after the batch in progress",
                  file=sys.stderr, flush=True)

    def __enter__(self) -> StopRequest:
        self._pid = os.getpid()
        for sig in _STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class _PreparedScans(torch.utils.data.Dataset):
    """Item ``j``: the j-th scan to do, prepared, or its one-line error (never an exception)."""

    def __init__(self, todo: Sequence[tuple[int, ScanRecord]], pcfg: Any) -> None:
        self.todo = list(todo)
        self.pcfg = pcfg

    def __len__(self) -> int:
        return len(self.todo)

    def __getitem__(self, j: int) -> dict[str, Any]:
        index, scan = self.todo[j]
        t0 = time.perf_counter()
        item: dict[str, Any] = {"index": index, "scan": scan, "volume": None, "error": None, "qc": {}, "warnings": []}
        item["key"] = _key_of(scan)
        try:
            prepared = prepare_input(scan.path, self.pcfg)
            item["volume"] = torch.from_numpy(np.ascontiguousarray(prepared.volume))  # (D, H, W) float16
            item["qc"] = {k: float(v) for k, v in prepared.qc.items()}
            item["warnings"] = list(prepared.warnings)
        except Exception as exc:  # one scan's problem, whatever it is, stays that scan's
            item["error"] = one_line_error(exc, scan.path)
        item["prepare_s"] = time.perf_counter() - t0
        return item


def _as_list(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return batch


def _sexes(scan: ScanRecord, default: str) -> list[float]:
    if scan.sex is not None:
        return [float(scan.sex)]
    return [1.0, 0.0] if default == "unknown" else [1.0 if default == "M" else 0.0]


def _combine(lm: Any, out: dict[str, np.ndarray], rows: slice, age: float | None = None,
             bias_correct: bool = False) -> dict[str, Any]:
    """One scan's prediction from its rows of the batch (one per assumed sex), with the calibrated columns
    (:func:`~brainage_hpc.evaluation.calibration.apply_calibration`) when the model has a calibration."""
    from brainage_hpc.data.ages import age_to_bin

    pred_age = float(np.mean(out["pred_age"][rows]))
    if not np.isfinite(pred_age):
        raise ValueError("the model gave a non-finite prediction")
    probs = out["probs"][rows].mean(0)  # (K,)
    if lm.n_classes == 4:
        bin4, class2 = int(probs.argmax()), int(probs[2:].sum() >= 0.5)
    elif lm.n_classes == 2:
        bin4, class2 = -1, int(probs.argmax())
    else:
        bin4 = age_to_bin(pred_age)
        class2 = int(bin4 >= 2) if bin4 >= 0 else -1
    pred: dict[str, Any] = {"pred_age": pred_age, "bin4_pred": bin4, "class2_pred": class2,
                            "probs": [float(p) for p in probs]}
    sd = None
    if "member_ages" in out:
        members = out["member_ages"][rows].mean(0)  # (M,)
        sd = np.array([float(np.std(members, ddof=1)) if members.size > 1 else 0.0])
        pred["ensemble_sd"] = float(sd[0])
    if lm.calibration is not None:
        from brainage_hpc.evaluation.calibration import apply_calibration

        feats = out.get("features")
        feats = feats[rows].mean(0, keepdims=True) if feats is not None and feats.shape[1] else None
        cols = apply_calibration(lm.calibration, np.array([pred_age]), feats, sd,
                                 None if age is None else np.array([float(age)]), bias_correct)
        for k, v in cols.items():
            pred[k] = bool(v[0]) if v.dtype == bool else float(v[0])
    return pred


def _predict_group(lm: Any, items: list[dict[str, Any]], default_sex: str, bias_correct: bool = False) -> list[dict[str, Any]]:
    from brainage_hpc.evaluation.predict import predict_batch

    volumes: list[torch.Tensor] = []
    sexes: list[float] = []
    spans: list[slice] = []
    for it in items:
        s = _sexes(it["scan"], default_sex)
        spans.append(slice(len(sexes), len(sexes) + len(s)))
        sexes += s
        volumes += [it["volume"]] * len(s)
    image = torch.stack(volumes)[:, None]  # (B', 1, D, H, W) float16
    out = predict_batch(lm, image, torch.tensor(sexes))
    return [_combine(lm, out, span, it["scan"].age, bias_correct) for it, span in zip(items, spans)]


def _predict_items(lm: Any, items: list[dict[str, Any]], default_sex: str,
                   bias_correct: bool = False) -> list[tuple[dict[str, Any] | None, str | None]]:
    """Predictions for the prepared items, falling back to one at a time when the batch fails."""
    if not items:
        return []
    try:
        return [(p, None) for p in _predict_group(lm, items, default_sex, bias_correct)]
    except Exception as exc:
        if len(items) == 1:
            return [(None, one_line_error(exc, items[0]["scan"].path))]
        log.debug("batch of %d failed (%s); predicting one scan at a time", len(items), exc)
        return [r for it in items for r in _predict_items(lm, [it], default_sex, bias_correct)]


def _record(item: dict[str, Any], pred: dict[str, Any] | None, error: str | None, task: int, infer_s: float,
            model: str) -> dict[str, Any]:
    return {
        "kind": "scan",
        "model": model,
        "index": item["index"],
        "key": item["key"],
        "file": item["scan"].path,
        "task": task,
        "pred": pred,
        "error": error,
        "qc": item["qc"],
        "warnings": item["warnings"],
        "prepare_s": round(item["prepare_s"], 4),
        "infer_s": round(infer_s, 4),
        "time": round(time.time(), 3),
    }


def _progress_bar(total: int, enabled: bool, desc: str) -> Any:
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    return tqdm(total=total, unit="scan", desc=desc, disable=not enabled or total == 0, file=sys.stderr,
                mininterval=0.5 if tty else 30.0, dynamic_ncols=tty, smoothing=0.1)


def _loader(todo: Sequence[tuple[int, ScanRecord]], pcfg: Any, batch_size: int, workers: int,
            prefetch: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        _PreparedScans(todo, pcfg),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_as_list,
        pin_memory=False,
        prefetch_factor=prefetch if workers else None,
        persistent_workers=False,
    )


def _worker_died(exc: BaseException) -> bool:
    """torch's error for a preprocessing process killed by a signal (segfault, OOM killer) or exiting early."""
    return isinstance(exc, RuntimeError) and "DataLoader worker" in str(exc)


def score_scans(
    lm: Any,
    pcfg: Any,
    todo: Sequence[tuple[int, ScanRecord]],
    writer: PartWriter,
    opts: ScoreOptions,
    stop: StopRequest,
    task: int = 0,
    model: str = "",
) -> ScoreOutcome:
    """Prepare, predict and record every scan of ``todo`` (plan index, scan), unless stopped.

    A preprocessing worker that dies (a library segfault, the OOM killer) is not an
    exception of one scan: the remaining scans are retried one at a time in a single
    worker until the scan that kills it is found; that scan gets an error record and
    the others go on at full speed, so one poisonous file cannot stop a cohort.

    Args:
        lm: the loaded model (``evaluation.predict.LoadedModel``).
        pcfg: the run's ``PreprocessConfig``.
        todo: the scans still to do, with their index in the plan.
        writer: the task's part file.
        opts: batch size, workers, default sex, progress bar.
        stop: set by a signal; the loop stops at the next batch boundary.
        task: task id written into every record.
        model: digest of the weights, written into every record (a rerun reuses only its own model's ages).

    Returns:
        The :class:`ScoreOutcome` (``stopped_by`` = the signal number when stopped).
    """
    outcome = ScoreOutcome()
    if not todo:
        return outcome
    started = time.perf_counter()
    hold = float(os.environ.get(HOLD_ENV, "0") or 0)
    bar = _progress_bar(len(todo), opts.progress, f"{socket.gethostname()} task {task}")

    def record(batch: list[dict[str, Any]], done: set[int]) -> None:
        ready = [it for it in batch if it["volume"] is not None]
        t0 = time.perf_counter()
        results = dict(zip((id(it) for it in ready), _predict_items(lm, ready, opts.sex, opts.bias_correct)))
        infer_each = (time.perf_counter() - t0) / max(len(ready), 1)
        records = []
        for it in batch:
            pred, error = results.get(id(it), (None, it["error"]))
            records.append(_record(it, pred, error, task, infer_each if it["volume"] is not None else 0.0, model))
            outcome.prepare_s += it["prepare_s"]
            outcome.infer_s += infer_each if it["volume"] is not None else 0.0
            if error:
                outcome.failed += 1
                bar.write(f"brainage predict: error: {error}", file=sys.stderr)
            else:
                outcome.scored += 1
        with _sigchld_deferred():  # written and marked done together, or neither
            writer.append(records)
            done.update(it["index"] for it in batch)
        bar.update(len(batch))
        if outcome.failed:
            bar.set_postfix(failed=outcome.failed, refresh=False)

    remaining = list(todo)
    isolate = False  # one scan at a time in one worker, to find the scan that kills workers
    try:
        while remaining and stop.signum is None:
            done: set[int] = set()
            if isolate:
                batches = iter(_loader(remaining, pcfg, 1, 1, 1))
            else:
                batches = iter(_loader(remaining, pcfg, opts.batch_size, opts.workers, 2))
            try:
                for batch in batches:
                    if stop.signum is not None:
                        break
                    record(batch, done)
                    if hold > 0:
                        time.sleep(hold)
                    if stop.signum is not None:
                        break
                remaining = []
            except RuntimeError as exc:
                if not _worker_died(exc):
                    raise
                remaining = [t for t in remaining if t[0] not in done]
                if isolate and remaining:
                    index, scan = remaining.pop(0)  # in isolation the worker died on the first unrecorded scan
                    reason = (str(exc).strip().splitlines() or ["died"])[0]
                    item = {"index": index, "scan": scan, "key": _key_of(scan), "qc": {}, "warnings": [], "prepare_s": 0.0,
                            "volume": None,
                            "error": f"{scan.path}: the preprocessing process died while preparing it ({reason})"}
                    record([item], done)
                    isolate = False
                else:
                    log.warning("a preprocessing worker died (%s); retrying the remaining %d scan(s) one at a time",
                                exc, len(remaining))
                    isolate = True
            finally:
                del batches  # shuts the worker processes down
    finally:
        bar.close()
    outcome.stopped_by = stop.signum
    outcome.elapsed_s = time.perf_counter() - started
    return outcome


@contextlib.contextmanager
def _sigchld_deferred() -> Iterator[None]:
    """Run the block with SIGCHLD's Python handler held back, then run it if the signal came meanwhile.

    torch's DataLoader turns a dead worker into a RuntimeError raised by its SIGCHLD handler, at
    whatever line the main thread is on. Between writing a batch's records and marking them done it
    made the retry score that batch a second time (seen: scans recorded twice in the part file).
    Python handlers always run in the main thread, so swapping the handler there is exact.
    """
    fired: list[int] = []
    try:
        previous = signal.signal(signal.SIGCHLD, lambda signum, frame: fired.append(signum))
    except ValueError:  # not the main thread: no handler of torch's can interrupt us here
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGCHLD, previous)
        if fired and callable(previous):
            previous(signal.SIGCHLD, None)


def _key_of(scan: ScanRecord) -> list[Any]:
    try:
        return list(scan_key(scan.path))
    except OSError:
        return [os.path.abspath(scan.path), -1, -1]
