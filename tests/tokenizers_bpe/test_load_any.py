"""tokenizers_bpe.load_any: a tokenizer.json, a .tiktoken rank file (tiktoken's definition for a known
file name, else the gpt2 pattern; the pattern may be replaced), or a directory holding a tokenizer.json."""

from __future__ import annotations

import shutil
from unittest import mock

import pytest

import tokenizers_bpe
from tokenizers_bpe import SettingError
from tokenizers_bpe.patterns import GPT2_PATTERN, GPT4_PATTERN, O200K_PATTERN

from .test_encoding import generated_texts


def test_known_rank_files_get_tiktokens_own_definitions():
    """TIKTOKEN_ENCODINGS holds exactly what tiktoken_ext.openai_public defines for each name."""
    import tiktoken_ext.openai_public as openai_public

    no_files = {"data_gym_to_mergeable_bpe_ranks": lambda *a, **k: {}, "load_tiktoken_bpe": lambda *a, **k: {}}
    with mock.patch.multiple(openai_public, **no_files):
        for stem, (pattern, specials) in tokenizers_bpe.TIKTOKEN_ENCODINGS.items():
            definition = openai_public.ENCODING_CONSTRUCTORS[stem]()
            assert (pattern, specials) == (definition["pat_str"], definition["special_tokens"]), stem
    assert {"gpt2", "r50k_base", "cl100k_base"} <= set(tokenizers_bpe.TIKTOKEN_ENCODINGS)


def test_shared_rank_files_load_as_tiktokens_encodings(shared_file, gpt2, cl100k, tiktoken_encoding):
    for path, ours, name in ((shared_file("cl100k/cl100k_base.tiktoken"), cl100k, "cl100k_base"),
                             (shared_file("gpt2/gpt2.tiktoken"), gpt2, "gpt2")):
        tok = tokenizers_bpe.load_any(path)
        assert tok == ours and tok.special_tokens == tiktoken_encoding(name)._special_tokens
        for text in generated_texts(10):
            assert tok.encode(text, allowed_special="all") == tiktoken_encoding(name).encode(text, allowed_special="all")


def test_other_rank_files_get_the_gpt2_pattern_and_no_specials_unless_told(tmp_path, shared_file, gpt2, tiktoken_encoding):
    import tiktoken

    mine = tmp_path / "mine.tiktoken"
    shutil.copyfile(shared_file("gpt2/gpt2.tiktoken"), mine)
    tok = tokenizers_bpe.load_any(mine)
    assert tok.pattern == GPT2_PATTERN and tok.special_tokens == {}
    assert tok.mergeable_ranks == gpt2.mergeable_ranks
    gpt4_style = tokenizers_bpe.load_any(mine, pattern="gpt4")
    assert gpt4_style.pattern == GPT4_PATTERN
    reference = tiktoken.Encoding("gpt2-ranks-gpt4-pattern", pat_str=GPT4_PATTERN, mergeable_ranks=gpt2.mergeable_ranks, special_tokens={})
    text = "It's 12345 apples\n\n  and     spaces!!\r\n"
    assert gpt4_style.encode_ordinary(text) == reference.encode_ordinary(text) != tok.encode_ordinary(text)
    # no .tiktoken suffix: recognised by its content
    bare = tmp_path / "ranks.txt"
    shutil.copyfile(mine, bare)
    assert tokenizers_bpe.load_any(bare) == tok


def test_a_directory_means_its_tokenizer_json(tmp_path, trained):
    (tmp_path / "data").mkdir()
    trained.save(tmp_path / "data" / "tokenizer.json")
    assert tokenizers_bpe.load_any(tmp_path / "data") == trained
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty: a directory without a tokenizer\.json; pass a tokenizer\.json, a \.tiktoken"):
        tokenizers_bpe.load_any(tmp_path / "empty")


def test_a_pattern_for_a_tokenizer_json_is_a_setting_error(tmp_path, trained):
    trained.save(tmp_path / "tok.json")
    with pytest.raises(SettingError) as e:
        tokenizers_bpe.load_any(tmp_path / "tok.json", pattern="gpt4")
    assert e.value.setting == "pattern" and "applies to a .tiktoken rank file only" in str(e.value)


def test_plain_load_of_a_rank_file_says_what_it_is_and_how_to_load_it(shared_file):
    with pytest.raises(ValueError) as e:
        tokenizers_bpe.load(shared_file("gpt2/gpt2.tiktoken"))
    message = str(e.value)
    assert "gpt2.tiktoken: a .tiktoken rank file" in message and "tokenizers_bpe.load_any(path)" in message
    assert "corrupt" not in message


def test_o200k_pattern_splits_like_tiktoken(play_text, tmp_path):
    """Our regex engine reads o200k_base's pattern as tiktoken does: a tokenizer trained with it and
    saved as a rank file encodes like tiktoken.Encoding with the same ranks and pattern."""
    import tiktoken

    small = tokenizers_bpe.train_from_iterator([play_text], 700, pattern=O200K_PATTERN, workers=1)
    small.save_tiktoken(tmp_path / "small.tiktoken")
    tok = tokenizers_bpe.load_any(tmp_path / "small.tiktoken", pattern=O200K_PATTERN)
    assert tok.pattern == O200K_PATTERN and tok.special_tokens == {}
    reference = tiktoken.Encoding("o200k-small", pat_str=O200K_PATTERN, mergeable_ranks=small.mergeable_ranks, special_tokens={})
    for text in [play_text[:20000], "Don'T CAN'T i'M x/y\n\n/ ABCdef", *generated_texts(30)]:
        assert tok.encode_ordinary(text) == reference.encode_ordinary(text)


def test_a_rank_file_named_like_a_known_one_must_fit_its_special_tokens(tmp_path, trained):
    """A 1024-rank file called gpt2.tiktoken is not GPT-2's: tiktoken's <|endoftext|> = 50256 would leave
    ~49,000 ids unused. Said so, naming the file, rather than loaded with GPT-2's special tokens."""
    trained.save_tiktoken(tmp_path / "gpt2.tiktoken")
    with pytest.raises(ValueError, match=r"gpt2\.tiktoken: named like tiktoken's gpt2 rank file, whose special tokens "
                                         r"start at id 50256, but it holds 1023 ranks"):
        tokenizers_bpe.load_any(tmp_path / "gpt2.tiktoken")
