"""Cohort inference benchmark: scans/s of ``brainage predict`` on skull-stripped NIfTI inputs.

``python -m benchmarks.predict_throughput [--quick] [--n 24] [--shapes demo 128] [--workers 0 1 2]``

For each target grid (the demo's 48x56x48 at 3 mm with cnn_demo's network, and
128^3 at 1.4 mm with cnn_hcp's network; random weights, which cost the same as
trained ones) it measures:

* the stages, one scan at a time on one thread: **load** (nibabel read, gunzip,
  checks), **preprocess** (``prepare_scan`` on the loaded image: plausibility
  checks, RAS, crop, resample, z-score) and **inference** (one forward per batch
  of ``--batch-size`` scans, both sexes as ``--sex unknown`` does, per scan);
* what a user would write instead: a serial loop ``prepare_scan`` + forward per
  file (what ``brainage predict`` did before the worker pool);
* the pipeline (``run_predict``: workers prepare, the main process infers in
  batches, records are appended per batch) with 0, 1 and 2 workers, timed over
  the scoring loop (from the part file's session record) and over the whole
  command (model load, plan, merge, CSV included);
* the physical ceiling on this machine: usable cores / CPU seconds per scan
  (load + preprocess + inference), since every stage is CPU-bound here.

Inputs are a synthetic skull-stripped cohort at ``--input-mm`` (1 mm: 197x233x189
voxels, HCP-like sizes are 0.7 mm and 260x311x260), made once and replicated by
hard links. Raw scans (``pipeline: raw``) are measured with ``--pipeline raw
--inputs DIR`` once the raw pipeline is on main. The 1-minute load average is
recorded before and after every measurement: this machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, finish, fresh_cache, machine_info, make_ratio, make_result, result_path

__all__ = ["main"]

SHAPES: dict[str, dict[str, Any]] = {
    "demo": {"config": "cnn_demo", "shape": (48, 56, 48), "voxel_mm": 3.0},
    "128": {"config": "cnn_hcp", "shape": (128, 128, 128), "voxel_mm": 1.4},
}


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def _inputs(work: Path, n: int, unique: int, input_mm: float) -> list[Path]:
    """``n`` scan files (``unique`` synthetic subjects, hard-linked copies) in a flat folder."""
    from brainage_hpc.ingest.synthetic import SynthConfig, make_cohort

    src = work / f"synth_u{unique}_{input_mm:g}mm"
    if not (src / "truth.json").is_file():
        print(f"predict_throughput: synthesising {unique} subjects at {input_mm:g} mm into {src} (once)", file=sys.stderr)
        shutil.rmtree(src, ignore_errors=True)
        make_cohort(src, SynthConfig(n_subjects=unique, seed=0, voxel_mm=input_mm), progress=False, workers=2)
    subjects = sorted(src.glob("*/T1w/*.nii.gz"))  # not the truth maps beside them
    flat = work / f"scans_n{n}_u{unique}_{input_mm:g}mm"
    if not flat.is_dir() or len(list(flat.iterdir())) != n:
        shutil.rmtree(flat, ignore_errors=True)
        flat.mkdir(parents=True)
        for i in range(n):
            try:
                os.link(subjects[i % len(subjects)], flat / f"scan-{i:04d}.nii.gz")
            except OSError:
                shutil.copyfile(subjects[i % len(subjects)], flat / f"scan-{i:04d}.nii.gz")
    return sorted(flat.iterdir())


def _model(work: Path, key: str, pipeline: str) -> Path:
    """``model.pt`` with the network of the shape's config, random weights, and its preprocessing config."""
    import torch

    from brainage_hpc.config import config_to_dict, load_config
    from brainage_hpc.engine.checkpoint import save_sealed
    from brainage_hpc.ingest.preprocess import PreprocessConfig
    from brainage_hpc.models.registry import build_model

    spec = SHAPES[key]
    d, h, w = spec["shape"]
    cfg = load_config(spec["config"], [f"data.shape=[{d},{h},{w}]"])
    torch.manual_seed(0)
    model = build_model(cfg.model, spec["shape"]).eval()
    pcfg = PreprocessConfig(shape=spec["shape"], voxel_mm=spec["voxel_mm"], pipeline=pipeline)  # type: ignore[arg-type]
    path = work / f"model_{key}_{pipeline}.pt"
    save_sealed({"format": "brainage-model", "state_dict": model.state_dict(), "config": config_to_dict(cfg),
                       "shape": list(spec["shape"]), "preprocess": pcfg.to_dict(), "affine": None, "step": 0}, path)
    return path


