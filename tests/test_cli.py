import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from fusegpt_core.cli import main
from fusegpt_core.testing import sample_text

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text("\n\n".join(sample_text(3000, seed=s) for s in range(8)))
    return path


def test_importance_json_contract(tiny_dir, text_file, tmp_path):
    out = tmp_path / "mi.json"
    args = ["importance", "--model", str(tiny_dir), "--eval-text", str(text_file), "--json", str(out)]
    assert main([*args, "--seq-len", "64", "--windows", "2", "--quiet"]) == 0
    data = json.loads(out.read_text())
    assert data["metric"] == "mi" and len(data["scores"]) == 6
    assert all(isinstance(s, float) for s in data["scores"])
    ref = tmp_path / "ref.json"
    args = ["importance", "--model", str(tiny_dir), "--eval-text", str(text_file), "--json", str(ref), "--no-cache"]
    assert main([*args, "--seq-len", "64", "--windows", "2", "--quiet"]) == 0
    assert json.loads(ref.read_text())["scores"] == data["scores"]


def test_fuse_writes_report_and_loadable_model(tiny_dir, text_file, tmp_path):
    out = tmp_path / "run"
    code = main(
        ["fuse", "--model", str(tiny_dir), "--remove", "2", "--preset", "tiny", "--set", "data.n_eval=2"]
        + ["--calib-text", str(text_file), "--eval-text", str(text_file), "--out", str(out), "--quiet"]
    )
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    for key in ("dense_ppl", "dropped_ppl", "result_ppl", "removed_blocks", "num_layers_before", "num_layers_after"):
        assert key in report
    assert report["num_layers_before"] == 6 and report["num_layers_after"] == 4
    assert set(report["seconds"]) >= {"score", "fuse", "finetune", "evaluate", "export"}
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.config.num_hidden_layers == 4
    assert torch.isfinite(model(torch.tensor([[3, 4, 5]])).logits).all()
    # the report reproduces the run
    again = tmp_path / "again"
    assert main(["fuse", "--recipe", str(out / "report.json"), "--out", str(again), "--quiet"]) == 0
    assert json.loads((again / "report.json").read_text())["result_ppl"] == pytest.approx(report["result_ppl"])
    # an existing export is never overwritten silently
    assert main(["fuse", "--recipe", str(out / "report.json"), "--out", str(out), "--quiet"]) == 2


@pytest.mark.parametrize(
    "argv, message",
    [
        (["fuse", "--model", "/no/such/folder", "--out", "{tmp}/x"], "error:"),
        (["fuse", "--model", "{tiny}", "--blocks", "1,1", "--preset", "tiny", "--out", "{tmp}/x"], "more than once"),
        (["fuse", "--model", "{tiny}", "--blocks", "a,b", "--out", "{tmp}/x"], "--blocks"),
        (["fuse", "--model", "{tiny}", "--set", "distill.epochs=0", "--out", "{tmp}/x"], "distill.epochs"),
        (
            ["fuse", "--model", "{tiny}", "--preset", "tiny", "--calib-text", "{tmp}/none.txt", "--out", "{tmp}/x"],
            "error:",
        ),
        (["importance", "--model", "{tiny}", "--metric", "xyz"], "unknown metric"),
    ],
)
def test_user_mistakes_are_one_line_no_traceback(argv, message, tiny_dir, tmp_path):
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{tiny}", str(tiny_dir)) for a in argv]
    proc = subprocess.run(
        [sys.executable, "-m", "fusegpt_core", *argv, "--quiet"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert message in proc.stderr
    assert not (tmp_path / "x").exists()
