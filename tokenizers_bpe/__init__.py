"""Byte-level BPE tokenizers: train (incrementally, in parallel), encode/decode with tiktoken's API
and ids, save/load a versioned ``tokenizer.json``, and read/write tiktoken and GPT-2 files.

    import tokenizers_bpe
    tok = tokenizers_bpe.train(["corpus.txt"], vocab_size=4096)
    tok.save("tokenizer.json")
    tok = tokenizers_bpe.load("tokenizer.json")
    tok = tokenizers_bpe.load_any("cl100k_base.tiktoken")  # or a data/checkpoint directory
    tok.decode(tok.encode("hello world")) == "hello world"
"""

from .char import CharTokenizer
from .errors import InvalidTextError, SettingError, UnknownCharacterError
from .formats import TIKTOKEN_ENCODINGS, load, load_any, load_gpt2, load_tiktoken
from .patterns import GPT2_PATTERN, GPT4_PATTERN, PATTERNS
from .rankfiles import bytes_to_unicode
from .tokenizer import ENDOFTEXT, TOKENIZER_FILE, BPETokenizer, Tokenizer
from .trainer import learn_merges, train, train_char, train_from_iterator

__all__ = [
    "Tokenizer",
    "BPETokenizer",
    "CharTokenizer",
    "UnknownCharacterError",
    "InvalidTextError",
    "SettingError",
    "train",
    "train_from_iterator",
    "train_char",
    "learn_merges",
    "load",
    "load_any",
    "load_gpt2",
    "load_tiktoken",
    "TIKTOKEN_ENCODINGS",
    "bytes_to_unicode",
    "PATTERNS",
    "GPT2_PATTERN",
    "GPT4_PATTERN",
    "ENDOFTEXT",
    "TOKENIZER_FILE",
]
