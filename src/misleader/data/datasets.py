"""Dataset registry: every dataset is a set of uint8 tensors in memory.

Images are stored as ``uint8`` tensors of shape (N, C, H, W) and labels as ``int64`` (N,); the
conversion to float in [0, 1] happens batch by batch on the training device (see
:mod:`misleader.data.loader`). 28x28 images (MNIST, Fashion-MNIST) are zero-padded to 32x32 and
scikit-learn's 8x8 ``digits`` are upscaled to 32x32, so the LeNet / ResNet families see the input
size of the paper.

Files are read from torchvision's folder layout under ``data_dir`` (``--data-dir``, else
``$MISLEADER_DATA``, else ``./data``), so an existing torchvision cache just works:

=============  =========================================================
mnist          ``MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte(.gz)``
fashion-mnist  ``FashionMNIST/raw/...`` (same names)
cifar10        ``cifar-10-batches-py/{data_batch_1..5,test_batch}``
cifar100       ``cifar-100-python/{train,test}``
svhn           ``svhn/{train,test}_32x32.mat`` (needs scipy)
npz:PATH       arrays ``x_train y_train x_test y_test`` (NHWC or NCHW or NHW, uint8 or [0,1] float)
digits         scikit-learn's bundled digits (no files needed)
=============  =========================================================
"""

from __future__ import annotations

import gzip
import logging
import os
import pickle
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from misleader.errors import MisleaderError
from misleader.registry import Registry

log = logging.getLogger(__name__)

ENV_VAR = "MISLEADER_DATA"


@dataclass
class Dataset:
    """An image-classification dataset held as tensors.

    Attributes:
        name: registry name (``mnist``, ``npz:/path/file.npz`` ...).
        x_train, x_test: uint8 (N, C, H, W).
        y_train, y_test: int64 (N,).
        num_classes: K.
        class_names: K names.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    class_names: list[str] = field(default_factory=list)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]

    @property
    def in_channels(self) -> int:
        return int(self.x_train.shape[1])

    def channel_stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of the training images in [0, 1]."""
        x = self.x_train.float().div_(255)
        mean = x.mean(dim=(0, 2, 3))
        std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
        return [round(float(v), 4) for v in mean], [round(float(v), 4) for v in std]


DATASETS: Registry[Dataset] = Registry("dataset")


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """``data_dir`` if given, else ``$MISLEADER_DATA``, else ``./data``."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get(ENV_VAR)
    return Path(env).expanduser() if env else Path("data")


def load_dataset(name: str, *, data_dir: str | os.PathLike | None = None, download: bool = False) -> Dataset:
    """Load a dataset by name (``npz:PATH`` for a user's own arrays).

    Args:
        name: a registered dataset name or ``npz:PATH``.
        data_dir: root folder in torchvision layout (default ``$MISLEADER_DATA`` or ``./data``).
        download: fetch missing files (md5-checked) before loading; needs network access.

    Raises:
        MisleaderError: unknown name or missing / unreadable files (the message says how to fix it).
    """
    if name.startswith("npz:"):
        return _load_npz(Path(name[4:]).expanduser(), name=name)
    root = resolve_data_dir(data_dir)
    factory = DATASETS.get(name)
    if download and name != "digits":
        from misleader.data.download import download_dataset

        download_dataset(name, root=root)
    return factory(root=root)


def list_datasets() -> list[str]:
    return DATASETS.names() + ["npz:PATH"]


# --------------------------------------------------------------------------- helpers


def _to_nchw_uint8(x: np.ndarray, *, layout: str) -> torch.Tensor:
    if layout == "nhw":
        x = x[:, None]
    elif layout == "nhwc":
        x = x.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.array(x, dtype=np.uint8, order="C"))


def pad_to(x: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad uint8 (N, C, H, W) images symmetrically to ``size`` x ``size``."""
    h, w = x.shape[-2:]
    if h == size and w == size:
        return x
    ph, pw = size - h, size - w
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))


def _missing(name: str, root: Path, expected: str) -> MisleaderError:
    return MisleaderError(
        f"dataset {name!r} not found under {root}: pass --data-dir or set {ENV_VAR} "
        f"(expected {expected}), or pass --download where the machine is online"
    )


