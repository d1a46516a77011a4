"""The registration template: the MNI152 ICBM 2009 brain that nilearn ships (no download).

nilearn's wheel holds ``mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz``: the
ICBM 2009**a** nonlinear *symmetric* T1 template, skull-stripped, 1 mm,
197 x 233 x 189. (DESIGN.md said 2009c; 2009c is not in the wheel, and 2009a differs
from it by the intensity non-uniformity correction of the averaging, not by space.)
Its sha256 goes into every preprocessing fingerprint, so a nilearn release that
changed the file would be noticed.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["Template", "load_template", "template_path"]


def template_path() -> Path:
    """Path of the template file inside the installed nilearn."""
    from nilearn.datasets import struct

    return Path(struct.MNI152_FILE_PATH)


@dataclass(frozen=True)
class Template:
    """The template on its 1 mm grid.

    Attributes:
        t1: (X, Y, Z) float32 T1 intensities (0-255 scale), background 0.
        mask: (X, Y, Z) bool brain mask (nilearn's ``load_mni152_brain_mask``).
        affine: (4, 4) voxel -> MNI mm (RAS).
        sha256: hex digest of the template file.
        name: human-readable name for manifests and reports.
    """

    t1: np.ndarray
    mask: np.ndarray
    affine: np.ndarray
    sha256: str
    name: str = "MNI152 ICBM 2009a nonlinear symmetric (nilearn)"

    @property
    def brain_centre_mm(self) -> np.ndarray:
        """Centre of the brain mask's bounding box, MNI mm (3,)."""
        idx = np.argwhere(self.mask)
        centre_vox = (idx.min(axis=0) + idx.max(axis=0)) / 2.0
        return self.affine[:3, :3] @ centre_vox + self.affine[:3, 3]


@functools.lru_cache(maxsize=1)
def load_template() -> Template:
    """Load (once per process) the 1 mm template, its brain mask and the file's sha256."""
    import nibabel as nib
    from nilearn import datasets

    path = template_path()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    img = nib.load(path)
    mask = datasets.load_mni152_brain_mask(resolution=1)
    t1 = np.asarray(img.get_fdata(), dtype=np.float32)
    m = np.asarray(mask.get_fdata()) > 0.5
    if m.shape != t1.shape or not np.allclose(mask.affine, img.affine):
        raise RuntimeError(f"{path}: nilearn's brain mask is not on the template grid; nilearn changed?")
    t1.setflags(write=False)
    m.setflags(write=False)
    return Template(t1=t1, mask=m, affine=np.asarray(img.affine, dtype=np.float64), sha256=digest)
