"""The memory plan: per-stage figures from shapes alone, and the up-front refusal when it cannot fit."""

import json

import pytest
import torch

from fusegpt_core.cli import main
from fusegpt_core.config import preset
from fusegpt_core.memory import parse_bytes, plan_memory, skeleton
from fusegpt_core.testing import tiny_model


def test_sizes_are_read_as_people_write_them():
    assert parse_bytes("24GiB") == 24 * 2**30
    assert parse_bytes("80GB") == 80 * 10**9
    assert parse_bytes("512 MiB") == 512 * 2**20
    assert parse_bytes("1000") == 1000
    with pytest.raises(ValueError):
        parse_bytes("lots")


def test_a_skeleton_plans_like_the_real_model_and_the_peak_is_the_worst_stage():
    model = tiny_model("llama", 6)
    recipe = preset("tiny", remove=2)
    real = plan_memory(model, recipe, torch.device("cpu"), torch.float32)
    meta = plan_memory(skeleton(model.config), recipe, torch.device("cpu"), torch.float32)
    assert real.to_dict() == meta.to_dict()
    assert real.peak_host_bytes == max(s.host_bytes for s in real.stages)
    assert real.weight_bytes == sum(p.numel() * 4 for p in model.parameters())
    assert [s.name for s in real.stages] == ["load", "evaluate", "score", "finetune", "fold", "evaluate result"]
    for stage in real.stages:
        assert stage.host_bytes == sum(stage.holds.values())  # CPU: one memory, every part listed


def test_a_gpu_plan_keeps_calibration_states_on_the_host_and_bf16_halves_the_weights():
    model = tiny_model("llama", 6)
    recipe = preset("tiny", remove=2, **{"data.n_calib": 64})
    gpu = plan_memory(model, recipe, torch.device("cuda"), torch.bfloat16)
    cpu = plan_memory(model, recipe, torch.device("cpu"), torch.float32)
    finetune = next(s for s in gpu.stages if s.name == "finetune")
    states = 64 * 64 * model.config.hidden_size * 2
    assert finetune.host_bytes >= 3 * states and "block inputs" in finetune.holds
    assert finetune.device_bytes + finetune.host_bytes == sum(finetune.holds.values())  # two memories
    assert gpu.weight_bytes * 2 == cpu.weight_bytes


def test_checkpointing_turns_on_only_when_the_device_is_short():
    model = tiny_model("llama", 6)
    recipe = preset("tiny", remove=2, **{"data.n_calib": 64, "distill.batch_size": 16})
    roomy = plan_memory(model, recipe, torch.device("cuda"), torch.bfloat16, device_budget=2**40)
    need = next(s for s in roomy.stages if s.name == "finetune").device_bytes
    short = plan_memory(model, recipe, torch.device("cuda"), torch.bfloat16, device_budget=need - 1)
    assert not roomy.checkpoint and short.checkpoint
    after = next(s for s in short.stages if s.name == "finetune").device_bytes
    assert after < need
    forced = plan_memory(model, preset("tiny", **{"distill.checkpoint": False}), torch.device("cuda"),
                         torch.bfloat16, device_budget=1)  # fmt: skip
    assert not forced.checkpoint and not forced.fits and "GiB" in forced.advice


def test_plan_command_writes_the_figures(tiny_dir, tmp_path):
    out = tmp_path / "plan.json"
    assert main(["plan", "--model", str(tiny_dir), "--preset", "tiny", "--device-memory", "24GiB",
                 "--device", "cpu", "--json", str(out), "--quiet"]) == 0  # fmt: skip
    plan = json.loads(out.read_text())
    assert {"peak_device_bytes", "peak_host_bytes", "offload", "stages"} <= set(plan)
    assert plan["offload"] == "none" and plan["fits"] and plan["device_budget"] == 24 * 2**30
    assert plan["peak_device_bytes"] == max(s["device_bytes"] for s in plan["stages"])


def test_fuse_refuses_up_front_when_the_plan_does_not_fit(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["fuse", "--model", str(tiny_dir), "--preset", "tiny", "--device-memory", "1MiB", "--device", "cpu",
                 "--out", str(out), "--quiet"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "GiB" in err and "try" in err and "Nothing was run" in err
    assert not out.exists()


def test_the_plan_offloads_blocks_only_when_the_device_is_short():
    """The paper preset on a Llama-2-7B-shaped skeleton in bf16: a 24 GiB GPU is short with every block
    on it, so the plan keeps the blocks in host RAM (the host has room), or on disk when the host has
    room for the calibration states but not for the blocks too."""
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_hidden_layers=32,
                         vocab_size=32000)  # fmt: skip
    model = skeleton(config)
    recipe = preset("paper")
    gpu, bf16, gib = torch.device("cuda"), torch.bfloat16, 2**30
    roomy = plan_memory(model, recipe, gpu, bf16, device_budget=80 * gib, host_budget=1024 * gib, offload=None)
    assert roomy.offload == "none" and roomy.fits
    small = plan_memory(model, recipe, gpu, bf16, device_budget=24 * gib, host_budget=1024 * gib, offload=None)
    assert small.offload == "cpu" and small.fits and small.peak_device_bytes < small.weight_bytes
    tight = plan_memory(model, recipe, gpu, bf16, device_budget=24 * gib, host_budget=small.peak_host_bytes - 1,
                        offload=None)  # fmt: skip
    assert tight.offload == "disk" and tight.fits
    assert tight.peak_host_bytes + small.weight_bytes // 2 < small.peak_host_bytes  # no blocks on the host
    forced = plan_memory(model, recipe, gpu, bf16, device_budget=24 * gib, host_budget=1024 * gib, offload="none")
    assert not forced.fits and "--offload" in forced.advice
