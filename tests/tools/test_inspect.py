"""gpt-inspect: the report, and exit status 1 for a failed check, 2 for an unreadable checkpoint."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import tokenizers_bpe
from gpt.model import GPT, GPTConfig
from tests.gpt.test_checkpoint import text, tokenizer  # noqa: F401 (shared fixtures: a 300-token BPE)
from tools.inspect_checkpoint import main


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    return GPT(GPTConfig.from_preset("tiny", vocab_size=tokenizer.n_vocab))


@pytest.fixture
def ckpt(model, tokenizer, tmp_path):
    model.save_pretrained(tmp_path / "model", tokenizer=tokenizer, generation={"temperature": 0.7})
    return tmp_path / "model"


def inspect(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_report(ckpt, model, capsys):
    rc, out, err = inspect(capsys, ckpt)
    assert rc == 0, out + err
    assert f"{model.num_parameters():,} total, {model.num_parameters(non_embedding=True):,} non-embedding" in out
    assert "n_layer=2" in out and "vocab_size=300" in out
    assert re.search(r"dtype\s+float32", out)
    assert re.search(r"size\s+\d+\.\d KB on disk \(config.json", out)
    assert "300 tokens, specials: <|endoftext|>=299" in out
    assert "generation.json: temperature=0.7" in out
    assert "FAIL" not in out and out.count("  ok  ") == 4 and "ok    values: every weight finite" in out


def test_vocab_mismatch_fails_check(ckpt, capsys, text):
    tokenizers_bpe.train_from_iterator([text], 320, progress=False).save(ckpt / "tokenizer.json")
    rc, out, err = inspect(capsys, ckpt)
    assert rc == 1
    assert "FAIL  tokenizer:" in out and "has 320 tokens but the model's vocab_size is 300" in out
    assert "1 check(s) failed" in err
    assert "  ok    weights" in out  # the other checks still run


def test_wrong_shape_fails_check(ckpt, capsys):
    state = load_file(ckpt / "model.safetensors")
    state["transformer.h.0.attn.c_attn.weight"] = state["transformer.h.0.attn.c_attn.weight"][:10]
    save_file(state, ckpt / "model.safetensors")
    rc, out, _ = inspect(capsys, ckpt)
    assert rc == 1 and "FAIL  weights:" in out and "transformer.h.0.attn.c_attn.weight has shape [10, 64]" in out


def test_non_finite_weights_fail_the_values_check(ckpt, capsys):
    state = load_file(ckpt / "model.safetensors")
    state["transformer.h.1.mlp.c_fc.weight"][3, 4] = float("nan")
    state["transformer.ln_f.bias"][0] = float("-inf")
    save_file(state, ckpt / "model.safetensors")
    rc, out, err = inspect(capsys, ckpt)
    assert rc == 1 and "1 check(s) failed" in err
    assert "FAIL  values: NaN or inf in 2 tensor(s)" in out and "transformer.h.1.mlp.c_fc.weight" in out


@pytest.mark.parametrize("name", ["model.safetensors", "tokenizer.json"])
def test_missing_file_fails_check(ckpt, capsys, name):
    (ckpt / name).unlink()
    rc, out, _ = inspect(capsys, ckpt)
    assert rc == 1 and f"{name}: file not found" in out


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda d: shutil.rmtree(d), "no such checkpoint directory"),
        (lambda d: (d / "config.json").unlink(), "config.json: file not found"),
        (lambda d: (d / "config.json").write_text(json.dumps({**json.loads((d / "config.json").read_text()), "format_version": 7})), "unknown format_version 7"),
    ],
)
def test_unreadable_checkpoint_is_a_usage_error(ckpt, capsys, breakage, message):
    breakage(ckpt)
    rc, out, err = inspect(capsys, ckpt)
    assert rc == 2 and out == ""
    assert err.startswith("gpt-inspect: error: ") and err.count("\n") == 1 and message in err


def test_usage(capsys):
    assert main(["--help"]) == 0
    assert "checkpoint directory" in capsys.readouterr().out
    rc, _, err = inspect(capsys)
    assert rc == 2 and "required: DIR" in err


def test_lora_checkpoint(tmp_path, tokenizer, capsys):
    from gpt.lora import LoRAConfig, apply_lora

    model = apply_lora(GPT(GPTConfig.from_preset("tiny", vocab_size=300)), LoRAConfig(rank=2, targets=("attn",)))
    model.save_pretrained(tmp_path / "lora", tokenizer=tokenizer)
    rc, out, _ = inspect(capsys, tmp_path / "lora")
    assert rc == 0 and "lora         rank=2 alpha=16.0 targets=['attn'] (adapters in adapters.safetensors)" in out


@pytest.mark.parametrize("edit, words", [
    (None, None),
    (lambda meta: meta.update(format_version="x" * 10_000), "unknown format_version"),
    (lambda meta: meta.update(labels=["a"]), "at least two distinct strings"),
    (lambda meta: meta.update(max_length=0), "positive integer"),
    (lambda meta: meta.update(labels=["a", "b" * 100_000]), "names of at most 256"),
    (lambda meta: meta.update(labels=[f"L{i}" for i in range(100_000)]), "at most 1,024 names"),
    (lambda meta: meta.update(labels=["a", "\udce9"]), "characters of text"),
    (lambda meta: meta.update(labels=["a", "b", "c"]), "for 3 labels"),  # the head was saved for two
])
def test_a_classifier_is_checked_as_gpt_classify_reads_it(model, tokenizer, tmp_path, capsys, edit, words):
    """gpt-inspect said "ok" for a classifier.json that gpt-classify refuses."""
    from gpt.classifier import CLASSIFIER_FILE, GPTClassifier, load_classifier, save_classifier

    (tmp_path / "cls").mkdir()
    save_classifier(GPTClassifier(model, ["neg", "pos"]), tmp_path / "cls", tokenizer, max_length=32)
    if edit is not None:
        meta = json.loads((tmp_path / "cls" / CLASSIFIER_FILE).read_text())
        edit(meta)
        (tmp_path / "cls" / CLASSIFIER_FILE).write_text(json.dumps(meta))
    rc, out, _ = inspect(capsys, tmp_path / "cls")
    if words is None:
        assert rc == 0 and "ok    classifier: 2 labels, max_length 32" in out
        return
    line = next(line for line in out.splitlines() if "classifier:" in line)
    assert rc == 1 and line.startswith("  FAIL  classifier") and words in line and len(line) < 300
    with pytest.raises(ValueError, match=words):  # the same verdict as gpt-classify's loader
        load_classifier(tmp_path / "cls")
