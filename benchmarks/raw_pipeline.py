"""Raw-pipeline benchmark: CPU seconds per 1 mm head scan on one core, split N4 / registration / brain extraction.

``python -m benchmarks.raw_pipeline [--quick] [--n 5] [--out benchmarks/results/raw_pipeline.json]``

Inputs: ``--n`` synthetic heads at 1 mm (synthetic 1 mm brains wrapped in skull,
scalp and neck, tilted up to 15 degrees, 200 x 240 x 240 mm field of view; made once
into ``bench_out/raw_pipeline``) plus Debian mricron-data's real head (ch2) when it is
installed. Every scan runs :func:`brainage_hpc.ingest.raw.raw_to_brain` with one ITK
and one torch thread; the step times are CPU seconds of this process
(``time.process_time``), so they do not depend on other load as much as wall time.

Baseline (what a user would write instead, one scan, full runs only): ANTsPy's default
calls, ``n4_bias_field_correction(img)`` on the full-resolution image and
``registration(type_of_transform="Affine")`` of the whole head, which is what the
ANTsPy README shows.

Target (issue 15): median <= 30 s CPU per 1 mm scan.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import BENCH_OUT, finish, machine_info, make_ratio, make_result, result_path

__all__ = ["main"]

MRICRON_HEAD = Path("/usr/share/mricron/templates/ch2.nii.gz")


def _heads(n: int, voxel: float, work: Path) -> list[Path]:
    """``n`` synthetic heads at ``voxel`` mm (cached), as NIfTI files."""
    import nibabel as nib

    from brainage_hpc.ingest.synthetic import SynthConfig, make_cohort
    from brainage_hpc.ingest.synthetic_head import HeadConfig, make_head

    root = work / f"heads_n{n}_{voxel:g}mm"
    paths = [root / f"head{i}.nii.gz" for i in range(n)]
    if all(p.is_file() for p in paths):
        return paths
    brains = work / f"brains_n{n}_{voxel:g}mm"
    if not (brains / "truth.json").is_file():
        make_cohort(brains, SynthConfig(n_subjects=n, seed=21, voxel_mm=voxel), progress=False, workers=1)
    root.mkdir(parents=True, exist_ok=True)
    for i, brain in enumerate(sorted(brains.rglob("*_brain.nii.gz"))[:n]):
        rng = np.random.default_rng([21, i])
        hc = HeadConfig(voxel_mm=(voxel,) * 3, rotation_deg=tuple(rng.uniform(-15, 15, 3)),  # type: ignore[arg-type]
                        orientation=("RAS", "LPS")[i % 2])
        img = nib.load(brain)
        head = make_head(np.asarray(img.dataobj, dtype=np.float32), img.affine, hc, rng)
        nib.save(nib.Nifti1Image(head.data, head.affine), paths[i])
    return paths


def _baseline(path: Path) -> dict[str, float]:
    """ANTsPy's default N4 and Affine calls on the full-resolution head (CPU s)."""
    import ants
    from nilearn import datasets

    img = ants.image_read(str(path))
    t0 = time.process_time()
    n4 = ants.n4_bias_field_correction(img)
    t_n4 = time.process_time() - t0
    fixed = ants.from_nibabel_nifti(datasets.load_mni152_template(resolution=1))
    t0 = time.process_time()
    ants.registration(fixed, n4, type_of_transform="Affine")
    return {"n4_s": t_n4, "registration_s": time.process_time() - t0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one 3 mm head, no baseline (smoke run)")
    parser.add_argument("--n", type=int, default=5, help="synthetic 1 mm heads (default 5)")
    parser.add_argument("--no-baseline", action="store_true", help="skip ANTsPy's default calls")
    parser.add_argument("--out", default=None)
    parser.add_argument("--work", default=str(BENCH_OUT / "raw_pipeline"))
    args = parser.parse_args(argv)
    q = args.quick
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = "1"
    machine = machine_info()

    import torch

    from brainage_hpc.ingest.preprocess import PreprocessConfig, load_volume
    from brainage_hpc.ingest.raw import raw_to_brain, set_threads

    set_threads(1)
    torch.set_num_threads(1)
    voxel = 3.0 if q else 1.0
    work = Path(args.work)
    scans = _heads(1 if q else args.n, voxel, work)
    if not q and MRICRON_HEAD.is_file():
        scans.append(MRICRON_HEAD)
    cfg = PreprocessConfig(shape=(160, 192, 160), voxel_mm=1.0, pipeline="raw")
    raw_to_brain(*load_volume(scans[0])[:2], "warm-up", cfg)  # deepbet weights, template, imports
    runs: list[dict[str, Any]] = []
    for path in scans:
        data, affine, name = load_volume(path)
        c0, w0 = time.process_time(), time.perf_counter()
        res = raw_to_brain(data, affine, name, cfg)
        runs.append({"scan": path.name if path != MRICRON_HEAD else "mricron ch2 (real)", "shape": list(data.shape),
                     "cpu_s": time.process_time() - c0, "wall_s": time.perf_counter() - w0,
                     **{k: float(v) for k, v in res.timings.items()}, "similarity": res.qc["similarity"]})
        print(f"{runs[-1]['scan']}: {runs[-1]['cpu_s']:.1f} s CPU", flush=True)
    base = None if (q or args.no_baseline) else _baseline(scans[0])

    def med(key: str) -> float:
        return statistics.median(r.get(key, 0.0) for r in runs)

    rows = [[r["scan"], "x".join(map(str, r["shape"])), f"{r['n4_s']:.1f}", f"{r['registration_s']:.1f}",
             f"{r.get('brain_extraction_s', 0.0):.1f}", f"{r['cpu_s']:.1f}", f"{r['wall_s']:.1f}", f"{r['similarity']:.2f}"]
            for r in runs]
    rows.append([f"median of {len(runs)}", "", f"{med('n4_s'):.1f}", f"{med('registration_s'):.1f}",
                 f"{med('brain_extraction_s'):.1f}", f"{med('cpu_s'):.1f}", f"{med('wall_s'):.1f}", ""])
    notes = ["CPU seconds of this process with 1 ITK thread and 1 torch thread (time.process_time); "
             "wall time depends on the machine's other load."]
    if base:
        rows.append(["ANTsPy defaults (baseline, first scan)", "", f"{base['n4_s']:.1f}", f"{base['registration_s']:.1f}",
                     "-", f"{base['n4_s'] + base['registration_s']:.1f}", "", ""])
        notes.append("Baseline: `ants.n4_bias_field_correction(img)` at full resolution and "
                     "`ants.registration(template, n4, 'Affine')` of the whole head (ANTsPy defaults).")
    ratio = make_ratio("median CPU s per scan", med("cpu_s"), 30.0, op="<=",
                       text=f"raw pipeline, median CPU per {voxel:g} mm scan on one core = {med('cpu_s'):.1f} s "
                            f"(N4 {med('n4_s'):.1f}, registration {med('registration_s'):.1f}, "
                            f"brain extraction {med('brain_extraction_s'):.1f})")
    result = make_result(
        "raw_pipeline", "Raw-scan pipeline (N4, registration, deepbet) per scan, one core", argv, quick=q, machine=machine,
        config={"voxel_mm": voxel, "n_synthetic": len(scans) - (0 if q or not MRICRON_HEAD.is_file() else 1),
                "threads": 1, "output": "160x192x160 at 1 mm"},
        headers=["scan", "shape", "N4 s", "registration s", "brain extraction s", "total CPU s", "wall s", "similarity"],
        rows=rows, ratio=ratio, notes=notes, runs=runs, baseline=base,
    )
    return finish(result, args.out or result_path("raw_pipeline", q))


if __name__ == "__main__":
    sys.exit(main())
