"""Character-level tokenizer (one id per character, as in Tiny-Shakespeare character models)."""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

from .errors import UnknownCharacterError
from .patterns import split_on_specials
from .tokenizer import Tokenizer


class CharTokenizer(Tokenizer):
    """Ids 0..len(chars)-1 are ``chars`` in order; special tokens come after."""

    type = "char"

    def __init__(self, chars: Sequence[str], special_tokens: Mapping[str, int] | None = None):
        chars = list(chars)
        if not chars or not all(isinstance(c, str) and len(c) == 1 for c in chars):
            raise ValueError("a char tokenizer needs a non-empty list of single characters")
        if len(set(chars)) != len(chars):
            raise ValueError("the character list has duplicates")
        self.chars = chars
        self._char_to_id = {c: i for i, c in enumerate(chars)}
        super().__init__(special_tokens or {}, {i: c.encode("utf-8") for i, c in enumerate(chars)})

    @classmethod
    def from_texts(cls, texts: Iterable[str], special_tokens: Sequence[str] = ()) -> "CharTokenizer":
        """The sorted set of characters in ``texts`` (specials cut out first), then the specials."""
        seen: set[str] = set()
        for text in texts:
            for part in split_on_specials(text, special_tokens):
                seen.update(part)
        if not seen:
            raise ValueError("the corpus is empty: no characters to build a vocabulary from")
        chars = sorted(seen)
        return cls(chars, {t: len(chars) + i for i, t in enumerate(dict.fromkeys(special_tokens))})

    def encode_ordinary(self, text: str) -> list[int]:
        try:
            return list(map(self._char_to_id.__getitem__, text))
        except KeyError as e:
            raise UnknownCharacterError(e.args[0], len(self.chars)) from None

    def _content(self) -> dict:
        return {"chars": "".join(self.chars), "special_tokens": self._special_tokens}

    @classmethod
    def _from_content(cls, d: dict) -> "CharTokenizer":
        if not isinstance(d["chars"], str):
            raise ValueError("'chars' must be a string of the vocabulary's characters")
        return cls(list(d["chars"]), d["special_tokens"])

