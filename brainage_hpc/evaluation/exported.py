"""Portable models: export a run to ONNX or TorchScript, and load such a file for inference.

An exported file carries everything ``brainage predict`` needs, in one place:
the network, the input shape (B, 1, D, H, W) with a free batch axis, the run config,
the preprocessing config and fingerprint (contract 4, when the run has one) and the
run's ``calibration.json`` (contract 7: bias coefficients, conformal quantile, OOD
parameters, when present). In ONNX they are one JSON string in the model's
``metadata_props`` (key ``brainage``); in TorchScript an extra file ``brainage.json``.

Each export stores the sha256 of its own graph/weights; loading recomputes it, so a
truncated or bit-flipped file is a one-line error, never an unnoticed wrong age.
RReLU (the seed CNN's head activation) is exported as the LeakyReLU it is in eval
mode (slope = (lower + upper) / 2): the same function, which ONNX can express.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import hashlib
import json
import logging
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

__all__ = [
    "EXPORT_FORMATS",
    "ExportedModule",
    "export_model",
    "is_exported_file",
    "load_exported",
    "model_digest",
    "parity_check",
]

log = logging.getLogger(__name__)
EXPORT_FORMATS = ("pt", "onnx", "torchscript")
DEFAULT_NAMES = {"pt": "model.pt", "onnx": "model.onnx", "torchscript": "model.ts"}
_META_KEY = "brainage"
_TS_EXTRA = "brainage.json"
_EXPORT_VERSION = 1
_OUTPUT_KEYS = ("pred_age", "logits", "features")


class _InferenceGraph(nn.Module):
    """The model as a function of two tensors, for tracing: (image, sex) -> (pred_age?, logits?, features?).

    ``features`` (B, F) are the penultimate features (:mod:`brainage_hpc.models.features`),
    exported so the out-of-distribution score of ``calibration.json`` works on the export too.
    """

    def __init__(self, model: nn.Module, outputs: tuple[str, ...]) -> None:
        super().__init__()
        self.model = model
        self.outputs = outputs

    def forward(self, image: torch.Tensor, sex: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Args:
            image: (B, 1, D, H, W) float32, preprocessed as the run's shards.
            sex: (B,) float32, 0 = F, 1 = M.
        Returns:
            The model outputs named in ``self.outputs``: ``pred_age`` (B,) years, ``logits`` (B, K),
            ``features`` (B, F).
        """
        from brainage_hpc.models.features import FEATURES_KEY, forward_with_features

        out, feats = forward_with_features(self.model, {"image": image, "sex": sex})
        if feats is not None:
            out = {**out, FEATURES_KEY: feats}
        return tuple(out[k].float() for k in self.outputs)


class ExportedModule(nn.Module):
    """An ONNX Runtime session or a TorchScript module behind the model interface (``batch -> dict``)."""

    def __init__(self, runner: Any, outputs: list[str], kind: Literal["onnx", "torchscript"], digest: str) -> None:
        super().__init__()
        self.runner = runner
        self.outputs = outputs
        self.kind = kind
        self.digest = digest  # sha256 recorded at export (graph for ONNX, weights for TorchScript)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Args:
            batch: ``image`` (B, 1, D, H, W), ``sex`` (B,).
        Returns:
            ``pred_age`` (B,) and/or ``logits`` (B, K), as the exported model gives them.
        """
        image = batch["image"].float().cpu()
        sex = batch["sex"].float().cpu()
        if self.kind == "onnx":
            values = self.runner.run(self.outputs, {"image": image.numpy(), "sex": sex.numpy()})
            return {k: torch.from_numpy(np.asarray(v)) for k, v in zip(self.outputs, values)}
        with torch.no_grad():
            values = self.runner(image, sex)
        return dict(zip(self.outputs, values))


def _leaky_for_rrelu(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every RReLU replaced by its eval-mode equivalent (LeakyReLU)."""
    model = copy.deepcopy(model).eval()
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.RReLU):
                setattr(module, child_name, nn.LeakyReLU((child.lower + child.upper) / 2, inplace=False))
    return model


def _output_keys(model: nn.Module, shape: tuple[int, int, int]) -> tuple[str, ...]:
    from brainage_hpc.models.features import FEATURES_KEY, forward_with_features

    with torch.no_grad():
        out, feats = forward_with_features(model, {"image": torch.zeros(1, 1, *shape), "sex": torch.zeros(1)})
    if feats is not None:
        out = {**out, FEATURES_KEY: feats}
    keys = tuple(k for k in _OUTPUT_KEYS if k in out)
    if not set(keys) - {"features"}:
        raise ValueError("the model gives neither pred_age nor logits; nothing to export")
    return keys


