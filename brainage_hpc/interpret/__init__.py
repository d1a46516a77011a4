"""Interpretation of trained models.

* :mod:`brainage_hpc.interpret.gradcam`: 3D Grad-CAM / Grad-CAM++ maps (NIfTI + PNG overlays),
  per subject and averaged over a split;
* :mod:`brainage_hpc.interpret.latent`: the conditional VAE's latent space (PCA, t-SNE) and
  age-conditioned generation of brains, with a CSF-fraction readout of generated volumes.

Submodules are imported on use (they pull in torch, MONAI and matplotlib).
"""

from __future__ import annotations

__all__ = ["gradcam", "latent"]
