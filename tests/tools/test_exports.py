"""Exports read by other programs give our ids: HF tokenizers / transformers (every kind of tokenizer
trained here), tiktoken, GPT-2's files; transformers' pipeline generates what we generate; a kind a
format cannot represent exactly is refused in one line with nothing written."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tokenizers_bpe
from gpt.model import GPT, GPTConfig
from gpt.sampling import generate
from tools.bpe_export import main as bpe_export
from tools.convert import main as convert
from tools.corpus import plays
from tools.generate import main as gpt_generate

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

SPECIALS = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|ünïcode ✓|>"]
CUSTOM_PATTERN = r"""'(?:s|t|ll)|\p{Lu}?\p{Ll}+|\p{L}+|\d{1,2}+|[^\s\p{L}\d]++|\s+$|\s+(?!\S)|\s"""
# Scripts, emoji (with joiners and skin tones), code, digits, CRLF, whitespace at the end, the
# whitespace characters the regex engines disagree on (U+0085, U+001C..U+001F).
MULTILINGUAL = (
    "Héllo wörld! Ça va? 你好，世界。こんにちは 안녕하세요 Привет, мир! Γειά σου κόσμε مرحبا بالعالم ١٢٣٤ "
    "नमस्ते दुनिया שלום 😀👍🏽👩‍👩‍👧‍👦🇫🇷 naïve café résumé Ǆ ǅ ǆ ﬁ ’s 'S 'LL 'ſ 'K\n"
    "def fib(n: int) -> int:\n\tif n < 2:\n\t\treturn n  # base case\r\n    return fib(n - 1) + fib(n - 2)\n\n"
    "x = {'a': [1, 2, 3.14159], \"b\": None}; 1234567890 ++i && j-- || k != 0;\n"
    "\u0085\x1c\x1d\x1e\x1f\u00a0\u2028\u2029\u3000 \t\n  trailing   \n \n\n"
)
KINDS = ("gpt2", "gpt4", "custom", "specials", "char")


def train(kind: str, text: str):
    if kind == "char":
        return tokenizers_bpe.train_char([text, MULTILINGUAL], special_tokens=SPECIALS[:1])
    pattern = {"gpt2": "gpt2", "gpt4": "gpt4", "custom": CUSTOM_PATTERN, "specials": "gpt4"}[kind]
    specials = SPECIALS if kind == "specials" else SPECIALS[:1]
    return tokenizers_bpe.train_from_iterator([text[:40000], MULTILINGUAL], 420, pattern=pattern,
                                              special_tokens=specials, progress=False)


@pytest.fixture(scope="module")
def builtin_text() -> str:
    return "".join(p.text() for p in plays()[:2])


