"""Issue 17.4: the training step does not synchronise host and device; syncs happen once per logging interval.

On CPU nothing stalls, so the test counts the Python-level calls that would stall a GPU
(``Tensor.item``/``tolist``/``__bool__``/``__float__``/``__int__``) while ``train_epoch`` runs.
"""

from __future__ import annotations

import pytest

from tests.conftest import train_overrides

pytestmark = pytest.mark.slow


def count_step_syncs(shards, run_dir, steps: int, *extra: str) -> int:
    """Syncing tensor calls made inside ``Trainer.train_epoch`` over ``steps`` optimizer steps."""
    from benchmarks.sync_counter import count_train_syncs

    return count_train_syncs(train_overrides(
        shards, "cnn3d", "train.backend=single", "train.precision=32", f"train.max_steps={steps}", "train.epochs=100",
        "train.ckpt_every_steps=0", *extra), run_dir)


@pytest.mark.parametrize("accum", [1, 2])
def test_17_4_syncs_once_per_logging_interval_not_per_step(tiny_shards, tmp_path, accum):
    from brainage_hpc.engine.syncs import sync_count

    before = sync_count()
    # 6 steps, one log line at the end (log_every_steps larger than the run)
    n = count_step_syncs(tiny_shards, tmp_path / "a", 6, "train.log_every_steps=1000", f"train.grad_accum={accum}",
                         "data.batch_size=8")
    assert n == 1, f"{n} syncing calls in 6 steps (expected 1: the final log line)"
    assert sync_count() - before >= 1
    # logging every 2 steps: 3 log lines, 3 syncs
    assert count_step_syncs(tiny_shards, tmp_path / "b", 6, "train.log_every_steps=2", f"train.grad_accum={accum}") == 3
