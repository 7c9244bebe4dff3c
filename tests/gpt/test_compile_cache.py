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


def test_only_a_file_signed_with_this_user_s_key_is_loaded(tmp_path, monkeypatch):
    """A compile cache beside a checkpoint can come with it from someone else (a tarball extracts as the
    user's own files): its artifacts are unpickled, so a file signed with another key is never loaded."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "mine"))
    key_file = tmp_path / "mine" / "gpt2-toolkit" / "compile-cache.key"
    sig = compile_cache.signature(b"artifacts")
    assert sig is not None and len(sig) == 32 and key_file.stat().st_mode & 0o777 == 0o600
    assert compile_cache.signature(b"artifacts") == sig  # the key is made once
    assert compile_cache.signed_here(b"artifacts", sig) and not compile_cache.signed_here(b"other", sig)
    loaded = []
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", lambda data: loaded.append(data) or object())
    path = tmp_path / "x.bin"
    path.write_bytes(compile_cache.MAGIC + sig + b"artifacts")
    assert compile_cache.load(path) and loaded == [b"artifacts"]
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "theirs"))  # another user, another machine: another key
    assert not compile_cache.load(path) and len(loaded) == 1
    path.write_bytes(compile_cache.MAGIC + b"\0" * 32 + b"artifacts")
    assert not compile_cache.load(path)


def test_a_key_others_can_read_or_none_at_all_keeps_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache.signature(b"x") is not None
    os.chmod(tmp_path / "gpt2-toolkit" / "compile-cache.key", 0o644)
    assert compile_cache.signature(b"x") is None
    monkeypatch.setenv("XDG_CACHE_HOME", "/proc/no-such-place")  # cannot be made
    assert compile_cache.signature(b"x") is None
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (b"artifacts", None))
    assert not compile_cache.save(tmp_path / "c.bin") and not (tmp_path / "c.bin").exists()


def test_a_compiled_package_is_taken_only_with_this_user_s_signature(tmp_path, monkeypatch):
    """gpt.aot_decode's packages are shared libraries: one that came with a checkpoint is built again."""
    from gpt import aot_decode

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "mine"))
    prefix = tmp_path / "model.compile-cache" / "key"
    prefix.parent.mkdir()
    for path in aot_decode.package_paths(prefix):
        path.write_bytes(b"native code")
    assert not aot_decode.packaged(prefix) and aot_decode.will_build(prefix)  # unsigned, as it came
    for path in aot_decode.package_paths(prefix):
        path.with_name(path.name + ".sig").write_bytes(compile_cache.signature(b"native code"))
    assert aot_decode.packaged(prefix)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "theirs"))
    assert not aot_decode.packaged(prefix)
