"""Files nothing should trust (issue 23): JSON/TOML nested absurdly deep or larger than the format
needs, FIFOs and devices given as inputs or outputs, symlink loops, a full disk at the lock. Each is a
typed one-line error, found without opening what could block or never end."""

from __future__ import annotations

import errno
import json
import os
import threading

import pytest

import tokenizers_bpe
from tokenizers_bpe.errors import InputFileError, NoSpaceError, OutputError
from tokenizers_bpe.fileio import (
    MAX_NESTING,
    Stamp,
    atomic_directory,
    atomic_write,
    check_regular_file,
    check_replaceable,
    parse_json,
    parse_toml,
    read_json,
    read_options_file,
    resolve_path,
)

STAMP = Stamp("test-output", "a test output")


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, '{"a":' * 100_000 + "1" + "}" * 100_000,
                                  "[" * (MAX_NESTING + 1) + "]" * (MAX_NESTING + 1)])
def test_json_nested_too_deep_is_a_one_line_error(tmp_path, text):
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(InputFileError, match="nested more than"):
        read_json(path)


def test_json_nested_within_the_limit_is_read(tmp_path):
    value = 1
    for _ in range(MAX_NESTING - 1):
        value = [value]
    assert parse_json(json.dumps(value), "x") == value


@pytest.mark.parametrize("text", ["a = " + "[" * 100_000 + "]" * 100_000, "a = " + "[" * 40 + "]" * 40,
                                  "a = " + "{b = " * 50 + "1" + "}" * 50])
def test_toml_nested_too_deep_is_a_one_line_error(text):
    with pytest.raises(InputFileError, match="nested"):
        parse_toml(text, "run.toml")


def test_options_file_by_suffix_and_size(tmp_path):
    (tmp_path / "a.toml").write_text("lr = 0.1\n")
    (tmp_path / "a.json").write_text('{"lr": 0.1}')
    assert read_options_file(tmp_path / "a.toml") == read_options_file(tmp_path / "a.json") == {"lr": 0.1}
    big = tmp_path / "big.json"
    big.write_text("[" + "0," * 20 + "0]")
    with pytest.raises(InputFileError, match="more than a JSON file can need"):
        read_json(big, max_bytes=10)


def test_fifo_input_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "tok.fifo"
    os.mkfifo(fifo)
    result = []
    worker = threading.Thread(target=lambda: result.append(pytest.raises(ValueError, tokenizers_bpe.load_any, fifo)), daemon=True)
    worker.start()
    worker.join(10)
    assert not worker.is_alive(), "opening a FIFO blocked"
    assert "FIFO" in str(result[0].value)
    with pytest.raises(InputFileError, match="FIFO"):
        read_json(fifo)
    with pytest.raises(ValueError, match="FIFO"):
        tokenizers_bpe.fileio.check_text_file(fifo)


def test_device_and_fifo_outputs_are_refused_without_reading_them(tmp_path):
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    for path, kind in ((fifo, "FIFO"), ("/dev/full", "device"), ("/dev/zero", "device")):
        with pytest.raises(OutputError, match=kind):
            check_replaceable(path, STAMP)


def test_symlink_loops_are_errors_naming_the_link(tmp_path):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(OutputError, match="symbolic link loop"):
        check_replaceable(loop, STAMP)
    with pytest.raises(InputFileError, match="symbolic link loop"):
        resolve_path(loop)
    with pytest.raises(InputFileError, match="symbolic link loop"):
        check_regular_file(loop)
    with pytest.raises(ValueError, match="symbolic link loop"):
        tokenizers_bpe.fileio.check_text_file(loop)


def test_dangling_symlink_output_is_an_error(tmp_path):
    link = tmp_path / "out.json"
    link.symlink_to(tmp_path / "nowhere" / "x.json")
    with pytest.raises(OutputError, match="does not exist"):
        check_replaceable(link, STAMP)


