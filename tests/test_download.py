"""Real download code against a local HTTP server: success, resume, truncation, hash mismatch, pinning, safe and
idempotent extraction, and a data root built from archive sources (sub-images, LR made from HR, LR-only test)."""
import hashlib
import io
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from smt.data.download import Archive, DownloadError, HashLock, download, extract


def _png_bytes(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


class _Server:
    """Serves ``files`` (path -> bytes). Per-path behaviour: ``truncate`` (always stop half way), ``flaky``
    (stop half way on the first request only), ``no_range`` (ignore Range headers). Logs Range headers."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.truncate: set[str] = set()
        self.flaky: set[str] = set()
        self.no_range: set[str] = set()
        self.ranges: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):  # noqa: N802 - http.server's naming
                path = self.path
                server.ranges.append((path, self.headers.get("Range")))
                if path not in server.files:
                    self.send_error(404)
                    return
                data = server.files[path]
                start = 0
                rng = self.headers.get("Range")
                if rng and path not in server.no_range:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                cut = path in server.truncate or (path in server.flaky and start == 0)
                if cut:
                    server.flaky.discard(path)
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.close()


def _quiet(msg):
    pass


def _payload(n=300_000, seed=0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def test_download_verifies_and_is_idempotent(server, tmp_path):
    data = _payload()
    server.files["/a.bin"] = data
    arc = Archive(server.url("/a.bin"), "a.bin", len(data), hashlib.sha256(data).hexdigest())
    path = download(arc, tmp_path, log=_quiet)
    assert path.read_bytes() == data and not (tmp_path / "a.bin.part").exists()
    n = len(server.ranges)
    assert download(arc, tmp_path, log=_quiet) == path and len(server.ranges) == n  # present + verified: no GET


def test_interrupted_download_resumes_with_range(server, tmp_path):
    data = _payload()
    server.files["/b.bin"] = data
    server.flaky.add("/b.bin")
    arc = Archive(server.url("/b.bin"), "b.bin", None, hashlib.sha256(data).hexdigest())
    path = download(arc, tmp_path, backoff=0, log=_quiet)
    assert path.read_bytes() == data
    assert server.ranges[0] == ("/b.bin", None)
    assert server.ranges[1] == ("/b.bin", f"bytes={len(data) // 2}-")  # picked up where the cut left it


def test_leftover_part_from_a_killed_run_is_resumed(server, tmp_path):
    data = _payload()
    server.files["/c.bin"] = data
    (tmp_path / "c.bin.part").write_bytes(data[:1000])
    path = download(Archive(server.url("/c.bin"), "c.bin", len(data), None), tmp_path, log=_quiet)
    assert path.read_bytes() == data and server.ranges == [("/c.bin", "bytes=1000-")]


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    data = _payload()
    server.files["/d.bin"] = data
    server.no_range.add("/d.bin")
    (tmp_path / "d.bin.part").write_bytes(b"garbage-prefix")
    path = download(Archive(server.url("/d.bin"), "d.bin", len(data), hashlib.sha256(data).hexdigest()),
                    tmp_path, log=_quiet)
    assert path.read_bytes() == data


def test_truncated_download_fails_naming_the_file_and_keeps_the_part(server, tmp_path):
    data = _payload()
    server.files["/e.bin"] = data
    server.truncate.add("/e.bin")
    server.no_range.add("/e.bin")  # every try starts over and is cut again
    with pytest.raises(DownloadError, match=r"e\.bin.*incomplete after 2 tries.*run again to resume"):
        download(Archive(server.url("/e.bin"), "e.bin"), tmp_path, retries=2, backoff=0, log=_quiet)
    assert not (tmp_path / "e.bin").exists()
    assert (tmp_path / "e.bin.part").stat().st_size == len(data) // 2


def test_wrong_hash_fails_and_deletes_the_download(server, tmp_path):
    data = _payload()
    server.files["/f.bin"] = data
    with pytest.raises(DownloadError, match=r"f\.bin: SHA-256 [0-9a-f]{64}, expected 0{64}.*deleted"):
        download(Archive(server.url("/f.bin"), "f.bin", None, "0" * 64), tmp_path, log=_quiet)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(Archive(server.url("/nothing"), "nothing.bin"), tmp_path, log=_quiet)


def test_first_download_pins_the_hash_and_later_changes_are_refused(server, tmp_path):
    data = _payload()
    server.files["/g.bin"] = data
    arc = Archive(server.url("/g.bin"), "g.bin")
    lock = HashLock(tmp_path / "lock.json")
    download(arc, tmp_path / "m1", lock, log=_quiet)
    assert HashLock(tmp_path / "lock.json").entries[arc.url] == {"size": len(data),
                                                                 "sha256": hashlib.sha256(data).hexdigest()}
    server.files["/g.bin"] = _payload(seed=1)  # the host changed the file: another machine must notice
    with pytest.raises(DownloadError, match="g.bin: SHA-256"):
        download(arc, tmp_path / "m2", HashLock(tmp_path / "lock.json"), log=_quiet)
    assert not (tmp_path / "m2" / "g.bin").exists()


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def _targz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_extract_once_atomically_and_refuse_unsafe_members(tmp_path):
    arc = tmp_path / "x.zip"
    arc.write_bytes(_zip({"top/a.txt": b"a", "top/b.txt": b"b"}))
    out = extract(arc, tmp_path / "out")
    assert (out / "top" / "a.txt").read_bytes() == b"a"
    (out / "top" / "a.txt").write_bytes(b"edited")
    extract(arc, tmp_path / "out")  # same archive: nothing is extracted again
    assert (out / "top" / "a.txt").read_bytes() == b"edited"
    evil = tmp_path / "evil.zip"
    evil.write_bytes(_zip({"../escape.txt": b"x"}))
    with pytest.raises(DownloadError, match="escape.txt"):
        extract(evil, tmp_path / "evil_out")
    assert not (tmp_path / "evil_out").exists() and not (tmp_path / "escape.txt").exists()
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(_targz({"a.txt": b"a" * 1000})[:40])
    with pytest.raises(DownloadError, match="bad.tar.gz"):
        extract(bad, tmp_path / "bad_out")
    assert not (tmp_path / "bad_out").exists() and not (tmp_path / "bad_out.partial").exists()


def test_build_from_sources_end_to_end(server, tmp_path):
    from smt.config import DataConfig
    from smt.data.manifest import has_hr, read_manifest
    from smt.data.images import read_image
    from smt.data.imresize import bicubic_degrade
    from smt.data.sources import Source, build_from_sources, missing_inputs

    rng = np.random.default_rng(0)
    hr_imgs = {f"{i:04d}": rng.integers(0, 256, (40, 56, 3), dtype=np.uint8) for i in (1, 2)}
    lr_imgs = {k: bicubic_degrade(v, 4) for k, v in hr_imgs.items()}
    server.files["/pair.zip"] = _zip({**{f"P/HR/{k}.png": _png_bytes(v) for k, v in hr_imgs.items()},
                                      **{f"P/LR/X4/{k}x4.png": _png_bytes(v) for k, v in lr_imgs.items()}})
    valid_hr = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    server.files["/hronly.tar.gz"] = _targz({"0801.png": _png_bytes(valid_hr)})
    test_dir = tmp_path / "test_lr"
    test_dir.mkdir()
    (test_dir / "0901x4.png").write_bytes(_png_bytes(rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)))
    sources = {
        "pairs": Source("pairs", "HR + LR", "test", (Archive(server.url("/pair.zip"), "pair.zip"),), "P/HR/*.png",
                        "P/LR/X4/*.png", 2),
        "hronly": Source("hronly", "HR only", "test", (Archive(server.url("/hronly.tar.gz"), "hronly.tar.gz"),),
                         "*.png", None, 1),
        "testlr": Source("testlr", "LR only", "test", (), None, "*.png", 1),
    }
    cfg = DataConfig(source="sources", root=str(tmp_path / "data" / "root"), train_sources=("pairs",),
                     valid_sources=("hronly",), test_sources=("testlr",), folders={},
                     downloads=str(tmp_path / "dl"), raw=str(tmp_path / "data" / "raw"),
                     lock=str(tmp_path / "data" / "lock.json"), subimage_size=32, subimage_step=24)
    assert any("testlr" in line and "MISSING" in line for line in missing_inputs(cfg, sources))
    assert sum("to download" in line for line in missing_inputs(cfg, sources)) == 2
    with pytest.raises(FileNotFoundError, match="data.folders.testlr"):
        build_from_sources(cfg, log=_quiet, sources=sources)
    assert not Path(cfg.root).exists()  # a failed build leaves no data root behind
    import dataclasses

    cfg = dataclasses.replace(cfg, folders={"testlr": str(test_dir)})
    assert not any("MISSING" in line for line in missing_inputs(cfg, sources))
    manifests = build_from_sources(cfg, log=_quiet, sources=sources)
    train = read_manifest(cfg.root, "train", verify=True)
    # 40x56 HR, tiles of 32 every 24 -> rows at 0, 8; columns at 0, 24 -> 4 tiles per image
    assert len(train) == 8 and train.id.iloc[0] == "pairs-0001-s001"
    assert train.source.tolist()[:4] == ["pairs:0001.png@0,0", "pairs:0001.png@0,24", "pairs:0001.png@8,0",
                                         "pairs:0001.png@8,24"]
    row = train.iloc[3]
    assert np.array_equal(read_image(Path(cfg.root) / row.hr_path), hr_imgs["0001"][8:40, 24:56])
    assert np.array_equal(read_image(Path(cfg.root) / row.lr_path), lr_imgs["0001"][2:10, 6:14])  # official LR
    valid = read_manifest(cfg.root, "valid", verify=True)
    assert valid.id.tolist() == ["0801"] and has_hr(valid)
    assert np.array_equal(read_image(Path(cfg.root) / valid.lr_path[0]), bicubic_degrade(valid_hr, 4))
    test = read_manifest(cfg.root, "test", verify=True)
    assert test.id.tolist() == ["0901"] and not has_hr(test) and test.lr_path[0] == "test_LR_bicubic/X4/0901x4.png"
    assert set(manifests) == {"train", "valid", "test"}
    assert len(HashLock(cfg.lock).entries) == 2  # both archives pinned
    before = len(server.ranges)
    build_from_sources(cfg, log=_quiet, sources=sources)  # archives kept and extracted: no network
    assert len(server.ranges) == before
