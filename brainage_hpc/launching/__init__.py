"""What ``python -m brainage_hpc.launch`` and ``slurm/*.sh`` need besides submitit.

Light on purpose: nothing here imports torch, so the sbatch scripts can call
``python -m brainage_hpc.launching.requeue`` in a second and the launcher's
``--wait`` loop stays cheap.

- :mod:`~brainage_hpc.launching.runstate`: read a run folder (steps, outcome, best metric).
- :mod:`~brainage_hpc.launching.requeue`: requeue decisions (stop after restarts without progress).
- :mod:`~brainage_hpc.launching.executor`: the submitit executor, sbatch options, dry-run text.
- :mod:`~brainage_hpc.launching.waiting`: ``--wait``: progress lines, results, no sacct noise.
- :mod:`~brainage_hpc.launching.sweep`: sweep grids, run-folder names, job arrays.
"""

import os

# submitit reads its preemption signal when first imported; the trainer and the sbatch
# scripts use USR1. Set it here, before any module of this package imports submitit.
os.environ.setdefault("SUBMITIT_PREEMPT_SIGNAL", "USR1")

__all__: list[str] = []
