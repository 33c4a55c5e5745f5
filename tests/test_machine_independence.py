"""No test assumes the committed run's numbers: the committed ``dvc.lock`` outputs and ``reports/`` figures come
from one CPU type, and another trains different weights (float summation order; docs/reproducibility.md), so a
test that read them would fail on a fresh clone elsewhere. Tests compute what they check in their own run (same
machine, same process), or compare code, never the committed outputs. This scans the test files for the two ways
that could creep in."""
import re

from conftest import REPO

# a DVC output of the committed run read from the checkout: REPO / "reports/...", REPO / "models" / ..., ...
OUTPUT_UNDER_REPO = re.compile(r"REPO\s*/\s*[\"'](reports|results|models|timings|data/demo|data/selection)\b")


def _test_sources() -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((REPO / "tests").glob("*.py"))
            if p.name != "test_machine_independence.py"}


def test_no_test_reads_the_committed_runs_outputs():
    hits = [f"{name}: {m.group(0)}" for name, text in _test_sources().items()
            for m in OUTPUT_UNDER_REPO.finditer(text)]
    assert not hits, "tests reading the committed run's outputs (machine-dependent):\n  " + "\n  ".join(hits)


def test_only_the_lock_test_reads_dvc_lock_and_only_its_code_deps():
    readers = [name for name, text in _test_sources().items() if re.search(r"REPO\s*/\s*[\"']dvc\.lock", text)]
    assert readers == ["test_lock.py"]
    lock_test = _test_sources()["test_lock.py"]
    assert '"outs"' not in lock_test and "'outs'" not in lock_test  # output hashes differ across CPU types
    assert 'path.startswith(("smt/", "notebooks/"))' in lock_test  # deps compared: code only


def test_the_scan_finds_what_it_looks_for():
    """The pattern catches the forms a test would use (so the scan above can fail)."""
    for line in ('json.loads((REPO / "reports/metrics.json").read_text())', "REPO / 'models' / 'hat'",
                 'REPO/"results"', 'REPO / "data/demo/valid_HR"'):
        assert OUTPUT_UNDER_REPO.search(line), line
    assert not OUTPUT_UNDER_REPO.search('workdir / "reports/metrics.json"')  # a test's own run is fine
