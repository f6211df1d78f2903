"""Checkpoints: ``NAME.safetensors`` (weights) + ``NAME.json`` (sidecar), written atomically.

The sidecar holds everything needed to rebuild the model and to check its integrity: arch,
dataset, classes, input shape, normalisation, seed, split, metrics, versions and the sha256 of the
weights file. Loading never unpickles (safetensors + JSON only); so does the resume state
(:mod:`misleader.training.resume`).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from misleader.errors import MisleaderError
from misleader.models import Classifier, create_model
from misleader.utils import atomic_write_bytes, environment, read_json, write_json

log = logging.getLogger(__name__)


def _state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    out = {}
    for k, v in sd.items():
        for prefix in ("_orig_mod.", "module."):
            k = k.replace(prefix, "")
        out[k] = v.detach().cpu().contiguous()
    return out


def save_model(model: Classifier, directory: str | Path, *, meta: dict[str, Any], name: str = "model") -> Path:
    """Write ``directory/name.safetensors`` and ``directory/name.json``.

    Args:
        model: a zoo :class:`~misleader.models.Classifier`.
        meta: at least ``dataset``, ``num_classes``, ``input_shape``; ``arch``, ``mean`` and ``std`` are
            filled in from the model.

    Returns:
        The path of the weights file.
    """
    directory = Path(directory)
    blob = st_save(_state_dict(model))
    sidecar = dict(meta)
    sidecar.update(
        arch=model.arch,
        mean=[float(v) for v in model.normalize.mean.flatten()],
        std=[float(v) for v in model.normalize.std.flatten()],
        weights=f"{name}.safetensors",
        sha256=hashlib.sha256(blob).hexdigest(),
        versions=environment(),
    )
    for key in ("dataset", "num_classes", "input_shape"):
        if key not in sidecar:
            raise ValueError(f"checkpoint meta needs {key!r}")
    atomic_write_bytes(directory / f"{name}.safetensors", blob)
    write_json(directory / f"{name}.json", sidecar)
    return directory / f"{name}.safetensors"


def read_sidecar(path: str | Path) -> dict[str, Any]:
    """The sidecar of a checkpoint given as a folder (``model``), ``.json`` or ``.safetensors`` path."""
    return read_json(_sidecar_path(Path(path)))


def _sidecar_path(path: Path) -> Path:
    if path.is_dir():
        path = path / "model.json"
    elif path.suffix == ".safetensors":
        path = path.with_suffix(".json")
    if not path.exists():
        raise MisleaderError(f"checkpoint {path} not found: pass the folder written by train-victim/defend")
    return path


def load_model(path: str | Path, *, device: torch.device | str = "cpu",
               expect_sha256: str | None = None) -> tuple[Classifier, dict[str, Any]]:
    """Rebuild a model from a checkpoint folder or file, verifying the weights' sha256.

    The sidecar must name its weights file inside its own folder and record its sha256 (a sidecar
    without one is refused, never loaded unchecked); both files must be regular files.

    Args:
        expect_sha256: the weights' sha256 recorded elsewhere (a manifest); must equal the sidecar's.

    Raises:
        MisleaderError: missing files, wrong sidecar types, sha256 missing or mismatched (corrupted),
            or weights that do not fit the arch.
    """
    from misleader.oracle.manifest import check_regular_file, check_shape_classes, read_json_file

    side_path = _sidecar_path(Path(path))
    meta = read_json_file(side_path, what="checkpoint sidecar")
    if not isinstance(meta, dict):
        raise MisleaderError(f"checkpoint sidecar {side_path} is not a JSON object: re-create the checkpoint")
    k, shape = check_shape_classes(meta, side_path)
    name = meta.get("weights", side_path.with_suffix(".safetensors").name)
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
        raise MisleaderError(f"checkpoint sidecar {side_path}: 'weights' must be a file name in its folder, "
                             f"got {name!r}: re-create the checkpoint")
    recorded = meta.get("sha256")
    if not isinstance(recorded, str) or not recorded:
        raise MisleaderError(f"checkpoint sidecar {side_path} records no sha256 of its weights, so they cannot be "
                             "checked: re-create the checkpoint with the command that wrote it")
    if expect_sha256 is not None and recorded != expect_sha256:
        raise MisleaderError(f"checkpoint {side_path} is not the one the manifest names (sha256 {recorded[:12]}... "
                             f"!= {expect_sha256[:12]}...): re-create the folder")
    if not isinstance(meta.get("arch"), str):
        raise MisleaderError(f"checkpoint sidecar {side_path}: 'arch' must be a model name: re-create the checkpoint")
    weights = side_path.parent / name
    if not weights.exists():
        raise MisleaderError(f"weights file {weights} is missing: re-run the command that wrote {side_path.parent}")
    blob = check_regular_file(weights, what="weights file").read_bytes()
    digest = hashlib.sha256(blob).hexdigest()
    if digest != recorded:
        raise MisleaderError(f"checkpoint {weights} is corrupted (sha256 {digest[:12]}... != recorded "
                             f"{recorded[:12]}...): re-create it with the command that wrote it")
    try:
        state = st_load(blob)
    except (SafetensorError, Exception) as exc:  # noqa: BLE001 - any decode failure means corruption
        raise MisleaderError(f"checkpoint {weights} cannot be read ({exc}): re-create it") from None
    model = create_model(meta["arch"], in_channels=int(shape[0]), num_classes=k,
                         mean=meta.get("mean"), std=meta.get("std"))
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise MisleaderError(f"checkpoint {weights} does not fit architecture {meta['arch']!r}: {str(exc)[:200]}") from None
    return model.to(device).eval(), meta
