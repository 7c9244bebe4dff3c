"""Writes that fail part-way, outputs named wrongly, and what the machine gives (issue 23), found by
running every writing command on small tmpfs mounts, with a full $TMPDIR, and with odd output paths:
each is one line and exit 2, never a traceback, and leaves nothing half-written.

- bpe-export --format tiktoken writes two files: a full disk at either leaves the previous pair (or
  nothing), never a new rank file without its sidecar.
- gpt-train FILE with a full disk while preparing its data: the pool's workers took the tokenizer from
  its file, which the failed run's directory took with it; a worker the pool started while the command
  ended printed a traceback for every try.
- A full disk at a line of metrics.jsonl: a bare `[Errno 28]` without a path; now the file, the last good
  checkpoint and the command that resumes.
- torch.compile's C++ build failing (a full $TMPDIR, or any compiler error): a torch traceback; now one
  line naming --compile.
- bpe-train without --max-memory on a corpus that may not fit in memory: a default budget.
- torchrun's variables set by mistake: a KeyError traceback or Python's int() message.
- A file output named with a trailing '/' (a directory) was written as a file of that name; any
  existing directory as gpt-genre-experiment's --work (".", a checkpoint) got its CSVs written into it,
  and a work directory made with other options had its steps reused silently.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import gpt.run_state
import tokenizers_bpe
from tests.conftest import ROOT
from tests.gpt.test_sampling import make_tiny_model, small_tokenizer
from tools.bpe_export import main as bpe_export
from tools.cli import ExitCode
from tools.train import main as train

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--n-ctx", "16", "--batch-size", "2", "--sample-tokens", "0",
        "--progress", "false", "--warmup-steps", "1", "--log-interval", "1"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------------------------------ bpe-export tiktoken


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tok.json"
    tokenizers_bpe.train_from_iterator(["hello world, hello there " * 50], 270).save(path)
    return path


@pytest.mark.parametrize("fails", ["sidecar", "rank file"])
@pytest.mark.parametrize("previous", [False, True])
def test_tiktoken_export_on_a_full_disk_leaves_the_old_pair_or_nothing(tokenizer_file, tmp_path, monkeypatch, capsys,
                                                                      fails, previous):
    out = tmp_path / "e.tiktoken"
    if previous:
        assert bpe_export([str(tokenizer_file), "--format", "tiktoken", "-o", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    capsys.readouterr()
    if fails == "sidecar":
        monkeypatch.setattr("tools.bpe_export.os.fsync", no_space)  # the sidecar's bytes reach the disk first
    else:
        monkeypatch.setattr(tokenizers_bpe.BPETokenizer, "save_tiktoken", lambda self, path: no_space())
    assert bpe_export([str(tokenizer_file), "--format", "tiktoken", "-o", str(out)]) == ExitCode.USER_ERROR
    line = error_line(capsys.readouterr().err)
    assert "no space left on the device" in line and str(out) in line
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no lock, temporary or half pair


# ------------------------------------------------------------------------------------------ gpt-train FILE, data stage

# gpt-train FILE as a console script (which ends at once after an error, killing its pool's workers), on
# a disk that fills up while the data is prepared by two workers.
FULL_IN_DATA = """
import builtins, errno, sys
sys.argv[0] = "gpt-train"
import tools.prepare
def full_open(path, mode="r", *args, **kwargs):
    f = builtins.open(path, mode, *args, **kwargs)
    if "w" in mode and str(path).endswith(".bin"):
        def write(data):
            raise OSError(errno.ENOSPC, "No space left on device")
        f.write = write
    return f