def test_full_disk_at_the_lock_is_the_disk_message_and_leaves_nothing(tmp_path, monkeypatch):
    real_dump = json.dump

    def full(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and "pid" in obj:  # the lock's holder record
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_dump(obj, f, *args, **kwargs)

    monkeypatch.setattr(json, "dump", full)
    out = tmp_path / "tok.json"
    with pytest.raises(NoSpaceError) as caught:
        with atomic_write(out, stamp=STAMP) as f:
            f.write("{}")
    assert str(caught.value).startswith(f"{out}: no space left on the device")
    assert list(tmp_path.iterdir()) == []


def test_full_disk_message_says_how_much_the_write_needed_at_least(tmp_path):
    out = tmp_path / "out.bin"
    with pytest.raises(NoSpaceError) as caught:
        with atomic_write(out, "wb") as f:
            f.write(b"x" * 3_000_000)
            f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")
    assert "needs more than 3.0 MB, " in str(caught.value) and " free)" in str(caught.value)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(NoSpaceError) as caught:  # a directory output: every file in it counts
        with atomic_directory(tmp_path / "d") as d:
            (d / "a").write_bytes(b"x" * 1_500_000)
            (d / "b").write_bytes(b"x" * 1_000_000)
            raise OSError(errno.ENOSPC, "No space left on device")
    assert "needs more than 2.5 MB, " in str(caught.value)
    assert list(tmp_path.iterdir()) == []


def test_full_disk_in_a_write_leaves_nothing(tmp_path):
    out = tmp_path / "out.txt"

    with pytest.raises(NoSpaceError, match="no space left"):
        with atomic_write(out) as f:
            f.write("x")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["fifo", "directory", "link", "huge"])
def test_a_lock_file_that_is_not_ours_is_refused_before_work_and_kept(tmp_path, kind):
    """Something in the place of ``.NAME.lock`` (a FIFO would block the read, a link point anywhere)
    is named in one line before any work, and left as it is; a huge regular file is no holder."""
    from tools.outputs import check_output

    out, lock = tmp_path / "tok.json", tmp_path / ".tok.json.lock"
    if kind == "fifo":
        os.mkfifo(lock)
    elif kind == "directory":
        lock.mkdir()
    elif kind == "link":
        lock.symlink_to(tmp_path / "elsewhere")
    else:
        lock.write_bytes(b"{" * 1_000_000)
    if kind == "huge":  # unreadable: left by a writer killed while writing it, taken over
        with atomic_write(out, stamp=STAMP) as f:
            f.write("x")
        assert out.read_text() == "x" and not lock.exists()
        return
    with pytest.raises(OutputError, match="not a regular file"):
        check_output(out, STAMP, "-o")
    with pytest.raises(OutputError, match="not a regular file"):
        with atomic_write(out, stamp=STAMP) as f:
            f.write("x")
    assert os.path.lexists(lock) and not out.exists()


def test_a_pattern_that_backtracks_catastrophically_is_an_error_in_time(monkeypatch):
    import time

    from tokenizers_bpe import patterns

    monkeypatch.setattr(patterns, "PATTERN_SECONDS", 0.5)
    patterns.piece_splitter.cache_clear()
    split = patterns.piece_splitter(r"(a|aa)*c|(?s:.)")
    assert split("ab") == ["a", "b"]
    start = time.monotonic()
    with pytest.raises(ValueError, match="backtracks catastrophically"):
        split("a" * 200 + "!")
    assert time.monotonic() - start < 10
    patterns.piece_splitter.cache_clear()
    with pytest.raises(ValueError, match="backtracks catastrophically"):  # the same through training
        tokenizers_bpe.train_from_iterator(["a" * 200 + "!"], vocab_size=300, pattern=r"(a|aa)*c|(?s:.)")
    patterns.piece_splitter.cache_clear()


