"""Edge numbers and absurd configs (issue 23): a model's sizes are bounded and checked against the
machine's memory before any model is built; sampling works for any temperature, top-p and repetition
penalty in range (no NaN probabilities); a draft model with NaN weights is an error, not a crash."""

from __future__ import annotations

import math

import pytest
import torch

import gpt.memory
from gpt.config import MAX_SIZES, GPTConfig
from gpt.model import GPT
from gpt.sampling import generate
from gpt.token_choice import nucleus, probabilities, sample_next
from tests.gpt.test_sampling import make_tiny_model, small_tokenizer


@pytest.fixture(scope="module")
def tok():
    return small_tokenizer()


@pytest.mark.parametrize("name", sorted(MAX_SIZES))
def test_sizes_above_the_bounds_are_errors_naming_them(name):
    for value in (MAX_SIZES[name] + 1, 10**30, 2**63):
        with pytest.raises(ValueError, match=f"{name} must be at most"):
            GPTConfig.from_dict({name: value})


@pytest.mark.parametrize("value", [None, {"a": 1}, [1], True, 1.5, "12"])
def test_sizes_of_the_wrong_type_are_errors(value):
    with pytest.raises(ValueError, match="n_embd must be a positive integer"):
        GPTConfig.from_dict({"n_embd": value})


@pytest.mark.parametrize("field, value", [("layer_norm_eps", v) for v in (0, -1e-5, 1.5, 1e308, math.inf, math.nan, True, "1e-5")]
                         + [("dropout", v) for v in (1, -0.1, math.nan, None)] + [("pos_embedding", v) for v in ([], {}, "alibi")]
                         + [("backend", v) for v in ([], "cuda")])
def test_other_fields_out_of_range_or_of_the_wrong_kind_are_errors_naming_them(field, value):
    with pytest.raises(ValueError, match=f"{field} must be"):
        GPTConfig.from_dict({field: value})


@pytest.mark.parametrize("overrides", [{}, {"bias": False}, {"tie_embeddings": False}, {"pos_embedding": "rope"},
                                       {"n_layer": 3, "n_embd": 48, "n_head": 4, "vocab_size": 77, "n_ctx": 33}])
def test_num_parameters_is_the_models_without_building_it(overrides):
    config = GPTConfig.from_preset("tiny", **overrides)
    assert config.num_parameters() == GPT(config).num_parameters()


def test_a_model_larger_than_memory_is_refused_before_it_is_built(monkeypatch, tmp_path, tok):
    make_tiny_model(tok).save_pretrained(tmp_path / "ckpt")
    monkeypatch.setattr(gpt.memory, "available_memory_bytes", lambda: 1000)
    with pytest.raises(ValueError, match="GiB of memory is available"):
        GPT(GPTConfig.from_preset("tiny"))
    with pytest.raises(ValueError, match="config.json: a model of 2 layers"):
        GPT.from_pretrained(tmp_path / "ckpt")
    with torch.device("meta"):  # on the meta device a model takes no memory: allowed
        GPT(GPTConfig.from_preset("gpt2-xl"))


def test_generation_memory_check_names_num_samples(monkeypatch):
    config = GPTConfig.from_preset("gpt2")
    monkeypatch.setattr(gpt.memory, "available_memory_bytes", lambda: 64 * 2**30)
    gpt.memory.check_generation_fits(config, 8, 300, 4, "cpu")
    with pytest.raises(ValueError, match="num_samples 100000 needs at least"):
        gpt.memory.check_generation_fits(config, 100_000, 300, 4, "cpu")


LOGITS = torch.tensor([[3.0, 1.0, 2.5, -1.0, 0.5]])


@pytest.mark.parametrize("temperature", [5e-324, 1e-300, 1e-45, 1e-30, 1e-8])
def test_tiny_temperatures_are_greedy_not_nan(temperature):
    probs = probabilities(LOGITS, temperature, None, None)
    assert torch.isfinite(probs).all() and probs[0, 0] == 1
    assert sample_next(LOGITS, temperature, None, 0.9, torch.Generator().manual_seed(0)).item() == 0


@pytest.mark.parametrize("p", [5e-324, 1e-300, 1e-46, 1e-10])
def test_tiny_top_p_keeps_the_top_token(p):
    kept = nucleus(LOGITS.sort(descending=True).values, p)
    assert torch.isfinite(kept[0, 0]) and torch.isinf(kept[0, 1:]).all()
    assert sample_next(LOGITS, 1.0, None, p, torch.Generator().manual_seed(0)).item() == 0


@pytest.mark.parametrize("penalty", [5e-324, 1e-300, 1e-40, 1e300])
def test_extreme_repetition_penalties_give_a_distribution(tok, penalty):
    model = make_tiny_model(tok)
    (out,) = generate(model, tok.encode("the cat"), 8, temperature=0.7, repetition_penalty=penalty, seed=0, stop_tokens=())
    assert len(out) == 8


def test_infinite_logits_after_a_penalty_are_the_largest_finite():
    logits = torch.tensor([[math.inf, 1.0, -math.inf]])
    probs = probabilities(logits, 0.8, None, 0.95)
    assert torch.isfinite(probs).all() and probs[0, 0] == 1


def test_a_draft_with_nan_weights_is_an_error_naming_it(tok):
    target, draft = make_tiny_model(tok, seed=1), make_tiny_model(tok, seed=2)
    with torch.no_grad():
        for p in draft.parameters():
            p.fill_(math.nan)
    for temperature in (0, 0.8):
        with pytest.raises(ValueError, match="the draft model's output is not finite"):
            generate(target, tok.encode("the cat"), 10, temperature=temperature, draft=draft, seed=0, stop_tokens=())
