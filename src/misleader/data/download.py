"""md5-checked download of datasets into torchvision's folder layout.

Every file is fetched to a temporary file in its destination folder, checked against the md5 that
torchvision publishes, and only then moved into place with :func:`os.replace` (atomic on one file
system), so an interrupted or corrupted download never leaves a file that looks complete. Files
already present with the right md5 are not fetched again. Archives (``.tar.gz``) are extracted after
verification, refusing members that would land outside the root.

The machines this project is developed on are offline: copy the files by hand under ``--data-dir``
(the folder names below), or serve them yourself and pass ``mirror="http://host:port/"``, which
replaces every URL by ``mirror + filename``.

=============  ===========================================  ==========================
name           files                                        folder under the root
=============  ===========================================  ==========================
mnist          4 idx ``.gz`` files                          ``MNIST/raw``
fashion-mnist  4 idx ``.gz`` files                          ``FashionMNIST/raw``
cifar10        ``cifar-10-python.tar.gz``                   extracted to ``cifar-10-batches-py``
cifar100       ``cifar-100-python.tar.gz``                  extracted to ``cifar-100-python``
svhn           ``train_32x32.mat``, ``test_32x32.mat``      ``svhn``
=============  ===========================================  ==========================
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import socket
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from misleader.errors import MisleaderError

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


@dataclass(frozen=True)
class Resource:
    """One downloadable file.

    Attributes:
        filename: the file's name, on the server and on disk.
        subdir: folder under the data root where it is stored ("" for the root itself).
        md5: expected md5 (hex) of the file.
        urls: URLs tried in order.
        extracts: for an archive, the paths (relative to the root) its extraction must produce;
            when all exist the archive counts as installed even if it was deleted after extraction.
    """

    filename: str
    subdir: str
    md5: str
    urls: tuple[str, ...]
    extracts: tuple[str, ...] = ()

    @property
    def is_archive(self) -> bool:
        return self.filename.endswith((".tar.gz", ".tgz", ".tar"))


_MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
_FASHION_MIRRORS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)


def _idx_files(subdir: str, mirrors: tuple[str, ...], md5s: dict[str, str]) -> list[Resource]:
    return [Resource(f, subdir, md5, tuple(m + f for m in mirrors)) for f, md5 in md5s.items()]


RESOURCES: dict[str, list[Resource]] = {
    "mnist": _idx_files("MNIST/raw", _MNIST_MIRRORS, {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    }),
    "fashion-mnist": _idx_files("FashionMNIST/raw", _FASHION_MIRRORS, {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    }),
    "cifar10": [
        Resource("cifar-10-python.tar.gz", "", "c58f30108f718f92721af3b95e74349a",
                 ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",),
                 extracts=tuple(f"cifar-10-batches-py/{f}" for f in
                                [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"])),
    ],
    "cifar100": [
        Resource("cifar-100-python.tar.gz", "", "eb9058c3a382ffc7106e4002c42a8d85",
                 ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",),
                 extracts=("cifar-100-python/train", "cifar-100-python/test", "cifar-100-python/meta")),
    ],
    "svhn": [
        Resource("train_32x32.mat", "svhn", "e26dedcc434d2e4c54c9b2d4a06d8373",
                 ("http://ufldl.stanford.edu/housenumbers/train_32x32.mat",)),
        Resource("test_32x32.mat", "svhn", "eb5a983be6a315427106f1b164d9cef3",
                 ("http://ufldl.stanford.edu/housenumbers/test_32x32.mat",)),
    ],
}

# Network failures turned into a MisleaderError (HTTPError is a URLError; socket.timeout is TimeoutError).
_NETWORK_ERRORS = (urllib.error.URLError, TimeoutError, socket.timeout, ConnectionError,
                   http.client.HTTPException)


def md5sum(path: str | os.PathLike, *, chunk_size: int = _CHUNK) -> str:
    """Hex md5 of a file, read in chunks."""
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        while block := fh.read(chunk_size):
            h.update(block)
    return h.hexdigest()


def download_dataset(
    name: str,
    *,
    root: Path,
    mirror: str | None = None,
    timeout: float = 30.0,
    progress: bool = True,
) -> list[Path]:
    """Download (md5-checked) the files of dataset ``name`` under ``root`` in torchvision's layout.

    Args:
        name: a key of :data:`RESOURCES` (``mnist``, ``fashion-mnist``, ``cifar10``, ``cifar100``, ``svhn``).
        root: the data root (what ``--data-dir`` points at).
        mirror: base URL replacing every URL: ``mirror + filename`` (e.g. ``http://127.0.0.1:8000/``).
        timeout: socket timeout in seconds for each connection and read.
        progress: show a tqdm progress bar on stderr.

    Returns:
        The local path of each resource: the file, or for an archive the folder it was extracted into.

    Raises:
        MisleaderError: unknown name, a network failure on every URL, or an md5 mismatch on every URL.
    """
    if name == "digits" or name.startswith("npz:"):
        log.info("dataset %s needs no download (embedded or a local file)", name)
        return []
    if name not in RESOURCES:
        raise MisleaderError(
            f"no download known for dataset {name!r}; choose one of: {', '.join(sorted(RESOURCES))} "
            "(digits is embedded and npz:PATH is a local file)"
        )
    root = Path(root).expanduser()
    paths = []
    for res in RESOURCES[name]:
        paths.append(_fetch(res, root=root, mirror=mirror, timeout=timeout, progress=progress))
    return paths


# --------------------------------------------------------------------------- internals


def _fetch(res: Resource, *, root: Path, mirror: str | None, timeout: float, progress: bool) -> Path:
    folder = root / res.subdir if res.subdir else root
    dest = folder / res.filename
    extracted = res.is_archive and res.extracts and all((root / p).exists() for p in res.extracts)
    result = (root / PurePosixPath(res.extracts[0]).parts[0]) if res.is_archive and res.extracts else dest

    if dest.exists():
        actual = md5sum(dest)
        if actual == res.md5:
            log.info("%s already present (md5 ok)", dest)
            if res.is_archive and not extracted:
                _extract(dest, root)
            return result
        log.warning("%s has md5 %s, expected %s: downloading it again", dest, actual, res.md5)
    elif extracted:
        log.info("%s already extracted under %s", res.filename, root)
        return result

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MisleaderError(f"cannot create {folder} ({exc}): pass a writable --data-dir") from None

    urls = (_join(mirror, res.filename),) if mirror else res.urls
    failures: list[str] = []
    md5_failures: list[str] = []
    for url in urls:
        try:
            actual = _download(url, folder=folder, dest=dest, expected_md5=res.md5, timeout=timeout,
                               progress=progress)
        except _NETWORK_ERRORS as exc:
            reason = getattr(exc, "reason", None) or exc
            log.warning("could not download %s from %s (%s)", res.filename, url, reason)
            failures.append(f"{url} ({reason})")
            continue
        if actual is None:
            log.info("downloaded %s (md5 ok)", dest)
            if res.is_archive:
                _extract(dest, root)
            return result
        log.warning("%s from %s has md5 %s, expected %s; trying the next URL",
                    res.filename, url, actual, res.md5)
        md5_failures.append(f"{url} gave md5 {actual}")

    where = f"{folder}{os.sep}{res.filename}"
    if md5_failures:
        raise MisleaderError(
            f"md5 mismatch for {res.filename}: expected {res.md5}, but "
            + "; ".join(md5_failures + [f"{f} failed" for f in failures])
            + f". The server sent a corrupted or different file: retry later, use another mirror, "
            f"or copy a good copy to {where}"
        )
    raise MisleaderError(
        f"could not download {res.filename} from {', '.join(failures)}: check the network "
        f"or copy the files under {folder}"
    )


def _join(mirror: str, filename: str) -> str:
    return mirror.rstrip("/") + "/" + filename


def _download(url: str, *, folder: Path, dest: Path, expected_md5: str, timeout: float,
              progress: bool) -> str | None:
    """Fetch ``url`` into ``dest`` through a temporary file.

    Returns None on success, else the wrong md5 (and nothing is kept).
    """
    from tqdm.auto import tqdm

    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=folder)
    except OSError as exc:
        raise MisleaderError(f"cannot write into {folder} ({exc}): pass a writable --data-dir") from None
    tmp = Path(tmp_name)
    try:
        h = hashlib.md5(usedforsecurity=False)
        log.info("downloading %s", url)
        req = urllib.request.Request(url, headers={"User-Agent": "misleader"})
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(req, timeout=timeout) as resp:
            total = resp.headers.get("Content-Length")
            with tqdm(total=int(total) if total and total.isdigit() else None, unit="B", unit_scale=True,
                      unit_divisor=1024, desc=dest.name, disable=not progress, file=sys.stderr,
                      leave=False) as bar:
                while block := resp.read(_CHUNK):
                    out.write(block)
                    h.update(block)
                    bar.update(len(block))
            out.flush()
            os.fsync(out.fileno())
        actual = h.hexdigest()
        if actual != expected_md5:
            return actual
        os.replace(tmp, dest)
        return None
    finally:
        tmp.unlink(missing_ok=True)


def _safe_members(tar: tarfile.TarFile, archive: Path) -> list[tarfile.TarInfo]:
    members = tar.getmembers()
    for m in members:
        p = PurePosixPath(m.name.replace("\\", "/"))
        bad = p.is_absolute() or ".." in p.parts or (bool(p.parts) and ":" in p.parts[0])
        if m.issym() or m.islnk():
            link = PurePosixPath(m.linkname.replace("\\", "/"))
            bad = bad or link.is_absolute() or ".." in link.parts
        bad = bad or m.isdev() or m.isfifo()
        if bad:
            raise MisleaderError(
                f"{archive} holds an unsafe member {m.name!r} (absolute path, '..', link out or device): "
                f"refusing to extract it; delete {archive} and download it from a trusted source"
            )
    return members


def _extract(archive: Path, root: Path) -> None:
    log.info("extracting %s into %s", archive, root)
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = _safe_members(tar, archive)
            kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(root, members=members, **kwargs)  # noqa: S202 - members checked above
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise MisleaderError(f"cannot extract {archive} ({exc}): delete it and download it again") from None