def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (optionally gzipped) into a numpy array."""
    opener: Callable = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except (EOFError, OSError, zlib.error) as exc:  # truncated or corrupted gzip (BadGzipFile is an OSError)
        raise MisleaderError(
            f"cannot read {path} ({exc}; corrupted or truncated download?): delete it and download again"
        ) from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 8 or len(data) < 4 + 4 * data[3]:
        raise MisleaderError(f"{path} is not a uint8 idx file (corrupted download?): delete it and download again")
    nd = data[3]
    dims = np.frombuffer(data, ">u4", count=nd, offset=4).astype(np.int64)
    expected = int(np.prod(dims)) + 4 + 4 * nd
    if len(data) != expected:
        raise MisleaderError(f"{path} is truncated ({len(data)} of {expected} bytes): delete it and download again")
    return np.frombuffer(data, np.uint8, offset=4 + 4 * nd).reshape(dims).copy()


def _find(raw: Path, stem: str) -> Path | None:
    for cand in (raw / stem, raw / f"{stem}.gz"):
        if cand.exists():
            return cand
    return None


def _mnist_like(root: Path, *, folder: str, name: str, classes: list[str]) -> Dataset:
    raw = root / folder / "raw"
    stems = {
        "x_train": "train-images-idx3-ubyte",
        "y_train": "train-labels-idx1-ubyte",
        "x_test": "t10k-images-idx3-ubyte",
        "y_test": "t10k-labels-idx1-ubyte",
    }
    arrays = {}
    for key, stem in stems.items():
        path = _find(raw, stem)
        if path is None:
            raise _missing(name, root, f"{folder}/raw/{stem}.gz")
        arrays[key] = read_idx(path)
    for part in ("train", "test"):
        x, y = arrays[f"x_{part}"], arrays[f"y_{part}"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y) or (len(y) and int(y.max()) >= len(classes)):
            raise MisleaderError(
                f"{raw}: {part} images {x.shape} and labels {y.shape} do not match "
                "(mixed or corrupted files?): delete the folder and download it again"
            )
    return Dataset(
        name=name,
        x_train=pad_to(_to_nchw_uint8(arrays["x_train"], layout="nhw"), 32),
        y_train=torch.from_numpy(arrays["y_train"].astype(np.int64)),
        x_test=pad_to(_to_nchw_uint8(arrays["x_test"], layout="nhw"), 32),
        y_test=torch.from_numpy(arrays["y_test"].astype(np.int64)),
        num_classes=10,
        class_names=classes,
    )


@DATASETS.register("mnist")
def mnist(*, root: Path) -> Dataset:
    return _mnist_like(root, folder="MNIST", name="mnist", classes=[str(i) for i in range(10)])


FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


@DATASETS.register("fashion-mnist")
def fashion_mnist(*, root: Path) -> Dataset:
    return _mnist_like(root, folder="FashionMNIST", name="fashion-mnist", classes=FASHION_CLASSES)


def _unpickle(path: Path, *keys: str) -> dict:
    """Load a CIFAR pickle (latin1) and check that it holds ``keys``."""
    try:
        with open(path, "rb") as fh:
            d = pickle.load(fh, encoding="latin1")
    except Exception as exc:  # noqa: BLE001 - a corrupted pickle can raise almost anything
        raise MisleaderError(
            f"{path} is corrupted ({type(exc).__name__}: {exc}): delete it and download again"
        ) from None
    if not isinstance(d, dict) or any(k not in d for k in keys):
        raise MisleaderError(
            f"{path} is not a CIFAR pickle holding {list(keys)} (wrong file?): delete it and download again"
        )
    return d


def _cifar(root: Path, *, folder: str, name: str, train_files: list[str], test_file: str,
           label_key: str, meta_file: str, names_key: str, num_classes: int) -> Dataset:
    base = root / folder
    for f in train_files + [test_file]:
        if not (base / f).exists():
            raise _missing(name, root, f"{folder}/{f}")
    xs, ys = [], []
    for f in train_files:
        d = _unpickle(base / f, "data", label_key)
        xs.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(d[label_key], dtype=np.int64))
    t = _unpickle(base / test_file, "data", label_key)
    names: list[str] = []
    if (base / meta_file).exists():
        names = [str(n) for n in _unpickle(base / meta_file, names_key)[names_key]]
    # the class count is the dataset's, not the largest label seen (a partial copy may miss classes)
    k = max(num_classes, len(names), int(max(int(np.max(y)) for y in ys + [np.asarray(t[label_key])])) + 1)
    return Dataset(
        name=name,
        x_train=torch.from_numpy(np.concatenate(xs)),
        y_train=torch.from_numpy(np.concatenate(ys)),
        x_test=torch.from_numpy(np.asarray(t["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)),
        y_test=torch.from_numpy(np.asarray(t[label_key], dtype=np.int64)),
        num_classes=k,
        class_names=names or [str(i) for i in range(k)],
    )


@DATASETS.register("cifar10")
def cifar10(*, root: Path) -> Dataset:
    return _cifar(root, folder="cifar-10-batches-py", name="cifar10",
                  train_files=[f"data_batch_{i}" for i in range(1, 6)], test_file="test_batch",
                  label_key="labels", meta_file="batches.meta", names_key="label_names", num_classes=10)


@DATASETS.register("cifar100")
def cifar100(*, root: Path) -> Dataset:
    return _cifar(root, folder="cifar-100-python", name="cifar100", train_files=["train"], test_file="test",
                  label_key="fine_labels", meta_file="meta", names_key="fine_label_names", num_classes=100)


@DATASETS.register("svhn")
def svhn(*, root: Path) -> Dataset:
    base = root / "svhn"
    for f in ("train_32x32.mat", "test_32x32.mat"):
        if not (base / f).exists():
            raise _missing("svhn", root, f"svhn/{f}")
    try:
        from scipy.io import loadmat
    except ImportError:
        raise MisleaderError("reading SVHN needs scipy: pip install 'misleader[svhn]'") from None

    def part(f: str) -> tuple[torch.Tensor, torch.Tensor]:
        m = loadmat(base / f)
        x = torch.from_numpy(np.ascontiguousarray(m["X"].transpose(3, 2, 0, 1), dtype=np.uint8))
        y = m["y"].astype(np.int64).reshape(-1)
        y[y == 10] = 0  # torchvision's convention: digit 0 is stored as label 10
        return x, torch.from_numpy(y)

    xtr, ytr = part("train_32x32.mat")
    xte, yte = part("test_32x32.mat")
    return Dataset(name="svhn", x_train=xtr, y_train=ytr, x_test=xte, y_test=yte, num_classes=10,
                   class_names=[str(i) for i in range(10)])


@DATASETS.register("digits")
def digits(*, root: Path | None = None) -> Dataset:  # noqa: ARG001 - embedded, no files
    """scikit-learn's 1,797 8x8 digits, upscaled to 32x32; a fixed 80/20 train/test split (seed 0)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]  # (N,1,8,8) in [0,1]
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    y = torch.from_numpy(d.target.astype(np.int64))
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n_test = len(y) // 5
    te, tr = perm[:n_test], perm[n_test:]
    return Dataset(name="digits", x_train=x[tr], y_train=y[tr], x_test=x[te], y_test=y[te], num_classes=10,
                   class_names=[str(i) for i in range(10)])


