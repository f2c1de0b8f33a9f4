"""Blocks offloaded to the host or to disk (offload.py): the same results bit for bit, where every
tensor is after each stage, the input model untouched, and resume on an offloaded model."""

import hashlib

import pytest
import torch

from fusegpt_core import pipeline
from fusegpt_core.adapters import get_blocks
from fusegpt_core.config import preset
from fusegpt_core.evaluate import perplexity
from fusegpt_core.export import export_model
from fusegpt_core.loading import load_model
from fusegpt_core.offload import BlockOffload, offload_of
from fusegpt_core.testing import sample_text, tiny_model, tiny_tokenizer

TEXT = "text:" + sample_text(30000)


def _recipe(method="fusegpt", **extra):
    return preset("tiny", remove=2, method=method, **{"data.calib_source": TEXT, "data.eval_source": TEXT, **extra})


def _digest(model) -> str:
    """A hash of every tensor's values (offloaded ones read from where they are stored)."""
    store = offload_of(model)
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict(keep_vars=True).items()):
        h.update(name.encode())
        h.update(store.host_copy(t).float().numpy().tobytes())
    return h.hexdigest()


def _block_slots(model):
    return [t for block in get_blocks(model) for t in [*block.parameters(), *block.buffers()]]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    out = {}
    for family in ("llama", "gpt2", "qwen2"):
        folder = tmp_path_factory.mktemp(family) / "model"
        tiny_model(family, num_layers=6).save_pretrained(folder)
        tiny_tokenizer().save_pretrained(folder)
        out[family] = folder
    return out


@pytest.mark.parametrize("family,method", [("llama", "fusegpt"), ("gpt2", "fusegpt"), ("qwen2", "drop+lora"),
                                           ("llama", "average")])  # fmt: skip
def test_results_are_identical_in_every_offload_mode(folders, family, method, tmp_path):
    results = {}
    for mode in ("none", "cpu", "disk"):
        loaded = load_model(str(folders[family]), device="cpu", dtype="float32", offload=mode)
        run = pipeline.run(_recipe(method), loaded=loaded, checkpoint_dir=tmp_path / mode)
        r = run.report
        assert r["offload"] == mode
        results[mode] = (
            r["dense_ppl"],
            r["dropped_ppl"],
            r["result_ppl"],
            tuple(r["removed_blocks"]),
            _digest(run.model),
        )
    assert results["cpu"] == results["none"] and results["disk"] == results["none"]


def test_disk_offload_keeps_blocks_off_memory_and_the_input_model_untouched(folders, tmp_path):
    loaded = load_model(str(folders["llama"]), device="cpu", dtype="float32", offload="disk", offload_folder=tmp_path)
    model = loaded.model
    store = offload_of(model)
    assert store.mode == "disk"
    # after loading: every block tensor is a placeholder read from the model's own files; the rest is real
    assert all(t.is_meta for t in _block_slots(model))
    assert not model.get_input_embeddings().weight.is_meta and not list(tmp_path.iterdir())  # nothing written
    block_bytes = sum(store.host_copy(t).numel() * 4 for t in _block_slots(model)) // len(get_blocks(model))

    # a forward onloads one block at a time and puts it back
    windows = torch.randint(0, 200, (4, 32))
    perplexity(model, windows)
    assert store.peak_resident_bytes <= block_bytes and not store._loaded
    assert all(t.is_meta for t in _block_slots(model))

    # a run: its group is resident while it trains, nothing is left on the device after it,
    # the blocks it changed went to the offload folder, and the input model is as it was
    before = _digest(model)
    seen = []
    original_hook = store.held

    def spy(blocks):
        blocks = list(blocks)
        seen.append(len(blocks))
        return original_hook(blocks)

    store.held = spy
    recipe = _recipe()
    run = pipeline.run(recipe, loaded=loaded)
    del store.held
    assert max(seen) == recipe.fusion.group_size  # a round holds its whole group, and never more
    assert not store._loaded and all(t.is_meta for t in _block_slots(model))
    assert all(t.is_meta for t in _block_slots(run.model))
    assert list(tmp_path.glob("part-*.safetensors"))
    assert _digest(model) == before


def test_export_and_resume_of_a_disk_offloaded_run(folders, tmp_path):
    plain = pipeline.run(_recipe(), loaded=load_model(str(folders["llama"]), device="cpu", dtype="float32"))
    loaded = load_model(str(folders["llama"]), device="cpu", dtype="float32", offload="disk")
    first = pipeline.run(_recipe(), loaded=loaded, checkpoint_dir=tmp_path / "run")
    # resuming after the last round restores every changed block from the checkpoint, onto disk
    again = pipeline.run(_recipe(), loaded=loaded, checkpoint_dir=tmp_path / "run", resume_run=True)
    assert again.report["result_ppl"] == first.report["result_ppl"] == plain.report["result_ppl"]
    assert _digest(again.model) == _digest(plain.model)
    export_model(plain.model, plain.tokenizer, tmp_path / "plain")
    export_model(again.model, again.tokenizer, tmp_path / "offloaded")
    # the offloaded export is sharded one block at a time; it loads to the same tensors
    assert len(list((tmp_path / "offloaded").glob("model-*-of-*.safetensors"))) == 4 + 1
    a = load_model(str(tmp_path / "plain"), device="cpu", dtype="float32").model.state_dict()
    b = load_model(str(tmp_path / "offloaded"), device="cpu", dtype="float32").model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_shared_tensor_is_stored_and_onloaded_once(tmp_path):
    model = tiny_model("llama", num_layers=3)
    blocks = get_blocks(model)
    shared = torch.nn.Parameter(torch.ones(8), requires_grad=False)
    for block in blocks[:2]:
        block.register_buffer("extra", shared, persistent=False)
    store = BlockOffload("disk", "cpu", tmp_path)
    store.attach(model)
    assert blocks[0].extra is blocks[1].extra and blocks[0].extra.is_meta
    with store.held(blocks[:2]):
        assert blocks[0].extra is blocks[1].extra and torch.equal(blocks[0].extra, torch.ones(8))
    assert blocks[0].extra.is_meta