tools.prepare.open = full_open
from tools.train import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_full_disk_while_a_text_run_prepares_its_data_is_one_line(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("".join(f"line {i} of some text to train on, with words.\n" for i in range(3000)))
    run = tmp_path / "run"
    done = subprocess.run([sys.executable, "-c", FULL_IN_DATA, str(text), "--out", str(run), "--vocab-size", "300", *TINY,
                           "--max-steps", "1"], env=ENV, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == ExitCode.USER_ERROR, done.stderr[-3000:]
    line = error_line(done.stderr)
    assert "no space left on the device" in line and "data" in line
    assert not run.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["t.txt"]


# ------------------------------------------------------------------------------------------ metrics.jsonl


def test_a_full_disk_at_a_metrics_line_names_it_and_the_checkpoint_to_resume_from(data_dir, tmp_path, monkeypatch, capsys):
    real_open = open

    def full_from_step_3(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if Path(path).name == "metrics.jsonl" and "a" in mode:
            write = f.write

            def full_write(text):
                if json.loads(text).get("step", 0) >= 3:
                    write(text[:5])  # a line cut short, as a full disk leaves it
                    raise OSError(errno.ENOSPC, "No space left on device")  # (no file name, as at a close)
                return write(text)

            f.write = full_write
        return f

    run = tmp_path / "run"
    monkeypatch.setattr(gpt.run_state, "open", full_from_step_3, raising=False)
    argv = ["--data", str(data_dir), "--out", str(run), *TINY, "--max-steps", "4", "--eval-interval", "2"]
    assert train(argv) == ExitCode.USER_ERROR
    line = error_line(capsys.readouterr().err)
    assert f"{run / 'metrics.jsonl'}: no space left on the device" in line
    assert "step-000002 is intact" in line and f"gpt-train --resume {run}" in line
    monkeypatch.undo()
    assert train(["--resume", str(run)]) == 0
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and max(steps) == 4  # the cut line dropped, nothing logged twice out of order


# ------------------------------------------------------------------------------------------ torch.compile

# A C++ compiler that answers torch's version probes and fails every build, as a full $TMPDIR makes g++ fail.
FAILING_CXX = """#!/bin/sh
for a in "$@"; do case "$a" in --version|-v|-dumpversion|-dumpmachine|-E) exec g++ "$@";; esac; done
echo "<built-in>: fatal error: when writing output to /tmp/x/header.i: {message}" >&2
exit 1
"""

needs_gxx = pytest.mark.skipif(shutil.which("g++") is None or sys.platform != "linux",
                               reason="torch.compile's CPU build needs g++ (the failing compiler probes it)")


def failing_compiler(tmp_path: Path, message: str) -> dict:
    cxx = tmp_path / "failing-g++"
    cxx.write_text(FAILING_CXX.format(message=message))
    cxx.chmod(0o755)
    return {**ENV, "CXX": str(cxx), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}  # (no cached build to reuse)


@needs_gxx
def test_torch_compile_on_a_full_tmpdir_is_one_line_naming_compile(data_dir, tmp_path):
    run = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "tools.train", "--data", str(data_dir), "--out", str(run), *TINY,
                           "--max-steps", "2", "--compile", "true"], env=failing_compiler(tmp_path, "No space left on device"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == ExitCode.USER_ERROR, done.stderr[-3000:]
    line = error_line(done.stderr)
    assert "torch.compile could not write its build files" in line and "no space left" in line and "--compile" in line
    assert not run.exists()  # the run had written nothing useful


@needs_gxx
def test_a_failing_torch_compile_in_generation_is_one_line_naming_compile(tmp_path):
    model = tmp_path / "model"
    make_tiny_model(small_tokenizer()).save_pretrained(model)
    env = failing_compiler(tmp_path, "internal compiler error")
    before = {p.name for p in tmp_path.iterdir()}
    done = subprocess.run([sys.executable, "-m", "tools.generate", "--model", str(model), "hi", "-n", "3", "--compile"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == ExitCode.USER_ERROR, done.stderr[-3000:]
    line = error_line(done.stderr)
    assert "torch.compile failed on this machine" in line and "run without --compile" in line
    assert {p.name for p in tmp_path.iterdir()} - before <= {"inductor"}  # no compile cache left beside the model


# ------------------------------------------------------------------------------------------ bpe-train's memory


def test_a_corpus_that_may_not_fit_in_memory_trains_in_a_default_budget(tmp_path, monkeypatch, capsys):
    """Without --max-memory, training held every distinct piece in memory, and a corpus too varied for
    the machine got the process killed. Where the files may not fit (40 bytes per corpus byte at
    worst), a budget of 3/4 of the available memory applies: the same tokenizer, spilled to disk."""
    import tokenizers_bpe.membudget as membudget
    from tools.bpe_train import main as bpe_train

    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"word{i % 5000} and line {i} of text.\n" for i in range(120_000)))  # ~4 MB
    assert bpe_train([str(corpus), "-o", str(tmp_path / "free.json"), "--vocab-size", "400", "--quiet"]) == 0
    assert "budget" not in capsys.readouterr().err  # this machine has the memory: no budget
    monkeypatch.setattr(membudget, "available_memory", lambda: 200 * 10**6)  # 4 MB x 40 > 3/4 of 200 MB
    assert bpe_train([str(corpus), "-o", str(tmp_path / "budget.json"), "--vocab-size", "400", "--quiet"]) == 0
    assert "training in a budget of 150.0 MB" in capsys.readouterr().err
    assert (tmp_path / "budget.json").read_bytes() == (tmp_path / "free.json").read_bytes()


# ------------------------------------------------------------------------------------------ torchrun's variables


@pytest.mark.parametrize("env, name", [({"WORLD_SIZE": "x"}, "WORLD_SIZE"), ({"WORLD_SIZE": "2"}, "RANK"),
                                       ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK"), ({"WORLD_SIZE": "9" * 5000}, "WORLD_SIZE"),
                                       ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "-1"}, "LOCAL_RANK")])
def test_stray_torchrun_variables_are_one_line_before_anything_is_written(data_dir, tmp_path, monkeypatch, capsys, env, name):
    """WORLD_SIZE without RANK was a KeyError traceback, a garbled one Python's int() message."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    run = tmp_path / "run"
    assert train(["--data", str(data_dir), "--out", str(run), *TINY, "--max-steps", "1"]) == ExitCode.USER_ERROR
    line = error_line(capsys.readouterr().err)
    assert f"the environment variable {name} must be an integer" in line and "torchrun" in line and len(line) < 400
    assert not run.exists()


# ------------------------------------------------------------------------------------------ output paths


@pytest.mark.parametrize("argv", [["bpe-train", "{text}", "-o", "{tmp}/new/"],
                                  ["bpe-export", "{tok}", "--format", "tiktoken", "-o", "{tmp}/new/"],
                                  ["gpt-convert", "gguf", "{model}", "{tmp}/new/"]])
def test_a_file_output_ending_with_a_slash_is_refused(tokenizer_file, tmp_path, capsys, argv):
    """Path("new/") is Path("new"): the file was written under the directory's name."""
    from tools.bpe_train import main as bpe_train
    from tools.convert import main as convert

    model = tmp_path / "model"
    make_tiny_model(small_tokenizer()).save_pretrained(model)
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 200)
    before = sorted(p.name for p in tmp_path.iterdir())
    main = {"bpe-train": bpe_train, "bpe-export": bpe_export, "gpt-convert": convert}[argv[0]]
    args = [a.format(text=text, tok=tokenizer_file, model=model, tmp=tmp_path) for a in argv[1:]]
    assert main(args) == ExitCode.USER_ERROR
    assert "new/" in error_line(capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_genre_experiment_works_only_in_its_own_work_directory(tmp_path, capsys):
    from tools.genre_experiment import main as genre

    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    for work in (checkpoint, tmp_path):  # a directory of other things, the current one among them
        assert genre(["--work", str(work), "--data-only"]) == ExitCode.USER_ERROR
        assert "is not a gpt-genre-experiment work directory" in error_line(capsys.readouterr().err)
    assert sorted(p.name for p in checkpoint.iterdir()) == ["config.json"]
    work = tmp_path / "work"
    assert genre(["--work", str(work), "--data-only"]) == 0
    assert genre(["--work", str(work), "--data-only"]) == 0  # its own: the steps done are kept
    made = {p.name: p.read_bytes() for p in work.iterdir()}
    capsys.readouterr()
    assert genre(["--work", str(work), "--data-only", "--seed", "3"]) == ExitCode.USER_ERROR
    assert "made with --seed 1337 (not 3)" in error_line(capsys.readouterr().err)
    assert {p.name: p.read_bytes() for p in work.iterdir()} == made


@pytest.mark.parametrize("argv", [["gpt-train", "--init-from", "", "--data", "{data}", "--out", "{tmp}/run"],
                                  ["gpt-train", "--data", "", "--out", "{tmp}/run"],
                                  ["gpt-generate", "--model", "", "hi"],
                                  ["gpt-finetune", "instruct", "--model", "", "--data", "{tmp}/i.jsonl", "--out", "{tmp}/run"]])
def test_an_empty_path_is_refused_not_taken_for_the_current_directory_or_no_option(data_dir, tmp_path, capsys, argv):
    """`--init-from ''` trained a fresh model for 2,000 steps (the option taken as not given); `--model ''`
    looked for config.json in the current directory."""
    from tools.finetune import main as finetune
    from tools.generate import main as generate

    main = {"gpt-train": train, "gpt-generate": generate, "gpt-finetune": finetune}[argv[0]]
    assert main([a.format(data=data_dir, tmp=tmp_path) for a in argv[1:]]) == ExitCode.USER_ERROR
    assert "an empty path" in error_line(capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


MAIN = {"bpe-train": "tools.bpe_train", "bpe-export": "tools.bpe_export", "gpt-prepare": "tools.prepare",
        "gpt-convert": "tools.convert", "gpt-train": "tools.train", "gpt-finetune": "tools.finetune"}
OUTPUTS = [["bpe-train", "{text}", "-o", "{out}"],
           ["bpe-export", "{tok}", "--format", "hf", "-o", "{out}"],
           ["gpt-prepare", "{text}", "--tokenizer", "{tok}", "-o", "{out}"],
           ["gpt-convert", "hf-export", "{model}", "{out}"],
           ["gpt-convert", "gguf", "{model}", "{out}"],
           ["gpt-train", "--data", "{data}", "--out", "{out}"],
           ["gpt-finetune", "instruct", "--model", "{model}", "--data", "{tmp}/i.jsonl", "--out", "{out}"]]


def _run_with_output(argv, out, data_dir, tokenizer_file, tmp_path, capsys) -> str:
    import importlib

    model = tmp_path / "model"
    if not model.exists():
        make_tiny_model(small_tokenizer()).save_pretrained(model)
        (tmp_path / "t.txt").write_text("hello world " * 200)
        (tmp_path / "i.jsonl").write_text("".join(json.dumps({"instruction": f"Say {w}.", "input": "", "output": w}) + "\n"
                                                  for w in ("hi", "yo", "ho", "ha")))
    args = [a.format(text=tmp_path / "t.txt", tok=tokenizer_file, model=model, data=data_dir, tmp=tmp_path, out=out)
            for a in argv[1:]]
    assert importlib.import_module(MAIN[argv[0]]).main(args) == ExitCode.USER_ERROR
    return error_line(capsys.readouterr().err)


@pytest.mark.parametrize("argv", OUTPUTS, ids=lambda a: " ".join(a[:2]))
def test_stdout_is_not_an_output_path(argv, data_dir, tokenizer_file, tmp_path, capsys, monkeypatch):
    """`-o -` wrote a file named '-' in the current directory where stdout was meant."""
    monkeypatch.chdir(tmp_path)
    assert "this command writes files, not stdout" in _run_with_output(argv, "-", data_dir, tokenizer_file, tmp_path, capsys)
    assert not (tmp_path / "-").exists()


@pytest.mark.parametrize("argv", OUTPUTS, ids=lambda a: " ".join(a[:2]))
def test_an_output_under_a_file_or_with_too_long_a_name_is_one_line(argv, data_dir, tokenizer_file, tmp_path, capsys,
                                                                     monkeypatch):
    """A file where a directory of the output path should be: "cannot write there (File exists)"; a
    name past the file system's limit: a bare `[Errno 36] File name too long`."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    line = _run_with_output(argv, "afile/sub/out", data_dir, tokenizer_file, tmp_path, capsys)
    assert "afile is a file, not a directory" in line
    line = _run_with_output(argv, "n" * 300, data_dir, tokenizer_file, tmp_path, capsys)
    assert "a name longer than the file system allows" in line and "Errno" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "i.jsonl", "model", "t.txt"]


# ------------------------------------------------------------------------------------------ names not in UTF-8

NOT_UTF8 = os.fsdecode(b"caf\xe9")  # a Latin-1 name: Python keeps the byte as a surrogate


def console(prog: str, module: str, *args: str) -> subprocess.CompletedProcess:
    """``prog`` run as its console script is, with the strict stdout of a UTF-8 locale other than C.UTF-8."""
    script = f"import sys; sys.argv[0] = {prog!r}; import tools; from {module} import main; raise SystemExit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", script, *args], env={**ENV, "PYTHONIOENCODING": "utf-8"},
                          capture_output=True, timeout=300)


def test_a_run_directory_named_in_latin1_is_written_and_read_back(data_dir, tmp_path):
    """Written, then unreadable: safetensors' reader takes UTF-8 names only, so --resume called the run
    "corrupt" and gpt-generate, gpt-inspect and gpt-convert refused its models; and every line naming
    the directory on a strict stdout failed the command after its work was done."""
    run = str(tmp_path / f"run-{NOT_UTF8}")
    steps = [("gpt-train", "tools.train", "--data", str(data_dir), "--out", run, *TINY, "--max-steps", "2"),
             ("gpt-train", "tools.train", "--resume", run, "--max-steps", "3"),
             ("gpt-inspect", "tools.inspect_checkpoint", run),
             ("gpt-generate", "tools.generate", "--model", f"{run}/final", "-n", "2", "To"),
             ("gpt-convert", "tools.convert", "hf-export", f"{run}/final", str(tmp_path / f"hf-{NOT_UTF8}")),
             ("gpt-convert", "tools.convert", "hf-import", str(tmp_path / f"hf-{NOT_UTF8}"), str(tmp_path / NOT_UTF8),
              "--tokenizer", f"{run}/final/tokenizer.json")]
    for prog, module, *args in steps:
        done = console(prog, module, *args)
        assert done.returncode == 0 and b"Traceback" not in done.stderr, (args, done.stderr[-3000:])
        assert os.fsencode(NOT_UTF8) in done.stdout + done.stderr or prog == "gpt-generate"
    assert (Path(run) / "checkpoints" / "step-000003").is_dir() and (tmp_path / NOT_UTF8 / "model.safetensors").is_file()


def test_latin1_output_names_for_exports(tokenizer_file, tmp_path):
    """A GGUF file's model name is its file name, shown as text; a tiktoken sidecar records its rank
    file's name, which JSON cannot hold in another encoding: refused, nothing written."""
    import gguf

    model = tmp_path / "model"
    make_tiny_model(small_tokenizer()).save_pretrained(model)
    out = tmp_path / f"{NOT_UTF8}.gguf"
    done = console("gpt-convert", "tools.convert", "gguf", str(model), str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert gguf.GGUFReader(out).fields["general.name"].contents() == "caf\ufffd"
    done = console("bpe-export", "tools.bpe_export", str(tokenizer_file), "--format", "tiktoken", "-o", str(tmp_path / f"{NOT_UTF8}.tiktoken"))
    assert done.returncode == ExitCode.USER_ERROR and "not valid UTF-8" in error_line(done.stderr.decode())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model", out.name])


@pytest.mark.parametrize("argv", [
    ["bpe-train", "--special", NOT_UTF8], ["bpe-train", "--pattern", NOT_UTF8 + "|(?s:.)"], ["bpe-train", "--char", "--special", NOT_UTF8],
    ["gpt-train", "--special", NOT_UTF8], ["gpt-train", "--sample-prompt", NOT_UTF8],
])
def test_text_options_in_another_encoding_are_refused_before_any_work(tmp_path, capsys, argv):
    """A special token, pattern or prompt holding a byte that is not UTF-8: the tokenizer was trained and
    then could not be saved (a raw codec message), or the prompt's byte became U+FFFD silently."""
    from tools.bpe_train import main as bpe_train

    text = tmp_path / "t.txt"
    text.write_text("some words to train on, and more words.\n" * 50)
    prog, *options = argv
    if prog == "bpe-train":
        rc = bpe_train([str(text), "-o", str(tmp_path / "tok.json"), *options])
    else:
        rc = train([str(text), "--out", str(tmp_path / "run"), *options, *TINY, "--max-steps", "1"])
    assert rc == ExitCode.USER_ERROR and "not valid UTF-8" in error_line(capsys.readouterr().err)
    assert [p.name for p in tmp_path.iterdir()] == ["t.txt"]


def test_a_tokenizer_file_with_a_lone_surrogate_is_refused_on_load(tokenizer_file, tmp_path):
    meta = json.loads(tokenizer_file.read_text())
    meta["special_tokens"] = {"\udce9": max(meta["special_tokens"].values())}
    bad = tmp_path / "tok.json"
    bad.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="valid UTF-8"):
        tokenizers_bpe.load(bad)


def test_lora_options_without_a_rank_are_refused(tmp_path, capsys):
    """--lora-targets without --lora-rank was ignored: a full fine-tune."""
    from tools.finetune import main as finetune

    rc = finetune(["instruct", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "d.json"), "--out", str(tmp_path / "o"),
                   "--lora-targets", "mlp"])
    assert rc == ExitCode.USER_ERROR and "--lora-targets needs --lora-rank" in error_line(capsys.readouterr().err)
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------ the process's limits


@pytest.mark.parametrize("limit, says", [("RLIMIT_FSIZE", "the limit on file size of this process (ulimit -f) is reached"),
                                         ("RLIMIT_NOFILE", "the limit on open files of this process (ulimit -n) is reached")])
def test_a_process_limit_reached_is_one_line_and_leaves_nothing(tokenizer_file, tmp_path, limit, says):
    """`ulimit -f` or `ulimit -n` set low: a raw `[Errno 27] File too large` or `[Errno 24] Too many open files`."""
    import resource

    text = tmp_path / "t.txt"
    text.write_text("some words to train on, and more words.\n" * 20000)
    value = {"RLIMIT_FSIZE": 100_000, "RLIMIT_NOFILE": 12}[limit]
    script = ("import resource, sys; sys.argv[0] = 'gpt-prepare'; import tools; from tools.prepare import main\n"
              f"resource.setrlimit(resource.{limit}, ({value}, resource.getrlimit(resource.{limit})[1]))\n"
              f"raise SystemExit(main([{str(text)!r}, '--tokenizer', {str(tokenizer_file)!r}, '-o', {str(tmp_path / 'data')!r}, "
              "'--quiet', '--workers', '2']))")
    done = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == ExitCode.USER_ERROR and says in error_line(done.stderr), done.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.txt"]


def test_a_gpt_command_under_an_address_space_limit_too_small_for_torch_is_one_line(tmp_path):
    """`ulimit -v` below what PyTorch takes to load: an ImportError or MemoryError traceback at import, or
    C++'s std::bad_alloc abort (exit 134), depending on the limit; now one line before torch is imported."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (400 << 20, resource.RLIM_INFINITY))

    script = "import sys; sys.argv[0] = 'gpt-inspect'; import tools; from tools.inspect_checkpoint import main; raise SystemExit(main())"
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=ENV, capture_output=True, text=True, timeout=120,
                          preexec_fn=limit)
    assert done.returncode == ExitCode.USER_ERROR and "(ulimit -v 409600) is below the 768 MiB PyTorch needs" in error_line(done.stderr)


@pytest.mark.parametrize("raised, says", [("ImportError('libtorch_cpu.so: failed to map segment from shared object')", "out of memory while loading"),
                                          ("MemoryError()", "out of memory while loading"),
                                          ("ImportError('No module named x')", "cannot be loaded (No module named x); reinstall")])
def test_a_library_that_cannot_be_loaded_is_one_line(raised, says):
    """Outside the command's own handling (torch imported as the command's module loads), a library
    that the memory limit kept from loading, or a broken install, printed a traceback; a bug still does."""
    script = f"import sys; sys.argv[0] = 'gpt-generate'; import tools; raise {raised}"
    done = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True, text=True, timeout=60)
    assert done.returncode == ExitCode.USER_ERROR and says in error_line(done.stderr)
    script = "import sys; sys.argv[0] = 'gpt-generate'; import tools; raise RuntimeError('a bug')"
    done = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "Traceback" in done.stderr


def test_a_loss_plot_that_cannot_be_drawn_is_a_warning_and_the_run_goes_on(tmp_path, monkeypatch, caplog):
    """matplotlib's native libraries not loading (ulimit -v) ended a training run at its first evaluation."""
    import gpt.plot

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # (an import of it raises ImportError)
    monkeypatch.setattr(gpt.plot, "_matplotlib_failed", False)
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": 2.0}\n')
    for _ in range(2):
        gpt.plot.plot_metrics(metrics, tmp_path / "loss.png")
    assert sum("loss.png is not drawn: matplotlib cannot be loaded" in r.message for r in caplog.records) == 1  # (once)
    assert not (tmp_path / "loss.png").exists()