def _graph_digest(proto: Any) -> str:
    return hashlib.sha256(proto.graph.SerializeToString(deterministic=True)).hexdigest()


def _state_digest(module: Any) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_digest(model: nn.Module) -> str:
    """sha256 identifying a model's weights: of the state_dict, or the digest an export recorded.

    ``brainage predict`` stores it with every record, so a rerun with other weights
    scores everything again instead of reusing the old model's ages.
    """
    return model.digest if isinstance(model, ExportedModule) else _state_digest(model)


def _metadata(lm: Any, outputs: tuple[str, ...], calibration: dict[str, Any] | None, fmt: str) -> dict[str, Any]:
    from brainage_hpc import __version__
    from brainage_hpc.config import config_to_dict

    return {
        "format": "brainage-export",
        "version": _EXPORT_VERSION,
        "export_format": fmt,
        "config": config_to_dict(lm.cfg),
        "shape": list(lm.shape),
        "input": {"image": ["batch", 1, *lm.shape], "sex": ["batch"]},
        "outputs": list(outputs),
        "preprocess": lm.preprocess,
        "fingerprint": lm.fingerprint,
        "calibration": calibration,
        "affine": np.asarray(lm.affine).tolist(),
        "step": lm.step,
        "source": str(lm.source),
        "exported": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "brainage_hpc": __version__,
    }


