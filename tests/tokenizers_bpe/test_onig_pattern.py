"""onig_pattern: our regexes rewritten for Oniguruma (HF tokenizers' engine) split text into the same
pieces as Python's ``regex``, constructs the two engines read differently included; what is not
known to be the same is refused."""

from __future__ import annotations

import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenizers_bpe.onig_pattern import UnsupportedPatternError, onig_pattern
from tokenizers_bpe.patterns import GPT2_PATTERN, GPT4_PATTERN

tokenizers = pytest.importorskip("tokenizers")

# The constructs whose meaning differs between the engines: $ (before any newline in Oniguruma),
# X{n,m}+ (a repetition of X{n,m} there), \s (U+0085, U+001C..U+001F), \p{..} tables, (?i) folding.
TRICKY = r"""'(?i:[sdmt]|ll)|\p{N}{1,3}+|\w+$|[^\s\w]{2}+|\s++$|\s*[\r\n]|\s+(?!\S)|\s|\S"""
ALPHABET = "ab1234 \n\r\t\u0085\x1c\x1f\u00a0\u2028!?.'sSſKé٣😀"


def hf_split(pattern: str):
    split = tokenizers.pre_tokenizers.Split(tokenizers.Regex(onig_pattern(pattern)), "removed", invert=True)
    return lambda text: [piece for piece, _ in split.pre_tokenize_str(text)]


@pytest.mark.parametrize("pattern", [GPT2_PATTERN, GPT4_PATTERN, TRICKY])
def test_same_pieces_as_regex(pattern):
    split = hf_split(pattern)

    @settings(max_examples=300, deadline=None)
    @given(st.one_of(st.text(alphabet=st.sampled_from(ALPHABET), max_size=30), st.text(max_size=30)))
    def check(text):
        text = text.encode("utf-8", "replace").decode("utf-8")
        assert split(text) == regex.findall(pattern, text)

    check()


def test_rewrites():
    assert onig_pattern(r"a$") == r"a(?=\n?\z)"
    assert onig_pattern(r"^a") == r"\Aa"
    assert onig_pattern(r"\d{1,3}+").startswith("(?>[") and onig_pattern(r"\d{1,3}+").endswith("]{1,3})")
    assert onig_pattern(r"(ab){2}+x") == "(?>(ab){2})x"
    assert onig_pattern(r"a++b*+c?+") == "a++b*+c?+"
    assert onig_pattern("[\t]") == r"[\x{9}]"


@pytest.mark.parametrize("pattern, construct", [
    (r"\bword", r"\b"), (r"(?m)^a", "(?m)"), (r"(?P<n>a)", "(?P<"), (r"[[:alpha:]]", "[:"), (r"[a&&b]", "&&"),
    (r"\1", r"\1"), (r"a{x}", "{x}"), (r"(?i:\p{Ll}+)", r"(?i:\p{Ll}"), (r"\e", r"\e"), (r"(a", "("), (r"a)", ")"), (r"\p{NoSuchProperty}", r"\p{NoSuchProperty}"),
])
def test_refuses_what_it_cannot_prove(pattern, construct):
    with pytest.raises(UnsupportedPatternError) as e:
        onig_pattern(pattern)
    assert construct in str(e.value)
