"""gpt-generate: output equals the Python API, incremental UTF-8 streaming, prompt sources, defaults from
generation.json, --instruct, special tokens, truncation, and one-line errors with exit status 2."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

import pytest
import torch

import gpt2_kernels
import tokenizers_bpe
import tools.generate
from gpt import aot_decode, compile_cache
from gpt.model import GPT
from gpt.prompt_template import format_instruction_prompt
from gpt.sampling import generate
from tools.generate import main
from tests.conftest import ROOT
from tests.gpt.test_sampling import make_tiny_model, small_tokenizer

PROG = "gpt-generate"


@pytest.fixture(scope="module")
def tok():
    return small_tokenizer()


@pytest.fixture(scope="module")
def ckpt(tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "model"
    make_tiny_model(tok, n_ctx=256).save_pretrained(path)  # room for the instruction template
    return path


@pytest.fixture(scope="module")
def model(ckpt):
    return GPT.from_pretrained(ckpt)


@pytest.fixture
def calls(monkeypatch):
    """Record the arguments gpt-generate passes to generate() (the real one still runs)."""
    recorded = []

    def spy(model, prompt_ids, max_new_tokens, **kwargs):
        recorded.append(dict(prompt_ids=list(prompt_ids), max_new_tokens=max_new_tokens, **kwargs))
        return generate(model, prompt_ids, max_new_tokens, **kwargs)

    monkeypatch.setattr(tools.generate, "generate", spy)
    return recorded


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, out, err, *words):
    assert rc == 2
    assert err.startswith(f"{PROG}: error: ") and err.count("\n") == 1, err
    for word in words:
        assert word in err


# ---------------------------------------------------------------------------------------------- output


def test_greedy_output_is_the_api_output(ckpt, model, tok, capsys):
    rc, out, err = run(capsys, "--model", ckpt, "To be or not", "-n", 30, "--temperature", 0)
    assert rc == 0
    (ids,) = generate(model, tok.encode_ordinary("To be or not"), 30, temperature=0)
    assert out == tok.decode(ids) + "\n"
    assert "tokens/s" in err and "time to first token" in err
    assert re.search(r"then \d+\.\d tokens/s", err), err  # the rate once the first step is done


def test_sampling_is_seeded_and_uses_the_settings(ckpt, model, tok, capsys, calls):
    argv = ["--model", ckpt, "Hello", "-n", 12, "--top-k", 20, "--top-p", 0.9, "--temperature", 1.1,
            "--repetition-penalty", 1.2, "--seed", 3]
    rc, first, _ = run(capsys, *argv)
    assert rc == 0
    assert run(capsys, *argv)[1] == first
    assert run(capsys, *argv[:-1], 4)[1] != first
    settings = {k: calls[0][k] for k in ("temperature", "top_k", "top_p", "repetition_penalty", "seed", "num_samples")}
    assert settings == dict(temperature=1.1, top_k=20, top_p=0.9, repetition_penalty=1.2, seed=3, num_samples=1)
    (ids,) = generate(model, tok.encode_ordinary("Hello"), 12, **settings)
    assert first == tok.decode(ids) + "\n"


def test_num_samples_batch(ckpt, model, tok, capsys):
    rc, out, _ = run(capsys, "--model", ckpt, "Hello", "-n", 10, "--num-samples", 3, "--seed", 5, "--top-k", "none")
    assert rc == 0
    samples = generate(model, tok.encode_ordinary("Hello"), 10, num_samples=3, seed=5, temperature=0.8, top_p=0.95)
    expected = f"{'-' * 20} sample 1 {'-' * 20}\n" + tok.decode(samples[0])  # every sample has its header
    for i in (1, 2):
        expected += f"\n{'-' * 20} sample {i + 1} {'-' * 20}\n" + tok.decode(samples[i])
    assert out == expected + "\n"
    assert run(capsys, "--model", ckpt, "Hello", "-n", 10, "--num-samples", 3, "--seed", 5, "--top-k", "none", "--no-stream")[1] == out


def test_streams_utf8_incrementally(ckpt, tok, monkeypatch):
    """'é' is two byte tokens (0xC3, 0xA9): nothing is printed after the first, 'é' after the second."""
    assert tok.decode_single_token_bytes(0xC3) == b"\xc3" and tok.decode_single_token_bytes(0xA9) == b"\xa9"
    written = []
    monkeypatch.setattr(sys, "stdout", type("Out", (), {"write": lambda self, s: written.append(s), "flush": lambda self: None})())

    def fake_generate(model, prompt_ids, max_new_tokens, *, stream, **kwargs):
        stream(0, 0xC3)
        assert "".join(written) == ""
        stream(0, 0xA9)
        assert "".join(written) == "é"
        stream(0, ord("!"))
        assert "".join(written) == "é!"
        return [[0xC3, 0xA9, ord("!")]]

    monkeypatch.setattr(tools.generate, "generate", fake_generate)
    assert main(["--model", str(ckpt), "x"]) == 0
    assert "".join(written) == "é!\n"


def test_defaults_from_generation_json(tok, tmp_path, capsys, calls):
    ckpt = tmp_path / "model"
    make_tiny_model(tok).save_pretrained(ckpt, generation={"max_new_tokens": 7, "temperature": 0, "top_k": 5})
    assert run(capsys, "--model", ckpt, "Hello")[0] == 0
    assert calls[-1]["max_new_tokens"] == 7 and calls[-1]["temperature"] == 0 and calls[-1]["top_k"] == 5
    assert calls[-1]["top_p"] == 0.95  # not in the file: the built-in default
    assert run(capsys, "--model", ckpt, "Hello", "-n", 3, "--top-k", "none")[0] == 0
    assert calls[-1]["max_new_tokens"] == 3 and calls[-1]["top_k"] is None and calls[-1]["temperature"] == 0


def test_bad_generation_json_value(tok, tmp_path, capsys):
    ckpt = tmp_path / "model"
    make_tiny_model(tok).save_pretrained(ckpt, generation={"top_p": 2.0})
    assert_one_line_error(*run(capsys, "--model", ckpt, "Hello"), "generation.json", "top_p")


# ---------------------------------------------------------------------------------------------- prompts


def test_prompt_from_stdin(ckpt, capsys, monkeypatch, calls, tok):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("Héllo wörld\n".encode())))
    assert run(capsys, "--model", ckpt, "-", "-n", 3)[0] == 0
    assert calls[-1]["prompt_ids"] == tok.encode_ordinary("Héllo wörld\n")


def test_non_utf8_stdin(ckpt, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"abc\xff\xfe")))
    assert_one_line_error(*run(capsys, "--model", ckpt, "-"), "stdin", "UTF-8", "offset 3")


def test_empty_prompt_starts_from_eot(ckpt, capsys, calls, tok):
    assert run(capsys, "--model", ckpt, "-n", 3)[0] == 0
    assert run(capsys, "--model", ckpt, "", "-n", 3)[0] == 0
    assert calls[0]["prompt_ids"] == calls[1]["prompt_ids"] == [tok.eot_token]


def test_special_tokens_are_ordinary_text_unless_allowed(ckpt, capsys, calls, tok):
    rc, _, err = run(capsys, "--model", ckpt, "Hi<|endoftext|>", "-n", 3)
    assert rc == 0 and "--allow-special" in err
    assert calls[-1]["prompt_ids"] == tok.encode_ordinary("Hi<|endoftext|>")
    assert tok.eot_token not in calls[-1]["prompt_ids"]
    rc, _, err = run(capsys, "--model", ckpt, "Hi<|endoftext|>", "-n", 3, "--allow-special")
    assert rc == 0 and "allow-special" not in err
    assert calls[-1]["prompt_ids"] == tok.encode_ordinary("Hi") + [tok.eot_token]


def test_long_prompt_keeps_the_last_n_ctx_minus_1_tokens(ckpt, model, capsys, calls, tok):
    n_ctx = model.config.n_ctx
    text = "To be or not to be, that is the question. " * 200
    ids = tok.encode_ordinary(text)
    assert len(ids) > n_ctx
    rc, out, err = run(capsys, "--model", ckpt, text, "-n", 3)
    assert rc == 0 and out
    assert f"keeping its last {n_ctx - 1} tokens" in err
    assert calls[-1]["prompt_ids"] == ids[-(n_ctx - 1):]


def test_instruct(ckpt, capsys, calls, tok):
    assert run(capsys, "--model", ckpt, "--instruct", "Say hi.", "--input", "Bob", "-n", 4)[0] == 0
    assert calls[-1]["prompt_ids"] == tok.encode_ordinary(format_instruction_prompt("Say hi.", "Bob"))
    assert calls[-1].get("stop_tokens") is None  # generate's default: the tokenizer's end-of-text token
    assert_one_line_error(*run(capsys, "--model", ckpt, "--instruct", "Say hi.", "a prompt"), "--instruct")
    assert_one_line_error(*run(capsys, "--model", ckpt, "--input", "Bob"), "--instruct")


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "args, words",
    [
        (["--temperature", "-1"], ["--temperature", ">= 0"]),
        (["--top-k", "0"], ["--top-k", ">= 1"]),
        (["--top-p", "0"], ["--top-p", "(0, 1]"]),
        (["--top-p", "1.5"], ["--top-p", "(0, 1]"]),
        (["-n", "0"], ["-n", "in [1, 1000000]"]),
        (["--num-samples", "0"], ["--num-samples"]),
        (["--repetition-penalty", "-2"], ["--repetition-penalty"]),
        (["--temperature", "hot"], ["--temperature"]),
        (["--threads", "0"], ["--threads", "in [1, "]),
    ],
)
def test_bad_arguments(ckpt, capsys, args, words):
    assert_one_line_error(*run(capsys, "--model", ckpt, "Hello", *args), *words)


def test_unknown_model_dir(tmp_path, capsys):
    assert_one_line_error(*run(capsys, "--model", tmp_path / "nope", "Hello"), "nope")


def test_not_a_checkpoint(tmp_path, capsys):
    assert_one_line_error(*run(capsys, "--model", tmp_path, "Hello"), "config.json")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when there is no GPU")
def test_cuda_without_gpu(ckpt, capsys):
    assert_one_line_error(*run(capsys, "--model", ckpt, "Hello", "--device", "cuda"), "--device cuda")


def test_help(capsys):
    rc, out, _ = run(capsys, "--help")
    assert rc == 0 and "--instruct" in out and "generation.json" in out


def test_real_process_stdin_and_exit_status(ckpt, model, tok):
    """As a user runs it: a separate process, the prompt piped in, the text on stdout, stats on stderr."""
    cmd = [sys.executable, "-c", "import sys; from tools.generate import main; sys.exit(main())",
           "--model", str(ckpt), "-", "-n", "8", "--temperature", "0"]
    done = subprocess.run(cmd, input="Hello".encode(), capture_output=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr.decode()
    (ids,) = generate(model, tok.encode_ordinary("Hello"), 8, temperature=0)
    assert done.stdout.decode() == tok.decode(ids) + "\n"
    assert b"tokens/s" in done.stderr
    bad = subprocess.run(cmd, input=b"\xff", capture_output=True, timeout=120, cwd=ROOT)
    assert bad.returncode == 2 and bad.stderr.decode().count("\n") == 1 and bad.stdout == b""



def test_a_prompt_character_a_char_model_lacks(tmp_path, capsys):
    from gpt.model import GPT, GPTConfig
    from tokenizers_bpe import CharTokenizer

    tok = CharTokenizer.from_texts(["abc "], special_tokens=["<|endoftext|>"])
    GPT(GPTConfig(vocab_size=tok.n_vocab, n_ctx=16, n_embd=16, n_layer=1, n_head=2)).save_pretrained(tmp_path / "char", tokenizer=tok)
    assert_one_line_error(*run(capsys, "--model", tmp_path / "char", "abz"), "the prompt:", "'z' (U+007A)", "tokenizer knows")


def test_every_sample_has_a_header_when_there_are_several(ckpt, capsys):
    for stream in ([], ["--no-stream"]):
        rc, out, _ = run(capsys, "--model", ckpt, "Hello", "-n", 4, "--num-samples", 3, "--seed", 1, *stream)
        assert rc == 0 and [out.count(f" sample {i} ") for i in (1, 2, 3)] == [1, 1, 1], out
        assert out.startswith("-" * 20 + " sample 1 ")


# ---------------------------------------------------------------------------------------------- fast paths


@pytest.fixture(scope="module")
def pair(tok, tmp_path_factory):
    """A target and a draft checkpoint with the same tokenizer (the shapes of tests/gpt's compiled
    models, so that inductor's disk cache can serve their graphs)."""
    root = tmp_path_factory.mktemp("pair")
    make_tiny_model(tok, n_ctx=32).save_pretrained(root / "target")
    make_tiny_model(tok, seed=3, n_ctx=32, n_layer=1).save_pretrained(root / "draft")
    return root / "target", root / "draft"


def test_compile_and_draft_give_the_same_greedy_text(pair, capsys, calls):
    target, draft = pair
    argv = ["--model", target, "To be or not", "-n", 40, "--temperature", 0]
    rc, plain, _ = run(capsys, *argv)
    assert rc == 0
    rc, compiled, err = run(capsys, *argv, "--compile")
    assert rc == 0 and compiled == plain and calls[-1]["compile"] is True
    # the first compiling run says so, and keeps its compiled code beside the checkpoint (not in it) ...
    assert "compiling the decoding step" in err
    key = dict(device="cpu", dtype=torch.float32, quantize=None, batch_size=1)
    cache = compile_cache.cache_file(target, **key)
    assert cache.parent == target.parent / f"{target.name}{compile_cache.SUFFIX}"
    # on a CPU: the step and prefill compiled ahead of time, as packages beside the cache's key (gpt.aot_decode)
    assert aot_decode.packaged(cache.with_suffix("")) and not any("cache" in p.name for p in target.iterdir())
    # ... which the next run loads (no compiling announced), and which new weights do not match
    rc, again, err = run(capsys, *argv, "--compile")
    assert rc == 0 and again == plain and "compiling" not in err
    os.utime(target / "model.safetensors", ns=(0, 0))
    assert compile_cache.cache_file(target, **key) != cache
    rc, drafted, err = run(capsys, *argv, "--draft", draft, "--draft-tokens", 3)
    assert rc == 0 and drafted == plain and calls[-1]["draft_tokens"] == 3
    assert "drafted tokens accepted" in err


def test_quantize_int8_runs_eagerly_on_cpu(pair, capsys, calls):
    """With the C kernel int8 needs no compiling; without it (no compiler) it compiles, with a note."""
    target, _ = pair
    rc, out, err = run(capsys, "--model", target, "Hello", "-n", 10, "--temperature", 0, "--quantize", "int8")
    assert rc == 0 and out.strip()
    assert calls[-1]["compile"] is (not gpt2_kernels.cpu_linear_available())
    assert ("cannot run here" in err) is (not gpt2_kernels.cpu_linear_available())
    assert run(capsys, "--model", target, "Hello", "-n", 4, "--quantize", "int8-blocks", "--compile")[0] == 0


def test_fast_path_option_errors(pair, tmp_path, capsys):
    target, draft = pair
    assert_one_line_error(*run(capsys, "--model", target, "Hi", "--draft", tmp_path / "nope"), "--draft", "nope")
    assert_one_line_error(*run(capsys, "--model", target, "Hi", "--draft-tokens", 2), "--draft-tokens", "--draft")
    assert_one_line_error(*run(capsys, "--model", target, "Hi", "--draft", draft, "--draft-tokens", 0), "--draft-tokens")
    assert_one_line_error(*run(capsys, "--model", target, "Hi", "--quantize", "int4"), "--quantize", "int4")


def test_a_draft_with_another_tokenizer_is_refused_before_loading(pair, tmp_path, capsys, monkeypatch):
    target, _ = pair
    other = tokenizers_bpe.train_from_iterator(["abc def ghi " * 50], 280)
    make_tiny_model(other, n_ctx=32).save_pretrained(tmp_path / "foreign")
    loaded = []
    real = GPT.from_pretrained.__func__
    monkeypatch.setattr(GPT, "from_pretrained", classmethod(lambda cls, *a, **k: loaded.append(a) or real(cls, *a, **k)))
    assert_one_line_error(*run(capsys, "--model", target, "Hi", "--draft", tmp_path / "foreign"), "tokenizer", "foreign")
    assert loaded == []
