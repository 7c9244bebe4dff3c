"""What gpt-convert (hf-export, gguf) and bpe-export write for other programs: Hugging Face tokenizer
files, tiktoken's rank file with its sidecar, GPT-2's vocabulary files and GGUF, each checked to be
exact (or refused, with the reason) before anything is written."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from gpt.gguf_export import GGUF_TOOLKIT_FORMAT, GGUF_TOOLKIT_KEY, check_gguf_exportable, write_gguf
from gpt.model import GPT
from tokenizers_bpe import BPETokenizer, Tokenizer
from tokenizers_bpe.errors import OutputError
from tokenizers_bpe.fileio import Stamp, current_umask, format_stamp, no_space_as_error
from tokenizers_bpe.hf_tokenizer import (
    HF_SPECIAL_TOKENS_MAP_FILE, HF_TOKENIZER_CONFIG_FILE, HF_TOKENIZER_FILE, ExportError, dumps, hf_gpt2_files_exact,
    hf_tokenizer_config, hf_tokenizer_json,
)
from tokenizers_bpe.onig_pattern import UnsupportedPatternError
from tokenizers_bpe.patterns import GPT2_PATTERN, GPT4_PATTERN
from tools.cli import CLIError

TIKTOKEN_SIDECAR_FORMAT = "gpt2-toolkit-tiktoken-encoding"
GGUF_STAMP = Stamp(GGUF_TOOLKIT_FORMAT, "a GGUF file")
# Text on which an export is checked against our ids when HF tokenizers is installed: scripts, emoji,
# code, digits, the whitespace each pattern treats specially (a run at the end, CRLF, U+0085, U+001C).
PROBE_TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
    "Héllo wörld! 你好，世界。 Привет, мир! مرحبا ١٢٣ नमस्ते 😀👍🏽👩‍👩‍👧 naïve café ’s 'S 'll 'VE\n"
    "def f(x: int) -> int:\n\treturn x ** 2  # 12345 1234567 3.14159\r\n  \n\u0085\x1c\u00a0\u2028 end   \n \n"
)


def pattern_name(pattern: str) -> str:
    return {GPT2_PATTERN: "the gpt2 pattern", GPT4_PATTERN: "the gpt4 pattern"}.get(pattern, "a custom pattern")


def tokenizer_kind(tok: Tokenizer) -> str:
    if isinstance(tok, BPETokenizer):
        return f"a byte-level BPE tokenizer with {pattern_name(tok.pattern)}"
    return f"a {tok.type} tokenizer"


def hf_tokenizer_content(tok: Tokenizer) -> dict:
    """HF's tokenizer.json for ``tok``, checked (where HF tokenizers is installed) to give our ids on
    PROBE_TEXT with every special token; a CLIError naming the kind when it cannot be exact."""
    try:
        content = hf_tokenizer_json(tok)
    except (ExportError, UnsupportedPatternError) as e:
        raise CLIError(f"{tokenizer_kind(tok)} cannot be exported to Hugging Face tokenizers exactly: {e}") from None
    try:
        import tokenizers
    except ImportError:
        return content
    try:
        hf = tokenizers.Tokenizer.from_str(json.dumps(content))
    except Exception as e:  # HF's own error type for a pattern its engine rejects (e.g. a variable-length look-behind)
        raise CLIError(f"{tokenizer_kind(tok)} cannot be exported to Hugging Face tokenizers: HF tokenizers cannot read "
                       f"it ({e})") from None
    text = PROBE_TEXT + "".join(tok.special_tokens) + PROBE_TEXT
    if isinstance(tok, BPETokenizer):
        probe = text
    else:  # a char vocabulary knows only its own characters
        probe = "".join(c for c in text if c in tok.chars) + "".join(tok.special_tokens)
    if hf.encode(probe).ids != tok.encode(probe, allowed_special="all"):
        raise CLIError(f"{tokenizer_kind(tok)} cannot be exported to Hugging Face tokenizers exactly: "
                       "HF tokenizers splits a test text differently (please report this)")
    return content


def write_hf_tokenizer(tok: Tokenizer, directory: Path, content: dict, model_max_length: int) -> list[str]:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json and, where they are exact,
    GPT-2's vocab.json + merges.txt into ``directory`` (a fresh temporary one); the names written."""
    config, specials = hf_tokenizer_config(tok, model_max_length)
    (directory / HF_TOKENIZER_FILE).write_text(dumps(content), encoding="utf-8")
    (directory / HF_TOKENIZER_CONFIG_FILE).write_text(dumps(config), encoding="utf-8")
    (directory / HF_SPECIAL_TOKENS_MAP_FILE).write_text(dumps(specials), encoding="utf-8")
    names = [HF_TOKENIZER_FILE, HF_TOKENIZER_CONFIG_FILE, HF_SPECIAL_TOKENS_MAP_FILE]
    if hf_gpt2_files_exact(tok):
        tok.save_gpt2(directory / "vocab.json", directory / "merges.txt")
        names += ["vocab.json", "merges.txt"]
    return names


def tiktoken_sidecar(tok: BPETokenizer, rank_file: Path) -> dict:
    """What tiktoken.Encoding needs besides the ranks, under its own argument names."""
    return {**format_stamp(TIKTOKEN_SIDECAR_FORMAT, 1), "name": rank_file.stem, "rank_file": rank_file.name,
            "pat_str": tok.pattern, "special_tokens": tok.special_tokens}


# ---------------------------------------------------------------------------------------------- GGUF


def is_our_gguf(path: Path) -> bool:
    try:
        import gguf

        field = gguf.GGUFReader(path).fields.get(GGUF_TOOLKIT_KEY)
        return field is not None and field.contents() == GGUF_TOOLKIT_FORMAT
    except Exception:  # not a GGUF file at all (any reader error): not ours
        return False


def check_gguf_output(out: Path) -> None:
    if out.is_symlink() or (out.exists() and not out.is_file()):
        raise OutputError(out, f"OUT {out} exists and is not a file; choose another path")
    if out.exists() and not is_our_gguf(out):
        raise OutputError(out, f"OUT {out} already exists and is not a GGUF file this toolkit wrote; choose a new path, "
                               "or move it away yourself")


def gguf_exportable(model: GPT, src: Path) -> None:
    try:
        check_gguf_exportable(model)
    except ExportError as e:
        raise CLIError(f"{src}: {e}") from None


def display_name(name: str) -> str:
    """A file name as text: bytes that are not UTF-8 (kept by Python as surrogates) shown as U+FFFD."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def write_gguf_atomically(model: GPT, out: Path, dtype: str) -> None:
    """write_gguf into a temporary file beside ``out``, renamed over it when complete."""
    parent = out.parent if str(out.parent) else Path(".")
    with no_space_as_error(out):
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.{os.getpid()}.", suffix=".tmp", dir=parent)
        os.close(fd)
        try:
            with no_space_as_error(out, Path(tmp)):
                os.chmod(tmp, 0o666 & ~current_umask())
                write_gguf(model, tmp, dtype=dtype, name=display_name(out.stem))
            check_gguf_output(out)  # again: something may have appeared there meanwhile
            os.replace(tmp, out)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