def test_a_pattern_tiktoken_gives_up_on_is_encoded_in_python_or_an_error_in_time(monkeypatch, capfd):
    """With a lookahead, fancy-regex backtracks, stops at its limit and tiktoken panics: a PanicException
    (a BaseException) with Rust's message and a traceback. The Python path takes over: the same pieces,
    in bounded time or a ValueError, and Rust's message is kept off stderr."""
    from tokenizers_bpe import patterns

    monkeypatch.setattr(patterns, "PATTERN_SECONDS", 0.5)
    patterns.piece_splitter.cache_clear()
    pattern = r"(a|aa)+(?=c)|(?s:.)"
    trained = tokenizers_bpe.train_from_iterator(["aaab cab " * 50], vocab_size=270, pattern=pattern)
    tok = tokenizers_bpe.BPETokenizer(trained.mergeable_ranks, pattern, backend="tiktoken")
    assert tok.encode("aac b") == tokenizers_bpe.BPETokenizer(tok.mergeable_ranks, pattern, backend="python").encode("aac b")
    assert tok.backend == "tiktoken"
    with pytest.raises(ValueError, match="backtracks catastrophically"):
        tok.encode("a" * 3000 + "!")
    err = capfd.readouterr().err
    assert "panicked" not in err and "RUST_BACKTRACE" not in err
    patterns.piece_splitter.cache_clear()


@pytest.mark.parametrize("field, value, words", [
    ("special_tokens", {f"<|s{i}|>": 300 + i for i in range(5000)}, "special tokens"),
    ("pattern", "a|" * 20_000 + "b", "pattern of 40,001 characters"),
    ("format_version", True, "format version"),
    ("type", ["bpe"], "unknown tokenizer type"),
    ("pattern", {"a": 1}, "pattern"),
])
def test_a_tokenizer_json_with_absurd_fields_is_refused_at_load(tmp_path, field, value, words):
    """Sizes that would make every encode slow (thousands of special tokens to search for, a
    megabyte-long regex) and values of the wrong kind are a ValueError naming the file."""
    tok = tokenizers_bpe.train_from_iterator(["hello world " * 50], 260, progress=False)
    tok.save(tmp_path / "tok.json")
    data = json.loads((tmp_path / "tok.json").read_text())
    data[field] = value
    (tmp_path / "tok.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=words) as caught:
        tokenizers_bpe.load(tmp_path / "tok.json")
    assert str(tmp_path / "tok.json") in str(caught.value)


def test_too_many_special_tokens_are_refused_before_training():
    from tokenizers_bpe.errors import SettingError
    from tokenizers_bpe.tokenizer import MAX_SPECIAL_TOKENS
    from tokenizers_bpe.trainer import check_train_settings

    specials = [f"<|s{i}|>" for i in range(MAX_SPECIAL_TOKENS + 1)]
    with pytest.raises(SettingError, match="special tokens"):
        check_train_settings(2 * MAX_SPECIAL_TOKENS, specials)
    check_train_settings(2 * MAX_SPECIAL_TOKENS, specials[:-1])


def test_scratch_arrays_take_their_disk_space_up_front(tmp_path, monkeypatch):
    """A page of a mapped file written to a full disk kills the process (SIGBUS): the space is
    allocated when the file is made, so a full disk is a NoSpaceError saying how much is needed."""
    from tokenizers_bpe.scratch import ScratchArrays

    allocated = []
    real = os.posix_fallocate
    monkeypatch.setattr(os, "posix_fallocate", lambda fd, offset, length: (allocated.append(length), real(fd, offset, length)))
    store = ScratchArrays(tmp_path, {"a": (1000, "i"), "b": (10, "q")})
    store.numpy("a")[:] = 7
    assert allocated == [2 * 4096] and store.numpy("a").sum() == 7000
    store.close()

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(NoSpaceError, match=r"needs about 4 KB") as caught:
        ScratchArrays(tmp_path, {"a": (1000, "i")})
    assert "TMPDIR" in str(caught.value) and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("error, full", [(OSError("16384 requested and 1216 written"), True),  # numpy's tofile
                                         (OSError(errno.ENOSPC, "No space left on device"), True),
                                         (OSError(errno.EDQUOT, "Disk quota exceeded"), True),
                                         (OSError("requested and written"), False), (OSError(errno.EIO, "I/O error"), False)])
def test_short_writes_count_as_a_full_disk(error, full):
    from tokenizers_bpe.fileio import is_out_of_space

    assert is_out_of_space(error) is full


def test_sizes_in_messages_have_units_that_fit():
    from tokenizers_bpe.errors import byte_size

    assert [byte_size(n) for n in (0, 812, 35_400, 3_250_000, 1_500_000_000)] == ["0 bytes", "812 bytes", "35 KB", "3.2 MB", "1.5 GB"]
