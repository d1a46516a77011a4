"""Models on FreeSurfer regional tables (scikit-learn), beside the deep models.

``data`` loads and joins the table, ``splits`` splits it like the shards, ``models`` builds
the pipelines and searches them on the validation split, ``importance`` computes
permutation/impurity importance, ``report`` writes ``report.md``. The command
``brainage tabular`` (:mod:`brainage_hpc.commands.tabular`) chains them.
"""

from brainage_hpc.tabular.data import (
    TabularData,
    TabularDataError,
    join_labels,
    read_feature_table,
    read_labels,
    task_targets,
)
from brainage_hpc.tabular.importance import importance_figure, importance_table
from brainage_hpc.tabular.models import MODEL_NAMES, TwoStepClassifier, build_model, search_on_validation
from brainage_hpc.tabular.report import headline, render_report
from brainage_hpc.tabular.splits import resolve_splits

__all__ = [
    "MODEL_NAMES",
    "TabularData",
    "TabularDataError",
    "TwoStepClassifier",
    "build_model",
    "headline",
    "importance_figure",
    "importance_table",
    "join_labels",
    "read_feature_table",
    "read_labels",
    "render_report",
    "resolve_splits",
    "search_on_validation",
    "task_targets",
]
