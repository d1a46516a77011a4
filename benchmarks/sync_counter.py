"""Count the calls that would stall a GPU inside ``Trainer.train_epoch`` (issue 17.4); runnable as a script.

``python benchmarks/sync_counter.py SHARDS RUN_DIR STEPS [override ...]`` prints one JSON line
``{"syncs": N, "steps": S}``. It imports only torch and ``brainage_hpc`` (whichever is first on
``PYTHONPATH``), so :mod:`benchmarks.syncs` can run it on an older revision of the package too.

On CPU nothing stalls, so the counter wraps the Python-level calls that copy a device value
to the host (``Tensor.item``/``tolist``/``__bool__``/``__float__``/``__int__``) while
``train_epoch`` runs; the DataLoader's own ``.item()`` of a CPU generator (its base seed) is
not counted.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SYNCING = ("item", "tolist", "__bool__", "__float__", "__int__")


def count_train_syncs(overrides: list[str], run_dir: Path) -> int:
    """Syncing tensor calls made inside ``Trainer.train_epoch`` during ``fit`` of the ``cnn_demo`` config + overrides."""
    import torch

    from brainage_hpc.config import load_config
    from brainage_hpc.engine.run import build_trainer

    cfg = load_config("cnn_demo", overrides)
    run_dir.mkdir(parents=True)
    trainer = build_trainer(cfg, run_dir)
    state = {"on": False, "n": 0}
    originals = {name: getattr(torch.Tensor, name) for name in SYNCING}

    def counting(name: str):  # type: ignore[no-untyped-def]
        original = originals[name]

        def wrapper(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            if state["on"] and not sys._getframe(1).f_globals.get("__name__", "").startswith("torch.utils.data"):
                state["n"] += 1
            return original(self, *args, **kwargs)
        return wrapper

    epoch = trainer.train_epoch

    def counted_epoch():  # type: ignore[no-untyped-def]
        state["on"] = True
        try:
            return epoch()
        finally:
            state["on"] = False

    trainer.train_epoch = counted_epoch  # type: ignore[method-assign]
    for name in SYNCING:
        setattr(torch.Tensor, name, counting(name))
    try:
        outcome = trainer.fit("none")
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
        trainer.logger.close()
    if outcome != "completed":
        raise RuntimeError(f"training ended {outcome!r}")
    return state["n"]


if __name__ == "__main__":
    shards, run, steps, *extra = sys.argv[1:]
    n = count_train_syncs([*extra, f"data.shards={shards}", f"train.max_steps={steps}"], Path(run))
    print(json.dumps({"syncs": n, "steps": int(steps)}))
