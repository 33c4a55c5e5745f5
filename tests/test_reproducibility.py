"""Same inputs, same bytes; execution settings change no result; a persisted output is resumed only by an
interrupted run of the same inputs. (The whole-pipeline check, `dvc repro -f` leaving dvc.lock unchanged, is in
tests/test_pipeline.py.)"""
import json
import subprocess
import sys

import pytest
import torch

from smt.config import AugmentSpec, TrainConfig, parse_section
from conftest import REPO


def test_safetensors_bytes_are_the_same_in_every_process(tmp_path):
    """safetensors writes metadata in hash-map order, which differs between processes; ours is canonical."""
    script = ("import sys, torch; sys.path.insert(0, sys.argv[2])\n"
              "from smt.train.checkpoint import save_safetensors\n"
              "save_safetensors({'b': torch.arange(6.).reshape(2, 3), 'a': torch.ones(2, dtype=torch.float16)}, "
              "sys.argv[1], {k: k.upper() for k in 'abcdefgh'})\n")
    outs = []
    for i in range(3):
        path = tmp_path / f"m{i}.safetensors"
        subprocess.run([sys.executable, "-c", script, str(path), str(REPO)], check=True)
        outs.append(path.read_bytes())
    assert outs[0] == outs[1] == outs[2]
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(tmp_path / "m0.safetensors"), "pt") as fh:
        assert fh.metadata() == {k: k.upper() for k in "abcdefgh"}
    loaded = load_file(tmp_path / "m0.safetensors")
    assert torch.equal(loaded["b"], torch.arange(6.).reshape(2, 3)) and loaded["a"].dtype == torch.float16
    assert len(outs[0][8:8 + int.from_bytes(outs[0][:8], "little")]) % 8 == 0  # header padded as the format says


def _cfg(out_root, **over) -> TrainConfig:
    raw = {"models": {"mambairv2": {"preset": "mambairv2_tiny"}},
           "stages": {"s1": {"patch_size": 8, "batch_size": 2, "loss": "l1", "lr": 1e-3, "iters": 4}},
           "stage_order": ["s1"], "out_root": str(out_root), "device": "cpu", "val_max_side": 16,
           "ema_decay": 0.5}
    raw.update(over)
    return parse_section(TrainConfig, raw, "train")


def test_logging_validation_and_checkpoint_cadence_change_no_result(tmp_path, demo_root, monkeypatch):
    """train.log_every / val_every / ckpt_every are execution settings: MambaIRv2 draws Gumbel noise in eval mode,
    and validation used to take it from training's random stream, so validating more often changed the weights."""
    from smt.train.engine import run_dir, train_stage

    runs = {"often": dict(log_every=1, val_every=1, ckpt_every=1), "rarely": dict(log_every=3, val_every=100,
                                                                                  ckpt_every=100)}
    files = {}
    for name, over in runs.items():
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)  # the same relative out_root: the file records it
        cfg = _cfg("models", **over)
        train_stage(cfg, "mambairv2", 1, "s1", demo_root, 4, log=lambda m: None)
        run = run_dir(cfg, "mambairv2", 1, "s1")
        metrics = json.loads((run / "metrics.json").read_text())
        metrics.pop("train_seconds", None)  # wall-clock (the stage runner moves it out of the run folder)
        files[name] = {"model.safetensors": (run / "model.safetensors").read_bytes(), "metrics": metrics}
        files[name]["final_val"] = (run / "val_log.csv").read_text().splitlines()[-1]
    assert files["often"] == files["rarely"]


def test_validation_is_seeded_and_leaves_the_training_stream_alone(demo_root):
    from smt.models import build_model
    from smt.train.engine import validate

    torch.manual_seed(0)
    net = build_model("mambairv2_tiny")  # routing="gumbel": random in eval mode
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = validate(net, demo_root, 4, torch.device("cpu"), 16)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(999)
    assert validate(net, demo_root, 4, torch.device("cpu"), 16) == a


@pytest.mark.parametrize("world", [2, 4])
def test_any_world_size_sees_the_same_global_batches(world):
    """What is guaranteed across process counts: every step's global batch (images, crops, flips, colour
    transforms) and their order are those of one process; the ranks split it. (Weights agree to float tolerance,
    not bitwise: gradients are averaged by all-reduce in another order — tests/test_train.py's DDP test.)"""
    from smt.train.data import GlobalBatchSampler

    aug = AugmentSpec(dihedral=True, channel_permute=True, color_prob=0.5, hue_degrees=90.0,
                      saturation=(0.5, 1.5))
    sizes = [(12, 16), (20, 10), (9, 30)]
    one = GlobalBatchSampler(sizes, 6, 8, seed=11, augment=aug)
    ranks = [GlobalBatchSampler(sizes, 6, 8, seed=11, rank=r, world_size=world, augment=aug) for r in range(world)]
    for step in (0, 1, 7, 1000):
        assert sum((r.draw(step) for r in ranks), []) == one.draw(step)
    with pytest.raises(ValueError, match="not divisible"):
        GlobalBatchSampler(sizes, 6, 6, seed=0, world_size=4)


