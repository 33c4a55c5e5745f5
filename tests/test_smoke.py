"""The GPU smoke check runs end to end (here on CPU with the demo models) and reports failures."""
import pytest
import torch

from smt.smoke import format_rows, run_smoke


def test_smoke_check_on_cpu_with_tiny_models():
    rows = run_smoke("cpu", "tiny", patch=8, batch=1, infer_side=20, tile=12)
    text = format_rows(rows)
    assert text.splitlines()[-1] == "SMOKE OK", text
    names = [r.check for r in rows]
    assert any(n.startswith("selective scan") for n in names) and any(n.startswith("window attention") for n in names)
    assert sum("train step" in n for n in names) == 2 and sum("tiled inference" in n for n in names) == 2


def test_smoke_reports_a_failure():
    from smt.smoke import SmokeRow

    assert format_rows([SmokeRow("x", "1"), SmokeRow("y", "nan", ok=False)]).endswith("SMOKE FAILED")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_smoke_check_on_gpu_with_large_models():
    rows = run_smoke("cuda", "large")
    assert all(r.ok for r in rows), format_rows(rows)
