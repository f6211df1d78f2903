"""Small shared helpers: seeding, devices, atomic writes, progress bars, environment capture."""

from __future__ import annotations

import json
import logging
import os
import platform
import random
import subprocess
import sys
import tempfile
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterable, Iterator, TypeVar

import numpy as np
import torch

from misleader.errors import MisleaderError

log = logging.getLogger(__name__)
T = TypeVar("T")

_QUIET = False


def set_quiet(quiet: bool) -> None:
    """Turn progress bars off (``--quiet``)."""
    global _QUIET
    _QUIET = quiet


def progress(iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
             leave: bool = False) -> Any:
    """A tqdm bar on stderr, shown when stderr is a terminal and ``--quiet`` is off."""
    from tqdm.auto import tqdm

    disable = _QUIET or not sys.stderr.isatty() or os.environ.get("MISLEADER_PROGRESS", "") == "0"
    if os.environ.get("MISLEADER_PROGRESS", "") == "1":
        disable = _QUIET
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, disable=disable, dynamic_ncols=True,
                mininterval=0.5)


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch (once, at an entry point) and return a CPU generator."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def make_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def derive_seed(generator: torch.Generator) -> int:
    """Draw a fresh 62-bit seed from ``generator`` (to seed a sub-component)."""
    return int(torch.randint(2**62, (1,), generator=generator))


@contextmanager
def forked_rng(generator: torch.Generator | None, device: torch.device) -> Iterator[None]:
    """Run code that uses torch's *global* RNG (kornia, dropout) reproducibly from ``generator``."""
    if generator is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        seed = derive_seed(generator)
        torch.manual_seed(seed)
        yield


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is a clear error."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MisleaderError("--device cuda asked for, but no CUDA device is visible: use --device cpu or auto")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise MisleaderError(f"unknown device {device!r}: use auto, cpu or cuda")
    return torch.device(device)


def autocast(device: torch.device, enabled: bool = True):
    """Mixed precision on CUDA (bf16 where supported, else fp16); a no-op on CPU."""
    if device.type == "cuda" and enabled:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return nullcontext()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp creates 0600; results are meant to be shared
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise MisleaderError(f"{path} not found") from None
    except json.JSONDecodeError as exc:
        raise MisleaderError(f"{path} is not valid JSON ({exc}): the file is corrupted, recreate it") from None


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def environment() -> dict[str, Any]:
    """Versions, device and git sha, for run folders and sidecars."""
    from misleader import __version__

    env: dict[str, Any] = {
        "misleader": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "threads": torch.get_num_threads(),
    }
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        env["git_sha"] = sha.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["git_sha"] = None
    return env
