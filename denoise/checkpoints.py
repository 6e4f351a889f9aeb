"""Versioned U-Net checkpoints: ``unet-<version>.pt`` (weights + config) with ``unet-<version>.json`` beside.

A checkpoint is a ``torch.save`` of a plain dict, loaded with
``weights_only=True`` (no pickled code runs)::

    {"format": "pacs-denoise-unet", "format_version": 1, "version": "1.0",
     "model": UNetConfig as a dict, "state_dict": {...}, "metrics": {...},
     "training": {...}}

The JSON file repeats everything but the weights, so a person (or a job
runner) can see what a checkpoint is without torch.  The default checkpoint
ships in ``denoise/checkpoints/`` and is used when no other model is named.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .model import UNet, UNetConfig

__all__ = ["CheckpointError", "CHECKPOINT_DIR", "DEFAULT_VERSION", "default_checkpoint", "save_checkpoint",
           "load_checkpoint", "export_checkpoint"]

FORMAT = "pacs-denoise-unet"
FORMAT_VERSION = 1
CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"
DEFAULT_VERSION = "1.5"


class CheckpointError(ValueError):
    """A checkpoint that is missing, not ours, or does not fit the model it describes."""


def default_checkpoint() -> Path:
    """The checkpoint shipped with the package (``denoise/checkpoints/unet-<DEFAULT_VERSION>.pt``)."""
    return CHECKPOINT_DIR / f"unet-{DEFAULT_VERSION}.pt"


def save_checkpoint(path: Path, model: UNet, *, version: str, metrics: dict[str, Any] | None = None,
                    training: dict[str, Any] | None = None, half: bool = False) -> Path:
    """Write ``path`` (.pt) and its ``.json`` twin; ``half`` stores weights as float16 (half the size)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: (v.detach().cpu().half() if half and v.is_floating_point() else v.detach().cpu())
             for k, v in model.state_dict().items()}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "version": version,
        "model": model.config.to_dict(),
        "parameters": model.parameter_count(),
        "weights_dtype": "float16" if half else "float32",
        "metrics": metrics or {},
        "training": training or {},
    }
    partial = path.with_suffix(".pt.partial")
    torch.save({**meta, "state_dict": state}, partial)
    partial.replace(path)
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2, default=str) + "\n", encoding="utf-8")
    return path


def load_checkpoint(path: Path | None = None, *, device: str | torch.device = "cpu") -> tuple[UNet, dict[str, Any]]:
    """The U-Net of ``path`` (default: ``default_checkpoint()``) in eval mode, float32, and its metadata."""
    path = Path(path) if path is not None else default_checkpoint()
    if not path.is_file():
        raise CheckpointError(f"checkpoint: expected a file, got {str(path)!r} (no such file)")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a file that is not a checkpoint
        raise CheckpointError(f"checkpoint {path.name}: expected a torch checkpoint, got an unreadable file ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(f"checkpoint {path.name}: expected format {FORMAT!r}, got {got!r}")
    try:
        config = UNetConfig.from_dict(data["model"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path.name}: expected a valid model config, got {data.get('model')!r} ({exc})") from None
    model = UNet(config)
    state = {k: v.float() if v.is_floating_point() else v for k, v in data["state_dict"].items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = "; ".join(line.strip() for line in first[1:3]) or first[0]
        raise CheckpointError(
            f"checkpoint {path.name}: expected weights for a U-Net of width {config.width} and depth {config.depth}, "
            f"got tensors of another shape ({detail})") from None
    model.to(device).eval()
    meta = {k: v for k, v in data.items() if k != "state_dict"}
    meta["path"] = str(path)
    return model, meta


def export_checkpoint(source: Path, destination: Path, *, half: bool = True, note: str | None = None,
                      version: str | None = None) -> Path:
    """Copy a training checkpoint for shipping: float16 weights by default, metadata kept (plus ``note``).

    ``version`` renames it (a run's ``1.5d`` shipped as ``1.5``); the version it was trained as stays in
    ``training["config"]``.
    """
    model, meta = load_checkpoint(source)
    training = dict(meta.get("training") or {})
    if note:
        training["note"] = note
    training["exported_from"] = Path(source).name
    return save_checkpoint(destination, model, version=version or meta["version"], metrics=meta.get("metrics"),
                           training=training, half=half)
