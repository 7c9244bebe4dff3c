"""gpt.compile_cache: the key of a setup (what invalidates compiled code) and files it refuses to load.
Saving and loading real artifacts runs in tests/tools/test_generate.py (gpt-generate --compile)."""

from __future__ import annotations

import os

import torch

from gpt import compile_cache


def make_checkpoint(tmp_path):
    ckpt = tmp_path / "model"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"weights")
    (ckpt / "config.json").write_text("{}")
    return ckpt


def test_the_key_follows_weights_and_setup(tmp_path):
    ckpt = make_checkpoint(tmp_path)
    setup = dict(device="cpu", dtype=torch.float32, quantize=None, batch_size=1)
    path = compile_cache.cache_file(ckpt, **setup)
    assert path.parent == tmp_path / "model.compile-cache" and path.suffix == ".bin"  # beside the checkpoint
    assert compile_cache.cache_file(ckpt, **setup) == path
    for change in (dict(dtype=torch.bfloat16), dict(quantize="int8"), dict(batch_size=8)):
        assert compile_cache.cache_file(ckpt, **{**setup, **change}) != path
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert compile_cache.cache_file(ckpt, **setup) != path
    finally:
        torch.set_num_threads(threads)
    (ckpt / "model.safetensors").write_bytes(b"other weights")
    assert compile_cache.cache_file(ckpt, **setup) != path


def test_refuses_what_it_did_not_write(tmp_path):
    path = tmp_path / "x.bin"
    assert not compile_cache.load(path)  # no file
    path.write_bytes(b"not a cache")
    assert not compile_cache.load(path)  # no header
    path.write_bytes(compile_cache.MAGIC + b"\x00garbage")
    assert not compile_cache.load(path)  # PyTorch cannot read it: compile from scratch
    os.truncate(path, 0)
    assert not compile_cache.load(path)
