"""gpt.checkpoint: save/load round trips and every way a checkpoint directory can be wrong."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import tokenizers_bpe
from gpt import checkpoint
from gpt.model import GPT, GPTConfig
from tools.corpus import plays


@pytest.fixture(scope="module")
def text() -> str:
    return plays()[0].text()[:20000]


@pytest.fixture(scope="module")
def tokenizer(text):
    return tokenizers_bpe.train_from_iterator([text], 300, progress=False)


def make_model(tokenizer, **overrides) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig.from_preset("tiny", **{"vocab_size": tokenizer.n_vocab, "backend": "torch", **overrides})
    return GPT(config).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
    directory = tmp_path_factory.mktemp("ckpt") / "model"
    make_model(tokenizer).save_pretrained(directory, tokenizer=tokenizer, generation={"temperature": 0.8, "top_k": 40})
    return directory


@pytest.fixture
def copy(saved, tmp_path):
    """A private copy of the saved checkpoint, for a test to break."""
    return shutil.copytree(saved, tmp_path / "model")


def logits(model, tokenizer, text="To be, or not to be"):
    with torch.no_grad():
        return model(torch.tensor([tokenizer.encode(text)]))[0]


# --------------------------------------------------------------------------------------------- round trips


def test_round_trip(saved, tokenizer):
    model = GPT.from_pretrained(saved)
    assert sorted(p.name for p in saved.iterdir()) == ["config.json", "generation.json", "model.safetensors", "tokenizer.json"]
    torch.testing.assert_close(logits(model, tokenizer), logits(make_model(tokenizer), tokenizer), atol=0, rtol=0)
    assert model.tokenizer.fingerprint() == tokenizer.fingerprint()
    assert model.generation_config == {"temperature": 0.8, "top_k": 40}
    assert model.lm_head.weight is model.transformer.wte.weight
    assert not model.training
    meta = json.loads((saved / "config.json").read_text())
    assert meta["format_version"] == checkpoint.FORMAT_VERSION and meta["dtype"] == "float32"


@pytest.mark.parametrize("overrides", [{"pos_embedding": "rope"}, {"tie_embeddings": False, "bias": False}])
def test_round_trip_variants(tmp_path, tokenizer, overrides):
    model = make_model(tokenizer, **overrides)
    model.tokenizer = tokenizer  # save_pretrained falls back to model.tokenizer
    model.save_pretrained(tmp_path / "m")
    loaded = GPT.from_pretrained(tmp_path / "m")
    assert loaded.config == model.config
    torch.testing.assert_close(logits(loaded, tokenizer), logits(model, tokenizer), atol=0, rtol=0)
    assert loaded.generation_config == {} and not (tmp_path / "m" / "generation.json").exists()


def test_dtype_on_load_and_save(saved, tmp_path, tokenizer):
    model = GPT.from_pretrained(saved, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert logits(model, tokenizer).dtype == torch.float32
    model.save_pretrained(tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert GPT.from_pretrained(tmp_path / "bf16").transformer.wte.weight.dtype == torch.bfloat16


def test_backend_override_and_dtype_names(saved):
    assert GPT.from_pretrained(saved, backend="triton").config.backend == "triton"
    assert GPT.from_pretrained(saved, dtype="float16").lm_head.weight.dtype == torch.float16
    with pytest.raises(ValueError, match="dtype must be one of float32"):
        GPT.from_pretrained(saved, dtype="fp8")
    with pytest.raises(ValueError, match="backend must be one of"):
        GPT.from_pretrained(saved, backend="cuda")


def test_write_checkpoint_keeps_other_files(tmp_path, tokenizer):
    (tmp_path / "trainer_state.json").write_text("{}")
    checkpoint.write_checkpoint(tmp_path, make_model(tokenizer), tokenizer)
    assert (tmp_path / "trainer_state.json").exists()
    GPT.from_pretrained(tmp_path)


def test_failed_save_leaves_existing_checkpoint_untouched(copy, tokenizer, text):
    before = {p.name: p.read_bytes() for p in copy.iterdir()}
    other = tokenizers_bpe.train_from_iterator([text], 320, progress=False)
    with pytest.raises(ValueError, match="320 tokens .* vocab_size is 300"):
        make_model(tokenizer).save_pretrained(copy, tokenizer=other)
    assert {p.name: p.read_bytes() for p in copy.iterdir()} == before
    assert [p.name for p in copy.parent.iterdir()] == ["model"]  # no temp directory left behind


def test_save_needs_a_tokenizer(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="needs its tokenizer"):
        make_model(tokenizer).save_pretrained(tmp_path / "m")


# --------------------------------------------------------------------------------------------- bad input


def edit_config(directory, edit):
    meta = json.loads((directory / "config.json").read_text())
    edit(meta)
    (directory / "config.json").write_text(json.dumps(meta))


def edit_weights(directory, edit):
    state = load_file(directory / "model.safetensors")
    edit(state)
    save_file(state, directory / "model.safetensors")


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "tokenizer.json"])
def test_missing_file(copy, name):
    (copy / name).unlink()
    with pytest.raises(checkpoint.CheckpointError, match=f"{name}: file not found"):
        GPT.from_pretrained(copy)


def test_missing_directory(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="no such checkpoint directory"):
        GPT.from_pretrained(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(checkpoint.CheckpointError, match="is a file, not a checkpoint directory"):
        GPT.from_pretrained(tmp_path / "file")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(checkpoint.CheckpointError, match="symbolic link loop"):
        GPT.from_pretrained(tmp_path / "loop")


@pytest.mark.parametrize("name", ["model.safetensors", "tokenizer.json"])
def test_a_checkpoint_file_that_is_not_a_file_is_named_for_what_it_is(saved, tmp_path, name):
    """A FIFO (which would block a reader), a device or a directory where a checkpoint file belongs."""
    for kind, make in (("FIFO", os.mkfifo), ("device", lambda p: p.symlink_to("/dev/zero")), ("directory", os.mkdir)):
        copy = tmp_path / kind
        shutil.copytree(saved, copy)
        (copy / name).unlink()
        make(copy / name)
        with pytest.raises(checkpoint.CheckpointError, match=f"{name}: is a {kind}.*needs {name}"):
            GPT.from_pretrained(copy)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m.update(format_version=2), "unknown format_version 2"),
        (lambda m: m.pop("format"), "not a gpt-checkpoint config"),
        (lambda m: m["model"].update(n_head=5), "divisible by n_head"),
        (lambda m: m["model"].update(heads=4), "unknown key"),
        (lambda m: m["model"].pop("n_layer"), "lacks n_layer"),
        (lambda m: m.update(dtype="int8"), "dtype must be one of"),
        (lambda m: m["tokenizer"].update(n_vocab=10**12), "records 1,000,000,000,000 tokens but the model.s vocab_size"),
        (lambda m: m["tokenizer"].update(n_vocab=True), "must record n_vocab and fingerprint"),
    ],
)
def test_bad_config(copy, edit, message):
    edit_config(copy, edit)
    with pytest.raises(checkpoint.CheckpointError, match=message):
        GPT.from_pretrained(copy)


def test_config_not_json(copy):
    (copy / "config.json").write_text("{not json")
    with pytest.raises(checkpoint.CheckpointError, match="not valid JSON"):
        GPT.from_pretrained(copy)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.update({"transformer.wpe.weight": torch.zeros(64, 64)}), r"transformer.wpe.weight has shape \[64, 64\], but the config implies \[128, 64\]"),
        (lambda s: s.pop("transformer.h.1.mlp.c_fc.bias"), "missing tensor.*transformer.h.1.mlp.c_fc.bias"),
        (lambda s: s.update({"extra.weight": torch.zeros(1)}), "unexpected tensor.*extra.weight"),
        (lambda s: s.update({"transformer.ln_f.bias": s["transformer.ln_f.bias"].half()}), "ln_f.bias has dtype float16, but config.json records float32"),
    ],
)
def test_bad_weights(copy, edit, message):
    edit_weights(copy, edit)
    with pytest.raises(checkpoint.CheckpointError, match=message):
        GPT.from_pretrained(copy)


def test_corrupt_weights(copy):
    (copy / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(checkpoint.CheckpointError, match="not a readable safetensors file"):
        GPT.from_pretrained(copy)


def test_tokenizer_vocab_mismatch_names_both_sizes(copy, text):
    tokenizers_bpe.train_from_iterator([text], 320, progress=False).save(copy / "tokenizer.json")
    with pytest.raises(checkpoint.CheckpointError, match="has 320 tokens but the model's vocab_size is 300"):
        GPT.from_pretrained(copy)


def test_swapped_tokenizer_of_the_same_size(copy, text):
    tokenizers_bpe.train_from_iterator([text[::-1]], 300, progress=False).save(copy / "tokenizer.json")
    with pytest.raises(checkpoint.CheckpointError, match="not the tokenizer this model was saved with"):
        GPT.from_pretrained(copy)


def test_generation_json_must_be_an_object(copy):
    (copy / "generation.json").write_text("[1, 2]")
    with pytest.raises(checkpoint.CheckpointError, match="generation.json: must be a JSON object"):
        GPT.from_pretrained(copy)
