"""md5-checked downloads against a local HTTP server (no internet needed)."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import os
import shutil
import socket
import tarfile
import threading
from pathlib import Path

import pytest

from misleader.data import load_dataset
from misleader.data.download import RESOURCES, Resource, download_dataset, md5sum
from misleader.errors import MisleaderError

MNIST_FILES = [r.filename for r in RESOURCES["mnist"]]


class _Server:
    """A ThreadingHTTPServer on 127.0.0.1 serving ``folder`` and counting GET requests."""

    def __init__(self, folder: Path) -> None:
        self.requests: list[str] = []
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                server.requests.append(self.path)
                super().do_GET()

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                                     functools.partial(Handler, directory=str(folder)))
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def serve():
    servers: list[_Server] = []

    def start(folder: Path) -> _Server:
        servers.append(_Server(folder))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


@pytest.fixture
def mnist_raw(shared_data: Path) -> Path:
    raw = shared_data / "MNIST" / "raw"
    if not all((raw / f).is_file() for f in MNIST_FILES):
        pytest.skip(f"MNIST .gz files not found under {raw}")
    return raw


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*")) if folder.exists() else []


def test_download_mnist_then_load_then_skip(tmp_path, serve, mnist_raw):
    www = tmp_path / "www"
    www.mkdir()
    for f in MNIST_FILES:
        (www / f).symlink_to(mnist_raw / f)
    server = serve(www)
    root = tmp_path / "root"

    paths = download_dataset("mnist", root=root, mirror=server.url, progress=False)

    assert [p.name for p in paths] == MNIST_FILES
    for p, res in zip(paths, RESOURCES["mnist"]):
        assert p == root / "MNIST" / "raw" / res.filename
        assert md5sum(p) == res.md5
    assert sorted(server.requests) == sorted("/" + f for f in MNIST_FILES)
    assert _leftovers(root / "MNIST" / "raw") == sorted(MNIST_FILES)  # no temporary files left

    ds = load_dataset("mnist", data_dir=root)
    assert tuple(ds.x_train.shape) == (60000, 1, 32, 32)
    assert tuple(ds.x_test.shape) == (10000, 1, 32, 32)

    again = download_dataset("mnist", root=root, mirror=server.url, progress=False)
    assert again == paths
    assert len(server.requests) == len(MNIST_FILES)  # nothing downloaded the second time


def test_corrupted_file_on_server_raises_and_leaves_nothing(tmp_path, serve, mnist_raw):
    www = tmp_path / "www"
    www.mkdir()
    for f in MNIST_FILES:
        (www / f).write_bytes((mnist_raw / f).read_bytes()[:1000])  # truncated copies
    server = serve(www)
    root = tmp_path / "root"

    with pytest.raises(MisleaderError, match="md5") as info:
        download_dataset("mnist", root=root, mirror=server.url, progress=False)

    first = RESOURCES["mnist"][0]
    msg = str(info.value)
    assert first.filename in msg and first.md5 in msg
    assert hashlib.md5((www / first.filename).read_bytes()).hexdigest() in msg  # the actual md5
    assert _leftovers(root / "MNIST" / "raw") == []  # neither the file nor a partial temp file


def test_wrong_md5_tries_next_url(tmp_path, serve, mnist_raw, monkeypatch):
    name = "t10k-labels-idx1-ubyte.gz"
    good = (mnist_raw / name).read_bytes()
    (tmp_path / "www" / "bad").mkdir(parents=True)
    (tmp_path / "www" / "good").mkdir()
    (tmp_path / "www" / "bad" / name).write_bytes(good[:-10])
    (tmp_path / "www" / "good" / name).write_bytes(good)
    server = serve(tmp_path / "www")
    urls = (server.url + "bad/" + name, server.url + "good/" + name)
    monkeypatch.setitem(RESOURCES, "toy", [Resource(name, "toy", hashlib.md5(good).hexdigest(), urls)])

    (path,) = download_dataset("toy", root=tmp_path / "root", progress=False)

    assert path.read_bytes() == good
    assert server.requests == ["/bad/" + name, "/good/" + name]
    assert _leftovers(tmp_path / "root" / "toy") == [name]


def test_existing_file_with_wrong_md5_is_replaced(tmp_path, serve, mnist_raw, monkeypatch):
    name = "t10k-labels-idx1-ubyte.gz"
    (tmp_path / "www").mkdir()
    shutil.copy(mnist_raw / name, tmp_path / "www" / name)
    server = serve(tmp_path / "www")
    res = next(r for r in RESOURCES["mnist"] if r.filename == name)
    monkeypatch.setitem(RESOURCES, "toy", [res])
    dest = tmp_path / "root" / res.subdir / name
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"not the right bytes")

    download_dataset("toy", root=tmp_path / "root", mirror=server.url, progress=False)

    assert md5sum(dest) == res.md5
    assert len(server.requests) == 1


def test_server_down_raises(tmp_path):
    with socket.socket() as s:  # a port that was free a moment ago and has no listener now
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = tmp_path / "root"
    with pytest.raises(MisleaderError, match="could not download") as info:
        download_dataset("mnist", root=root, mirror=f"http://127.0.0.1:{port}/", timeout=5, progress=False)
    msg = str(info.value)
    assert "check the network" in msg and str(root / "MNIST" / "raw") in msg
    assert _leftovers(root / "MNIST" / "raw") == []


def _targz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_archive_is_extracted_after_verification(tmp_path, serve, monkeypatch):
    blob = _targz({"toy-batches/a.bin": b"abc", "toy-batches/b.bin": b"xyz"})
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "toy.tar.gz").write_bytes(blob)
    server = serve(tmp_path / "www")
    monkeypatch.setitem(RESOURCES, "toy", [Resource("toy.tar.gz", "", hashlib.md5(blob).hexdigest(), (),
                                                    extracts=("toy-batches/a.bin", "toy-batches/b.bin"))])
    root = tmp_path / "root"

    (path,) = download_dataset("toy", root=root, mirror=server.url, progress=False)

    assert path == root / "toy-batches"
    assert (root / "toy-batches" / "b.bin").read_bytes() == b"xyz"
    (root / "toy.tar.gz").unlink()  # extracted data alone counts as installed
    download_dataset("toy", root=root, mirror=server.url, progress=False)
    assert len(server.requests) == 1


@pytest.mark.parametrize("evil", ["../evil.txt", "ABSOLUTE", "ok/../../evil.txt"])
def test_unsafe_archive_is_refused(tmp_path, serve, monkeypatch, evil):
    if evil == "ABSOLUTE":
        evil = str(tmp_path / "evil.txt")
    blob = _targz({"toy/a.bin": b"abc", evil: b"pwned"})
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "toy.tar.gz").write_bytes(blob)
    server = serve(tmp_path / "www")
    monkeypatch.setitem(RESOURCES, "toy", [Resource("toy.tar.gz", "", hashlib.md5(blob).hexdigest(), (),
                                                    extracts=("toy/a.bin",))])
    root = tmp_path / "root"

    with pytest.raises(MisleaderError, match="unsafe"):
        download_dataset("toy", root=root, mirror=server.url, progress=False)

    assert not (tmp_path / "evil.txt").exists() and not (root / "toy" / "a.bin").exists()


def test_unknown_and_embedded_names():
    with pytest.raises(MisleaderError, match="mnist.*svhn"):
        download_dataset("imagenet", root=Path("unused"))
    assert download_dataset("digits", root=Path("unused")) == []


def test_md5sum_matches_hashlib(tmp_path):
    data = os.urandom(3000)
    (tmp_path / "f").write_bytes(data)
    assert md5sum(tmp_path / "f", chunk_size=7) == hashlib.md5(data).hexdigest()


def test_resources_cover_the_downloadable_datasets():
    from misleader.data import DATASETS

    assert set(RESOURCES) == set(DATASETS.names()) - {"digits"}  # every file-backed dataset can be fetched
    for resources in RESOURCES.values():
        for r in resources:
            assert len(r.md5) == 32 and r.urls and all(u.endswith(r.filename) for u in r.urls)
    assert all(len(r.urls) == 2 for r in RESOURCES["mnist"])
