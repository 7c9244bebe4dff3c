"""gpt-convert gguf: the file read back with gguf.GGUFReader (llama.cpp's own Python reader) holds
every tensor of the model under llama.cpp's gpt2 names, in the type asked for, and the tokenizer
as llama.cpp's "gpt2" BPE vocabulary, whose merges give our ids under llama.cpp's merge rule."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess

import gguf
import numpy as np
import pytest
import regex
import torch

import tokenizers_bpe
from gpt.model import GPT, GPTConfig
from gpt.sampling import generate
from tokenizers_bpe.patterns import GPT2_PATTERN
from tools.convert import main as convert
from tools.corpus import plays

# llama.cpp's names for GPT-2's tensors (convert_hf_to_gguf.py, GPT2Model), written out by hand.
LAYER_NAMES = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
               "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}


def expected_names(n_layer: int) -> dict[str, str]:
    names = {"token_embd.weight": "transformer.wte.weight", "position_embd.weight": "transformer.wpe.weight",
             "output_norm.weight": "transformer.ln_f.weight", "output_norm.bias": "transformer.ln_f.bias",
             "output.weight": "lm_head.weight"}
    for i in range(n_layer):
        for ours, theirs in LAYER_NAMES.items():
            for s in ("weight", "bias"):
                names[f"blk.{i}.{theirs}.{s}"] = f"transformer.h.{i}.{ours}.{s}"
    return names


def byte_string(token: bytes) -> str:
    table = tokenizers_bpe.bytes_to_unicode()
    return "".join(table[b] for b in token)


@pytest.fixture(scope="module")
def text() -> str:
    return plays()[0].text()[:30000]


@pytest.fixture(scope="module")
def tokenizer(text):
    return tokenizers_bpe.train_from_iterator([text], 400, special_tokens=["<|endoftext|>", "<|sep|>"], progress=False)


def field(reader, key):
    f = reader.fields[key]
    return f.contents()


def read_back(path):
    reader = gguf.GGUFReader(path)
    return reader, {t.name: t for t in reader.tensors}


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("overrides", [{}, {"bias": False, "tie_embeddings": False}])
def test_every_tensor_and_key(tmp_path, capsys, tokenizer, dtype, overrides):
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny", vocab_size=tokenizer.n_vocab, **overrides)).eval()
    model.save_pretrained(tmp_path / "ours", tokenizer=tokenizer)
    out = tmp_path / "model.gguf"
    assert convert(["gguf", str(tmp_path / "ours"), str(out), "--dtype", dtype]) == 0
    reader, tensors = read_back(out)
    c = model.config

    assert field(reader, "general.architecture") == "gpt2"
    assert field(reader, "gpt2.block_count") == c.n_layer
    assert field(reader, "gpt2.context_length") == c.n_ctx
    assert field(reader, "gpt2.embedding_length") == c.n_embd
    assert field(reader, "gpt2.feed_forward_length") == 4 * c.n_embd
    assert field(reader, "gpt2.attention.head_count") == c.n_head
    assert field(reader, "gpt2.attention.layer_norm_epsilon") == pytest.approx(c.layer_norm_eps)
    assert field(reader, "general.file_type") == {"f32": 0, "f16": 1, "q8_0": 7}[dtype]

    state = {k: v.float() for k, v in model.state_dict().items()}
    state["lm_head.weight"] = model.lm_head.weight.detach().float()
    names = expected_names(c.n_layer)
    assert set(tensors) == set(names)
    for theirs, ours in names.items():
        t = tensors[theirs]
        want = state.get(ours, torch.zeros(state[ours.replace(".bias", ".weight")].shape[0])).numpy()  # GPT-2 has biases
        assert tuple(int(n) for n in reversed(t.shape)) == want.shape, theirs  # GGUF lists dims innermost first
        two_d = want.ndim == 2 and theirs != "position_embd.weight"
        expected_type = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0"}[dtype] if two_d else "F32"
        assert t.tensor_type.name == expected_type, theirs
        if expected_type == "Q8_0":
            got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
            # a block of 32 shares one scale d = max|x| / 127, stored as f16: error <= d/2 + 127 * d * 2**-11
            scale = np.abs(want.reshape(-1, 32)).max(axis=1, keepdims=True) / 127
            assert (np.abs(got - want).reshape(-1, 32) <= scale * (0.5 + 127 * 2**-11) + 1e-7).all(), theirs
        else:
            got = np.asarray(t.data).reshape(want.shape)
            np.testing.assert_array_equal(got, want.astype(np.float16) if expected_type == "F16" else want, err_msg=theirs)


def test_tokenizer_keys(tmp_path, tokenizer):
    GPT(GPTConfig.from_preset("tiny", vocab_size=tokenizer.n_vocab)).save_pretrained(tmp_path / "ours", tokenizer=tokenizer)
    assert convert(["gguf", str(tmp_path / "ours"), str(tmp_path / "m.gguf")]) == 0
    reader, _ = read_back(tmp_path / "m.gguf")
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == "gpt-2"
    n_ordinary = len(tokenizer.mergeable_ranks)
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert tokens[:n_ordinary] == [byte_string(tokenizer.decode_single_token_bytes(i)) for i in range(n_ordinary)]
    assert {tokens[i]: i for i in range(n_ordinary, len(tokens))} == tokenizer.special_tokens
    assert field(reader, "tokenizer.ggml.token_type") == [1] * n_ordinary + [3] * len(tokenizer.special_tokens)
    assert field(reader, "tokenizer.ggml.bos_token_id") == field(reader, "tokenizer.ggml.eos_token_id") == tokenizer.eot_token
    assert field(reader, "tokenizer.ggml.add_bos_token") is False
    merges = field(reader, "tokenizer.ggml.merges")
    learnt = [f"{tokens[a]} {tokens[b]}" for a, b in tokenizer.merges]
    assert [m for m in merges if m in set(learnt)] == learnt
    vocab = {t: i for i, t in enumerate(tokens)}
    ids = [vocab["".join(m.split(" "))] for m in merges]
    assert ids == sorted(ids)  # ranked by the token they make


def llama_cpp_bpe(piece: str, ranks: dict[tuple[str, str], int], vocab: dict[str, int]) -> list[int]:
    """llama.cpp's BPE merge loop (llm_tokenizer_bpe): repeatedly merge the adjacent pair of lowest
    merge rank, the leftmost among equals; no whole-piece shortcut."""
    parts = [byte_string(bytes([b])) for b in piece.encode("utf-8")]
    while len(parts) > 1:
        best = min(range(len(parts) - 1), key=lambda i: (ranks.get((parts[i], parts[i + 1]), 1 << 60), i))
        if (parts[best], parts[best + 1]) not in ranks:
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    return [vocab[p] for p in parts]


def test_gguf_merges_give_our_ids(tmp_path, text, tokenizer):
    GPT(GPTConfig.from_preset("tiny", vocab_size=tokenizer.n_vocab)).save_pretrained(tmp_path / "ours", tokenizer=tokenizer)
    assert convert(["gguf", str(tmp_path / "ours"), str(tmp_path / "m.gguf")]) == 0
    reader, _ = read_back(tmp_path / "m.gguf")
    tokens = field(reader, "tokenizer.ggml.tokens")
    vocab = {t: i for i, t in enumerate(tokens)}
    ranks = {tuple(m.split(" ")): r for r, m in enumerate(field(reader, "tokenizer.ggml.merges"))}
    sample = text + "Héllo wörld 😀 ١٢٣ 12345\r\n  end  "
    ids = [i for piece in regex.findall(GPT2_PATTERN, sample) for i in llama_cpp_bpe(piece, ranks, vocab)]
    assert ids == tokenizer.encode(sample)


def test_gpt2_vocabulary(tmp_path, shared_file):
    encoder = json.loads(shared_file("gpt2/encoder.json").read_text(encoding="utf-8"))
    tok = tokenizers_bpe.load_gpt2(shared_file("gpt2/encoder.json"), shared_file("gpt2/vocab.bpe"))
    GPT(GPTConfig.from_preset("tiny", vocab_size=tok.n_vocab)).save_pretrained(tmp_path / "ours", tokenizer=tok)
    assert convert(["gguf", str(tmp_path / "ours"), str(tmp_path / "m.gguf"), "--dtype", "f16"]) == 0
    reader, _ = read_back(tmp_path / "m.gguf")
    assert field(reader, "tokenizer.ggml.tokens") == sorted(encoder, key=encoder.__getitem__)
    assert field(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert field(reader, "tokenizer.ggml.eos_token_id") == 50256


@pytest.mark.parametrize("kind, message", [
    ("gpt4", "a tokenizer with GPT-4's pattern cannot be exported to llama.cpp"),
    ("custom", "a tokenizer with a custom pattern cannot be exported to llama.cpp"),
    ("char", "a char tokenizer cannot be exported to llama.cpp"),
    ("rope", "a 'rope' model cannot be exported"),
])
def test_refused_in_one_line_with_nothing_written(tmp_path, capsys, text, tokenizer, kind, message):
    if kind == "char":
        tok = tokenizers_bpe.train_char([text])
    elif kind in ("gpt4", "custom"):
        tok = tokenizers_bpe.train_from_iterator([text], 300, pattern="gpt4" if kind == "gpt4" else r"\w+|\s+|.", progress=False)
    else:
        tok = tokenizer
    overrides = {"pos_embedding": "rope"} if kind == "rope" else {}
    GPT(GPTConfig.from_preset("tiny", vocab_size=tok.n_vocab, **overrides)).save_pretrained(tmp_path / "ours", tokenizer=tok)
    capsys.readouterr()
    assert convert(["gguf", str(tmp_path / "ours"), str(tmp_path / "m.gguf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpt-convert: error: ") and message in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours"]


def test_replaces_only_its_own_output(tmp_path, capsys, tokenizer):
    GPT(GPTConfig.from_preset("tiny", vocab_size=tokenizer.n_vocab)).save_pretrained(tmp_path / "ours", tokenizer=tokenizer)
    out = tmp_path / "m.gguf"
    assert convert(["gguf", str(tmp_path / "ours"), str(out), "--dtype", "f32"]) == 0
    assert convert(["gguf", str(tmp_path / "ours"), str(out), "--dtype", "q8_0"]) == 0
    assert field(gguf.GGUFReader(out), "general.file_type") == 7
    (tmp_path / "notes.gguf").write_text("precious")
    capsys.readouterr()
    assert convert(["gguf", str(tmp_path / "ours"), str(tmp_path / "notes.gguf")]) == 2
    assert "is not a GGUF file this toolkit wrote" in capsys.readouterr().err
    assert (tmp_path / "notes.gguf").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "notes.gguf", "ours"]


def llama_cpp_tool(name: str) -> str:
    """A llama.cpp program from $LLAMA_CPP_BIN or PATH; the test is skipped without one (CI does not
    build llama.cpp: the README says how, and the closing note of issue 21 what was run by hand)."""
    found = shutil.which(name, path=os.environ.get("LLAMA_CPP_BIN") or None)
    if found is None:
        pytest.skip(f"{name} not found: build llama.cpp and put its bin/ on PATH or in $LLAMA_CPP_BIN")
    return found


@pytest.mark.parametrize("vocabulary", ["own", "gpt2"])
def test_llama_cpp_reads_it_as_we_do(tmp_path, text, tokenizer, shared_file, vocabulary):
    """llama.cpp itself, where it is built: its token ids for a text equal ours, and its greedy text
    (llama-simple samples greedily and prints prompt and continuation) equals ours."""
    tokenize, simple = llama_cpp_tool("llama-tokenize"), llama_cpp_tool("llama-simple")
    tok = tokenizer if vocabulary == "own" else tokenizers_bpe.load_gpt2(shared_file("gpt2/encoder.json"),
                                                                        shared_file("gpt2/vocab.bpe"))
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny", vocab_size=tok.n_vocab)).eval()
    model.save_pretrained(tmp_path / "ours", tokenizer=tok)
    assert convert(["gguf", str(tmp_path / "ours"), str(tmp_path / "m.gguf"), "--dtype", "f32"]) == 0

    sample = tmp_path / "sample.txt"
    sample.write_bytes((text + "Héllo wörld 😀 ١٢٣ 12345\r\n  end \u00a0 def f(x):\n\treturn x  ").encode("utf-8"))
    run = subprocess.run([tokenize, "-m", str(tmp_path / "m.gguf"), "-f", str(sample), "--ids", "--log-disable"],
                         capture_output=True, text=True, timeout=120, check=True)
    theirs = ast.literal_eval(run.stdout.strip().splitlines()[-1])
    assert theirs == tok.encode(sample.read_bytes().decode("utf-8"))

    prompt = "ROMEO:"
    ours = generate(model, tok.encode(prompt), 40, temperature=0.0, stop_tokens=[tok.eot_token])[0]
    run = subprocess.run([simple, "-m", str(tmp_path / "m.gguf"), "-n", "40", prompt],
                         capture_output=True, timeout=120, check=True)
    assert run.stdout.decode("utf-8", "replace").strip("\n") == tok.decode(tok.encode(prompt) + list(ours)).strip("\n")