def _stages(lm: Any, pcfg: Any, files: list[Path], batch: int) -> dict[str, float]:
    """Median seconds per scan of load, preprocess and inference, one thread, one scan at a time."""
    import nibabel as nib
    import torch

    from brainage_hpc.evaluation.predict import predict_batch
    from brainage_hpc.ingest.prepare import prepare_scan
    from brainage_hpc.ingest.preprocess import load_volume

    t_load, t_prep, volumes = [], [], []
    prepare_scan(files[0], pcfg)  # warm-up (imports, MONAI caches)
    for f in files:
        t0 = time.perf_counter()
        data, affine, _ = load_volume(f)
        t1 = time.perf_counter()
        img = nib.Nifti1Image(data, affine)
        img.set_filename(str(f))
        volumes.append(prepare_scan(img, pcfg).volume)
        t2 = time.perf_counter()
        t_load.append(t1 - t0)
        t_prep.append(t2 - t1)
    image = torch.from_numpy(__import__("numpy").stack(volumes[:batch]).astype("float32"))[:, None]
    image = image.repeat_interleave(2, dim=0)  # both sexes, as --sex unknown
    sex = torch.tensor([1.0, 0.0] * (image.shape[0] // 2))
    predict_batch(lm, image, sex)  # warm-up
    t_inf = []
    for _ in range(3):
        t0 = time.perf_counter()
        predict_batch(lm, image, sex)
        t_inf.append((time.perf_counter() - t0) / (image.shape[0] // 2))
    return {"load_s": statistics.median(t_load), "preprocess_s": statistics.median(t_prep),
            "inference_s": statistics.median(t_inf)}


def _serial(lm: Any, pcfg: Any, files: list[Path]) -> float:
    """Scans/s of the plain loop: prepare one file, predict it (both sexes), next."""
    import torch

    from brainage_hpc.evaluation.predict import predict_batch
    from brainage_hpc.ingest.prepare import prepare_scan

    t0 = time.perf_counter()
    for f in files:
        vol = torch.from_numpy(prepare_scan(f, pcfg).volume.astype("float32"))[None, None].expand(2, 1, *lm.shape)
        predict_batch(lm, vol, torch.tensor([1.0, 0.0]))
    return len(files) / (time.perf_counter() - t0)


def _pipeline(model: Path, folder: Path, out: Path, workers: int, batch: int) -> tuple[float, float]:
    """(scans/s of the scoring loop, scans/s of the whole command) of ``run_predict``."""
    from brainage_hpc.evaluation.cohort_predict import PredictRequest, run_predict
    from brainage_hpc.evaluation.cohort_run import ScoreOptions
    from brainage_hpc.evaluation.parts import parts_dir_for, read_records

    shutil.rmtree(out.parent, ignore_errors=True)
    req = PredictRequest(checkpoint=str(model), inputs=(f"files:{folder}",), out=str(out), device="cpu", report=False,
                         options=ScoreOptions(batch_size=batch, workers=workers, progress=False))
    t0 = time.perf_counter()
    code = run_predict(req, say=lambda *a, **k: None)
    wall = time.perf_counter() - t0
    if code != 0:
        raise RuntimeError(f"run_predict exited {code} (see {out})")
    part = next(parts_dir_for(out).glob("part-*.jsonl"))
    end = [r for r in read_records(part)[0] if r.get("kind") == "session" and r.get("event") == "end"][-1]
    n = int(end["scored"])
    return n / float(end["elapsed_s"]), n / wall


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.predict_throughput", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 6 scans at 3 mm input, demo shape, workers 0 and 1")
    p.add_argument("--n", type=int, default=24, help="scans per measurement (default 24)")
    p.add_argument("--unique", type=int, default=8, help="distinct synthetic subjects (default 8)")
    p.add_argument("--input-mm", type=float, default=1.0, help="voxel size of the synthetic inputs (default 1 mm)")
    p.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["demo", "128"])
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--pipeline", choices=["skullstripped", "raw"], default="skullstripped")
    p.add_argument("--inputs", default=None, help="folder of NIfTI inputs to use instead of the synthetic cohort")
    p.add_argument("--work", default="bench_out/predict_data")
    p.add_argument("--out", default=None, help="JSON result (default benchmarks/results/predict_throughput.json)")
    args = p.parse_args(argv)
    args.out = args.out or str(result_path("predict_throughput", args.quick))
    if args.quick:
        args.n, args.unique, args.input_mm, args.shapes, args.workers = 6, 2, 3.0, ["demo"], [0, 1]

    import logging

    import torch

    from brainage_hpc.evaluation.predict import load_model
    from brainage_hpc.ingest.preprocess import PreprocessConfig

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"  # the preprocessing workers too
    work = fresh_cache((REPO / args.work) if not Path(args.work).is_absolute() else Path(args.work))
    machine = machine_info()
    cores = machine.get("cores_usable") or 1
    if args.inputs:
        files = sorted(q for q in Path(args.inputs).rglob("*") if q.name.endswith((".nii", ".nii.gz")))[: args.n]
        folder = Path(args.inputs)
    else:
        files = _inputs(work, args.n, args.unique, args.input_mm)
        folder = files[0].parent
    rows, raw = [], []
    for key in args.shapes:
        model = _model(work, key, args.pipeline)
        lm = load_model(model, "cpu")
        pcfg = PreprocessConfig.from_dict(lm.preprocess)
        load0 = _load()
        st = _stages(lm, pcfg, files[: max(4, min(len(files), 8))], args.batch_size)
        cpu_per_scan = st["load_s"] + st["preprocess_s"] + st["inference_s"]
        ceiling = cores / cpu_per_scan
        serial = _serial(lm, pcfg, files)
        entry: dict[str, Any] = {"shape": key, **st, "ceiling_scans_per_s": ceiling, "serial_scans_per_s": serial,
                                 "load_before": load0, "pipeline": {}}
        label = f"{'x'.join(map(str, SHAPES[key]['shape']))} @ {SHAPES[key]['voxel_mm']:g} mm ({SHAPES[key]['config']})"
        rows.append([label, "serial loop (prepare + forward per file)", "-", f"{serial:.2f}", "-",
                     f"{100 * serial / ceiling:.0f} %", f"{st['load_s']:.3f} / {st['preprocess_s']:.3f} / {st['inference_s']:.3f}",
                     f"{load0} -> {_load()}"])
        for w in args.workers:
            before = _load()
            loop, whole = _pipeline(model, folder, work / f"run_{key}_w{w}" / "pred.csv", w, args.batch_size)
            entry["pipeline"][w] = {"loop_scans_per_s": loop, "command_scans_per_s": whole, "load": [before, _load()]}
            rows.append([label, f"brainage predict, {w} worker(s), batch {args.batch_size}", str(w), f"{loop:.2f}",
                         f"{whole:.2f}", f"{100 * loop / ceiling:.0f} %", "", f"{before} -> {_load()}"])
        rows.append([label, "ceiling: cores / CPU s per scan", "-", f"{ceiling:.2f}", "-", "100 %", "", ""])
        raw.append(entry)
    best_key = args.shapes[-1]
    best = max(raw[-1]["pipeline"].values(), key=lambda e: e["loop_scans_per_s"])["loop_scans_per_s"]
    ratio = make_ratio(f"best pipeline / serial loop at {best_key}", best / raw[-1]["serial_scans_per_s"], 1.0)
    notes = [
        "Stages are medians per scan on one thread (load = nibabel read + gunzip + checks; preprocess = prepare_scan "
        "on the loaded image; inference = one forward of a batch, both sexes, divided by the scans in it).",
        "Pipeline scans/s is timed over the scoring loop (part-file session record); 'whole command' adds model "
        "load, planning, merge and the CSV. Every process uses one thread (OMP_NUM_THREADS=1).",
        f"The machine is shared with other jobs: the 1-minute load average before -> after each row is in the "
        f"last column (usable cores: {cores}); differences of a few percent are inside the noise.",
        "Raw scans (pipeline: raw) are not in this run: `--pipeline raw --inputs DIR` measures them; the raw "
        "pipeline's own per-scan time is in the raw_pipeline benchmark."
        if args.pipeline == "skullstripped" else "Raw-scan inputs: " + str(folder),
    ]
    result = make_result(
        "predict_throughput", "Cohort inference throughput (brainage predict)", argv, quick=args.quick,
        config={"n": len(files), "input_mm": args.input_mm, "batch_size": args.batch_size, "pipeline": args.pipeline,
                "workers": args.workers, "shapes": args.shapes},
        headers=["grid (model)", "method", "workers", "scans/s (loop)", "scans/s (command)", "of ceiling",
                 "load / preprocess / inference s per scan", "load avg"],
        rows=rows, ratio=ratio, notes=notes, machine=machine, measurements=raw)
    return finish(json.loads(json.dumps(result, default=str)), args.out)


if __name__ == "__main__":
    sys.exit(main())
