"""bpe-inspect: show what a tokenizer learned: sizes, special tokens, longest tokens, merges, compression."""

from __future__ import annotations

from typing import Sequence

from tokenizers_bpe import BPETokenizer, Tokenizer, load_any
from tokenizers_bpe.errors import byte_size
from tokenizers_bpe.fileio import check_text_file, read_file_blocks
from tokenizers_bpe.patterns import PATTERNS
from tools.cli import ArgumentParser, HelpFormatter, add_tokenizer_arguments, command, integer
from tools.corpus import plays

PROG = "bpe-inspect"


def describe_sizes(tok: Tokenizer) -> str:
    n_special = len(tok.special_tokens)
    if isinstance(tok, BPETokenizer):
        return f"{tok.n_vocab} ids = 256 bytes + {len(tok.mergeable_ranks) - 256} merges + {n_special} special"
    return f"{tok.n_vocab} ids = {tok.n_vocab - n_special} characters + {n_special} special"


def _show(token: bytes, width: int = 32) -> str:
    text = token.decode("utf-8", errors="backslashreplace")
    return repr(text) if len(text) <= width else f"{text[:width]!r}...({len(token)} bytes)"


def _show_merges(merges, by_rank) -> str:
    return ", ".join(f"{_show(by_rank[a])}+{_show(by_rank[b])}" for a, b in merges)


@command(PROG)
def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog=PROG, formatter_class=HelpFormatter, description=__doc__.split(": ", 1)[1].strip())
    add_tokenizer_arguments(p, "tokenizer")
    p.add_argument("--sample", metavar="FILE", help="measure compression on this UTF-8 file (its first 16 MB; default: about 1 MB of the built-in corpus)")
    p.add_argument("--top", type=integer(1), default=10, help="how many tokens/merges to list")
    args = p.parse_args(argv)
    tok = load_any(args.tokenizer, pattern=args.pattern)
    print(f"{args.tokenizer}: {tok.type} tokenizer, fingerprint {tok.fingerprint()[:16]}")
    print(f"  vocabulary     {describe_sizes(tok)}")
    specials = ", ".join(f"{t}={i}" for t, i in tok.special_tokens.items()) or "none"
    print(f"  special tokens {specials}")
    if isinstance(tok, BPETokenizer):
        named = next((name for name, rx in PATTERNS.items() if rx == tok.pattern), None)
        print(f"  pattern        {named + ' (as tiktoken)' if named else repr(tok.pattern)}")
        ranks = tok.mergeable_ranks
        lengths = sorted(len(t) for t in ranks)
        print(f"  token bytes    mean {sum(lengths) / len(lengths):.2f}, median {lengths[len(lengths) // 2]}, max {lengths[-1]}")
        longest = sorted(ranks, key=lambda t: (-len(t), ranks[t]))[: args.top]
        print("  longest tokens " + ", ".join(f"{_show(t)} ({ranks[t]})" for t in longest))
        by_rank = sorted(ranks, key=ranks.get)
        try:
            merges = tok.merges
        except ValueError as e:  # a rank file whose token is no merge: tiktoken still encodes with it
            print(f"  merges         none: {e}")
        else:
            print(f"  first merges   {_show_merges(merges[: args.top], by_rank)}")
            print(f"  last merges    {_show_merges(merges[-args.top :], by_rank)}")
    else:
        print(f"  characters     {''.join(tok.chars)!r}")
    sample, label = _sample(args.sample)
    try:
        ids = tok.encode(sample, disallowed_special=())
    except ValueError as e:  # e.g. a char-level vocabulary that lacks a character of the sample
        print(f"  compression    not measurable on {label}: {e}")
        return 0
    n_bytes = len(sample.encode("utf-8"))
    print(
        f"  compression    {label}: {n_bytes:,} bytes -> {len(ids):,} tokens = "
        f"{n_bytes / max(1, len(ids)):.2f} bytes/token, {len(sample) / max(1, len(ids)):.2f} chars/token"
    )
    return 0


SAMPLE_BYTES = 16 << 20  # plenty to measure compression (a 5 GB --sample, encoded whole, held some 45 GB of ids)


def _sample(path: str | None) -> tuple[str, str]:
    if path is not None:
        texts, size = [], 0
        for text, n in read_file_blocks(check_text_file(path)):
            texts.append(text)
            size += n
            if size >= SAMPLE_BYTES:
                return "".join(texts), f"{path} (its first {byte_size(size)})"
        return "".join(texts), path
    texts, size = [], 0
    for play in plays():
        texts.append(play.text())
        size += len(texts[-1])
        if size >= 1_000_000:
            break
    return "\n".join(texts), f"the first {len(texts)} plays of the built-in corpus"


if __name__ == "__main__":
    raise SystemExit(main())
