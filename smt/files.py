"""Writing files and folders so that a crash or an error never leaves a half-written one, and file digests.

Every stage writes its outputs through these: :func:`atomic_path` for one file (written beside its target,
then renamed onto it), :func:`build_aside` for a folder (built as a sibling, then swapped in), and
:func:`file_digest` hashes a file in chunks (SHA-256 for manifests and download pins, MD5 for DVC's hashes).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_path", "build_aside", "file_digest", "sha256_file"]


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path in ``path``'s folder to write to; renamed onto ``path`` when the block ends without an
    error (``os.replace`` is atomic on one file system), removed otherwise. Creates the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


@contextmanager
def build_aside(dest: str | os.PathLike, staging: str | os.PathLike | None = None) -> Iterator[Path]:
    """A fresh, empty folder to build ``dest`` in (``staging``, default ``<dest>.partial`` beside it). When the
    block ends without an error, the old ``dest`` is removed and the staging folder renamed to it; on an error the
    staging folder is removed and ``dest`` is left as it was."""
    dest = Path(dest)
    staging = Path(staging) if staging is not None else dest.with_name(dest.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)  # left over from a crashed run
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(dest, ignore_errors=True)
    staging.rename(dest)


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of a file (manifests, download pins)."""
    return file_digest(path, "sha256")