def test_an_unknown_offload_mode_is_refused(folders):
    from fusegpt_core.errors import FuseGPTError

    with pytest.raises(FuseGPTError, match="offload"):
        load_model(str(folders["llama"]), device="cpu", offload="gpu")


def test_a_disk_offload_folder_of_its_own_goes_with_the_model():
    import gc

    model = tiny_model("llama", num_layers=2)
    store = BlockOffload("disk", "cpu")
    store.attach(model)
    folder = store.folder
    assert any(folder.glob("*.safetensors")), "nothing was offloaded: nothing was tested"
    del model, store  # nobody calls close(): a model the app or a test simply drops
    gc.collect()
    assert not folder.exists()


def test_a_device_map_spreads_the_model_through_accelerate_with_the_same_results(folders, tmp_path):
    """accelerate places the blocks where the map says (here on disk: a CPU-only machine has no second
    device, and transformers maps "auto" there to the CPU alone); perplexity and generation agree."""
    from fusegpt_core.evaluate import generate

    plain = load_model(str(folders["llama"]), device="cpu", dtype="float32")
    device_map = {"model.embed_tokens": "cpu", "model.layers": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu",
                  "lm_head": "cpu"}  # fmt: skip
    spread = load_model(str(folders["llama"]), dtype="float32", device_map=device_map, offload_folder=tmp_path)
    assert spread.model.hf_device_map["model.layers"] == "disk"
    assert spread.model.model.layers[0].self_attn.q_proj.weight.is_meta  # accelerate reads it per forward
    windows = torch.randint(0, 200, (4, 32))
    assert perplexity(spread.model, windows) == pytest.approx(perplexity(plain.model, windows), rel=1e-6)
    prompt = "Write one sentence about the sea."
    assert generate(spread.model, spread.tokenizer, prompt, 8) == generate(plain.model, plain.tokenizer, prompt, 8)


def test_scoring_streams_the_blocks_with_the_same_scores(folders):
    from fusegpt_core.importance import score_blocks

    windows = torch.randint(0, 200, (5, 32))
    plain = load_model(str(folders["llama"]), device="cpu", dtype="float32")
    disk = load_model(str(folders["llama"]), device="cpu", dtype="float32", offload="disk")
    store = offload_of(disk.model)
    reads = []
    store_read = store._read
    store._read = lambda key, device: reads.append(key) or store_read(key, device)
    metrics = ("mi", "bi", "ppl")
    assert score_blocks(disk.model, windows, metrics, batch_size=2) == score_blocks(
        plain.model, windows, metrics, batch_size=2
    )
    per_block = len(list(get_blocks(disk.model)[0].parameters()))
    # each block is read once per scoring batch (3 of 2 windows; not once per skip variant), once for
    # the capture's whole forward of the first window, and block 0 once per capture batch (2) after it
    assert len(reads) == 6 * per_block * 3 + 6 * per_block + 2 * per_block
    assert not store._loaded  # nothing left on the device


def test_fuse_offloads_to_disk_when_the_plan_says_the_device_is_short(folders, tmp_path, capsys):
    """`fuse --offload auto` (the default): a budget between the disk plan's peak and the no-offload
    one makes the run stream its blocks from disk, and the result is the one without offload."""
    import json

    import transformers

    from fusegpt_core.cli import main
    from fusegpt_core.memory import plan_memory

    folder = tmp_path / "wide"  # weights large next to the tiny preset's activations, as in a real model
    config = transformers.LlamaConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=6,
                                      num_attention_heads=4, vocab_size=259)  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    model = load_model(str(folder), device="cpu", dtype="float32").model
    recipe = preset("tiny", remove=2, **{"distill.checkpoint": True})  # the other knob, fixed
    cpu = torch.device("cpu")
    budget = plan_memory(model, recipe, cpu, torch.float32, device_budget=2**40, offload="disk").peak_device_bytes
    assert not plan_memory(model, recipe, cpu, torch.float32, device_budget=budget, offload="none").fits
    assert plan_memory(model, recipe, cpu, torch.float32, device_budget=budget, offload=None).offload == "disk"
    args = ["fuse", "--model", str(folder), "--preset", "tiny", "--remove", "2", "--device", "cpu", "--quiet",
            "--set", "distill.checkpoint=true", "--calib-text", "pydoc", "--eval-text", "pydoc"]  # fmt: skip
    assert main([*args, "--device-memory", str(budget), "--out", str(tmp_path / "auto")]) == 0
    assert main([*args, "--offload", "none", "--out", str(tmp_path / "plain")]) == 0
    assert "offload: blocks on the disk" in capsys.readouterr().err
    auto = json.loads((tmp_path / "auto" / "report.json").read_text())
    plain = json.loads((tmp_path / "plain" / "report.json").read_text())
    assert auto["offload"] == "disk" and plain["offload"] == "none"
    assert auto["result_ppl"] == plain["result_ppl"] and not (tmp_path / "auto" / "offload").exists()
