"""gpt.aot_decode: the decoding step and prefill compiled ahead of time into packages (built once, then
loaded without tracing), with the same logits and greedy tokens as eager decoding, every length, the
sliding window and speculative decoding's verification (eager) included; failures fall back."""

from __future__ import annotations

import pytest
import torch

from gpt import aot_decode
from gpt.decode import Decoder
from gpt.sampling import generate
from tests.gpt.test_sampling import make_tiny_model, small_tokenizer


@pytest.fixture(scope="module")
def tok():
    return small_tokenizer()


@pytest.fixture(scope="module")
def built(tok, tmp_path_factory):
    """A tiny model and the packages of its compiled decoding at batch 2 (built once: ~20 s)."""
    model = make_tiny_model(tok, n_ctx=32)
    prefix = tmp_path_factory.mktemp("aot") / "key"
    with torch.inference_mode():
        decoder = Decoder(model, 2, compile=True)
        assert aot_decode.attach(decoder, prefix)
    return model, prefix


def logits_of(decoder: Decoder, idx: torch.Tensor, prefix_len: int) -> torch.Tensor:
    with torch.inference_mode():
        out = [decoder.prefill(idx[:, :prefix_len])] + [decoder.step(idx[:, t]) for t in range(prefix_len, idx.shape[1])]
    return torch.stack(out, 1)


def test_packages_give_eager_logits_at_every_length(built, monkeypatch):
    """Loaded (not rebuilt: build would raise), the packages decode prompts of several lengths and every
    position up to the context, and write the same cache as eager decoding."""
    model, prefix = built
    monkeypatch.setattr(aot_decode, "build", lambda *a: pytest.fail("packages rebuilt"))
    idx = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    for prompt in (2, 9, 31):
        with torch.inference_mode():
            decoder = Decoder(model, 2, compile=True)
        assert aot_decode.attach(decoder, prefix) and not decoder.traced
        got = logits_of(decoder, idx, prompt)
        want = logits_of(Decoder(model, 2), idx, prompt)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_generate_with_packages_equals_eager(built, tok, tmp_path, monkeypatch):
    """generate(compile=True, compiled_package=...): greedy tokens equal eager ones, past the context
    (the sliding window's prefills) and with a draft (verification runs eagerly)."""
    model, prefix = built
    loaded = []
    load = aot_decode._load
    monkeypatch.setattr(aot_decode, "_load", lambda path: loaded.append(path.name) or load(path))
    prompt = tok.encode("To be or not to be")
    eager = generate(model, prompt, 60, temperature=0, stop_tokens=(), num_samples=2)
    assert generate(model, prompt, 60, temperature=0, stop_tokens=(), num_samples=2, compile=True,
                    compiled_package=prefix) == eager
    draft = make_tiny_model(tok, seed=3, n_ctx=32, n_layer=1)
    assert generate(model, prompt, 20, temperature=0, stop_tokens=(), num_samples=2, compile=True, compiled_package=prefix,
                    draft=draft, draft_tokens=3) == [s[:20] for s in eager]
    assert loaded == ["key-step.pt2", "key-prefill.pt2"] * 2  # both runs decoded with the packages


def test_a_failed_build_falls_back_once(tok, tmp_path, monkeypatch):
    """Where the step cannot be exported or compiled, the decoder keeps torch.compile, and later runs do
    not try again (a marker beside the packages)."""
    model = make_tiny_model(tok, n_ctx=32)
    calls = []

    def failing_build(decoder, prefix):
        calls.append(prefix)
        raise RuntimeError("no C++ kernel for an op")

    monkeypatch.setattr(aot_decode, "build", failing_build)
    with torch.inference_mode():
        decoder = Decoder(model, 1, compile=True)
    step = decoder._step
    assert not aot_decode.attach(decoder, tmp_path / "key")
    assert decoder._step is step and decoder.traced
    assert not aot_decode.attach(decoder, tmp_path / "key") and len(calls) == 1
    assert not aot_decode.will_build(tmp_path / "key") and not aot_decode.packaged(tmp_path / "key")


def test_a_damaged_package_is_made_again(tok, tmp_path, monkeypatch):
    """A package that does not load (truncated, or of another PyTorch build) is rebuilt, not trusted."""
    model = make_tiny_model(tok, n_ctx=32)
    prefix = tmp_path / "key"
    with torch.inference_mode():
        assert aot_decode.attach(Decoder(model, 1, compile=True), prefix)
    step_path, _ = aot_decode.package_paths(prefix)
    step_path.write_bytes(step_path.read_bytes()[:1000])
    builds = []
    build = aot_decode.build
    monkeypatch.setattr(aot_decode, "build", lambda *a: builds.append(1) or build(*a))
    with torch.inference_mode():
        decoder = Decoder(model, 1, compile=True)
    assert aot_decode.attach(decoder, prefix) and builds == [1] and not decoder.traced
    idx = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(logits_of(decoder, idx, 5), logits_of(Decoder(model, 1), idx, 5), rtol=1e-4, atol=1e-4)


def test_only_compiled_cpu_decoders_attach(built, tmp_path):
    model, prefix = built
    assert not aot_decode.attach(Decoder(model, 2), prefix)  # eager: nothing to replace
    assert aot_decode.will_build(tmp_path / "other") and not aot_decode.will_build(None)