@pytest.fixture(scope="module")
def shakespeare(shared_file) -> str:
    return shared_file("tinyshakespeare.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def exports(tmp_path_factory, builtin_text):
    """kind -> (our tokenizer, its bpe-export --format hf directory)."""
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for kind in KINDS:
        tok = train(kind, builtin_text)
        tok.save(root / f"{kind}.json")
        assert bpe_export([str(root / f"{kind}.json"), "--format", "hf", "-o", str(root / kind)]) == 0
        out[kind] = (tok, root / kind)
    return out


def ours(tok, text: str) -> list[int]:
    return tok.encode(text, allowed_special="all")


@pytest.mark.parametrize("kind", KINDS)
def test_hf_ids_equal_ours_on_real_text(exports, kind, shakespeare, builtin_text):
    tok, directory = exports[kind]
    hf = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
    auto = transformers.AutoTokenizer.from_pretrained(directory)
    texts = [shakespeare, builtin_text, MULTILINGUAL, MULTILINGUAL + "".join(tok.special_tokens) + "\n" + MULTILINGUAL + SPECIALS[0]]
    for text in texts:
        if kind == "char":
            text = "".join(c for c in text if c in tok.chars or c in "<|>")
        expected = ours(tok, text)
        assert hf.encode(text).ids == expected
        assert auto.encode(text, add_special_tokens=False) == expected
        assert hf.decode(expected, skip_special_tokens=False) == text
        assert auto.decode(expected) == text


SPECIAL_OR_TEXT = st.one_of(st.text(max_size=40), st.sampled_from(SPECIALS))


@pytest.mark.parametrize("kind", ["gpt2", "gpt4", "custom", "specials"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(SPECIAL_OR_TEXT, max_size=6))
def test_hf_ids_equal_ours_on_random_unicode(exports, kind, parts):
    tok, directory = exports[kind]
    hf = hf_tokenizer(directory)
    text = "".join(parts)
    text = text.encode("utf-8", "replace").decode("utf-8")  # no lone surrogates: HF takes only valid strings
    ids = hf.encode(text).ids
    assert ids == ours(tok, text)
    assert hf.decode(ids, skip_special_tokens=False) == tok.decode(ids) == text


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_hf_char_ids_equal_ours_on_random_text(exports, data):
    tok, directory = exports["char"]
    text = data.draw(st.lists(st.one_of(st.text(alphabet=st.sampled_from(tok.chars)), st.just(SPECIALS[0]))).map("".join))
    ids = hf_tokenizer(directory).encode(text).ids
    assert ids == ours(tok, text)
    assert hf_tokenizer(directory).decode(ids, skip_special_tokens=False) == text


_HF_CACHE: dict = {}


def hf_tokenizer(directory):
    if directory not in _HF_CACHE:
        _HF_CACHE[directory] = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
    return _HF_CACHE[directory]


def test_char_export_rejects_unknown_characters_as_ours_does(exports):
    tok, directory = exports["char"]
    unknown = next(chr(c) for c in range(0x4E00, 0x9FFF) if chr(c) not in tok.chars)
    with pytest.raises(tokenizers_bpe.UnknownCharacterError):
        tok.encode(unknown)
    with pytest.raises(Exception, match="UNK"):
        hf_tokenizer(directory).encode(unknown)


def test_gpt2_files_only_where_exact(exports):
    assert (exports["gpt2"][1] / "vocab.json").is_file() and (exports["gpt2"][1] / "merges.txt").is_file()
    for kind in ("gpt4", "custom", "char"):
        assert not (exports[kind][1] / "vocab.json").exists(), kind
    tok, directory = exports["gpt2"]
    slow = tokenizers_bpe.load_gpt2(directory / "vocab.json", directory / "merges.txt")
    assert slow.encode(MULTILINGUAL) == tok.encode(MULTILINGUAL)


def test_gpt2_vocabulary_itself(shared_file, tmp_path, shakespeare):
    tok = tokenizers_bpe.load_gpt2(shared_file("gpt2/encoder.json"), shared_file("gpt2/vocab.bpe"))
    tok.save(tmp_path / "gpt2.json")
    assert bpe_export([str(tmp_path / "gpt2.json"), "--format", "hf", "-o", str(tmp_path / "hf")]) == 0
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))
    for text in (shakespeare[:200000], MULTILINGUAL):
        assert hf.encode(text).ids == ours(tok, text)


# ------------------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize("pattern, construct", [(r"\b\w+\b|\s+|[^\w\s]", r"\b"), (r"(?m)^\w+|\w+|\s+|[^\w\s]", "(?m)"),
                                                (r"[[a-z]--[aeiou]]+|.|\n", "'[a'"), (r"(?P<w>\w+)|\s|[^\w\s]", "(?P<")])
