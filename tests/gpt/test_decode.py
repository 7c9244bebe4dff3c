"""gpt.decode, the fast path of generate: its logits equal the model's own forward (every position
embedding, bias, tied or not, LoRA), the static cache (prefill, step, extend, rewind, full), the
inference weights (a huge-page arena on the CPU, a fallback without one, cached and refreshed, never in
a checkpoint), and the compiled step and prefill: one graph for every position, prompt and call, the
same greedy tokens as eager decoding and transformers, the sliding window."""

from __future__ import annotations

import mmap

import pytest
import torch
import torch._dynamo.utils

import gpt.arena
from gpt.arena import Arena, thp_mode
from gpt.decode import Decoder, inference_weights
from gpt.lora import LoRAConfig, apply_lora, lora_layers
from gpt.model import GPT, GPTConfig
from gpt.quantize import quantize
from gpt2_kernels import cpu_linear
from gpt.sampling import generate
from tests.gpt.test_sampling import hf_greedy, make_tiny_model, small_tokenizer, uncached_greedy


@pytest.fixture(scope="module")
def tok():
    return small_tokenizer()


def forward_logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx)[0]


def decoded_logits(model: GPT, idx: torch.Tensor, prefix: int, *, compile: bool = False) -> torch.Tensor:
    """Logits of positions prefix-1 .. T-1 from a Decoder: a prefill of ``prefix`` tokens, then one step each."""
    decoder = Decoder(model, idx.shape[0], compile=compile)
    with torch.inference_mode():
        out = [decoder.prefill(idx[:, :prefix])]
        out += [decoder.step(idx[:, t]) for t in range(prefix, idx.shape[1])]
    return torch.stack(out, 1)


@pytest.mark.parametrize("overrides", [dict(), dict(pos_embedding="rope"), dict(bias=False, tie_embeddings=False)],
                         ids=["learned", "rope", "no-bias-untied"])
def test_eager_decoder_logits_equal_the_forward(tok, overrides):
    model = make_tiny_model(tok, n_ctx=32, **overrides)
    idx = torch.randint(0, tok.n_vocab, (2, 20), generator=torch.Generator().manual_seed(0))
    expected = forward_logits(model, idx)[:, 7:]
    torch.testing.assert_close(decoded_logits(model, idx, 8), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "int8"])
@pytest.mark.parametrize("overrides", [dict(), dict(pos_embedding="rope"), dict(bias=False, tie_embeddings=False)],
                         ids=["learned", "rope", "no-bias-untied"])