@contextlib.contextmanager
def _quiet_loggers(*names: str) -> Iterator[None]:
    """The exporter's INFO/WARNING chatter (optional torchvision ops, graph passes) is not the user's business."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _export_onnx(graph: _InferenceGraph, lm: Any, meta: dict[str, Any], out: Path) -> None:
    import onnx

    from brainage_hpc.report import atomic_path

    image = torch.zeros(2, 1, *lm.shape)
    sex = torch.tensor([0.0, 1.0])
    batch = torch.export.Dim("batch", min=1)
    with atomic_path(out) as tmp, warnings.catch_warnings(), _quiet_loggers("torch.onnx", "torch._dynamo", "onnx_ir", "onnxscript"):
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, (image, sex), str(tmp), input_names=["image", "sex"], output_names=list(graph.outputs),
                          dynamic_shapes={"image": {0: batch}, "sex": {0: batch}}, dynamo=True, external_data=False,
                          verbose=False)
        proto = onnx.load(str(tmp))
        meta = dict(meta, sha256=_graph_digest(proto))
        entry = proto.metadata_props.add()
        entry.key, entry.value = _META_KEY, json.dumps(meta)
        onnx.save(proto, str(tmp))


def _export_torchscript(graph: _InferenceGraph, lm: Any, meta: dict[str, Any], out: Path) -> None:
    from brainage_hpc.report import atomic_path

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated upstream; ONNX is the portable format
        traced = torch.jit.trace(graph, (torch.zeros(2, 1, *lm.shape), torch.tensor([0.0, 1.0])), check_trace=False)
    meta = dict(meta, sha256=_state_digest(traced))
    with atomic_path(out) as tmp:
        torch.jit.save(traced, str(tmp), _extra_files={_TS_EXTRA: json.dumps(meta)})


def export_model(source: str | Path, out: str | Path | None, fmt: str = "onnx") -> tuple[Path, dict[str, Any]]:
    """Export a run folder or ``model.pt`` as ``pt``, ``onnx`` or ``torchscript``.

    Args:
        source: run folder (its ``best.pt``/``last.pt``, DeepSpeed included) or exported ``model.pt``.
        out: output file; default ``<run folder>/model.{pt,onnx,ts}``.
        fmt: one of :data:`EXPORT_FORMATS`.

    Returns:
        (path written, metadata stored with it).

    Raises:
        ValueError: unknown format, unreadable source, or a model that cannot be exported.
    """
    from brainage_hpc.engine.checkpoint import save_sealed
    from brainage_hpc.evaluation.predict import load_model, read_calibration

    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"--format {fmt!r} is not valid. Valid: {', '.join(EXPORT_FORMATS)}")
    source = Path(source)
    folder = source if source.is_dir() else source.parent
    out = Path(out) if out else folder / DEFAULT_NAMES[fmt]
    lm = load_model(source, "cpu")
    calibration = read_calibration(source) or lm.calibration
    model = _leaky_for_rrelu(lm.model)
    outputs = _output_keys(model, lm.shape)
    meta = _metadata(lm, outputs, calibration, fmt)
    if fmt == "pt":
        bundle = {"format": "brainage-model", "state_dict": lm.model.state_dict(), "config": meta["config"],
                  "shape": meta["shape"], "preprocess": lm.preprocess, "affine": meta["affine"], "step": lm.step,
                  "fingerprint": lm.fingerprint, "calibration": calibration}
        save_sealed(bundle, out)  # contract 2: exported bundles carry a digest verified on load
    elif fmt == "onnx":
        _export_onnx(_InferenceGraph(model, outputs).eval(), lm, meta, out)
    else:
        _export_torchscript(_InferenceGraph(model, outputs).eval(), lm, meta, out)
    return out, meta


def is_exported_file(path: Path) -> Literal["onnx", "torchscript"] | None:
    """``onnx`` for ``*.onnx``, ``torchscript`` for a TorchScript archive, else None (a torch.save bundle)."""
    if path.suffix == ".onnx":
        return "onnx"
    if path.is_file() and zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except (OSError, zipfile.BadZipFile):
            return None
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            return "torchscript"
    return None


def _load_onnx(path: Path) -> tuple[ExportedModule, dict[str, Any]]:
    import onnx
    import onnxruntime as ort

    try:
        proto = onnx.load(str(path))
    except Exception as exc:  # protobuf DecodeError, truncated file...
        raise ValueError(f"{path}: not a readable ONNX model, truncated or corrupt ({type(exc).__name__})") from None
    props = {p.key: p.value for p in proto.metadata_props}
    meta = _parse_meta(path, props.get(_META_KEY))
    if meta.get("sha256") != _graph_digest(proto):
        raise ValueError(f"{path}: ONNX graph does not match its recorded sha256 (file damaged after export); export it again")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(torch.get_num_threads(), 1)
    opts.log_severity_level = 3
    try:
        session = ort.InferenceSession(proto.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ValueError(f"{path}: ONNX Runtime cannot load it ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    return ExportedModule(session, list(meta["outputs"]), "onnx", meta["sha256"]), meta


def _load_torchscript(path: Path) -> tuple[ExportedModule, dict[str, Any]]:
    extra = {_TS_EXTRA: ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except Exception as exc:
        raise ValueError(f"{path}: not a readable TorchScript model, truncated or corrupt ({type(exc).__name__})") from None
    meta = _parse_meta(path, extra[_TS_EXTRA] or None)
    if meta.get("sha256") != _state_digest(module):
        raise ValueError(f"{path}: TorchScript weights do not match their recorded sha256 (file damaged after export)")
    return ExportedModule(module.eval(), list(meta["outputs"]), "torchscript", meta["sha256"]), meta


def _parse_meta(path: Path, text: str | bytes | None) -> dict[str, Any]:
    if not text:
        raise ValueError(f"{path}: no brainage metadata; export it with `brainage export --format ...`")
    try:
        meta = json.loads(text)
    except ValueError:
        raise ValueError(f"{path}: damaged brainage metadata (not JSON)") from None
    if not isinstance(meta, dict) or meta.get("format") != "brainage-export" or "config" not in meta or "outputs" not in meta:
        raise ValueError(f"{path}: not a brainage export (metadata format {meta.get('format') if isinstance(meta, dict) else None!r})")
    return meta


def load_exported(path: str | Path, kind: Literal["onnx", "torchscript"]) -> tuple[ExportedModule, dict[str, Any]]:
    """Load an ONNX or TorchScript export and its metadata, checking its digest.

    Raises:
        ValueError: unreadable, truncated, damaged (digest mismatch), or not a brainage export (one line).
    """
    path = Path(path)
    return _load_onnx(path) if kind == "onnx" else _load_torchscript(path)


def parity_check(reference: Any, exported: Any, n: int = 2, seed: int = 0) -> float:
    """Max |delta age| in years between two loaded models on ``n`` random volumes (both sexes).

    Args:
        reference, exported: ``LoadedModel`` of the run and of its export (same shape).
    """
    from brainage_hpc.evaluation.predict import predict_batch

    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(n, 1, *reference.shape, generator=gen)
    sex = torch.arange(n, dtype=torch.float32) % 2
    a = predict_batch(reference, image, sex)["pred_age"]
    b = predict_batch(exported, image, sex)["pred_age"]
    return float(np.max(np.abs(a - b)))
