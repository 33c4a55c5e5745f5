"""Verified, resumable downloads and idempotent extraction of the data sources' archives.

- ``download``: HTTP(S) GET into ``<name>.part`` beside the final file, resumed with a ``Range`` request after an
  interruption (a server that ignores ranges restarts from zero), checked against the expected size and
  SHA-256, then renamed into place. A truncated transfer keeps the ``.part`` for the next try and says so; a
  wrong hash deletes it (resuming cannot fix it). The final name only ever holds verified bytes.
- Hash pinning: the dataset hosts publish no checksums, so sources may leave ``sha256`` empty. The first verified
  download then records size and SHA-256 in a lock file (``data/sources.lock.json``, meant to be committed) and
  every later download of that URL, on any machine, must match it.
- ``extract``: zip or tar into a staging folder, renamed into place with a marker holding the archive's hash;
  a second call with the same archive does nothing. Members with absolute paths, ``..`` or links are refused.
"""
from __future__ import annotations

import http.client
import json
import os
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable

from smt.files import atomic_path, build_aside, sha256_file

__all__ = ["Archive", "DownloadError", "HashLock", "download", "extract"]

_CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A download or extraction failed; the message names the file and what to do."""


@dataclass(frozen=True)
class Archive:
    url: str
    filename: str
    size: int | None = None  # bytes, when known
    sha256: str | None = None  # when known; otherwise pinned in the lock file on first download


class HashLock:
    """``{url: {"size": n, "sha256": hex}}`` in a JSON file, written atomically."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.entries: dict[str, dict] = json.loads(self.path.read_text()) if self.path.exists() else {}

    def expected(self, archive: Archive) -> tuple[int | None, str | None]:
        pinned = self.entries.get(archive.url, {})
        return archive.size or pinned.get("size"), archive.sha256 or pinned.get("sha256")

    def pin(self, archive: Archive, size: int, sha256: str) -> None:
        if self.entries.get(archive.url) == {"size": size, "sha256": sha256}:
            return
        self.entries[archive.url] = {"size": size, "sha256": sha256}
        with atomic_path(self.path) as tmp:
            tmp.write_text(json.dumps(dict(sorted(self.entries.items())), indent=2) + "\n")


def _fetch_into(url: str, part: Path, timeout: float) -> int | None:
    """Append the rest of ``url`` to ``part`` (Range request). Returns the total size the server announced."""
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # nothing left to send: the part is complete as far as the server knows
            return have
        raise
    with resp:
        if have and resp.status != 206:  # the server ignored the range: start again
            have = 0
        length = resp.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        with open(part, "ab" if have else "wb") as f:
            while True:
                try:
                    block = resp.read(_CHUNK)
                except http.client.IncompleteRead as exc:
                    f.write(exc.partial)
                    raise
                if not block:
                    break
                f.write(block)
    return total


def download(archive: Archive, dest_dir: str | Path, lock: HashLock | None = None, retries: int = 3,
             timeout: float = 60.0, backoff: float = 1.0, log: Callable[[str], None] = print) -> Path:
    """Download ``archive`` into ``dest_dir`` (resuming a previous ``.part``) and return the verified file."""
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    final, part = dest_dir / archive.filename, dest_dir / (archive.filename + ".part")
    size, sha = lock.expected(archive) if lock else (archive.size, archive.sha256)
    if final.exists():
        _verify(final, archive, size, sha, keep=True)
        return final
    for attempt in range(1, retries + 1):
        try:
            total = _fetch_into(archive.url, part, timeout)
        except (OSError, http.client.HTTPException) as exc:  # URLError, timeouts, resets, IncompleteRead
            if isinstance(exc, urllib.error.HTTPError) and exc.code < 500:
                raise DownloadError(f"{archive.filename}: {archive.url} answered HTTP {exc.code} ({exc.reason})") \
                    from None
            got = part.stat().st_size if part.exists() else 0
            log(f"{archive.filename}: transfer interrupted after {got} bytes ({exc}); try {attempt}/{retries}")
            time.sleep(backoff * attempt)
            continue
        got = part.stat().st_size
        if total is not None and got < total:
            log(f"{archive.filename}: truncated at {got} of {total} bytes; try {attempt}/{retries}")
            time.sleep(backoff * attempt)
            continue
        break
    else:
        got = part.stat().st_size if part.exists() else 0
        raise DownloadError(f"{archive.filename}: download from {archive.url} incomplete after {retries} tries "
                            f"({got} bytes kept in {part}; run again to resume)")
    digest = _verify(part, archive, size, sha, keep=False)
    os.replace(part, final)
    if lock is not None:
        lock.pin(archive, final.stat().st_size, digest)
    return final


def _verify(path: Path, archive: Archive, size: int | None, sha: str | None, keep: bool) -> str:
    """Check size and hash; a bad file is removed unless ``keep`` (then the error says to delete it)."""
    got_size = path.stat().st_size
    digest = sha256_file(path)
    problem = None
    if size is not None and got_size != size:
        problem = f"size {got_size} bytes, expected {size}"
    elif sha is not None and digest != sha:
        problem = f"SHA-256 {digest}, expected {sha}"
    if problem:
        if not keep:
            path.unlink()
        raise DownloadError(f"{archive.filename}: {problem} (from {archive.url}). "
                            + (f"Delete {path} to download it again." if keep else "The download was deleted."))
    return digest


def _safe_member(name: str, archive: Path) -> None:
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts:
        raise DownloadError(f"{archive.name}: refuses to extract member {name!r} (outside the target folder)")


def extract(archive_path: str | Path, dest: str | Path, digest: str | None = None) -> Path:
    """Extract a zip/tar(.gz) archive into ``dest`` once. The folder appears complete or not at all."""
    archive_path, dest = Path(archive_path), Path(dest)
    digest = digest or sha256_file(archive_path)
    marker = dest / ".extracted"
    if marker.exists() and marker.read_text().strip() == digest:
        return dest
    try:
        with build_aside(dest) as staging:
            if zipfile.is_zipfile(archive_path):
                with zipfile.ZipFile(archive_path) as z:
                    for name in z.namelist():
                        _safe_member(name, archive_path)
                    z.extractall(staging)
            elif tarfile.is_tarfile(archive_path):
                with tarfile.open(archive_path) as t:
                    for m in t.getmembers():
                        _safe_member(m.name, archive_path)
                        if m.issym() or m.islnk():
                            raise DownloadError(f"{archive_path.name}: refuses to extract link member {m.name!r}")
                    t.extractall(staging, filter="data")
            else:
                raise DownloadError(f"{archive_path}: not a zip or tar archive")
            (staging / ".extracted").write_text(digest + "\n")
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as exc:
        raise DownloadError(f"{archive_path}: cannot be extracted ({exc}); delete it to download it again") \
            from None
    return dest
