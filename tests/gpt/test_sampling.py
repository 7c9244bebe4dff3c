"""gpt.generate: parity with transformers (greedy, repetition penalty), the sampling filters, seeding,
the KV cache (cached == uncached, sliding window), batched samples with independent stops, streaming,
backends and dtypes, and argument checks."""

from __future__ import annotations

import math

import pytest
import torch

import tokenizers_bpe
from gpt.model import GPT, GPTConfig
from gpt.sampling import apply_repetition_penalty, generate, nucleus, sample_next
from tools import convert

TEXTS = ["Hello world, café olé! naïve résumé. " * 50, "To be or not to be, that is the question. " * 20]


def small_tokenizer():
    """A 300-token byte-level BPE (with <|endoftext|>) trained in ~0.1 s."""
    return tokenizers_bpe.train_from_iterator(TEXTS, 300)


def make_tiny_model(tokenizer, seed: int = 0, std: float = 0.2, **overrides) -> GPT:
    """A random tiny GPT. Weights are drawn wider than GPT-2's init (std 0.02) so that greedy decoding
    wanders over many tokens instead of repeating one, which makes the comparisons below meaningful."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig.from_preset("tiny", vocab_size=tokenizer.n_vocab, **overrides))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, std)
    model.tokenizer = tokenizer
    return model.eval()


@pytest.fixture(scope="module")
def tok():
    return small_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return make_tiny_model(tok)


@pytest.fixture(scope="module")
def prompt(tok):
    return tok.encode_ordinary("To be or not")


def hf_greedy(model: GPT, tmp_path, prompt, max_new_tokens, **generate_kwargs) -> tuple[GPT, list[int]]:
    """Save ``model``, export it with ``gpt-convert hf-export``, and decode greedily with transformers.
    Returns our model reloaded from the checkpoint (the same weights) and transformers' new tokens, cut
    before its first end-of-text token (transformers includes it; generate() does not)."""
    transformers = pytest.importorskip("transformers")
    ckpt, hf_dir = tmp_path / "ckpt", tmp_path / "hf"
    model.save_pretrained(ckpt)
    assert convert.main(["hf-export", str(ckpt), str(hf_dir)]) == 0
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    with torch.inference_mode():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=model.tokenizer.eot_token,
                          **generate_kwargs)
    new = out[0, len(prompt):].tolist()
    eot = model.tokenizer.eot_token
    return GPT.from_pretrained(ckpt), new[: new.index(eot)] if eot in new else new


# ---------------------------------------------------------------------------------------------- parity


def test_greedy_matches_transformers_tiny(model, prompt, tmp_path):
    ours, expected = hf_greedy(model, tmp_path, prompt, 100)
    assert len(expected) == 100 and len(set(expected)) > 10  # a real sequence, not one token repeated
    assert generate(ours, prompt, 100, temperature=0) == [expected]


@pytest.mark.slow
def test_greedy_matches_transformers_124m_shape(shared_file, tmp_path):
    tok = tokenizers_bpe.load_gpt2(shared_file("gpt2/encoder.json"), shared_file("gpt2/vocab.bpe"))
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("gpt2")).eval()  # GPT-2's own random init: 124M parameters
    model.tokenizer = tok
    prompt = tok.encode("The quick brown fox jumps over the lazy dog. Then")
    ours, expected = hf_greedy(model, tmp_path, prompt, 100)
    assert len(expected) == 100
    assert generate(ours, prompt, 100, temperature=0) == [expected]


def test_repetition_penalty_matches_transformers(model, prompt, tmp_path):
    ours, expected = hf_greedy(model, tmp_path, prompt, 40, repetition_penalty=1.5)
    assert generate(ours, prompt, 40, temperature=0, repetition_penalty=1.5) == [expected]
    assert generate(ours, prompt, 40, temperature=0) != [expected]  # the penalty changed something


# ---------------------------------------------------------------------------------------------- filters


def test_top_p_keeps_the_smallest_set_reaching_p():
    sorted_logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = lambda p: int(torch.isfinite(nucleus(sorted_logits, p)).sum())  # noqa: E731
    assert kept(0.3) == 1  # the top token alone already holds 0.5
    assert kept(0.5) == 1
    assert kept(0.6) == 2
    assert kept(0.79) == 2
    assert kept(0.81) == 3
    assert kept(0.96) == 4
    assert kept(1.0) == 4
    assert torch.equal(nucleus(sorted_logits, 0.6)[0, :2], sorted_logits[0, :2])  # kept logits unchanged


def test_top_p_is_per_row():
    sorted_logits = torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25]]).log()
    assert torch.isfinite(nucleus(sorted_logits, 0.7)).tolist() == [[True, False, False], [True, True, False]]


def drawn(probs: list[float], n: int = 2000, **settings) -> set[int]:
    """The set of tokens sample_next draws in n rows from a hand-made distribution."""
    logits = torch.tensor(probs).log().expand(n, -1)
    return set(sample_next(logits, generator=torch.Generator().manual_seed(0), **settings).tolist())


def test_sampling_draws_exactly_from_the_kept_set():
    probs = [0.05, 0.5, 0.15, 0.3]  # ranked: 1, 3, 2, 0
    assert drawn(probs, temperature=1.0, top_k=None, top_p=None) == {0, 1, 2, 3}
    assert drawn(probs, temperature=1.0, top_k=None, top_p=0.6) == {1, 3}
    assert drawn(probs, temperature=1.0, top_k=None, top_p=0.81) == {1, 3, 2}
    assert drawn(probs, temperature=1.0, top_k=3, top_p=None) == {1, 3, 2}
    assert drawn(probs, temperature=1.0, top_k=1, top_p=None) == {1}
    # top-p applies to the top-k renormalised: 0.5 / 0.8 = 0.625 of the two kept
    assert drawn(probs, temperature=1.0, top_k=2, top_p=0.62) == {1}
    assert drawn(probs, temperature=1.0, top_k=2, top_p=0.63) == {1, 3}
    # and after the temperature: at T = 0.5 the probabilities are squared and renormalised, the top token holds 0.68
    assert drawn(probs, temperature=0.5, top_k=None, top_p=0.6) == {1}


def test_sampling_frequencies_follow_the_distribution():
    logits = torch.tensor([0.2, 0.5, 0.3]).log().expand(20000, -1)
    draws = sample_next(logits, 1.0, None, None, torch.Generator().manual_seed(1))
    freq = torch.bincount(draws, minlength=3) / draws.numel()
    assert torch.allclose(freq, torch.tensor([0.2, 0.5, 0.3]), atol=0.015)


def test_repetition_penalty_semantics():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 2.0, -2.0]]


# ---------------------------------------------------------------------------------------------- sampling


def test_top_k_1_sampling_equals_greedy(model, prompt):
    greedy = generate(model, prompt, 30, temperature=0, stop_tokens=())
    for seed, temperature in ((0, 1.0), (1, 0.7), (2, 1.5)):
        assert generate(model, prompt, 30, temperature=temperature, top_k=1, seed=seed, stop_tokens=()) == greedy


def test_same_seed_same_samples(model, prompt):
    a = generate(model, prompt, 30, seed=7, num_samples=3, top_k=50, top_p=0.9, stop_tokens=())
    b = generate(model, prompt, 30, seed=7, num_samples=3, top_k=50, top_p=0.9, stop_tokens=())
    c = generate(model, prompt, 30, seed=8, num_samples=3, top_k=50, top_p=0.9, stop_tokens=())
    assert a == b
    assert a != c
    assert len({tuple(s) for s in a}) == 3  # the samples in a batch differ from each other


def test_samples_stay_inside_the_filtered_set(model, prompt):
    """Every sampled token is one of the top-k of its step's distribution (checked by recomputation)."""
    (out,) = generate(model, prompt, 20, temperature=1.0, top_k=3, seed=3, stop_tokens=())
    seq = list(prompt)
    with torch.no_grad():
        for token in out:
            logits, _ = model(torch.tensor([seq]))
            assert token in torch.topk(logits[0, -1], 3).indices.tolist()
            seq.append(token)


