"""The GPU smoke check runs end to end (here on CPU with the demo models), covers the shapes and modes the full
profile uses (channel-tail scan, bf16 attention, stage-1 per-GPU batch, two processes) and reports failures."""
import os
import subprocess
import sys

import pytest
import torch

import smt.smoke as smoke
from smt.config import ConfigError
from smt.smoke import SmokeRow, format_rows, run_smoke, smoke_command, stage1_per_gpu_batch
from conftest import REPO


def test_smoke_check_on_cpu_with_tiny_models():
    rows = run_smoke("cpu", "tiny", patch=8, batch=1, infer_side=20, tile=12)
    text = format_rows(rows)
    assert text.splitlines()[-1] == "SMOKE OK", text
    names = [r.check for r in rows]
    assert sum(n.startswith("selective scan") for n in names) == 2
    assert any("D=40 N=16 L=130" in n for n in names)  # 40 channels: a partial block of 8 after 32
    assert any(n.startswith("window attention sdpa vs reference, fp32") for n in names)
    assert any("bf16 head dim 30" in n for n in names) and any("bf16 head dim 29" in n for n in names)
    assert sum("train step (fp32, 1x8px per GPU" in n for n in names) == 2
    assert sum("tiled inference" in n for n in names) == 2


def test_large_smoke_scans_mambairv2_l_shape():
    assert (1, 348, 16, 4096) in smoke._SCAN_CASES["large"]
    assert 348 % 32  # a channel tail for the Triton kernel's blocks of 32


def test_smoke_defaults_to_the_stage1_per_gpu_batch(monkeypatch, tmp_path):
    assert stage1_per_gpu_batch() == (64, 8)  # profiles/ntire2025.yaml: global 64 over 8 GPUs, 64 px
    text = smoke.PROFILE.read_text().replace("nproc: 8 ", "nproc: 4 ", 1)
    (tmp_path / "p.yaml").write_text(text)
    assert stage1_per_gpu_batch(tmp_path / "p.yaml") == (64, 16)
    (tmp_path / "bad.yaml").write_text(smoke.PROFILE.read_text().replace("nproc: 8 ", "nproc: 7 ", 1))
    with pytest.raises(ConfigError, match="not divisible by 7"):
        stage1_per_gpu_batch(tmp_path / "bad.yaml")
    monkeypatch.setattr(smoke, "stage1_per_gpu_batch", lambda: (8, 3))
    monkeypatch.setattr(smoke, "_scan_rows", lambda *a: [])
    monkeypatch.setattr(smoke, "_attention_rows", lambda *a: [])
    monkeypatch.setattr(smoke, "_infer_row", lambda *a: SmokeRow("infer", ""))
    names = [r.check for r in run_smoke("cpu", "tiny")]
    assert sum("3x8px per GPU" in n for n in names) == 2


def test_smoke_arguments():
    assert smoke_command(1, "cpu", "tiny", None, None) is None  # runs in this process
    assert smoke_command(2, "cpu", "tiny", 8, None) == ["smoke", "--device", "cpu", "--models", "tiny",
                                                        "--patch", "8"]
    with pytest.raises(ValueError, match="--nproc must be >= 1"):
        smoke_command(0, "cpu", "tiny", None, None)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs 2 GPUs, this machine sees 0"):
            smoke_command(2, "cuda", "large", None, None)
    with pytest.raises(ValueError, match="unknown model size"):
        run_smoke("cpu", "medium")
    with pytest.raises(ValueError, match="patch and batch must be >= 1"):
        run_smoke("cpu", "tiny", patch=8, batch=-1)


def test_smoke_reports_a_failure():
    assert format_rows([SmokeRow("x", "1"), SmokeRow("y", "nan", ok=False)]).endswith("SMOKE FAILED")


@pytest.mark.slow
def test_two_process_smoke_under_torchrun_on_cpu():
    """``python -m smt smoke --nproc 2``: two gloo ranks, DDP train steps whose weights agree, rank 0 prints
    both ranks' rows."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "smt", "smoke", "--nproc", "2", "--device", "cpu", "--models", "tiny",
           "--patch", "8", "--batch", "1"]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    lines = res.stdout.splitlines()
    assert lines[-1] == "SMOKE OK"
    for rank in (0, 1):
        ddp = [line for line in lines if f"[rank {rank}]" in line and "DDP" in line]
        assert len(ddp) == 2 and all("ranks' weights agree" in line for line in ddp), lines
    assert any("[rank 1] device" in line and "rank 1 of 2" in line for line in lines)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_smoke_check_on_gpu_with_large_models():
    rows = run_smoke("cuda", "large")
    assert all(r.ok for r in rows), format_rows(rows)
