"""The committed ``dvc.lock`` matches the committed code: every stage's code deps (its notebook and the ``smt``
files it runs) were hashed from exactly these files, so the committed outputs (``reports/metrics.json``, the
README figures) come from this code. After a code change this fails, naming the stage and the files, until the
pipeline is rerun (``dvc repro``; the ablation stages too) and ``dvc.lock`` committed.

Hashes are recomputed the way DVC 3 does (``hash: md5``): a file's MD5; a folder's is the MD5 of the JSON list of
its files' ``{"md5", "relpath"}`` sorted by path, with ``.dir`` appended (byte-code caches are ignored, as in
``.dvcignore``)."""
import hashlib
import json
from pathlib import Path

import pytest
import yaml

from conftest import REPO

STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
LOCK = yaml.safe_load((REPO / "dvc.lock").read_text())["stages"] if (REPO / "dvc.lock").exists() else {}


def _is_code(path: str) -> bool:
    return path.startswith(("smt/", "notebooks/"))


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def dvc_md5(path: Path) -> str | None:
    """DVC's md5 of a file or folder (None when it does not exist)."""
    if path.is_file():
        return _md5(path)
    if not path.is_dir():
        return None
    entries = [{"md5": _md5(f), "relpath": f.relative_to(path).as_posix()} for f in path.rglob("*")
               if f.is_file() and "__pycache__" not in f.parts and f.suffix != ".pyc"]
    entries.sort(key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode()).hexdigest() + ".dir"


def test_dir_hash_is_dvcs(tmp_path):
    """The folder hash above is DVC's own (dvc_data's tree of the same files)."""
    from dvc_data.hashfile.hash_info import HashInfo  # noqa: F401 - dvc_data is the reference implementation
    from dvc_data.hashfile.tree import Tree

    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a.py").write_text("x = 1\n")
    (tmp_path / "d" / "sub" / "b.json").write_text("{}")
    tree = Tree()
    for f in sorted((tmp_path / "d").rglob("*")):
        if f.is_file():
            from dvc_data.hashfile.meta import Meta

            tree.add(tuple(f.relative_to(tmp_path / "d").parts), Meta(size=f.stat().st_size),
                     HashInfo("md5", _md5(f)))
    tree.digest()
    assert dvc_md5(tmp_path / "d") == tree.hash_info.value


@pytest.mark.parametrize("name", list(STAGES))
def test_lock_records_this_code(name):
    stage = STAGES[name]
    assert name in LOCK, f"dvc.lock has no stage {name!r}: run the pipeline (dvc repro) and commit dvc.lock"
    wanted = [d for d in stage["deps"] if _is_code(d)]
    recorded = {d["path"]: d for d in LOCK[name].get("deps", []) if _is_code(d["path"])}
    problems = []
    for path in sorted(set(recorded) - set(wanted)):
        problems.append(f"{path}: in dvc.lock but no longer a dep in dvc.yaml")
    for path in wanted:
        if path not in recorded:
            problems.append(f"{path}: a dep in dvc.yaml, not recorded in dvc.lock")
            continue
        actual = dvc_md5(REPO / path)
        if actual != recorded[path]["md5"]:
            problems.append(f"{path}: dvc.lock md5 {recorded[path]['md5']}, file md5 {actual}")
    assert not problems, (f"stage {name}: dvc.lock is behind the code ({len(problems)} deps); rerun the pipeline "
                          f"and commit dvc.lock:\n  " + "\n  ".join(problems))
