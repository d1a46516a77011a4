"""AMP on CPU: fp32 vs bf16 autocast forward+backward throughput of the demo models.

``python -m benchmarks.amp [--quick] [--out benchmarks/results/amp.json]``

For each model (the seed CNN of ``cnn_demo`` and the SFCN of ``sfcn_demo``, at
their 48x56x48 demo size), times ``--steps`` forward+backward passes of a fixed
random batch, in fp32 and under ``torch.autocast("cpu", dtype=torch.bfloat16)``
(what ``train.precision=bf16-mixed`` does), with a fixed number of torch
threads. One untimed pass of each precision first; then ``--repeats`` timed
blocks, interleaved fp32 / bf16, and the median volumes/s of each. No target
in DESIGN.md: the table says whether bf16 pays off on this CPU (it needs
AVX512-BF16 or AMX to beat fp32; the CPU flags are in the machine record).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from typing import Any

import torch

from benchmarks.common import finish, machine_info, make_ratio, make_result, median, result_path, set_threads

__all__ = ["main", "fwd_bwd_rate"]

MODELS = ("cnn_demo", "sfcn_demo")


def fwd_bwd_rate(model: torch.nn.Module, batch: dict[str, Any], steps: int, dtype: torch.dtype | None) -> float:
    """Volumes/s of ``steps`` forward+backward passes (autocast to ``dtype`` when given)."""
    ctx = (lambda: torch.autocast("cpu", dtype=dtype)) if dtype is not None else contextlib.nullcontext
    t0 = time.perf_counter()
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        with ctx():
            out = model(batch)
        out["loss"].backward()
    return steps * batch["image"].shape[0] / (time.perf_counter() - t0)


def _model_and_batch(config: str, batch: int) -> tuple[torch.nn.Module, dict[str, Any], str]:
    from brainage_hpc.config import load_config
    from brainage_hpc.models.registry import build_model

    cfg = load_config(config)
    shape = tuple(cfg.data.shape)
    torch.manual_seed(0)
    model = build_model(cfg.model, shape).train()
    age = 22 + 14 * torch.rand(batch)
    data = {"image": torch.randn(batch, 1, *shape), "age": age, "sex": (torch.rand(batch) > 0.5).float(),
            "label": ((age - 22) // 4).long().clamp(0, 3), "age_bin": ((age - 22) // 4).long().clamp(0, 3)}
    return model, data, f"{cfg.model.name} ({config}, {'x'.join(map(str, shape))})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.amp", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="few steps (a smoke run, not a measurement)")
    p.add_argument("--configs", nargs="+", default=list(MODELS), help="configs whose models are timed")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=None, help="passes per timed block (default 8; quick 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed blocks per precision (default 5; quick 2)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--out", default=None, help="JSON result (default benchmarks/results/amp.json)")
    args = p.parse_args(argv)
    args.steps = args.steps or (1 if args.quick else 8)
    args.repeats = args.repeats or (2 if args.quick else 5)
    out = args.out or str(result_path("amp", args.quick))
    logging.basicConfig(level=logging.WARNING)
    set_threads(args.threads)
    machine = machine_info()  # at the start: its load record is the load before this run

    precisions: dict[str, torch.dtype | None] = {"fp32": None, "bf16 autocast": torch.bfloat16}
    rows, raw, speedups = [], {}, {}
    for config in args.configs:
        model, batch, label = _model_and_batch(config, args.batch)
        rates: dict[str, list[float]] = {k: [] for k in precisions}
        for dtype in precisions.values():
            fwd_bwd_rate(model, batch, 1, dtype)  # warm-up
        for _ in range(args.repeats):
            for name, dtype in precisions.items():
                rates[name].append(fwd_bwd_rate(model, batch, args.steps, dtype))
        base = median(rates["fp32"])
        for name in precisions:
            m = median(rates[name])
            rows.append([label, name, f"{m:.2f}", f"{min(rates[name]):.2f}–{max(rates[name]):.2f}", f"{m / base:.2f}x"])
        speedups[config] = median(rates["bf16 autocast"]) / base
        raw[config] = rates
        print(f"  {label}: fp32 {base:.2f}, bf16 {median(rates['bf16 autocast']):.2f} volumes/s", file=sys.stderr)

    flags = ", ".join(f for f in machine["cpu_flags"] if "bf16" in f or "amx" in f) or "none"
    text = "bf16 autocast / fp32: " + ", ".join(f"{c} {s:.2f}x" for c, s in speedups.items())
    ratio = make_ratio("bf16 / fp32 volumes/s (lowest model)", min(speedups.values()), None, text=text)
    result = make_result(
        "amp", "Mixed precision on CPU: fp32 vs bf16 autocast", argv, quick=args.quick, machine=machine,
        config={"configs": args.configs, "batch": args.batch, "steps": args.steps, "repeats": args.repeats,
                "threads": args.threads},
        headers=["model", "precision", "volumes/s (median)", "range", "vs fp32"], rows=rows, ratio=ratio,
        notes=[f"forward+backward, batch {args.batch}, {args.threads} torch threads, median of {args.repeats} "
               f"interleaved blocks of {args.steps} passes after one warm-up pass; CPU bf16 flags: {flags}."],
        volumes_per_s=raw, speedups=speedups,
    )
    return finish(result, out)


if __name__ == "__main__":
    sys.exit(main())