def test_out_of_memory_is_one_line():
    from tools.cli import error_message

    assert error_message(MemoryError()).startswith("out of memory: this process could not get the memory it needs")


def test_a_text_run_short_of_file_descriptors_leaves_no_run_directory(tmp_path):
    """The pool that could not start kept its pipes open through the traceback: the failed run's
    directory could not be removed (no descriptor left), and stayed with its tokenizer in it."""
    text = tmp_path / "t.txt"
    text.write_text("some words to train on, and more words.\n" * 2000)
    script = ("import resource, sys; sys.argv[0] = 'gpt-train'; import tools; from tools.train import main\n"
              "resource.setrlimit(resource.RLIMIT_NOFILE, (10, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))\n"
              f"raise SystemExit(main([{str(text)!r}, '--out', {str(tmp_path / 'run')!r}, '--vocab-size', '280', *{TINY!r}, "
              "'--max-steps', '1']))")
    done = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == ExitCode.USER_ERROR and "ulimit -n" in error_line(done.stderr), done.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.txt"]


def test_a_library_write_past_the_file_size_limit_is_named():
    """safetensors' writer reports `ulimit -f` as its own error type: a traceback, now the limit's line."""
    from tokenizers_bpe.fileio import no_space_as_error

    class SafetensorError(Exception):
        pass

    with pytest.raises(OSError) as e, no_space_as_error(Path("run/best")):
        raise SafetensorError("Error while serializing: I/O error: File too large (os error 27)")
    assert e.value.errno == errno.EFBIG and e.value.filename == "run/best"
