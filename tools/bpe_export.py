"""bpe-export: write a tokenizer in another library's format, giving the same ids there.

  --format hf        OUT/ for Hugging Face: tokenizer.json (tokenizers.Tokenizer.from_file), with
                     tokenizer_config.json + special_tokens_map.json (transformers' AutoTokenizer),
                     and GPT-2's vocab.json + merges.txt where those are exact (GPT-2's pattern).
                     Every kind trained here: byte-level BPE with the gpt2, gpt4 or a custom pattern
                     (rewritten for HF's regex engine; a construct without a known exact equivalent
                     is refused), and char-level (a WordLevel model over single characters).
  --format tiktoken  OUT (a .tiktoken rank file: base64 token, space, rank per line) and OUT.json
                     beside it with what tiktoken.Encoding needs besides the ranks, under its
                     argument names:
                       import base64, json, tiktoken
                       spec = json.load(open("OUT.json"))
                       ranks = {base64.b64decode(t): int(r) for t, r in map(str.split, open("OUT"))}
                       enc = tiktoken.Encoding(spec["name"], pat_str=spec["pat_str"],
                                               mergeable_ranks=ranks, special_tokens=spec["special_tokens"])
                     (tiktoken.load.load_tiktoken_bpe reads the file too, but caches it by its path
                     in a temporary directory: a file re-exported to the same path is then read
                     stale). Byte-level BPE only.
  --format gpt2      OUT/encoder.json + OUT/vocab.bpe, GPT-2's own files (readers apply GPT-2's
                     pattern, so only a tokenizer with that pattern is exact; others are refused)

A tokenizer that a format cannot represent exactly is refused with one line (exit 2), and nothing
is written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from tokenizers_bpe import BPETokenizer, load_any
from tokenizers_bpe.errors import is_unicode
from tokenizers_bpe.fileio import Stamp, atomic_directory, atomic_write, check_not_a_broken_link, format_stamp, is_stamped
from tokenizers_bpe.hf_tokenizer import dumps, hf_gpt2_files_exact
from tokenizers_bpe.patterns import GPT2_PATTERN
from tools.cli import ArgumentParser, CLIError, HelpFormatter, add_tokenizer_arguments, command, output_path
from tools.exports import TIKTOKEN_SIDECAR_FORMAT, hf_tokenizer_content, tiktoken_sidecar, tokenizer_kind, write_hf_tokenizer
from tools.outputs import check_not_an_input, check_output

PROG = "bpe-export"
FORMATS = ("hf", "tiktoken", "gpt2")
EXPORT_FILE = "gpt2_toolkit_export.json"  # our stamp in an exported directory (other readers ignore it)
DIRECTORY_STAMPS = {
    "hf": Stamp("gpt2-toolkit-tokenizer-export-hf", "a Hugging Face tokenizer export", EXPORT_FILE),
    "gpt2": Stamp("gpt2-toolkit-tokenizer-export-gpt2", "a GPT-2 vocabulary export", EXPORT_FILE),
}
SIDECAR_STAMP = Stamp(TIKTOKEN_SIDECAR_FORMAT, "a tiktoken encoding sidecar")
NO_LENGTH_LIMIT = int(1e30)  # transformers' own "no limit" model_max_length, for a tokenizer without a model


def build_parser() -> ArgumentParser:
    summary, details = __doc__.split("\n\n", 1)
    p = ArgumentParser(prog=PROG, formatter_class=HelpFormatter, description=summary.split(": ", 1)[1].strip(), epilog=details)
    add_tokenizer_arguments(p, "tokenizer")
    p.add_argument("--format", required=True, choices=FORMATS, help="hf, tiktoken or gpt2 (see below)")
    p.add_argument("-o", "--output", required=True, type=output_path, metavar="OUT",
                   help="directory to write (hf, gpt2) or the .tiktoken file (tiktoken; OUT.json beside it)")
    return p


def sidecar_path(rank_file: Path) -> Path:
    return rank_file.with_name(rank_file.name + ".json")


def check_tiktoken_outputs(out: Path, inputs) -> None:
    """The rank file has no stamp of its own: OUT may be replaced only together with its sidecar, ours."""
    if not is_unicode(out.name):  # (bytes Python keeps as surrogates) JSON text cannot hold them
        raise CLIError(f"-o {out}: the name is not valid UTF-8, and {out.name}.json records it for the reader; choose a "
                       "UTF-8 name")
    sidecar = sidecar_path(out)
    check_output(sidecar, SIDECAR_STAMP, "-o", inputs=inputs)
    check_not_an_input(out, inputs, "-o")
    if out.is_symlink() or out.is_dir():
        raise CLIError(f"-o {out} exists and is not a file; choose another path")
    if out.exists() and not is_stamped(sidecar, SIDECAR_STAMP):
        raise CLIError(f"-o {out} already exists and is not a rank file this toolkit wrote (no {sidecar.name} beside it); "
                       "choose a new path, or move it away yourself")


def refuse(tok, target: str, reason: str):
    raise CLIError(f"{tokenizer_kind(tok)} cannot be exported to {target} exactly: {reason}")


@command(PROG)
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_not_a_broken_link(args.tokenizer)
    if not Path(args.tokenizer).exists():
        raise CLIError(f"{args.tokenizer}: no such file or directory; pass a tokenizer.json, a .tiktoken file or a data "
                       "or checkpoint directory")
    out, inputs = Path(args.output), [args.tokenizer]
    if args.format == "tiktoken" and args.output.endswith(("/", os.sep)):
        raise CLIError(f"-o {args.output} names a directory (it ends with '/'); --format tiktoken writes a file: give its path")
    if args.format == "tiktoken":
        check_tiktoken_outputs(out, inputs)
    else:
        check_output(out, DIRECTORY_STAMPS[args.format], "-o", inputs=inputs)
    tok = load_any(args.tokenizer, pattern=args.pattern)
    stamp = {**format_stamp(DIRECTORY_STAMPS.get(args.format, SIDECAR_STAMP).format, 1), "source": str(args.tokenizer)}
    if args.format == "hf":
        content = hf_tokenizer_content(tok)
        with atomic_directory(out, DIRECTORY_STAMPS["hf"]) as tmp:
            (tmp / EXPORT_FILE).write_text(dumps(stamp), encoding="utf-8")
            names = write_hf_tokenizer(tok, tmp, content, NO_LENGTH_LIMIT)
    elif args.format == "gpt2":
        if not isinstance(tok, BPETokenizer):
            refuse(tok, "GPT-2's encoder.json + vocab.bpe", "the format is byte-level BPE")
        if tok.pattern != GPT2_PATTERN:
            refuse(tok, "GPT-2's encoder.json + vocab.bpe", "the format has no pattern and its readers split with "
                   "GPT-2's; use --format hf (or tiktoken), which carries the pattern")
        if not hf_gpt2_files_exact(tok):
            refuse(tok, "GPT-2's encoder.json + vocab.bpe", "a token is no merge of two lower ones, or a special token is "
                   "spelled like an ordinary one")
        with atomic_directory(out, DIRECTORY_STAMPS["gpt2"]) as tmp:
            (tmp / EXPORT_FILE).write_text(dumps(stamp), encoding="utf-8")
            tok.save_gpt2(tmp / "encoder.json", tmp / "vocab.bpe")
        names = ["encoder.json", "vocab.bpe"]
    else:
        if not isinstance(tok, BPETokenizer):
            refuse(tok, "tiktoken", "tiktoken's encodings are byte-level BPE")
        with atomic_write(sidecar_path(out), "w", stamp=SIDECAR_STAMP) as f:
            # The sidecar is on the disk before the rank file replaces OUT, and is renamed right after it:
            # a full disk or an error at either leaves the old pair (or nothing), never half a pair.
            f.write(json.dumps(tiktoken_sidecar(tok, out), ensure_ascii=False, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
            tok.save_tiktoken(out)
        names = [out.name, sidecar_path(out).name]
    print(f"{PROG}: wrote {out} ({', '.join(names)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