# ---------------------------------------------------------------------------------------------- KV cache


def uncached_greedy(model: GPT, prompt: list[int], n: int) -> list[int]:
    """The documented context rule, by full recomputation: the model sees seq[start:], a prompt of
    n_ctx tokens or more is cut to its last n_ctx - 1, and when the view would exceed n_ctx tokens it
    restarts from the last n_ctx // 2."""
    n_ctx = model.config.n_ctx
    seq = list(prompt)
    start = max(0, len(seq) - (n_ctx - 1)) if len(seq) >= n_ctx else 0
    new = []
    with torch.no_grad():
        for _ in range(n):
            if len(seq) - start > n_ctx:
                start = len(seq) - n_ctx // 2
            logits, _ = model(torch.tensor([seq[start:]]))
            new.append(int(logits[0, -1].argmax()))
            seq.append(new[-1])
    return new


def test_cached_equals_uncached(model, prompt):
    assert generate(model, prompt, 60, temperature=0, stop_tokens=()) == [uncached_greedy(model, prompt, 60)]


@pytest.mark.parametrize("prompt_len", [3, 16, 40])
def test_sliding_window_past_n_ctx(tok, prompt_len):
    """n_ctx = 16: 50 new tokens slide the window several times; a 40-token prompt is cut first."""
    model = make_tiny_model(tok, n_ctx=16)
    prompt = (tok.encode_ordinary(TEXTS[1]) * 3)[:prompt_len]
    out = generate(model, prompt, 50, temperature=0, stop_tokens=())
    assert out == [uncached_greedy(model, prompt, 50)]
    assert len(out[0]) == 50


