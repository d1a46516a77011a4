"""Issue 17.4: the training step does not synchronise host and device; syncs happen once per logging interval.

On CPU nothing stalls, so the test counts the Python-level calls that would stall a GPU
(``Tensor.item``/``tolist``/``__bool__``/``__float__``/``__int__``) while ``train_epoch`` runs.
"""

from __future__ import annotations

import sys

import pytest
import torch

from tests.conftest import train_overrides

pytestmark = pytest.mark.slow
_SYNCING = ("item", "tolist", "__bool__", "__float__", "__int__")


def count_step_syncs(shards, run_dir, steps: int, *extra: str) -> int:
    """Syncing tensor calls made inside ``Trainer.train_epoch`` over ``steps`` optimizer steps."""
    from brainage_hpc.config import load_config
    from brainage_hpc.engine.run import build_trainer

    cfg = load_config("cnn_demo", train_overrides(
        shards, "cnn3d", "train.backend=single", "train.precision=32", f"train.max_steps={steps}", "train.epochs=100",
        "train.ckpt_every_steps=0", *extra))
    run_dir.mkdir(parents=True)
    trainer = build_trainer(cfg, run_dir)
    state = {"on": False, "n": 0}
    originals = {name: getattr(torch.Tensor, name) for name in _SYNCING}

    def counting(name):
        original = originals[name]

        def wrapper(self, *args, **kwargs):
            # the DataLoader draws its per-epoch base seed with .item() of a CPU generator: no device involved
            if state["on"] and not sys._getframe(1).f_globals.get("__name__", "").startswith("torch.utils.data"):
                state["n"] += 1
            return original(self, *args, **kwargs)
        return wrapper

    epoch = trainer.train_epoch

    def counted_epoch():
        state["on"] = True
        try:
            return epoch()
        finally:
            state["on"] = False

    trainer.train_epoch = counted_epoch
    for name in _SYNCING:
        setattr(torch.Tensor, name, counting(name))
    try:
        assert trainer.fit("none") == "completed"
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
        trainer.logger.close()
    return state["n"]


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
