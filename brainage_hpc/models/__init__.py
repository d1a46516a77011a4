"""Model zoo: the seed 3D CNN, SFCN and the conditional VAE, plus the registry.

Every model is a pure ``nn.Module`` built as
``Model(in_shape=(D, H, W), task="regress" | "classify", num_classes=K, **params)``
whose ``forward(batch) -> dict`` computes its own loss when targets are present.
"""

from brainage_hpc.models.cnn3d import CNN3d
from brainage_hpc.models.cvae import ConditionalVAE3d, CVAEEncoding, kl_to_prior
from brainage_hpc.models.registry import (
    MODEL_NAMES,
    TASKS,
    build_model,
    get_model_class,
    model_params,
    param_count,
    resolve_task,
)
from brainage_hpc.models.sfcn import SFCN, soft_age_labels
from brainage_hpc.models.summary import LayerInfo, ModelSummary, summarize

__all__ = [
    "CNN3d",
    "CVAEEncoding",
    "ConditionalVAE3d",
    "LayerInfo",
    "MODEL_NAMES",
    "ModelSummary",
    "SFCN",
    "TASKS",
    "build_model",
    "get_model_class",
    "kl_to_prior",
    "model_params",
    "param_count",
    "resolve_task",
    "soft_age_labels",
    "summarize",
]
