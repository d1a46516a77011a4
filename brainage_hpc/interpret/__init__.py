"""Interpretation of trained models.

* :mod:`brainage_hpc.interpret.gradcam`: 3D Grad-CAM / Grad-CAM++ maps (NIfTI + PNG overlays),
  per subject and averaged over a split;
* :mod:`brainage_hpc.interpret.methods`: one attribution map per subject by Grad-CAM, occlusion (MONAI),
  integrated gradients and SmoothGrad (Captum), or the CVAE counterfactual;
* :mod:`brainage_hpc.interpret.faithfulness`: enrichment / Spearman against a truth map, deletion/insertion AOPC;
* :mod:`brainage_hpc.interpret.truth`: truth maps on the shard grid (``|r|`` over the train split, or a NIfTI);
* :mod:`brainage_hpc.interpret.explain`: ``brainage explain`` (all of the above, NIfTI/PNG/JSON/Markdown);
* :mod:`brainage_hpc.interpret.latent`: the conditional VAE's latent space (PCA, t-SNE) and
  age-conditioned generation of brains, with a CSF-fraction readout of generated volumes.

Submodules are imported on use (they pull in torch, MONAI and matplotlib).
"""

from __future__ import annotations

__all__ = ["explain", "faithfulness", "gradcam", "latent", "methods", "truth"]
