"""Resume state of a training run: one ``.safetensors`` file, written atomically, never unpickled.

The state is any nesting of dicts, lists, tuples, numbers, strings, ``None`` and tensors (model,
optimiser, scheduler and generator states, history rows). Tensors go into the safetensors body
(``t0``, ``t1`` ...); everything else is JSON in the header's ``__metadata__`` (key
``misleader_resume``), with tensors replaced by ``{"__tensor__": "t0"}``, tuples by
``{"__tuple__": [...]}`` and dicts whose keys are not all strings (optimiser states are keyed by
parameter index) by ``{"__items__": [[key, value], ...]}``. One file, so the tensors and the
bookkeeping can never come from two different epochs.

Example:
    >>> import torch
    >>> blob = encode_resume_state({"epoch": 2, "opt": {0: (1.5, torch.ones(2))}})
    >>> state = decode_resume_state(blob, where="example")
    >>> state["epoch"], state["opt"][0][0], state["opt"][0][1].tolist()
    (2, 1.5, [1.0, 1.0])
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from misleader.errors import MisleaderError
from misleader.utils import atomic_write_bytes, write_json

META_KEY = "misleader_resume"
#: the resume file of a training run inside its output folder
RESUME_FILE = "resume.safetensors"
#: what :func:`misleader.experiments.runner.execute_stage` writes into a run folder before the API runs
RUNNER_FILES = frozenset({"config.yaml", "env.json", "error.txt"})
_MARKERS = ("__tensor__", "__tuple__", "__items__")


def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous().clone()  # own storage: safetensors refuses shared ones
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and k not in _MARKERS for k in obj):
            return {k: _encode(v, tensors) for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"resume state cannot hold a {type(obj).__name__}")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if set(obj) == {"__tensor__"}:
        return tensors[obj["__tensor__"]]
    if set(obj) == {"__tuple__"}:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if set(obj) == {"__items__"}:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def encode_resume_state(state: dict[str, Any]) -> bytes:
    """The bytes of a resume file for ``state`` (see the module docstring for the layout)."""
    tensors: dict[str, torch.Tensor] = {}
    doc = json.dumps(_encode(state, tensors), separators=(",", ":"))
    return st_save(tensors, metadata={META_KEY: doc})


def decode_resume_state(blob: bytes, *, where: str) -> dict[str, Any]:
    """Inverse of :func:`encode_resume_state`; ``where`` names the file in errors.

    Raises:
        MisleaderError: the bytes are not a resume file written by this module.
    """
    try:
        n = int.from_bytes(blob[:8], "little")
        header = json.loads(blob[8:8 + n])
        doc = json.loads(header["__metadata__"][META_KEY])
        tensors = st_load(blob)
        state = _decode(doc, tensors)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - any decode failure (pyo3 panics included) is corruption
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
        raise MisleaderError(f"resume state {where} is unreadable ({reason}): delete it or pass --force to "
                             "start over") from None
    if not isinstance(state, dict):
        raise MisleaderError(f"resume state {where} is unreadable (not a mapping): delete it or pass --force to "
                             "start over")
    return state


def flat_settings(settings: dict[str, Any], *, prefix: str = "") -> dict[str, Any]:
    """Nested dicts flattened to dotted keys, so that a refusal names the one setting that differs.

    Example: ``{"recipe": {"lr": 0.1}}`` -> ``{"recipe.lr": 0.1}``.
    """
    out: dict[str, Any] = {}
    for k, v in settings.items():
        if isinstance(v, dict) and v:
            out.update(flat_settings(v, prefix=f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def claim_run_dir(out: str | Path, settings: dict[str, Any], *, force: bool, command: str) -> bool:
    """Claim ``out`` for a run with ``settings`` (:func:`misleader.fingerprint.claim_out_dir`, on
    :func:`flat_settings`).

    Same settings: resume (returns True). Other settings: a one-line :class:`MisleaderError`, or
    with ``force`` a fresh start. ``force`` always starts over, also with the same settings (so it
    also gets past an unreadable resume file): everything in ``out`` but the fingerprint is deleted.
    A folder that holds only the experiment runner's bookkeeping (:data:`RUNNER_FILES`) counts as new.
    """
    from misleader.fingerprint import FINGERPRINT_FILE, check_out_dir, claim_out_dir, settings_fingerprint

    flat = flat_settings(settings)
    out = check_out_dir(out)
    if out.is_dir() and not (out / FINGERPRINT_FILE).exists() and any(out.iterdir()) and all(
            p.name in RUNNER_FILES and p.is_file() for p in out.iterdir()):
        # a run folder of `misleader run` before its API started: fresh, claimed for these settings
        write_json(out / FINGERPRINT_FILE, {"fingerprint": settings_fingerprint(flat), "settings": flat})
        return False
    resumed = claim_out_dir(out, flat, force=force, command=command)
    if force and resumed:
        for child in Path(out).iterdir():
            if child.name == FINGERPRINT_FILE:
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
        resumed = False
    return resumed


def save_resume_state(path: str | Path, state: dict[str, Any]) -> None:
    """Atomically write ``state`` to ``path`` (a ``.safetensors`` file)."""
    atomic_write_bytes(path, encode_resume_state(state))


def load_resume_state(path: str | Path) -> dict[str, Any] | None:
    """The state saved at ``path``, or ``None`` when there is no such file.

    Raises:
        MisleaderError: the file exists but cannot be read (never a silent restart).
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise MisleaderError(f"resume state {path} is unreadable ({exc.strerror}): delete it or pass --force to "
                             "start over") from None
    return decode_resume_state(blob, where=str(path))


__all__ = ["claim_run_dir", "flat_settings", "decode_resume_state", "encode_resume_state", "load_resume_state", "save_resume_state"]
