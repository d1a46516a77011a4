"""``make demo`` end to end: the whole pipeline on the 200-subject synthetic cohort (about 4 min on 2 cores).

This is the acceptance check of the demo: exit code 0, a report with every figure, the CNN's
test MAE at most half of the predict-the-mean MAE, and brains the trained CVAE generates at the
oldest age have more ventricle/CSF than at the youngest.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


def test_demo_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "demo_out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "brainage_hpc.demo", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=1400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "target <= 50 %: met" in proc.stdout
    assert f"--logdir {out.resolve() / 'runs'}" in proc.stdout

    summary = json.loads((out / "summary.json").read_text())
    assert summary["mae_ratio"] <= 0.5, summary
    assert summary["cvae_csf"]["oldest_larger"], summary["cvae_csf"]
    assert summary["cvae_csf"]["oldest_mean"] > summary["cvae_csf"]["youngest_mean"]

    report = (out / "report.md").read_text()
    figures = re.findall(r"!\[[^]]*\]\(([^)]+)\)", report)
    assert len(figures) == 6, figures
    for rel in figures:
        assert (out / rel).stat().st_size > 1000, rel
    # issue 18.2: explanations that are right (truth: |r| of intensity vs age over the train split)
    assert summary["explain"]["gradcam"]["enrichment"] >= 2.0, summary["explain"]
    assert max(m["enrichment"] for m in summary["explain"].values()) >= 4.0, summary["explain"]
    assert summary["explain"]["gradcam"]["n_zero_maps"] == 0
    assert "Explanations: faithfulness per method" in report
    for sub in ("eval_cnn", "eval_cvae", "gradcam", "explain", "explain_cvae", "latent", "generate", "tabular"):
        assert (out / sub / "report.md").is_file(), sub
    assert list((out / "runs" / "cnn" / "tb").rglob("events.out.tfevents.*"))

    # a second run reuses every stage's output and rewrites the same numbers
    again = subprocess.run([sys.executable, "-m", "brainage_hpc.demo", "--out", str(out)],
                           env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already trained: skipping" in again.stdout
    assert json.loads((out / "summary.json").read_text())["cnn_mae"] == summary["cnn_mae"]
