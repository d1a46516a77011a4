"""The engine of ``brainage preprocess``: worker pool, shard processing, resume, merge.

Kept apart from the command (argument parsing and planning) so a workflow
manager or a notebook can drive it with a ``plan`` dict alone:

* :class:`WorkerPool`: in-order map over a bounded window of jobs, in-process
  for one worker, else a process pool (``fork`` where available);
* :func:`fit_landmarks`: histogram landmarks on the training split (reused from
  ``plan.json`` when the plan is unchanged);
* :func:`process_shards`: write every selected shard not already finished
  (its sidecar records the sha256 of the file on disk and the path, size and
  mtime of every input scan, so a changed or replaced scan redoes its shard),
  atomically;
* :func:`merge_shards`: sidecars -> ``manifest.json`` + ``failures.csv``.

A bad subject is a ``failures.csv`` row, never the end of the run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["PLAN_NAME", "WorkerPool", "fit_landmarks", "merge_shards", "process_shards"]

logger = logging.getLogger("brainage_hpc.preprocess")
PLAN_NAME = "plan.json"
# per-subject keys of manifest.json (contract 3: readers accept manifests without cohort/site/group/session)
_OPTIONAL = ("qc", "warnings")
_MANIFEST_SUBJECT_KEYS = ("age", "age_bin", "sex", "family_id", "cohort", "site", "group", "session", "index", "qc", "warnings")
_MAX_LANDMARK_SUBJECTS = 200


def _plan_key(plan: dict[str, Any]) -> str:
    p = {k: v for k, v in plan.items() if k not in ("preprocess", "preprocess_hash")}
    p["preprocess"] = {k: v for k, v in plan["preprocess"].items() if k != "landmarks"}
    return json.dumps(p, sort_keys=True)


def fit_landmarks(plan: dict[str, Any], out: Path, pool: WorkerPool) -> dict[str, Any]:
    """Fit histogram landmarks on (at most 200 of) the training subjects; reuse them from plan.json if it matches."""
    from brainage_hpc.ingest.preprocess import PreprocessConfig, landmarks_from_percentiles

    old_path = out / PLAN_NAME
    if old_path.is_file():
        try:
            old = json.loads(old_path.read_text())
            if old["preprocess"].get("landmarks") and _plan_key(old) == _plan_key(plan):
                logger.info("reusing histogram landmarks from %s", old_path)
                return old
        except (ValueError, KeyError, TypeError):
            pass
    train = set(plan["splits"].get("train", []))
    recs = [r for r in plan["subjects"] if r["id"] in train]
    if not recs:
        raise ValueError("--intensity histogram needs a non-empty 'train' split to fit landmarks on")
    step = max(1, math.ceil(len(recs) / _MAX_LANDMARK_SUBJECTS))
    recs = recs[::step]
    cfg = PreprocessConfig.from_dict(plan["preprocess"])
    logger.info("fitting histogram landmarks on %d training subjects", len(recs))
    pcts = [
        p for _, p, _ in pool.map_ordered(_percentile_job, [(r["id"], r["t1w"], cfg) for r in recs]) if p is not None
    ]
    cfg = dataclasses.replace(cfg, landmarks=landmarks_from_percentiles(pcts))
    return {**plan, "preprocess": cfg.to_dict(), "preprocess_hash": cfg.config_hash()}


# ----------------------------------------------------------------------------- workers


def _init_worker(threads: int = 1) -> None:
    import os

    import torch

    torch.set_num_threads(threads)  # deepbet (raw pipeline)
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)  # ANTs N4 and registration
    import monai.transforms  # noqa: F401  (imported once per worker, not per subject)


def _reason(exc: BaseException, path: str) -> str:
    text = (str(exc).splitlines() or [type(exc).__name__])[0]
    return text[len(path) + 2 :] if text.startswith(f"{path}: ") else f"{type(exc).__name__}: {text}"


def input_stamp(path: str) -> dict[str, Any]:
    """What identifies one input file's contents cheaply: path, size and mtime (ns); size None when absent."""
    try:
        st = Path(path).stat()
    except OSError:
        return {"path": path, "size": None, "mtime_ns": None}
    return {"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _preprocess_job(job: tuple[str, str, Any]) -> tuple[str, np.ndarray | None, str | None, dict[str, Any], dict[str, Any]]:
    """One subject -> (id, volume or None, failure reason or None, input stamp, {"qc", "warnings"})."""
    from brainage_hpc.ingest.preprocess import prepare_volume

    sid, path, cfg = job
    stamp = input_stamp(path)  # before reading: a file changed while we read it is redone next time
    try:
        vol, qc, warnings = prepare_volume(path, cfg)
        return sid, vol, None, stamp, {"qc": qc, "warnings": warnings}
    except Exception as exc:  # noqa: BLE001  (a bad subject is a failures.csv row, never the end of the run)
        return sid, None, _reason(exc, path), stamp, {}


def _percentile_job(job: tuple[str, str, Any]) -> tuple[str, np.ndarray | None, str | None]:
    from brainage_hpc.ingest.preprocess import subject_percentiles

    sid, path, cfg = job
    try:
        return sid, subject_percentiles(path, cfg), None
    except Exception as exc:  # noqa: BLE001
        return sid, None, _reason(exc, path)


class WorkerPool:
    """In-order map over a bounded window of jobs: in-process for 1 worker, else a process pool."""

    def __init__(self, workers: int, threads: int = 1) -> None:
        self.workers = workers
        self.threads = threads
        self._executor: Any = None
        self._threads: int | None = None

    def __enter__(self) -> WorkerPool:
        import torch

        if self.workers > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            if method == "fork":
                import monai.transforms  # noqa: F401  (import once here; forked workers inherit it)
            ctx = multiprocessing.get_context(method)
            self._executor = ProcessPoolExecutor(
                self.workers, mp_context=ctx, initializer=_init_worker, initargs=(self.threads,)
            )
            self._executor.submit(int).result()  # start (fork) the workers now, before tqdm starts a thread
        else:
            self._threads = torch.get_num_threads()
            _init_worker(self.threads)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
        if self._threads is not None:
            import torch

            torch.set_num_threads(self._threads)

    def map_ordered(self, fn: Callable[[Any], Any], jobs: Iterable[Any]) -> Iterator[Any]:
        if self._executor is None:
            yield from map(fn, jobs)
            return
        it = iter(jobs)
        pending: deque[Any] = deque(
            self._executor.submit(fn, j) for _, j in zip(range(2 * self.workers), it, strict=False)
        )
        while pending:
            result = pending.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(self._executor.submit(fn, nxt))
            yield result


# ----------------------------------------------------------------------------- shards


def _assigned(plan: dict[str, Any], k: int) -> list[dict[str, Any]]:
    from brainage_hpc.ingest.plan import SUBJECT_KEYS

    size = plan["shard_size"]
    return [{key: r.get(key) for key in SUBJECT_KEYS} for r in plan["subjects"][k * size : (k + 1) * size]]


def _stamps(plan: dict[str, Any], k: int) -> dict[str, dict[str, Any]]:
    size = plan["shard_size"]
    return {r["id"]: input_stamp(r["t1w"]) for r in plan["subjects"][k * size : (k + 1) * size]}


def _sidecar_problem(out: Path, k: int, plan: dict[str, Any], sha: str | None = None) -> str | None:
    """Why shard ``k`` must be (re)done, or ``None`` when its file, config and inputs match its sidecar."""
    from brainage_hpc.data.shards import sha256_file, shard_name
    from brainage_hpc.ingest.shard_writer import read_partial

    rec = read_partial(out, k)
    path = out / shard_name(k)
    if rec is None or not path.is_file():
        return "not written yet"
    if (rec.get("preprocess_hash"), rec.get("compression")) != (plan["preprocess_hash"], plan["compression"]):
        return "preprocessing config changed"
    if rec.get("assigned") != _assigned(plan, k):
        return "subjects or labels changed"
    recorded = rec.get("inputs") or {}
    changed = [sid for sid, stamp in _stamps(plan, k).items() if recorded.get(sid) != stamp]
    if changed:
        more = f" and {len(changed) - 1} more" if len(changed) > 1 else ""
        return f"input of {changed[0]}{more} changed (path, size or mtime)"
    if rec.get("sha256") != (sha if sha is not None else sha256_file(path)):
        return "shard file differs from its record (damaged or replaced)"
    return None


def _sidecar_ok(out: Path, k: int, plan: dict[str, Any], sha: str | None = None) -> bool:
    return _sidecar_problem(out, k, plan, sha) is None


def process_shards(
    plan: dict[str, Any], out: Path, selected: list[int], pool: WorkerPool, progress: bool, force: bool = False
) -> dict[int, str]:
    """Write every selected shard that is not already finished (all with ``force``); return {shard: sha256}.

    A shard is finished when its sidecar matches the plan, the file's sha256 and the
    path, size and mtime of each of its input scans (a fixed or replaced scan redoes it).
    """
    from tqdm import tqdm

    from brainage_hpc.data.shards import MANIFEST_NAME, shard_name
    from brainage_hpc.ingest.preprocess import PreprocessConfig, reference_affine
    from brainage_hpc.ingest.shard_writer import read_partial, write_partial, write_shard

    cfg = PreprocessConfig.from_dict(plan["preprocess"])
    paths = {r["id"]: r["t1w"] for r in plan["subjects"]}
    todo, hashes = [], {}
    for k in selected:
        problem = "--force" if force else _sidecar_problem(out, k, plan)
        if problem is None:
            hashes[k] = read_partial(out, k)["sha256"]  # type: ignore[index]
            logger.info("%s: already done (sha256 and inputs match), skipping", shard_name(k))
        else:
            if problem != "not written yet":
                logger.info("%s: redoing it (%s)", shard_name(k), problem)
            (out / (shard_name(k) + ".tmp")).unlink(missing_ok=True)
            todo.append(k)
    if not todo:
        return hashes
    (out / MANIFEST_NAME).unlink(missing_ok=True)  # stale until the next merge
    jobs = [(s["id"], paths[s["id"]], cfg) for k in todo for s in _assigned(plan, k)]
    bar = tqdm(total=len(jobs), desc="preprocess", unit="subj", disable=None if progress else True)  # None: tty only
    results = pool.map_ordered(_preprocess_job, jobs)
    for k in todo:
        vols: list[np.ndarray] = []
        subjects: list[dict[str, Any]] = []
        failures: list[dict[str, str]] = []
        inputs: dict[str, dict[str, Any]] = {}
        for rec in _assigned(plan, k):
            sid, vol, reason, stamp, extra = next(results)
            inputs[sid] = stamp
            bar.update()
            if vol is None:
                logger.warning("skipping subject %s: %s (%s)", sid, reason, paths[sid])
                failures.append({"subject": sid, "file": paths[sid], "reason": reason})
                continue
            for w in extra.get("warnings", []):
                logger.warning("subject %s: %s", sid, w)
            subjects.append({**rec, "index": len(vols), **{key: v for key, v in extra.items() if v}})
            vols.append(vol)
        images = np.stack(vols)[:, None] if vols else np.zeros((0, 1, *cfg.shape), dtype=np.float16)  # (N, 1, D, H, W)
        sha = write_shard(
            out / shard_name(k),
            images,
            subjects,
            voxel_mm=cfg.voxel_mm,
            affine=reference_affine(cfg),
            preprocess=plan["preprocess"],
            preprocess_hash=plan["preprocess_hash"],
            compression=plan["compression"],
        )
        write_partial(
            out,
            k,
            {
                "file": shard_name(k),
                "sha256": sha,
                "n": len(subjects),
                "preprocess_hash": plan["preprocess_hash"],
                "compression": plan["compression"],
                "assigned": _assigned(plan, k),
                "inputs": inputs,
                "subjects": subjects,
                "failures": failures,
            },
        )
        hashes[k] = sha
        logger.info("%s: %d subjects, %d failed", shard_name(k), len(subjects), len(failures))
    bar.close()
    return hashes


def merge_shards(out: str | Path, max_fail_fraction: float = 0.1, known_hashes: dict[int, str] | None = None) -> int:
    """Assemble ``manifest.json`` and ``failures.csv`` from the plan and the shard sidecars.

    Args:
        out: the output folder of ``brainage preprocess``.
        max_fail_fraction: return 1 (and write no manifest) if more subjects failed.
        known_hashes: sha256 of shards this process just wrote or checked (not re-read).

    Returns:
        0 on success, 1 when shards are unfinished or too many subjects failed.

    Raises:
        FileNotFoundError: no ``plan.json`` in ``out``.
    """
    from brainage_hpc import __version__
    from brainage_hpc.data.shards import FAILURES_NAME, FORMAT_VERSION, MANIFEST_NAME
    from brainage_hpc.ingest.fingerprint import preprocessing_fingerprint
    from brainage_hpc.ingest.preprocess import PreprocessConfig, reference_affine
    from brainage_hpc.ingest.qc import ROBUST_Z_MAX, flag_outliers
    from brainage_hpc.ingest.shard_writer import read_partial, write_failures, write_json

    out = Path(out)
    plan_path = out / PLAN_NAME
    if not plan_path.is_file():
        raise FileNotFoundError(f"{plan_path}: not found; run `brainage preprocess --hcp-root ... --out {out}` first")
    plan = json.loads(plan_path.read_text())
    known = known_hashes or {}
    n_shards = math.ceil(len(plan["subjects"]) / plan["shard_size"])
    shards, subjects, failures, missing = [], {}, list(plan["failures"]), []
    for k in range(n_shards):
        rec = read_partial(out, k)
        if rec is None or not _sidecar_ok(out, k, plan, sha=known.get(k)):
            missing.append(k)
            continue
        shards.append({"file": rec["file"], "sha256": rec["sha256"], "n": rec["n"]})
        for s in rec["subjects"]:
            subjects[s["id"]] = {key: s.get(key) for key in _MANIFEST_SUBJECT_KEYS if key in s or key not in _OPTIONAL}
            subjects[s["id"]]["shard"] = k
        failures += rec["failures"]
    if missing:
        shown = ", ".join(str(k) for k in missing[:10]) + (" ..." if len(missing) > 10 else "")
        print(
            f"brainage preprocess: error: {len(missing)} of {n_shards} shards unfinished or stale ({shown}); "
            "rerun the preprocess (array) tasks for them, then --merge",
            file=sys.stderr,
        )
        return 1
    write_failures(out / FAILURES_NAME, failures)
    n_total = len(subjects) + len(failures)
    if len(failures) > max_fail_fraction * n_total:
        (out / MANIFEST_NAME).unlink(missing_ok=True)
        print(
            f"brainage preprocess: error: {len(failures)} of {n_total} subjects failed "
            f"({len(failures) / n_total:.1%} > --max-fail-fraction {max_fail_fraction}); see {out / FAILURES_NAME}",
            file=sys.stderr,
        )
        return 1
    cfg = PreprocessConfig.from_dict(plan["preprocess"])
    manifest = {
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "shape": list(cfg.shape),
        "voxel_mm": cfg.voxel_mm,
        "affine": reference_affine(cfg).tolist(),
        "dtype": "float16",
        "compression": plan["compression"],
        "preprocess": plan["preprocess"],
        "preprocess_hash": plan["preprocess_hash"],
        "shards": shards,
        "subjects": subjects,
        "splits": {name: [s for s in ids if s in subjects] for name, ids in plan["splits"].items()},
        "split_info": plan["split_info"],
        "n_subjects": len(subjects),
        "n_failures": len(failures),
        "source": plan["source"],
        "fingerprint": preprocessing_fingerprint(plan["preprocess"]),
        "qc_outliers": flag_outliers({sid: rec.get("qc") or {} for sid, rec in subjects.items()}),
    }
    write_json(out / MANIFEST_NAME, manifest)
    print(
        f"preprocess: {len(subjects)} subjects in {len(shards)} shards, {len(failures)} failed "
        f"(see {FAILURES_NAME}) -> {out / MANIFEST_NAME}"
    )
    outliers = manifest["qc_outliers"]
    if outliers:
        print(f"QC outliers ({len(outliers)}, robust z beyond {ROBUST_Z_MAX}; look at them: brainage qc {out}):")
        for sid, reasons in outliers.items():
            print(f"  {sid}: {'; '.join(reasons)}")
    return 0