def test_eager_cpu_step_in_c_kernels(tok, overrides, quantized):
    """Where gpt2_kernels' C kernels run, an eager fp32 or int8 step on a CPU runs every block in one C
    call (gpt2_kernels.cpu_decode) with learned positions; with rotary ones its products and attention
    are C calls and the rotation PyTorch's. Either way its logits equal the model's own forward, over
    batches of rows and growing lengths."""
    model = make_tiny_model(tok, n_ctx=32, **overrides)
    if quantized:
        model = quantize(model, "int8")
    decoder = Decoder(model, 3)
    spec = decoder.weights.spec
    assert spec.cpu_blocks == (cpu_linear.available() and "pos_embedding" not in overrides)
    assert spec.cpu_attention == cpu_linear.available()
    idx = torch.randint(0, tok.n_vocab, (3, 24), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(decoded_logits(model, idx, 5), forward_logits(model, idx)[:, 4:], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_decoder(tok, dtype):
    """bf16 on a CPU decodes with oneDNN's prepacked weights (where available), fp16 with F.linear."""
    model = make_tiny_model(tok, n_ctx=32).to(dtype)
    idx = torch.randint(0, tok.n_vocab, (1, 16), generator=torch.Generator().manual_seed(0))
    expected = forward_logits(model, idx)[:, 7:]
    got = decoded_logits(model, idx, 8)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0.05, atol=0.05 * float(expected.abs().max()))


def test_extend_verifies_several_positions_and_rewind_forgets(tok):
    model = make_tiny_model(tok, n_ctx=32)
    idx = torch.randint(0, tok.n_vocab, (1, 12), generator=torch.Generator().manual_seed(1))
    expected = forward_logits(model, idx)
    decoder = Decoder(model, 1)
    if torch.backends.mkldnn.is_available():  # a verification reads oneDNN's packed copy of the weights
        assert decoder.verify_weights().spec.layout == "verify"
    with torch.inference_mode():
        decoder.prefill(idx[:, :5])
        torch.testing.assert_close(decoder.extend(idx[:, 5:9], all_positions=True), expected[:, 5:9], rtol=1e-4, atol=1e-4)
        decoder.rewind(6)  # keep positions 0..5; 6..8 are forgotten and written again
        assert decoder.length == 6 and decoder.tokens[0, :6].tolist() == idx[0, :6].tolist()
        torch.testing.assert_close(decoder.extend(idx[:, 6:12]), expected[:, 11], rtol=1e-4, atol=1e-4)
        with pytest.raises(ValueError, match="rewind"):
            decoder.rewind(13)


def test_cache_full_is_an_error(tok):
    model = make_tiny_model(tok, n_ctx=8)
    decoder = Decoder(model, 1)
    with torch.inference_mode():
        decoder.prefill(torch.zeros(1, 8, dtype=torch.long))
        assert decoder.room() == 0
        with pytest.raises(ValueError, match="full"):
            decoder.step(torch.zeros(1, dtype=torch.long))


def test_lora_adapters_are_applied(tok):
    """An adapted model decodes as its merged equivalent (the inference weights fold the update in)."""
    model = make_tiny_model(tok, n_ctx=32)
    apply_lora(model, LoRAConfig(rank=4, targets=("attn", "mlp")))
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.normal_(0.0, 0.1)
    idx = torch.randint(0, tok.n_vocab, (1, 16), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(decoded_logits(model.eval(), idx, 8), forward_logits(model, idx)[:, 7:], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------- inference weights


def test_inference_weights_are_cached_refreshed_and_not_saved(tok, tmp_path):
    model = make_tiny_model(tok, n_ctx=32)
    first, _ = inference_weights(model, False)
    assert inference_weights(model, False)[0] is first  # reused while nothing changed
    assert inference_weights(model, True)[0].spec.layout == "rows"  # the compiled layout, held next to it
    assert inference_weights(model, False)[0] is first
    state_before = set(model.state_dict())
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.mul_(2.0)  # an in-place change, as an optimizer step
    second, _ = inference_weights(model, False)
    assert second is not first
    want = model.transformer.h[0].mlp.c_fc.weight.detach()
    torch.testing.assert_close(second.layers[0].c_fc.weight, want.t() if second.spec.layout == "transposed" else want)
    assert set(model.state_dict()) == state_before  # nothing was added to the model
    model.save_pretrained(tmp_path / "ckpt")
    assert set(GPT.from_pretrained(tmp_path / "ckpt").state_dict()) == state_before


def test_a_model_in_training_mode_is_not_cached(tok):
    model = make_tiny_model(tok, n_ctx=32).train()
    before = len(gpt.decode._CACHE)
    generate(model, [1, 2, 3], 3, temperature=0)
    assert len(gpt.decode._CACHE) == before and model.training


@pytest.mark.skipif(thp_mode() not in ("always", "madvise"), reason=f"transparent huge pages are {thp_mode()} here")
def test_cpu_weights_live_in_huge_pages(tok):
    """The streamed weights of a large enough model get 2 MiB pages (the point of the arena)."""
    model = GPT(GPTConfig(vocab_size=tok.n_vocab, n_ctx=32, n_embd=512, n_layer=2, n_head=8, backend="torch")).eval()
    decoder = Decoder(model, 1)
    assert decoder.arena.advised and decoder.arena.nbytes > 8 * 2**20
    assert decoder.arena.huge_page_bytes() >= 2 * 2**20


@pytest.mark.skipif(thp_mode() not in ("always", "madvise"), reason=f"transparent huge pages are {thp_mode()} here")
def test_arena_reports_its_own_huge_pages_only():
    """Arenas made one after another stay separate mappings, so each reports only its own huge pages."""
    arenas = [Arena.holding([torch.ones(2**22 + 1000 * i)])[0] for i in range(3)]  # 16 MiB and a bit
    for arena in arenas:
        assert arena.huge_page_bytes() <= arena.nbytes + 2 * 2**20


def test_arena_without_huge_pages(monkeypatch, tok):
    """Where madvise(MADV_HUGEPAGE) does not exist, the arena has ordinary pages and decoding is unchanged."""
    model = make_tiny_model(tok, n_ctx=32)
    idx = torch.randint(0, tok.n_vocab, (1, 12), generator=torch.Generator().manual_seed(3))
    expected = decoded_logits(model, idx, 4)
    monkeypatch.delattr(mmap, "MADV_HUGEPAGE", raising=False)
    monkeypatch.setattr(gpt.decode, "_CACHE", type(gpt.decode._CACHE)())
    assert not Decoder(model, 1).arena.advised
    torch.testing.assert_close(decoded_logits(model, idx, 4), expected, rtol=0, atol=0)
    monkeypatch.setattr(gpt.arena, "THP_MODE_FILE", gpt.arena.Path("/nonexistent"))
    assert thp_mode() == "unavailable" and not Arena(4096).advised


def test_arena_places_tensors_in_order_and_refuses_overflow():
    a, b = torch.arange(10, dtype=torch.float32), torch.arange(6, dtype=torch.int8).view(2, 3)
    arena, (a2, b2) = Arena.holding([a, b])
    assert torch.equal(a2, a) and torch.equal(b2, b) and a2.data_ptr() < b2.data_ptr()
    assert a2.data_ptr() % gpt.arena.HUGE_PAGE == 0 and b2.data_ptr() % gpt.arena.ALIGN == 0
    with pytest.raises(ValueError, match="no room"):
        arena.take(a)


# ---------------------------------------------------------------------------------------------- compiled


@pytest.fixture(scope="module")
def compiled_model(tok):
    """One tiny model whose step and prefill get compiled once for this module (n_ctx 32: the tests
    below slide its window)."""
    return make_tiny_model(tok, n_ctx=32)


def graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def test_compiled_step_one_graph_and_same_logits(compiled_model, tok):
    idx = torch.randint(0, tok.n_vocab, (2, 30), generator=torch.Generator().manual_seed(4))
    expected = decoded_logits(compiled_model, idx, 6)
    torch.testing.assert_close(decoded_logits(compiled_model, idx, 6, compile=True), expected, rtol=1e-4, atol=1e-4)
    before = graphs()  # step and prefill are compiled now: other positions and prompt lengths add nothing
    torch.testing.assert_close(decoded_logits(compiled_model, idx, 11, compile=True), decoded_logits(compiled_model, idx, 11),
                               rtol=1e-4, atol=1e-4)
    assert graphs() == before


def test_compiled_greedy_equals_eager_transformers_and_slides(compiled_model, tok, tmp_path):
    prompt = tok.encode_ordinary("To be or not")
    ours, expected = hf_greedy(compiled_model, tmp_path, prompt, 25)  # within the window: transformers can follow
    assert generate(ours, prompt, 25, temperature=0, compile=True) == [expected]
    # 60 new tokens slide the 32-token window twice; compiled, eager and recomputed from scratch agree,
    # and neither a full cache nor a rebuild compiles anything more
    before = graphs()
    long = generate(compiled_model, prompt, 60, temperature=0, stop_tokens=(), compile=True)
    assert graphs() == before
    assert long == generate(compiled_model, prompt, 60, temperature=0, stop_tokens=())
    assert long == [uncached_greedy(compiled_model, prompt, 60)]


def test_compiled_batches_stops_and_sampling(compiled_model, tok):
    prompt = tok.encode_ordinary("Hello")
    kwargs = dict(num_samples=2, seed=2, top_k=20, repetition_penalty=1.3, stop_tokens=(tok.eot_token,))
    streamed = []
    out = generate(compiled_model, prompt, 20, compile=True, stream=lambda i, t: streamed.append((i, t)), **kwargs)
    assert out == generate(compiled_model, prompt, 20, **kwargs)
    assert [t for i, t in streamed if i == 1] == out[1]
