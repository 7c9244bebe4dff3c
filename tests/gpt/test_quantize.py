"""gpt.quantize: which layers become int8 (embeddings and LayerNorms untouched, the head optional), the
int8 layer's arithmetic, logits close to fp32, dtype casts that keep the scales in fp32, a quantized
model refused by save_pretrained, and int8 decoding eager (the default where the CPU kernel runs),
dequantising and compiled."""

from __future__ import annotations

import copy

import pytest
import torch

from gpt.checkpoint import CheckpointError
from gpt.lora import LoRAConfig, apply_lora, lora_layers
from gpt.quantize import Int8Linear, quantize
from gpt.sampling import compiles_by_default, generate
import gpt2_kernels
from gpt2_kernels import cpu_linear, quantize_int8
from tests.gpt.test_sampling import make_tiny_model, small_tokenizer
from tokenizers_bpe import SettingError


@pytest.fixture(scope="module")
def tok():
    return small_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return make_tiny_model(tok, n_ctx=32, std=0.05)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def logits(model, idx):
    with torch.no_grad():
        return model(idx)[0]


IDX = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("head", [True, False])
def test_which_layers_are_quantized(model, head):
    q = quantize(copy.deepcopy(model), "int8", head=head)
    assert q.quantization == {"method": "int8", "head": head}
    for block in q.transformer.h:
        assert all(isinstance(m, Int8Linear) for m in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj))
        assert block.ln_1.weight.dtype == torch.float32
    assert isinstance(q.lm_head, Int8Linear) == head
    assert q.transformer.wte.weight.dtype == torch.float32  # the embedding lookup stays in full precision
    torch.testing.assert_close(q.transformer.wte.weight, model.transformer.wte.weight, rtol=0, atol=0)
    if not head:
        assert q.lm_head.weight is q.transformer.wte.weight  # still tied


def test_int8_layer_is_the_dequantized_product(model):
    linear = model.transformer.h[0].mlp.c_fc
    layer = Int8Linear.from_weight(linear.weight, linear.bias, backend="torch")
    w8, scale = quantize_int8(linear.weight)
    assert torch.equal(layer.weight_int8, w8) and torch.equal(layer.scale, scale)
    x = torch.randn(3, linear.in_features)
    expected = x.double() @ (w8.double() * scale.double()[:, None]).T + linear.bias.double()
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.weight, w8.float() * scale[:, None])


def test_logits_stay_close_to_fp32(model):
    reference = logits(model, IDX)
    for head in (False, True):
        error = relative_error(logits(quantize(copy.deepcopy(model), "int8", head=head), IDX), reference)
        assert 0 < error < 0.025, (head, error)


def block_linears(model):
    return [lin for b in model.transformer.h for lin in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj)]


def test_scales_are_per_output_channel(model):
    """Rows whose ranges differ by 100x (as trained weights' do): per-channel scales keep every row's
    precision and the bound above; one scale per matrix, rounded the same way, does not."""
    wide = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for lin in block_linears(wide):
            lin.weight.mul_(torch.logspace(-1.5, 0.5, lin.out_features)[torch.randperm(lin.out_features, generator=g)][:, None])
    reference = logits(wide, IDX)
    assert relative_error(logits(quantize(copy.deepcopy(wide), "int8", head=False), IDX), reference) < 0.025
    per_tensor = copy.deepcopy(wide)
    with torch.no_grad():
        for lin in block_linears(per_tensor):
            step = lin.weight.abs().max() / 127
            lin.weight.copy_(torch.round(lin.weight / step) * step)
    assert relative_error(logits(per_tensor, IDX), reference) > 0.025


def test_casts_keep_the_scales_fp32(model):
    q = quantize(copy.deepcopy(model), "int8").to(torch.bfloat16)
    layer = q.transformer.h[0].attn.c_attn
    assert layer.scale.dtype == torch.float32 and layer.weight_int8.dtype == torch.int8
    assert layer.bias.dtype == torch.bfloat16 and layer.dtype == torch.bfloat16 and layer.weight.dtype == torch.bfloat16
    out = generate(q, [1, 2, 3], 5, temperature=0, stop_tokens=(), compile=False)
    assert len(out[0]) == 5


def test_loss_through_the_dequantized_head(model):
    """The training-style forward (fused loss on lm_head.weight) works on a quantized model."""
    q = quantize(copy.deepcopy(model), "int8")
    with torch.no_grad():
        _, loss = q(IDX[:, :-1], targets=IDX[:, 1:])
        full, _ = q(IDX[:, :-1])
    expected = torch.nn.functional.cross_entropy(full.reshape(-1, full.shape[-1]), IDX[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-4)


def test_lora_is_folded_in(tok):
    adapted = make_tiny_model(tok, n_ctx=32, std=0.05)
    apply_lora(adapted, LoRAConfig(rank=4, targets=("mlp",)))
    with torch.no_grad():
        for _, layer in lora_layers(adapted):
            layer.lora_B.normal_(0.0, 0.05)
    reference = logits(adapted, IDX)
    assert relative_error(logits(quantize(copy.deepcopy(adapted), "int8"), IDX), reference) < 0.03


def test_refusals(model, tmp_path):
    q = quantize(copy.deepcopy(model), "int8")
    with pytest.raises(CheckpointError, match="quantized model cannot be saved"):
        q.save_pretrained(tmp_path / "q")
    assert not (tmp_path / "q").exists()
    with pytest.raises(ValueError, match="already quantized"):
        quantize(q, "int8")
    with pytest.raises(SettingError, match="quantize must be one of int8"):
        quantize(copy.deepcopy(model), "int4")


def test_int8_decoding_is_eager_by_default_where_the_cpu_kernel_runs(model, monkeypatch):
    """With gpt2_kernels' C kernel, eager int8 is the fast CPU path and nothing is compiled by default;
    without it (no compiler, no AVX2) int8 on a CPU compiles, and both give the same greedy text."""
    q = quantize(copy.deepcopy(model), "int8")
    assert compiles_by_default(q) == (not gpt2_kernels.cpu_linear_available()) and not compiles_by_default(model)
    prompt = [5, 6, 7, 8]
    eager = generate(q, prompt, 30, temperature=0, stop_tokens=(), compile=False)
    assert generate(q, prompt, 30, temperature=0, stop_tokens=(), compile=True) == eager  # the streaming path
    monkeypatch.setattr(gpt2_kernels, "cpu_linear_available", lambda: False)
    monkeypatch.setattr(cpu_linear, "available", lambda: False)  # what int8_linear asks
    assert compiles_by_default(q)
    assert generate(q, prompt, 30, temperature=0, stop_tokens=(), compile=False) == eager  # dequantising
    fp32 = generate(model, prompt, 30, temperature=0, stop_tokens=())
    assert sum(a == b for a, b in zip(eager[0], fp32[0])) >= 10  # close to the fp32 model's choices
