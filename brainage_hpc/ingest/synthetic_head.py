"""Head-like raw T1w scans from synthetic (skull-stripped) brains, for CI of the raw pipeline.

A scanner T1w is not a brain on a black background: the brain sits in CSF inside
a skull and scalp, the field of view holds the neck and is not centred on the
brain, the head is tilted in the scanner, voxels are often anisotropic, the
array may be stored LPS (DICOM order) or RAS, and a receive-coil bias field
shades it. :func:`make_head` adds all of that to one brain volume so that the
raw pipeline can be tested against the skull-stripped volume of the *same*
subject (which is the truth for its brain mask).

Layers outward from the brain mask (distances in mm from a smoothed head
outline, so the skull does not follow the sulci): CSF 0-3 mm (dark), inner
table of the skull 3-5 mm (very dark), diploe 5-8 mm (bright marrow), outer
table 8-10 mm (very dark), scalp 10-16 mm (bright fat over muscle); below the
brain a neck (muscle with a fat rim) runs to the edge of the field of view.
Magnitude (Rician) noise keeps the background above zero, as on a scanner.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = ["HeadConfig", "HeadScan", "make_head", "rotation_matrix"]


@dataclass(frozen=True)
class HeadConfig:
    """Acquisition of one synthetic raw scan.

    Args:
        voxel_mm: stored voxel size (x, y, z) in mm; anisotropic allowed.
        fov_mm: field of view (x, y, z) in mm.
        rotation_deg: head tilt in the scanner, rotations about x, y, z (degrees).
        fov_offset_mm: field-of-view centre relative to the brain centre (mm, scanner RAS);
            the default puts the neck in and the brain high in the field of view.
        orientation: ``"RAS"`` or ``"LPS"`` storage order of the array.
        bias_std: std of the log bias field (0.25: about +-40 % shading).
        noise_std: std of the complex noise relative to white matter.
        intensity_scale: white-matter intensity of the stored int16 image.
    """

    voxel_mm: tuple[float, float, float] = (1.0, 1.0, 1.2)
    fov_mm: tuple[float, float, float] = (200.0, 240.0, 240.0)
    rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    fov_offset_mm: tuple[float, float, float] = (0.0, -10.0, -25.0)
    orientation: str = "RAS"
    bias_std: float = 0.25
    noise_std: float = 0.02
    intensity_scale: float = 1000.0

    def __post_init__(self) -> None:
        if self.orientation not in ("RAS", "LPS"):
            raise ValueError(f"HeadConfig.orientation must be 'RAS' or 'LPS', got {self.orientation!r}")
        if min(self.voxel_mm) <= 0 or min(self.fov_mm) <= 0:
            raise ValueError("HeadConfig.voxel_mm and fov_mm must be > 0")


@dataclass
class HeadScan:
    """A synthetic raw scan: ``data`` (X, Y, Z) int16 with its (4, 4) ``affine`` and the true brain mask in that grid."""

    data: np.ndarray
    affine: np.ndarray
    brain_mask: np.ndarray


def rotation_matrix(deg: tuple[float, float, float]) -> np.ndarray:
    """(3, 3) rotation about x, then y, then z, angles in degrees."""
    ax, ay, az = (math.radians(d) for d in deg)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], n_ctrl: int = 4) -> np.ndarray:
    ctrl = rng.standard_normal((n_ctrl,) * 3)
    out = ndimage.zoom(ctrl, [s / n_ctrl for s in shape], order=3, mode="nearest")
    return out[: shape[0], : shape[1], : shape[2]]


def _tissue_model(brain: np.ndarray, voxel: float) -> tuple[np.ndarray, np.ndarray]:
    """Head intensities (WM = 1) on the brain's own grid, padded for skull, scalp and neck -> (head, brain mask)."""
    pad = int(math.ceil(40 / voxel))
    below = int(math.ceil(110 / voxel))  # room for the neck
    mask = brain > 0
    wm = float(np.percentile(brain[mask], 95)) if mask.any() else 1.0
    img = np.pad(brain / wm, ((pad, pad), (pad, pad), (below, pad)))
    mask = np.pad(mask, ((pad, pad), (pad, pad), (below, pad)))
    # a smooth outline: close the sulci, then measure distances outward from it
    ball = max(1, int(round(8 / voxel)))
    outline = ndimage.binary_closing(mask, structure=ndimage.generate_binary_structure(3, 1), iterations=ball)
    outline = ndimage.binary_fill_holes(outline | mask)
    dist = ndimage.distance_transform_edt(~outline) * voxel  # mm outside the outline
    head = np.where(mask, img, 0.0)
    layers = [(0, 3, 0.12), (3, 5, 0.03), (5, 8, 0.75), (8, 10, 0.03), (10, 13, 0.45), (13, 16, 1.05)]
    for lo, hi, value in layers:
        shell = ~mask & (dist > lo - 1e-6) & (dist <= hi)
        head = np.where(shell, value, head)
    head = np.where(~mask & outline, 0.12, head)  # CSF filling the closed sulci
    # neck: an elliptic column under the brain (muscle, fat rim), joined to the scalp
    zs = np.flatnonzero(mask.any(axis=(0, 1)))
    z_low = zs[0] + int(0.25 * (zs[-1] - zs[0]))
    cx, cy = (float(c) for c in ndimage.center_of_mass(mask[:, :, z_low]))
    x, y = np.meshgrid(np.arange(head.shape[0]), np.arange(head.shape[1]), indexing="ij")
    r = np.sqrt(((x - cx) * voxel / 55.0) ** 2 + ((y - cy - 15 / voxel) * voxel / 60.0) ** 2)
    column = np.where(r < 0.88, 0.5, np.where(r < 1.0, 1.0, 0.0))
    for z in range(0, z_low):
        free = head[:, :, z] == 0
        head[:, :, z] = np.where(free, column, head[:, :, z])
    return head, mask


