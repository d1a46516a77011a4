"""The preprocessing fingerprint (contract 4): what produced a shard set, stored in its manifest and every checkpoint.

Brain-age predictions go wrong quietly when the preprocessing at inference differs
from training (another skull stripper, another registration, another template, a
library upgrade that changed interpolation). The fingerprint names all of it::

    {"pipeline": "skullstripped" | "raw",
     "config": {... PreprocessConfig ..., "raw": {... raw pipeline settings ...}},
     "versions": {"nibabel", "monai", "antspyx", "deepbet", "brainage_hpc", "torch"},
     "template_sha256": sha256 of the registration template (raw) or None}

``brainage predict`` compares it with what is installed (:func:`fingerprint_differences`)
and warns on any difference.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

__all__ = ["FINGERPRINT_PACKAGES", "fingerprint_differences", "preprocessing_fingerprint"]

# fingerprint key -> distribution name
FINGERPRINT_PACKAGES: dict[str, str] = {
    "nibabel": "nibabel",
    "monai": "monai",
    "antspyx": "antspyx",
    "deepbet": "deepbet",
    "torch": "torch",
    "brainage_hpc": "brainage-hpc",
}


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        if dist == "brainage-hpc":
            from brainage_hpc import __version__

            return __version__
        return None


def preprocessing_fingerprint(preprocess: dict[str, Any]) -> dict[str, Any]:
    """The fingerprint of a preprocessing config (``PreprocessConfig.to_dict()``) in this environment."""
    pipeline = preprocess.get("pipeline", "skullstripped")
    config = dict(preprocess)
    template_sha = None
    if pipeline == "raw":
        from brainage_hpc.ingest.raw import RAW_SETTINGS, deepbet_available
        from brainage_hpc.ingest.template import load_template

        config["raw"] = dict(RAW_SETTINGS, deepbet_used=deepbet_available())
        template_sha = load_template().sha256
    return {
        "pipeline": pipeline,
        "config": config,
        "versions": {key: _version(dist) for key, dist in FINGERPRINT_PACKAGES.items()},
        "template_sha256": template_sha,
    }


def fingerprint_differences(saved: dict[str, Any] | None) -> list[str]:
    """What differs between a stored fingerprint and this environment, one phrase each (empty: nothing).

    Only what matters for the stored pipeline is compared: library versions, the raw
    settings and the template for ``raw``; nibabel, MONAI and brainage-hpc for ``skullstripped``.
    """
    if not saved:
        return []
    now = preprocessing_fingerprint(dict(saved.get("config", {})) | {"pipeline": saved.get("pipeline", "skullstripped")})
    keys = list(FINGERPRINT_PACKAGES) if saved.get("pipeline") == "raw" else ["nibabel", "monai", "brainage_hpc"]
    out = [
        f"{k} {saved.get('versions', {}).get(k)} at training, {now['versions'][k]} installed"
        for k in keys
        if saved.get("versions", {}).get(k) != now["versions"][k]
    ]
    if saved.get("template_sha256") != now["template_sha256"]:
        out.append("registration template differs (sha256) from the one used for training")
    if saved.get("pipeline") == "raw" and saved.get("config", {}).get("raw") != now["config"].get("raw"):
        out.append("raw-pipeline settings differ from the training ones")
    return out