def test_sliding_window_rope(tok):
    model = make_tiny_model(tok, n_ctx=16, pos_embedding="rope")
    prompt = tok.encode_ordinary("To be or")
    assert generate(model, prompt, 40, temperature=0, stop_tokens=()) == [uncached_greedy(model, prompt, 40)]


# ---------------------------------------------------------------------------------------------- batches, stops, streaming


def test_batched_greedy_rows_equal_single(model, prompt):
    single = generate(model, prompt, 25, temperature=0, stop_tokens=())
    assert generate(model, prompt, 25, temperature=0, num_samples=4, stop_tokens=()) == single * 4


def test_each_sample_stops_independently_and_streams(model, prompt):
    full = generate(model, prompt, 40, seed=5, num_samples=4, stop_tokens=())
    first = lambda s, t: s.index(t) if t in s else len(s)  # noqa: E731
    stop = next(t for t in sorted({t for s in full for t in s}) if len({first(s, t) for s in full}) > 1)
    streamed = []
    out = generate(model, prompt, 40, seed=5, num_samples=4, stop_tokens=(stop,), stream=lambda i, t: streamed.append((i, t)))
    for sample, tokens in zip(full, out):
        assert tokens == (sample[: sample.index(stop)] if stop in sample else sample)
    assert len({len(s) for s in out}) > 1  # they really stopped at different points
    for i in range(4):
        assert [t for j, t in streamed if j == i] == out[i]


def test_default_stop_is_the_tokenizers_eot(model, prompt):
    eot = model.tokenizer.eot_token
    full = generate(model, prompt, 60, seed=11, stop_tokens=(), top_k=None)
    default = generate(model, prompt, 60, seed=11, top_k=None)
    assert eot not in default[0]
    assert default == [full[0][: full[0].index(eot)] if eot in full[0] else full[0]]


def test_prompt_tensor_and_training_mode_restored(model, prompt):
    model.train()
    try:
        out = generate(model, torch.tensor(prompt), 5, temperature=0, stop_tokens=())
        assert model.training
    finally:
        model.eval()
    assert out == generate(model, prompt, 5, temperature=0, stop_tokens=())


# ---------------------------------------------------------------------------------------------- backends and dtypes


def test_triton_backend_matches_torch(tok, prompt, monkeypatch):
    """The Triton kernels (under TRITON_INTERPRET=1 without a GPU) give the same greedy tokens."""
    pytest.importorskip("triton")
    torch_model = make_tiny_model(tok, backend="torch")
    triton_model = make_tiny_model(tok, backend="triton")
    expected = generate(torch_model, prompt, 8, temperature=0, stop_tokens=())
    assert generate(triton_model, prompt, 8, temperature=0, stop_tokens=()) == expected


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_dtypes(tok, prompt, dtype):
    model = make_tiny_model(tok).to(dtype)
    a = generate(model, prompt, 20, seed=1, num_samples=2, stop_tokens=())
    assert a == generate(model, prompt, 20, seed=1, num_samples=2, stop_tokens=())
    assert all(len(s) == 20 and all(0 <= t < tok.n_vocab for t in s) for s in a)


# ---------------------------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=math.inf), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(num_samples=0), "num_samples"),
    ],
)
def test_bad_settings(model, prompt, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(model, prompt, 5, **kwargs)


def test_bad_lengths_and_ids(model, prompt):
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, prompt, 0)
    with pytest.raises(ValueError, match="empty"):
        generate(model, [], 5)
    with pytest.raises(ValueError, match="300"):
        generate(model, [1, 300], 5)
