"""Settings fingerprints: a re-run into an existing ``--out`` resumes only with the same settings.

Every command that writes an ``--out`` folder (``train-victim``, ``defend``, ``attack``) stores
``fingerprint.json`` there *before* any work: ``{"fingerprint": sha256, "settings": {...}}``. A later
call with the same folder calls :func:`claim_out_dir`: same fingerprint -> resume (or return the
finished result); another fingerprint -> a one-line :class:`MisleaderError` naming the first
differing setting (``--force`` starts over).

Example:
    >>> settings_fingerprint({"epochs": 3, "arch": "lenet5"}) == settings_fingerprint({"arch": "lenet5", "epochs": 3})
    True
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from misleader.errors import MisleaderError
from misleader.utils import read_json, write_json

FINGERPRINT_FILE = "fingerprint.json"
#: bookkeeping the experiment runner writes into a run's folder before calling the command's API
RUNNER_FILES = frozenset({"config.yaml", "env.json", "error.txt"})


def _canonical(settings: dict[str, Any]) -> str:
    return json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)


def settings_fingerprint(settings: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of ``settings`` (key order does not matter)."""
    return hashlib.sha256(_canonical(settings).encode()).hexdigest()


def _first_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    for key in sorted(set(old) | set(new)):
        if _canonical({"v": old.get(key)}) != _canonical({"v": new.get(key)}):
            return f"{key}: stored {old.get(key)!r}, requested {new.get(key)!r}"
    return "settings differ"


def check_out_dir(out: str | Path) -> Path:
    """Make sure ``out`` can be an output folder (creating it), else raise a one-line error.

    Refused: an existing file, a path under a file, a folder that cannot be created or written
    (read-only, ``/proc/...``). Checked with a probe file in ``out`` or its nearest existing parent (nothing is
    created), before any work.
    """
    import os
    import tempfile

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MisleaderError(f"--out {out} is an existing file, not a folder: pass a folder path")
    parent = out
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise MisleaderError(f"--out {out} lies under {parent}, which is a file: pass a folder path")
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise MisleaderError(f"--out {out} cannot be written: no file can be created in {parent} "
                             f"({exc.strerror or exc}): pass a folder you can write to") from None
    return out


def claim_out_dir(out: str | Path, settings: dict[str, Any], *, force: bool = False,
                  command: str = "this command") -> bool:
    """Check (or record) that ``out`` belongs to ``settings``; return True when it is a resume.

    Args:
        out: the ``--out`` folder.
        settings: every setting that changes the result (JSON-serialisable).
        force: delete ``out``'s contents and start over when the fingerprint differs.
        command: named in the error message (e.g. ``"misleader attack"``).

    Raises:
        MisleaderError: ``out`` holds another run's results (and not ``force``), or is unusable.
    """
    out = check_out_dir(out)
    fp = settings_fingerprint(settings)
    path = out / FINGERPRINT_FILE
    if path.exists():
        stored = read_json(path)
        if not isinstance(stored, dict) or stored.get("fingerprint") == fp:
            if isinstance(stored, dict):
                return True
        if not force:
            diff = _first_difference(stored.get("settings", {}) if isinstance(stored, dict) else {}, settings)
            raise MisleaderError(f"{out} holds a {command} run with other settings ({diff}): pass another --out, "
                                 "or --force to start over")
    elif out.exists() and any(c.name not in RUNNER_FILES for c in out.iterdir()):
        # never wipe a folder that this project did not write, even with --force
        raise MisleaderError(f"{out} is not empty and was not written by {command}: pass another --out")
    if force and path.exists():
        for child in out.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    out.mkdir(parents=True, exist_ok=True)
    write_json(path, {"fingerprint": fp, "settings": settings})
    return False


__all__ = ["FINGERPRINT_FILE", "RUNNER_FILES", "check_out_dir", "claim_out_dir", "settings_fingerprint"]