def test_pattern_without_exact_equivalent_is_refused(tmp_path, capsys, builtin_text, pattern, construct):
    tok = tokenizers_bpe.train_from_iterator([builtin_text[:5000]], 270, pattern=pattern, progress=False)
    tok.save(tmp_path / "tok.json")
    assert bpe_export([str(tmp_path / "tok.json"), "--format", "hf", "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bpe-export: error: a byte-level BPE tokenizer with a custom pattern cannot be exported")
    assert construct in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok.json"]


@pytest.mark.parametrize("kind, fmt, message", [
    ("gpt4", "gpt2", "the gpt4 pattern cannot be exported to GPT-2's encoder.json"),
    ("char", "gpt2", "a char tokenizer cannot be exported"),
    ("char", "tiktoken", "a char tokenizer cannot be exported to tiktoken"),
])
def test_format_that_cannot_hold_the_kind_is_refused(exports, tmp_path, capsys, kind, fmt, message):
    tok, _ = exports[kind]
    tok.save(tmp_path / "tok.json")
    assert bpe_export([str(tmp_path / "tok.json"), "--format", fmt, "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok.json"]


# ------------------------------------------------------------------------------------------ tiktoken, gpt2


@pytest.mark.parametrize("kind", ["gpt2", "custom", "specials"])
def test_tiktoken_rank_file_and_sidecar(exports, tmp_path, kind, builtin_text):
    import base64

    import tiktoken

    tok, _ = exports[kind]
    tok.save(tmp_path / "tok.json")
    out = tmp_path / "mine.tiktoken"
    assert bpe_export([str(tmp_path / "tok.json"), "--format", "tiktoken", "-o", str(out)]) == 0
    spec = json.loads((tmp_path / "mine.tiktoken.json").read_text(encoding="utf-8"))
    with open(out, encoding="ascii") as f:  # as bpe-export --help says
        ranks = {base64.b64decode(t): int(r) for t, r in map(str.split, f)}
    enc = tiktoken.Encoding(spec["name"], pat_str=spec["pat_str"], mergeable_ranks=ranks, special_tokens=spec["special_tokens"])
    text = builtin_text[:20000] + MULTILINGUAL + SPECIALS[0]
    assert enc.encode(text, allowed_special="all") == ours(tok, text)
    # written again over our own output; never over a foreign file
    assert bpe_export([str(tmp_path / "tok.json"), "--format", "tiktoken", "-o", str(out)]) == 0
    (tmp_path / "other.tiktoken").write_text("precious")
    assert bpe_export([str(tmp_path / "tok.json"), "--format", "tiktoken", "-o", str(tmp_path / "other.tiktoken")]) == 2
    assert (tmp_path / "other.tiktoken").read_text() == "precious"


def test_gpt2_format(exports, tmp_path):
    tok, _ = exports["gpt2"]
    tok.save(tmp_path / "tok.json")
    assert bpe_export([str(tmp_path / "tok.json"), "--format", "gpt2", "-o", str(tmp_path / "out")]) == 0
    assert tokenizers_bpe.load_gpt2(tmp_path / "out" / "encoder.json", tmp_path / "out" / "vocab.bpe") == tok


# ------------------------------------------------------------------------------------------ models


@pytest.fixture(scope="module")
def models(tmp_path_factory, exports):
    """kind -> (our checkpoint dir, its hf-export dir): tiny random models over each tokenizer."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for i, kind in enumerate(KINDS):
        tok, _ = exports[kind]
        torch.manual_seed(i)
        model = GPT(GPTConfig.from_preset("tiny", vocab_size=tok.n_vocab, backend="torch")).eval()
        model.save_pretrained(root / kind, tokenizer=tok)
        assert convert(["hf-export", str(root / kind), str(root / f"{kind}-hf")]) == 0
        out[kind] = (root / kind, root / f"{kind}-hf")
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_pipeline_generates_our_greedy_tokens(models, kind, capsys):
    ckpt, hf_dir = models[kind]
    prompt = "ROMEO:\nWhat light"
    model = GPT.from_pretrained(ckpt)
    assert json.loads((hf_dir / "config.json").read_text())["n_ctx"] == model.config.n_ctx  # llama.cpp's converter reads it
    prompt_ids = model.tokenizer.encode(prompt)
    expected = list(prompt_ids) + list(generate(model, prompt_ids, 24, temperature=0.0)[0])
    capsys.readouterr()
    threads = torch.get_num_threads()
    try:
        assert gpt_generate(["--model", str(ckpt), prompt, "-n", "24", "--temperature", "0", "--no-stream", "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    cli_text = capsys.readouterr().out
    assert cli_text.rstrip("\n") == model.tokenizer.decode(expected[len(prompt_ids):]).rstrip("\n")

    pipe = transformers.pipeline("text-generation", model=str(hf_dir), device="cpu")
    hf_ids = pipe.model.generate(torch.tensor([pipe.tokenizer.encode(prompt)]), max_new_tokens=24, do_sample=False,
                                 pad_token_id=model.tokenizer.eot_token)[0].tolist()
    assert pipe.tokenizer.encode(prompt) == prompt_ids
    sample = MULTILINGUAL if kind != "char" else "".join(c for c in MULTILINGUAL if c in model.tokenizer.chars)
    assert pipe.tokenizer.encode(sample) == ours(model.tokenizer, sample)  # the export's own tokenizer files
    assert hf_ids == expected
    result = pipe(prompt, max_new_tokens=24, do_sample=False, return_full_text=False)
    assert isinstance(result[0]["generated_text"], str)


def test_hf_export_refuses_an_inexact_tokenizer_and_writes_nothing(tmp_path, capsys, builtin_text):
    tok = tokenizers_bpe.train_from_iterator([builtin_text[:5000]], 270, pattern=r"\b\w+|\s+|.", progress=False)
    GPT(GPTConfig.from_preset("tiny", vocab_size=tok.n_vocab)).save_pretrained(tmp_path / "ours", tokenizer=tok)
    assert convert(["hf-export", str(tmp_path / "ours"), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "cannot be exported to Hugging Face tokenizers exactly" in err and err.count("\n") == 1
    assert not (tmp_path / "hf").exists()