# ------------------------------------------------------------------------------------- the stage runner


def test_scrub_keeps_results_and_drops_what_describes_the_run():
    import nbformat

    from smt.stages import scrub_notebook

    nb = nbformat.v4.new_notebook()
    nb.metadata["papermill"] = {"parameters": {"params_path": "p.yaml"}, "start_time": "2026-01-01T00:00:00",
                                "end_time": "x", "duration": 3.2, "input_path": "/abs/nb.ipynb"}
    params = nbformat.v4.new_code_cell("params_path = 'p.yaml'")
    params.metadata["tags"] = ["injected-parameters"]
    params["id"] = "a1b2c3d4"
    cell = nbformat.v4.new_code_cell("x")
    cell.metadata["papermill"] = {"start_time": "t", "duration": 1.0}
    cell.metadata["execution"] = {"iopub.execute_input": "2026-01-01T00:00:01"}
    cell.outputs = [
        nbformat.v4.new_output("stream", name="stderr", text="train 40%|####| 4/10 [00:01<00:01, 3.2it/s]\n"),
        nbformat.v4.new_output("stream", name="stdout", text="RESULT 27.1 dB\n"),
        nbformat.v4.new_output("execute_result", data={
            "text/plain": "<pandas.io.formats.style.Styler at 0x7f4e48238810>",
            "text/html": '<style>#T_3fa9c_row0 {}</style><table id="T_3fa9c"><td id="T_3fa9c_row0">1</td></table>'
                         '<table id="T_0b7e1">'}, execution_count=1)]
    nb.cells = [params, cell]
    scrub_notebook(nb)
    assert nb.metadata["papermill"] == {"parameters": {"params_path": "p.yaml"}}
    assert params["id"] == "injected-parameters-0" and "papermill" not in cell.metadata
    assert "execution" not in cell.metadata
    assert [o.get("name") for o in cell.outputs] == ["stdout", None] and "27.1 dB" in cell.outputs[0]["text"]
    data = cell.outputs[1]["data"]
    assert data["text/plain"] == "<pandas.io.formats.style.Styler at 0x?>"
    assert data["text/html"] == ('<style>#T_00000_row0 {}</style><table id="T_00000"><td id="T_00000_row0">1</td>'
                                 '</table><table id="T_00001">')


def _persisted_stage(tmp_path):
    (tmp_path / "code.py").write_text("v = 1\n")
    (tmp_path / "params.yaml").write_text("train:\n  seed: 0\n")
    stage = {"cmd": "python -m smt stage t", "deps": ["code.py"], "params": ["train.seed"],
             "outs": [{"runs/t": {"persist": True}}, "reports/t"]}
    return stage, {"train": {"seed": 0}}


def test_persisted_output_resumes_only_an_interrupted_run_of_the_same_inputs(tmp_path):
    from smt.stages import INPUTS_MARKER, _mark_finished, prepare_persisted_outputs

    stage, params = _persisted_stage(tmp_path)
    out = tmp_path / "runs/t"
    (outs := prepare_persisted_outputs(stage, params, tmp_path))
    assert outs == [out] and json.loads((out / INPUTS_MARKER).read_text())["finished"] is False
    (out / "state.pt").write_text("half-way")  # killed here
    prepare_persisted_outputs(stage, params, tmp_path)
    assert (out / "state.pt").read_text() == "half-way"  # same inputs, unfinished: resumed
    (tmp_path / "code.py").write_text("v = 2\n")  # the code changed while it was down
    prepare_persisted_outputs(stage, params, tmp_path)
    assert not (out / "state.pt").exists()  # not resumed with other inputs
    (out / "state.pt").write_text("done")
    _mark_finished(outs)
    prepare_persisted_outputs(stage, params, tmp_path)  # `dvc repro -f`: same inputs, but that run finished
    assert not (out / "state.pt").exists()
    (out / "state.pt").write_text("half-way")
    prepare_persisted_outputs(stage, {"train": {"seed": 1}}, tmp_path)  # a param changed
    assert not (out / "state.pt").exists()


def test_dvcignore_keeps_working_state_out_of_hashes():
    lines = (REPO / ".dvcignore").read_text().split()
    assert {"state.pt", ".smt_inputs.json", "__pycache__/"} <= set(lines)
    from smt.stages import INPUTS_MARKER

    assert INPUTS_MARKER in lines
    assert "/timings/" in (REPO / ".gitignore").read_text().split()

