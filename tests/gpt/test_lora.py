"""LoRA adapters: training only the adapters, merge equality, the checkpoint format and merge-lora."""

from __future__ import annotations

import json
import string

import pytest
import torch
from safetensors.torch import load_file

from gpt.checkpoint import CheckpointError
from gpt.lora import LoRAConfig, LoRALinear, apply_lora, lora_layers, merge_lora
from gpt.model import GPT, GPTConfig
from tokenizers_bpe import CharTokenizer, SettingError
from tools.cli import error_message
from tools.convert import main as convert_main
from tools.convert import merge_checkpoint


def tiny_gpt(seed=0, **overrides):
    tok = CharTokenizer.from_texts([string.printable], special_tokens=["<|endoftext|>"])
    torch.manual_seed(seed)
    config = dict(vocab_size=tok.n_vocab, n_ctx=32, n_embd=32, n_layer=2, n_head=2, backend="torch")
    model = GPT(GPTConfig(**{**config, **overrides}))
    model.tokenizer = tok
    return model


def randomize_adapters(model, seed=1):
    """B starts at zero (an adapted model equals its base); give it values so merging matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)


IDX = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(5))


def test_adapted_model_starts_equal_and_trains_only_adapters():
    model = tiny_gpt()
    reference = model(IDX)[0]
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=("attn", "mlp")))
    names = [n for n, _ in lora_layers(model)]
    assert names == [f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    torch.testing.assert_close(model(IDX)[0], reference, rtol=0, atol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}" for n in names for ab in "AB"}
    _, loss = model(IDX, targets=IDX)
    loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if not n.endswith(("lora_A", "lora_B")))
    assert all(p.grad is not None for n, p in model.named_parameters() if n.endswith("lora_B"))


def test_targets_select_layers():
    model = apply_lora(tiny_gpt(), LoRAConfig(rank=2, targets=("mlp",)))
    assert [n for n, _ in lora_layers(model)] == [f"transformer.h.{i}.mlp.{m}" for i in range(2) for m in ("c_fc", "c_proj")]
    assert isinstance(model.transformer.h[0].mlp.c_fc, LoRALinear) and not isinstance(model.transformer.h[0].attn.c_attn, LoRALinear)


def test_merged_and_unmerged_logits_are_equal():
    model = apply_lora(tiny_gpt(), LoRAConfig(rank=4, alpha=16, targets=("attn", "mlp")))
    randomize_adapters(model)
    unmerged = model(IDX)[0]
    weight = model.transformer.h[0].attn.c_attn.weight.detach().clone()
    for _, layer in lora_layers(model):
        layer.merge()
    assert not torch.equal(model.transformer.h[0].attn.c_attn.weight, weight)
    torch.testing.assert_close(model(IDX)[0], unmerged, rtol=1e-5, atol=1e-5)
    for _, layer in lora_layers(model):
        layer.unmerge()
    torch.testing.assert_close(model.transformer.h[0].attn.c_attn.weight, weight, rtol=0, atol=1e-6)
    plain = merge_lora(model)
    assert not lora_layers(plain) and type(plain.transformer.h[0].attn.c_attn) is torch.nn.Linear
    torch.testing.assert_close(plain(IDX)[0], unmerged, rtol=1e-5, atol=1e-5)


def test_checkpoint_stores_adapters_apart_and_merge_lora_command(tmp_path):
    base = tiny_gpt()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    model = apply_lora(base, LoRAConfig(rank=3, alpha=6, targets=("attn",)))
    randomize_adapters(model)
    expected = model(IDX)[0]
    model.save_pretrained(tmp_path / "lora")

    config = json.loads((tmp_path / "lora" / "config.json").read_text())
    assert config["lora"] == {"rank": 3, "alpha": 6.0, "targets": ["attn"]}
    weights = load_file(str(tmp_path / "lora" / "model.safetensors"))
    assert all(torch.equal(weights[k], base_state[k]) for k in weights)  # the base weights, untouched
    adapters = load_file(str(tmp_path / "lora" / "adapters.safetensors"))
    assert sorted(adapters) == sorted(f"transformer.h.{i}.attn.{m}.lora_{ab}" for i in range(2) for m in ("c_attn", "c_proj") for ab in "AB")

    loaded = GPT.from_pretrained(tmp_path / "lora")
    assert loaded.lora_config == LoRAConfig(rank=3, alpha=6, targets=("attn",))
    torch.testing.assert_close(loaded(IDX)[0], expected, rtol=0, atol=0)

    assert convert_main(["merge-lora", str(tmp_path / "lora"), str(tmp_path / "merged")]) == 0
    assert not (tmp_path / "merged" / "adapters.safetensors").exists()
    assert "lora" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    merged = GPT.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(merged(IDX)[0], expected, rtol=1e-5, atol=1e-5)


def test_merge_lora_bad_inputs(tmp_path, capsys):
    tiny_gpt().save_pretrained(tmp_path / "plain")
    assert convert_main(["merge-lora", str(tmp_path / "plain"), str(tmp_path / "out")]) == 2
    assert "has no LoRA adapters" in capsys.readouterr().err
    with pytest.raises(ValueError, match="nothing to merge"):
        merge_checkpoint(tmp_path / "plain", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_lora_checkpoints_are_rejected(tmp_path):
    model = apply_lora(tiny_gpt(), LoRAConfig(rank=2))
    model.save_pretrained(tmp_path / "ok")
    config_path = tmp_path / "ok" / "config.json"
    config = json.loads(config_path.read_text())

    config_path.write_text(json.dumps({**config, "lora": {"rank": 0, "alpha": 1.0, "targets": ["attn"]}}))
    with pytest.raises(CheckpointError, match="lora-rank must be an integer in \[1, 65536\]"):
        GPT.from_pretrained(tmp_path / "ok")
    config_path.write_text(json.dumps({**config, "lora": {**config["lora"], "rank": 4}}))  # adapters have rank 2
    with pytest.raises(CheckpointError, match="adapters.safetensors: tensor .* has shape"):
        GPT.from_pretrained(tmp_path / "ok")
    config_path.write_text(json.dumps(config))
    (tmp_path / "ok" / "adapters.safetensors").unlink()
    with pytest.raises(CheckpointError, match="adapters.safetensors: file not found"):
        GPT.from_pretrained(tmp_path / "ok")


@pytest.mark.parametrize("kwargs, message", [
    (dict(rank=0), "--lora-rank must be an integer in [1, 65536]"),
    (dict(alpha=-1.0), "--lora-alpha must be > 0"),
    (dict(targets=("attn", "ffn")), "--lora-targets must be a comma-separated subset of attn,mlp"),
    (dict(targets=()), "--lora-targets must be"),
])
def test_lora_config_validation(kwargs, message):
    # A SettingError naming the setting; the command layer shows it as gpt-finetune's flag.
    with pytest.raises(SettingError) as caught:
        LoRAConfig(**kwargs)
    assert caught.value.setting.startswith("lora_") and message in error_message(caught.value)


def test_applying_twice_is_an_error():
    model = apply_lora(tiny_gpt(), LoRAConfig(rank=2))
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        apply_lora(model, LoRAConfig(rank=2))