def _images_from_array(a: np.ndarray, *, path: Path, key: str) -> torch.Tensor:
    if a.dtype != np.uint8:
        if (not np.issubdtype(a.dtype, np.floating) or a.size == 0 or not np.isfinite(a).all()
                or a.min() < 0 or a.max() > 1):
            span = f" in [{a.min()}, {a.max()}]" if a.size and np.issubdtype(a.dtype, np.number) else ""
            raise MisleaderError(f"{path}: {key} must be uint8 or float in [0, 1], got {a.dtype}{span}")
        a = np.round(a * 255).astype(np.uint8)
    if a.ndim == 3:
        t = _to_nchw_uint8(a, layout="nhw")
    elif a.ndim == 4 and a.shape[-1] in (1, 3) and a.shape[1] not in (1, 3):
        t = _to_nchw_uint8(a, layout="nhwc")
    elif a.ndim == 4:
        t = _to_nchw_uint8(a, layout="nchw")
    else:
        raise MisleaderError(f"{path}: {key} must have shape (N,H,W), (N,H,W,C) or (N,C,H,W), got {a.shape}")
    return pad_to(t, 32) if t.shape[-1] == 28 else t


def _load_npz(path: Path, *, name: str) -> Dataset:
    if not path.is_file():
        raise MisleaderError(f"npz dataset {path} not found: give an existing file as npz:PATH "
                             "(arrays x_train y_train x_test y_test)")
    try:
        d = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise MisleaderError(f"cannot read {path} as .npz ({exc}): write it with numpy.savez") from None
    if not isinstance(d, np.lib.npyio.NpzFile):
        raise MisleaderError(f"{path} is a single .npy array, not an .npz archive: write it with "
                             "numpy.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)")
    with d:
        missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in d.files]
        if missing:
            raise MisleaderError(
                f"{path} lacks arrays {missing}: an npz dataset needs x_train y_train x_test y_test"
            )
        try:
            arrays = {k: d[k] for k in ("x_train", "y_train", "x_test", "y_test")}
            names_arr = d["label_names"] if "label_names" in d.files else None
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
            raise MisleaderError(f"{path} is corrupted ({exc}): write it again with numpy.savez") from None
    ys = {}
    for part in ("train", "test"):
        y = arrays[f"y_{part}"].reshape(-1)
        if len(y) == 0 or not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
            raise MisleaderError(f"{path}: y_{part} must be a non-empty array of integer labels >= 0, "
                                 f"got {y.dtype} {arrays[f'y_{part}'].shape}")
        if len(y) != len(arrays[f"x_{part}"]):
            n_x = len(arrays[f"x_{part}"])
            raise MisleaderError(f"{path}: x_{part} has {n_x} rows but y_{part} has {len(y)}")
        ys[part] = torch.from_numpy(y.astype(np.int64))
    xtr = _images_from_array(arrays["x_train"], path=path, key="x_train")
    xte = _images_from_array(arrays["x_test"], path=path, key="x_test")
    if xtr.shape[1:] != xte.shape[1:]:
        raise MisleaderError(f"{path}: x_train images {tuple(xtr.shape[1:])} and x_test images "
                             f"{tuple(xte.shape[1:])} differ in shape")
    k = int(max(ys["train"].max(), ys["test"].max())) + 1
    names = [str(n) for n in names_arr] if names_arr is not None else []
    if names and len(names) < k:
        raise MisleaderError(f"{path}: label_names has {len(names)} names but labels go up to {k - 1}")
    k = max(k, len(names))
    return Dataset(name=name, x_train=xtr, y_train=ys["train"], x_test=xte, y_test=ys["test"],
                   num_classes=k, class_names=names or [str(i) for i in range(k)])