def make_head(
    brain: np.ndarray, brain_affine: np.ndarray, cfg: HeadConfig, rng: np.random.Generator
) -> HeadScan:
    """Wrap one skull-stripped brain in a head and 'scan' it.

    Args:
        brain: (X, Y, Z) skull-stripped brain, background 0, on an isotropic RAS grid.
        brain_affine: its (4, 4) voxel -> mm (RAS) affine.
        cfg: acquisition (voxel size, field of view, tilt, offset, storage order...).
        rng: random generator for the bias field and noise.

    Returns:
        A :class:`HeadScan`: int16 data, its affine (RAS or LPS storage, axis-aligned
        scanner grid) and the true brain mask resampled into that grid.
    """
    voxel = float(abs(brain_affine[0, 0]))
    head, mask = _tissue_model(np.asarray(brain, dtype=np.float32), voxel)
    pad_aff = brain_affine.copy()
    pad = int(math.ceil(40 / voxel))
    below = int(math.ceil(110 / voxel))
    pad_aff[:3, 3] = brain_affine[:3, :3] @ np.array([-pad, -pad, -below]) + brain_affine[:3, 3]
    centre_vox = np.array(ndimage.center_of_mass(mask))
    centre_mm = pad_aff[:3, :3] @ centre_vox + pad_aff[:3, 3]  # brain centre, anatomical mm

    vox = np.asarray(cfg.voxel_mm, dtype=float)
    shape = tuple(int(round(f / v)) for f, v in zip(cfg.fov_mm, vox, strict=True))
    # scanner grid (RAS, axis-aligned), centred at brain centre + offset
    grid_aff = np.diag([*vox, 1.0])
    grid_aff[:3, 3] = centre_mm + np.asarray(cfg.fov_offset_mm) - vox * (np.asarray(shape) - 1) / 2
    # the head is tilted in the scanner: anatomy point = R^-1 (scanner point - centre) + centre
    rot = rotation_matrix(cfg.rotation_deg)
    scan_to_anat = np.eye(4)
    scan_to_anat[:3, :3] = rot.T
    scan_to_anat[:3, 3] = centre_mm - rot.T @ centre_mm
    vox_map = np.linalg.inv(pad_aff) @ scan_to_anat @ grid_aff  # scan voxel -> head-model voxel
    data = ndimage.affine_transform(head, vox_map[:3, :3], vox_map[:3, 3], output_shape=shape, order=1, cval=0.0)
    truth = ndimage.affine_transform(mask.astype(np.float32), vox_map[:3, :3], vox_map[:3, 3], output_shape=shape,
                                     order=1, cval=0.0) > 0.5
    bias = np.exp(cfg.bias_std * _smooth_noise(rng, shape))
    signal = data * bias
    noise = cfg.noise_std * rng.standard_normal((2, *shape))
    magnitude = np.sqrt((signal + noise[0]) ** 2 + noise[1] ** 2)  # Rician background, as on a scanner
    out = np.clip(np.round(magnitude * cfg.intensity_scale), 0, np.iinfo(np.int16).max).astype(np.int16)
    affine = grid_aff
    if cfg.orientation == "LPS":  # store x and y reversed, as DICOM-ordered converters do
        out, truth = out[::-1, ::-1].copy(), truth[::-1, ::-1].copy()
        flip = np.diag([-1.0, -1.0, 1.0, 1.0])
        flip[:3, 3] = [shape[0] - 1, shape[1] - 1, 0]
        affine = grid_aff @ flip
    return HeadScan(out, affine, truth)
