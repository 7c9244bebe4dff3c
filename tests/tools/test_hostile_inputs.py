"""Hostile files and edge numbers at the commands (issue 23): every bad input is one line and exit 2,
every interrupt exit 130, nothing hangs, nothing is left after an error, a resumed run never trains on
another tokenizer's ids."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import signal
import shutil
import subprocess
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import tools.prepare
from tokenizers_bpe.trainer import quiet_worker
from tools.cli import ExitCode, command
from tools.convert import main as convert
from tools.corpus import plays
from tools.finetune import main as finetune
from tools.generate import MAX_NUM_SAMPLES, main as generate
from gpt.sampling import MAX_NEW_TOKENS
from gpt.model import GPT
from tools.prepare import main as prepare
from tools.train import main as train
from tools.training import removed_after_early_error
from tests.gpt.test_sampling import make_tiny_model, small_tokenizer

REPO = Path(__file__).resolve().parents[2]

QUICK = ["--progress", "false", "--sample-tokens", "0"]


@pytest.fixture(scope="module")
def tok():
    return small_tokenizer()


@pytest.fixture(scope="module")
def ckpt(tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("hostile") / "model"
    make_tiny_model(tok).save_pretrained(path)
    return path


def one_line(capsys, rc, *words, code=ExitCode.USER_ERROR):
    err = capsys.readouterr().err
    assert rc == code, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], err
    return lines[0]


def edited_copy(src: Path, dst: Path, **model) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["model"].update(model)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


# ---------------------------------------------------------------------------------------------- configs we read


@pytest.mark.parametrize("model", [{"n_embd": 10**9}, {"n_layer": 200_000}, {"n_ctx": 10**30}, {"vocab_size": 2**63},
                                   {"n_ctx": 10**12, "pos_embedding": "rope"}, {"n_embd": None}, {"n_layer": {"a": 1}}])
def test_absurd_model_configs_are_one_line_in_every_command(ckpt, tmp_path, capsys, model):
    bad = edited_copy(ckpt, tmp_path / "bad", **model)
    name = next(iter(model))
    one_line(capsys, generate(["--model", str(bad), "hi", "-n", "2"]), name)
    one_line(capsys, convert(["hf-export", str(bad), str(tmp_path / "hf")]), name)
    assert not (tmp_path / "hf").exists()
    (tmp_path / "i.jsonl").write_text("".join(json.dumps({"instruction": f"a{i}", "output": "b"}) + "\n" for i in range(8)))
    one_line(capsys, finetune(["instruct", "--model", str(bad), "--data", str(tmp_path / "i.jsonl"), "--out", str(tmp_path / "ft")]), name)
    assert not (tmp_path / "ft").exists()


def test_deep_generation_json_and_config_are_one_line(ckpt, tmp_path, capsys):
    bad = edited_copy(ckpt, tmp_path / "deep")
    (bad / "generation.json").write_text("[" * 100_000 + "]" * 100_000)
    one_line(capsys, generate(["--model", str(bad), "hi"]), "generation.json", "nested")
    (tmp_path / "deep.toml").write_text("lr = " + "[" * 100_000 + "]" * 100_000 + "\n")
    one_line(capsys, train(["--config", str(tmp_path / "deep.toml")]), "--config", "nested")


@pytest.mark.parametrize("args", [["--temperature", "5e-324"], ["--top-p", "1e-300"], ["--repetition-penalty", "5e-324"],
                                  ["--top-p", "5e-324", "--top-k", "none"], ["--temperature", "1e-40", "--repetition-penalty", "1e300"]])
def test_edge_sampling_numbers_generate(ckpt, capsys, args):
    assert generate(["--model", str(ckpt), "hi", "-n", "3", "--seed", "1", *args]) == 0, capsys.readouterr().err


def test_edge_numbers_refused_in_one_line(ckpt, tmp_path, capsys, data_dir):
    one_line(capsys, generate(["--model", str(ckpt), "hi", "--seed", str(10**30)]), "--seed")
    one_line(capsys, generate(["--model", str(ckpt), "hi", "--seed", "-1"]), "--seed")
    one_line(capsys, train(["--data", str(data_dir), "--out", str(tmp_path / "r"), "--threads", str(10**9)]), "--threads")
    for threads in (10**6, 10**9):  # (a million made OpenMP crash the process)
        one_line(capsys, generate(["--model", str(ckpt), "hi", "--threads", str(threads)]), "--threads")
    (tmp_path / "t.toml").write_text(f"threads = {10**9}\nseed = {2**64}\n")
    one_line(capsys, train(["--config", str(tmp_path / "t.toml"), "--data", str(data_dir), "--out", str(tmp_path / "r")]), "--config")
    assert not (tmp_path / "r").exists()


def test_num_samples_beyond_memory_is_refused(ckpt, capsys, monkeypatch):
    import gpt.memory
    need = gpt.memory.generation_bytes(GPT.from_pretrained(ckpt).config, MAX_NUM_SAMPLES, 210, 4)
    monkeypatch.setattr(gpt.memory, "available_memory_bytes", lambda: need // 2)
    one_line(capsys, generate(["--model", str(ckpt), "hi", "-n", "200", "--num-samples", str(MAX_NUM_SAMPLES)]), "--num-samples", "memory")


def test_counts_beyond_their_bounds_are_refused_before_any_work(ckpt, tmp_path, capsys):
    """A batch of samples or a length no run could want is an error, not hours of decoding: on the
    command line and in a checkpoint's generation.json."""
    one_line(capsys, generate(["--model", str(ckpt), "hi", "--num-samples", str(MAX_NUM_SAMPLES + 1)]), "--num-samples")
    one_line(capsys, generate(["--model", str(ckpt), "hi", "-n", str(MAX_NEW_TOKENS + 1)]), "--max-new-tokens")
    bad = tmp_path / "ckpt"
    shutil.copytree(ckpt, bad)
    (bad / "generation.json").write_text(json.dumps({"max_new_tokens": 10**12}))
    one_line(capsys, generate(["--model", str(bad), "hi"]), "generation.json", "max_new_tokens")


# ---------------------------------------------------------------------------------------------- hf-import


@pytest.fixture(scope="module")
def hf_dir(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "export"
    assert convert(["hf-export", str(ckpt), str(out)]) == 0
    return out


def hf_copy(hf_dir, tmp_path, config=None, tensors=None, index=None):
    d = tmp_path / "src"
    shutil.copytree(hf_dir, d)
    c = json.loads((d / "config.json").read_text())
    c.update(config or {})
    (d / "config.json").write_text(json.dumps(c))
    if tensors:
        state = load_file(str(d / "model.safetensors"))
        tensors(state)
        save_file(state, str(d / "model.safetensors"))
    if index is not None:
        (d / "model.safetensors.index.json").write_text(index if isinstance(index, str) else json.dumps(index))
    return d


def _first(state, suffix):
    return next(k for k in state if k.endswith(suffix))


@pytest.mark.parametrize("case, kwargs, word", [
    ("n_layer", {"config": {"n_layer": 10**6}}, "n_layer"),
    ("n_embd null", {"config": {"n_embd": None}}, "n_embd"),
    ("n_embd dict", {"config": {"n_embd": {"a": 1}}}, "n_embd"),
    ("n_head bool", {"config": {"n_head": True}}, "n_head"),
    ("3-D conv", {"tensors": lambda s: s.update({_first(s, "attn.c_attn.weight"): s[_first(s, "attn.c_attn.weight")][None]})}, "3 dimensions"),
    ("int64", {"tensors": lambda s: s.update({_first(s, "mlp.c_fc.weight"): s[_first(s, "mlp.c_fc.weight")].long()})}, "int64"),
    ("weight_map list", {"index": {"weight_map": [1, 2]}}, "weight_map"),
    ("weight_map int", {"index": {"weight_map": 5}}, "weight_map"),
    ("weight_map values", {"index": {"weight_map": {"a": 3}}}, "weight_map"),
    ("weight_map path", {"index": {"weight_map": {"a": "../model.safetensors"}}}, "weight_map"),
    ("deep index", {"index": '{"a":' * 100_000 + "1" + "}" * 100_000}, "nested"),
])
def test_hf_import_validates_what_it_reads(hf_dir, tmp_path, capsys, case, kwargs, word):
    src = hf_copy(hf_dir, tmp_path, **kwargs)
    one_line(capsys, convert(["hf-import", str(src), str(tmp_path / "out")]), word)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- interrupts


@pytest.mark.parametrize("command", ["bpe-encode", "bpe-decode", "gpt-generate"])
def test_an_endless_stdin_is_refused_at_its_bound(command, ckpt, tmp_path):
    """`cat /dev/zero | bpe-encode -t tok -` read until the machine ran out of memory: now what a
    command holds whole is read up to tools.cli.MAX_STDIN_BYTES, and more is a one-line error."""
    args = {"bpe-encode": ["-t", str(ckpt), "-"], "bpe-decode": ["-t", str(ckpt), "-"],
            "gpt-generate": ["--model", str(ckpt), "-n", "1", "-"]}[command]
    script = (f"import sys, tools.cli; tools.cli.MAX_STDIN_BYTES = 1 << 20; sys.argv[0] = {command!r}; "
              f"from tools.{ {'bpe-encode': 'bpe_encode', 'bpe-decode': 'bpe_decode', 'gpt-generate': 'generate'}[command]} "
              f"import main; raise SystemExit(main({args!r}))")
    with open("/dev/zero", "rb") as zeros:
        done = subprocess.run([sys.executable, "-c", script], stdin=zeros, capture_output=True, text=True, timeout=120)
    assert done.returncode == ExitCode.USER_ERROR and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (f"{command}: error: {'IDS' if command == 'bpe-decode' else 'TEXT' if command == 'bpe-encode' else 'PROMPT'} "
                                                   "on stdin: more than 1 MiB, which this command holds in memory whole; give it less "
                                                   "(for a corpus, gpt-prepare streams any size)")


@pytest.mark.parametrize("closed, command, args, code, says", [
    ("<&-", "bpe-encode", ["-"], ExitCode.OK, "[]"),  # as an empty stdin
    ("<&-", "bpe-decode", ["-"], ExitCode.USER_ERROR, ""),
    (">&-", "bpe-decode", ["[104, 105]"], ExitCode.OK, ""),
    ("2>&-", "bpe-decode", ["[104, 10**9]"], ExitCode.USER_ERROR, ""),
])
def test_a_closed_standard_stream_is_dev_null(ckpt, tmp_path, closed, command, args, code, says):
    """`<&-` or `>&-` left sys.stdin or sys.stdout None: an AttributeError traceback in every command
    reading stdin or writing it directly, and `2>&-` turned an error's exit status 2 into 1."""
    module = {"bpe-encode": "bpe_encode", "bpe-decode": "bpe_decode"}[command]
    script = (f"import sys; sys.argv[0] = {command!r}; import tools; from tools.{module} import main; "
              f"raise SystemExit(main({['-t', str(ckpt), *args]!r}))")
    done = subprocess.run(["sh", "-c", f'exec "$@" {closed}', "sh", sys.executable, "-c", script], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == code and "Traceback" not in done.stderr + done.stdout, done.stderr
    assert done.stdout.strip() == says


def test_sigterm_is_an_interrupt_in_every_command(capsys):
    @command("gpt-test")
    def main(argv=None):
        signal.raise_signal(signal.SIGTERM)
        raise AssertionError("not reached")

    before = signal.getsignal(signal.SIGTERM)
    assert main([]) == ExitCode.INTERRUPTED
    assert capsys.readouterr().err == "gpt-test: interrupted\n"
    assert signal.getsignal(signal.SIGTERM) == before  # restored after the command


def test_a_console_script_is_never_killed_by_a_late_interrupt(tmp_path):
    """A console script exits 130 on an interrupt while it starts and ends (tools/__init__) and, once its
    exit handlers have run, ignores one: Python's shutdown would otherwise put the default action
    back, and a Ctrl-C in the last milliseconds killed the process by the signal (status -2)."""
    script = ("import atexit, os, signal, sys\n"
              "sys.argv[0] = 'gpt-test'\n"
              "atexit.register(lambda: os.kill(os.getpid(), signal.SIGINT))  # runs after tools' own (LIFO)\n"
              "import tools\n"
              "assert signal.getsignal(signal.SIGINT) is tools._exit_interrupted\n"
              "sys.exit(3)\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 3, run.stderr
    run = subprocess.run([sys.executable, "-c", script.replace("sys.exit(3)", "os.kill(os.getpid(), signal.SIGTERM)")],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert (run.returncode, run.stderr) == (130, "gpt-test: interrupted\n")


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="processes are found through /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_an_interrupted_console_script_stops_the_programs_it_runs_first(tmp_path, sig):
    """subprocess.run SIGKILLs its child on any exception: a C++ compiler driver (torch.compile's) was
    killed so, leaving its temporary files and an orphaned compiler. The command now sends SIGTERM to
    what it runs before the KeyboardInterrupt unwinds, so the child cleans up; nothing is left running."""
    child = ("trap 'rm -f marker; exit 143' TERM INT; touch marker; sleep 60 & echo $! > sleeper; wait")
    script = ("import subprocess, sys\n"
              "sys.argv[0] = 'gpt-test'\n"
              "import tools\n"
              "from tools.cli import command\n"
              f"main = command('gpt-test')(lambda argv: subprocess.run(['sh', '-c', {child!r}]))\n"
              "sys.exit(main([]))\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.monotonic() + 60
    while not (tmp_path / "sleeper").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    os.kill(proc.pid, sig)
    _, err = proc.communicate(timeout=60)
    assert (proc.returncode, err) == (130, "gpt-test: interrupted\n")
    assert not (tmp_path / "marker").exists()  # the child's own cleanup ran
    sleeper = int((tmp_path / "sleeper").read_text())
    time.sleep(0.5)
    assert not os.path.exists(f"/proc/{sleeper}") or open(f"/proc/{sleeper}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"


def test_an_interrupt_swallowed_by_a_finalizer_is_raised_again(capsys):
    """A SIGTERM to gpt-train FILE's group just after its data stage landed in the `regex` module's
    SetBase.__del__ (a pattern being compiled): Python printed the KeyboardInterrupt as an ignored
    exception and the run trained to its end, exit 0. The interrupt is now raised again."""

    class Finalized:
        def __del__(self):
            raise KeyboardInterrupt  # (what the signal handler raises, here inside a finalizer)

    steps = []

    @command("gpt-test")
    def main(argv=None):
        Finalized()  # (collected at once: its exception is "ignored")
        for step in range(200):
            steps.append(step)
            time.sleep(0.01)
        return 0

    assert main([]) == ExitCode.INTERRUPTED
    assert len(steps) < 200 and "Exception ignored" not in capsys.readouterr().err


def test_pool_workers_leave_interrupts_to_the_parent():
    """Out of the parent's process group, so a group signal cannot kill one mid-message (which hung the
    parent's Pool.terminate); SIGTERM, how Pool.terminate ends them, left at its default."""
    with Pool(1, initializer=quiet_worker) as pool:
        handlers, group = pool.apply(_handlers)
    assert handlers == (signal.SIG_IGN, signal.SIG_DFL)
    assert group != os.getpgid(0)


def test_pool_workers_end_when_their_parent_is_gone(tmp_path):
    """Out of the group, no signal reaches a worker: one that outlived its parent (a replacement the
    pool's thread forked just as an interrupted command exited) waited on the task queue for ever,
    holding the command's stdout and stderr open (the caller saw a hang). Now a worker ends itself."""
    pids = tmp_path / "pids"
    # Both workers killed (one held the task queue's lock), the pool's thread forks two replacements,
    # which wait on that lock; the parent then goes without ending its pool.
    script = ("import os, multiprocessing, signal, time; from tokenizers_bpe.trainer import quiet_worker; "
              "pool = multiprocessing.Pool(2, initializer=quiet_worker); time.sleep(0.5); "
              "killed = [p.pid for p in multiprocessing.active_children()]; [os.kill(pid, signal.SIGKILL) for pid in killed]; "
              "deadline = time.time() + 20\n"  # (the pool's thread replaces dead workers every 0.1 s)
              "while time.time() < deadline and len({p.pid for p in multiprocessing.active_children()} - set(killed)) < 2: time.sleep(0.1)\n"
              f"open({str(pids)!r}, 'w').write(' '.join(str(p.pid) for p in multiprocessing.active_children())); "
              "os._exit(0)")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    workers = [int(p) for p in pids.read_text().split()]
    assert len(workers) == 2
    deadline = time.time() + 5
    while time.time() < deadline and any(_running(pid) for pid in workers):
        time.sleep(0.1)
    assert not [pid for pid in workers if _running(pid)]


def test_no_pool_worker_takes_a_task_once_the_command_is_ending():
    """A pool's thread replaces the workers an ending command kills; a replacement that took a task
    after the command had gone printed a BrokenPipeError traceback on its stderr (about one group
    SIGINT in forty to gpt-prepare). Started after no_more_workers, a worker exits at once."""
    script = ("import multiprocessing, sys; from tokenizers_bpe.trainer import no_more_workers, quiet_worker\n"
              "def work():\n    quiet_worker(); print('took a task', flush=True)\n"
              "p = multiprocessing.Process(target=work); p.start(); p.join(); assert p.exitcode == 0\n"
              "no_more_workers(); p = multiprocessing.Process(target=work); p.start(); p.join(); sys.exit(p.exitcode)")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == "took a task\n" and not proc.stderr, (proc.stdout, proc.stderr)


def test_no_pool_forks_a_worker_once_the_command_is_ending():
    """The workers an ending command kills are not replaced: each replacement exited at once (above) and
    was replaced again, so the ending never saw its workers gone, waited its whole grace and left the
    last replacements to init (gpt-train FILE interrupted while preparing its data took 2 s to exit)."""
    script = ("import os, multiprocessing, time; from tokenizers_bpe.trainer import no_more_workers, quiet_worker\n"
              "forks = []; os.register_at_fork(after_in_parent=lambda: forks.append(1))\n"
              "pool = multiprocessing.Pool(2, initializer=quiet_worker); time.sleep(0.5)\n"
              "no_more_workers(); [p.kill() for p in multiprocessing.active_children()]\n"
              "before = len(forks); time.sleep(1); print(len(forks) - before, flush=True); os._exit(0)")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == "0\n" and not proc.stderr, (proc.stdout, proc.stderr)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _session_processes(sid: int, zombies: bool = False) -> list[tuple[int, str]]:
    """(pid, "state wchan cmdline") of the live processes (and the zombies too, with ``zombies``) in
    session ``sid`` (workers leave the process group, not the session)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            fields = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
            if entry.isdigit() and int(fields[3]) == sid and (zombies or fields[0] != "Z"):
                wchan = open(f"/proc/{entry}/wchan").read()
                cmd = open(f"/proc/{entry}/cmdline").read().replace("\0", " ")[:80]
                found.append((int(entry), f"{fields[0]} {wchan} {cmd}"))
        except (OSError, ValueError, IndexError):
            continue
    return found


def _handlers():
    return (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)), os.getpgid(0)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_group_signal_at_any_moment_of_prepare_exits_130(tmp_path, sig):
    """SIGTERM or SIGINT to the whole process group while gpt-prepare's workers encode (the fast native
    encoder leaves them mostly reading tasks and writing results): exit 130 every time, nothing left.
    Before the workers left the group, about one moment in five hung the parent."""
    import time

    text = tmp_path / "t.txt"
    text.write_text(plays()[0].text() * 80)  # ~12 MB
    tokenizer = tmp_path / "tok.json"
    small_tokenizer().save(tokenizer)
    for delay in (0.9, 1.2, 1.5, 1.8, 2.1, 2.4, 2.7, 3.0):
        out = tmp_path / f"d{delay}"
        script = ("import sys; sys.argv[0] = 'gpt-prepare'; import tools; from tools.prepare import main; "
                  f"raise SystemExit(main([{str(text)!r}, '--tokenizer', {str(tokenizer)!r}, '-o', {str(out)!r}, "
                  "'--quiet', '--workers', '2']))")
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True, text=True)
        time.sleep(delay)
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            # What is still there, for the next one to look at: the command itself, or a worker holding its pipes.
            left = _session_processes(proc.pid)
            os.killpg(proc.pid, signal.SIGKILL)
            for pid, _ in left:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            raise AssertionError(f"gpt-prepare hung after {signal.Signals(sig).name} at {delay} s; the command "
                                 f"{'had exited' if proc.poll() is not None else 'still ran'}; processes of its session: "
                                 f"{left}") from None
        assert proc.returncode in (0, ExitCode.INTERRUPTED) and "Traceback" not in err, (proc.returncode, delay, err)
        assert proc.returncode == 0 or not out.exists() or (out / "meta.json").is_file()  # nothing, or all of it
        # Nothing of it runs on, nor waits as a zombie: the pool's thread no longer forks replacements that
        # exit at once (the ending then waited its whole grace and left the last ones to init), and the
        # command reaps the workers it killed.
        deadline = time.time() + 2
        while (left := _session_processes(proc.pid, zombies=True)) and time.time() < deadline:
            time.sleep(0.1)
        assert not left, (delay, left)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary or lock left


def test_interrupted_prepare_exits_130_and_leaves_nothing(tmp_path, capsys, monkeypatch, tok):
    text = tmp_path / "t.txt"
    text.write_text(plays()[0].text())
    tok.save(tmp_path / "tok.json")
    terminated = []

    class InterruptedPool:
        def __init__(self, *args, **kwargs):
            pass

        def map(self, fn, items):
            raise KeyboardInterrupt

        def terminate(self):
            terminated.append(True)

        def close(self):
            pass

        def join(self):
            pass

    monkeypatch.setattr(tools.prepare, "Pool", InterruptedPool)
    rc = prepare([str(text), "--tokenizer", str(tmp_path / "tok.json"), "-o", str(tmp_path / "data"), "--workers", "2", "--quiet"])
    assert rc == ExitCode.INTERRUPTED and terminated == [True]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.txt", "tok.json"]


def test_full_disk_in_prepare_is_the_disk_message(tmp_path, capsys, monkeypatch, tok):
    text = tmp_path / "t.txt"
    text.write_text(plays()[0].text())
    tok.save(tmp_path / "tok.json")
    real = tools.prepare.atomic_write

    def full(path, *args, **kwargs):
        if Path(path).name == "meta.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(tools.prepare, "atomic_write", full)
    rc = prepare([str(text), "--tokenizer", str(tmp_path / "tok.json"), "-o", str(tmp_path / "data"), "--workers", "1", "--quiet"])
    one_line(capsys, rc, f"{tmp_path / 'data'}: no space left on the device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.txt", "tok.json"]


# ---------------------------------------------------------------------------------------------- leftovers


def test_an_early_error_removes_the_run_directory_it_created(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError):
        with removed_after_early_error(out):
            out.mkdir()
            (out / ".lock").write_text("{}")
            raise ValueError("late")
    assert not out.exists()
    out.mkdir()  # one that was there before is the user's: kept
    with pytest.raises(ValueError), removed_after_early_error(out):
        raise ValueError("late")
    assert out.exists()
    with pytest.raises(KeyboardInterrupt), removed_after_early_error(tmp_path / "new"):
        (tmp_path / "new").mkdir()
        raise KeyboardInterrupt  # an interrupt keeps what the same command resumes from
    assert (tmp_path / "new").exists()


def test_an_early_error_keeps_a_new_run_directory_another_process_is_writing(tmp_path):
    """Two commands started on the same new --out at once: the one refused for the lock removed the
    directory the other had just made and was writing (which then failed on a missing metrics.jsonl)."""
    out = tmp_path / "run"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with pytest.raises(ValueError), removed_after_early_error(out):
            out.mkdir()  # made by the other command, which holds its lock
            (out / ".lock").write_text(json.dumps({"pid": other.pid, "host": os.uname().nodename}))
            raise ValueError("run directory in use")
        assert out.exists()
    finally:
        other.kill()
        other.wait()
    with pytest.raises(ValueError), removed_after_early_error(tmp_path / "run2"):
        (tmp_path / "run2").mkdir()  # a lock its process left when it died: nobody's
        (tmp_path / "run2" / ".data.lock").write_text(json.dumps({"pid": other.pid, "host": os.uname().nodename}))
        raise ValueError("late")
    assert not (tmp_path / "run2").exists()


def test_nan_loss_at_the_first_step_leaves_no_run(ckpt, data_dir, tmp_path, capsys, tok):
    nan = tmp_path / "nan"
    model = make_tiny_model(tok)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(math.nan)
    model.save_pretrained(nan)
    (tmp_path / "i.jsonl").write_text("".join(json.dumps({"instruction": f"say {i}", "output": f"ok {i}"}) + "\n" for i in range(8)))
    rc = finetune(["instruct", "--model", str(nan), "--data", str(tmp_path / "i.jsonl"), "--out", str(tmp_path / "ft"),
                   "--max-steps", "2", "--progress", "false"])
    one_line(capsys, rc, str(nan))
    assert not (tmp_path / "ft").exists()


def _filled_model(tok, path: Path, value: float) -> Path:
    model = make_tiny_model(tok)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tok_data(tok, tmp_path_factory):
    """A data directory prepared with ``tok`` (the tokenizer of the tiny models here)."""
    root = tmp_path_factory.mktemp("tokdata")
    (root / "t.txt").write_text(plays()[1].text()[:30_000], encoding="utf-8")
    tok.save(root / "tok.json")
    assert prepare([str(root / "t.txt"), "--tokenizer", str(root / "tok.json"), "-o", str(root / "data"), "--workers", "1", "--quiet"]) == 0
    return root / "data"


@pytest.mark.parametrize("value", [math.nan, -math.inf, 3e38])
def test_damaged_weights_are_a_bad_input_to_training(value, tok, tok_data, tmp_path, capsys):
    """NaN or inf weights, or finite ones so large that the first loss overflows, are the starting
    model's fault, not a run that diverged: exit 2 in one line, before any update, nothing left."""
    bad = _filled_model(tok, tmp_path / "bad", value)
    (tmp_path / "i.jsonl").write_text("".join(json.dumps({"instruction": f"say {i}", "output": f"ok {i}"}) + "\n" for i in range(8)))
    (tmp_path / "c.csv").write_text("text,label\n" + "".join(f"line {i},{'ab'[i % 2]}\n" for i in range(8)))
    one_line(capsys, train(["--data", str(tok_data), "--init-from", str(bad), "--out", str(tmp_path / "run"), "--max-steps", "2", *QUICK]))
    one_line(capsys, finetune(["instruct", "--model", str(bad), "--data", str(tmp_path / "i.jsonl"), "--out", str(tmp_path / "sft"),
                               "--max-steps", "2", "--progress", "false"]))
    one_line(capsys, finetune(["classify", "--model", str(bad), "--train", str(tmp_path / "c.csv"), "--val", str(tmp_path / "c.csv"),
                               "--out", str(tmp_path / "cls"), "--max-steps", "2", "--progress", "false"]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "c.csv", "i.jsonl"]


def test_damaged_weights_are_not_exported_and_float16_range_is_checked(tok, tmp_path, capsys):
    nan = _filled_model(tok, tmp_path / "nan", math.nan)
    one_line(capsys, convert(["hf-export", str(nan), str(tmp_path / "hf")]), "NaN or inf")
    one_line(capsys, convert(["gguf", str(nan), str(tmp_path / "m.gguf")]), "NaN or inf")
    large = _filled_model(tok, tmp_path / "large", 1e5)  # finite, beyond float16's 65504
    one_line(capsys, convert(["gguf", str(large), str(tmp_path / "m.gguf"), "--dtype", "f16"]), "65504", "--dtype f32")
    larger = _filled_model(tok, tmp_path / "larger", 1e7)  # q8_0 keeps a block's largest value / 127 as a float16
    one_line(capsys, convert(["gguf", str(larger), str(tmp_path / "m.gguf"), "--dtype", "q8_0"]), "65504", "--dtype f32")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["large", "larger", "nan"]
    assert convert(["gguf", str(large), str(tmp_path / "m.gguf"), "--dtype", "q8_0"]) == 0
    assert convert(["gguf", str(larger), str(tmp_path / "m2.gguf"), "--dtype", "f32"]) == 0


def test_fine_tuning_data_beyond_memory_is_refused_before_reading(ckpt, tmp_path, capsys, monkeypatch):
    import gpt.memory

    data = tmp_path / "i.json"
    data.write_text(json.dumps([{"instruction": f"say {i} " * 5, "output": f"ok {i}"} for i in range(8000)]))
    monkeypatch.setattr(gpt.memory, "available_memory_bytes", lambda: data.stat().st_size * 8)  # the model fits, the data not
    one_line(capsys, finetune(["instruct", "--model", str(ckpt), "--data", str(data), "--out", str(tmp_path / "ft")]), str(data), "memory")
    (tmp_path / "c.csv").write_text("text,label\n" + "".join(f"{f'line {i} ' * 6},{'ab'[i % 2]}\n" for i in range(8000)))
    one_line(capsys, finetune(["classify", "--model", str(ckpt), "--train", str(tmp_path / "c.csv"), "--val", str(tmp_path / "c.csv"),
                               "--out", str(tmp_path / "cls")]), "c.csv", "memory")
    assert not (tmp_path / "ft").exists() and not (tmp_path / "cls").exists()


def test_a_hostile_metrics_file_on_resume(ckpt, tok_data, tmp_path, capsys):
    """A run's metrics.jsonl is read on --resume: a FIFO is named (not read forever), a line nested
    absurdly deep or not an object is skipped like a line cut short by a crash."""
    args = ["--data", str(tok_data), "--preset", "tiny", "--batch-size", "2", "--block-size", "16", *QUICK]
    run = tmp_path / "run"
    assert train([*args, "--out", str(run), "--max-steps", "2"]) == 0
    with open(run / "metrics.jsonl", "a") as f:
        f.write("[" * 100_000 + "]" * 100_000 + "\n[1, 2]\n{\"step\": \"x\", \"loss\": [1]}\n")
    assert train(["--resume", str(run), "--max-steps", "3", *QUICK]) == 0, capsys.readouterr().err
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(line)["step"] <= 3 for line in lines)
    (run / "metrics.jsonl").unlink()
    os.mkfifo(run / "metrics.jsonl")
    capsys.readouterr()
    one_line(capsys, train(["--resume", str(run), "--max-steps", "4", *QUICK]), "metrics.jsonl", "FIFO")


def test_bad_kernels_backend_leaves_no_run(ckpt, tmp_path, capsys, monkeypatch):
    (tmp_path / "i.jsonl").write_text("".join(json.dumps({"instruction": f"a{i}", "output": "b"}) + "\n" for i in range(8)))
    for variable in ("GPT2_KERNELS_BACKEND", "KERNELS_BACKEND"):
        monkeypatch.setenv(variable, "garbage")
        rc = finetune(["instruct", "--model", str(ckpt), "--data", str(tmp_path / "i.jsonl"), "--out", str(tmp_path / "ft")])
        one_line(capsys, rc, "garbage")
        assert not (tmp_path / "ft").exists()
        monkeypatch.delenv(variable)


# ---------------------------------------------------------------------------------------------- gpt-train FILE


@pytest.fixture
def finished_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("small.txt").write_text(plays()[3].text()[:40_000], encoding="utf-8")
    assert train(["small.txt", "--out", "run", "--preset", "tiny", "--vocab-size", "300", "--max-steps", "2", "--batch-size", "2",
                  "--block-size", "32", *QUICK]) == 0
    return tmp_path / "run"


def test_resume_refuses_changed_text_options_and_keeps_its_tokenizer(finished_run, capsys):
    capsys.readouterr()
    config = (finished_run / "run_config.json").read_bytes()
    Path("other.txt").write_text("other text " * 500)
    for args, word in ((["--val-fraction", "0.2"], "--val-fraction"), (["--pattern", "gpt4"], "--pattern"),
                       (["--char", "true"], "--char"), (["--min-frequency", "3"], "--min-frequency"),
                       (["other.txt"], "FILEs"), (["--builtin", "shakespeare"], "--builtin")):
        one_line(capsys, train(["--resume", "run", "--max-steps", "3", *args]), word)
    assert (finished_run / "run_config.json").read_bytes() == config
    # Its text gone, a run whose data is complete still resumes.
    Path("small.txt").rename("gone.txt")
    assert train(["--resume", "run", "--max-steps", "3", *QUICK]) == 0
    # Its data gone and its text changed: refused before anything is written (the run would continue on
    # other data, its best/ chosen by losses on two validation sets); the same text: prepared again with
    # the run's own tokenizer.
    Path("gone.txt").rename("small.txt")
    original = Path("small.txt").read_bytes()
    with open("small.txt", "a", encoding="utf-8") as f:
        f.write("zebra quokka " * 200)
    tokenizer = (finished_run / "tokenizer.json").read_bytes()
    shutil.rmtree(finished_run / "data")
    before = sorted(p.name for p in finished_run.iterdir())
    capsys.readouterr()
    one_line(capsys, train(["--resume", "run", "--max-steps", "4", *QUICK]), "the text is not the one the run was trained on")
    assert sorted(p.name for p in finished_run.iterdir()) == before
    Path("small.txt").write_bytes(original)
    assert train(["--resume", "run", "--max-steps", "4", *QUICK]) == 0
    assert (finished_run / "tokenizer.json").read_bytes() == tokenizer
    final = json.loads((finished_run / "final" / "config.json").read_text())["tokenizer"]["fingerprint"]
    assert final == json.loads((finished_run / "data" / "meta.json").read_text())["tokenizer_fingerprint"]
    # A tokenizer.json that is no longer the checkpoints' is refused before anything is rewritten.
    shutil.rmtree(finished_run / "data")
    small_tokenizer().save(Path("other.json"))
    (finished_run / "tokenizer.json").write_bytes(Path("other.json").read_bytes())
    before = sorted(p.name for p in finished_run.iterdir())
    capsys.readouterr()
    one_line(capsys, train(["--resume", "run", "--max-steps", "5", *QUICK]), "not the one the run's checkpoints")
    assert sorted(p.name for p in finished_run.iterdir()) == before


def test_text_mode_vocab_size_larger_than_the_text_gives(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path("tiny.txt").write_text("abc abd abe " * 300, encoding="utf-8")
    rc = train(["tiny.txt", "--out", "run", "--preset", "tiny", "--vocab-size", "2000", "--max-steps", "1", "--batch-size", "2",
                "--block-size", "16", *QUICK])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "the model takes its size" in err
    n_vocab = json.loads((tmp_path / "run" / "data" / "meta.json").read_text())["n_vocab"]
    assert json.loads((tmp_path / "run" / "final" / "config.json").read_text())["model"]["vocab_size"] == n_vocab < 2000


def test_a_full_disk_at_stdout_or_in_the_gguf_writer_is_the_disk_message(ckpt, tmp_path, monkeypatch, capsys):
    """stdout redirected to a full disk (here /dev/full) and numpy's short write inside the GGUF
    writer are the one-line disk message, not ``[Errno 28]`` or "16384 requested and 1216 written"."""
    if os.path.exists("/dev/full"):
        with open("/dev/full", "w") as full:
            done = subprocess.run([sys.executable, "-m", "tools.bpe_decode", "-t", str(ckpt / "tokenizer.json"), "[72, 105]"],
                                  stdout=full, stderr=subprocess.PIPE, text=True, cwd=REPO, timeout=120)
        assert done.returncode == 2 and done.stderr.strip().splitlines() == [
            "bpe-decode: error: the output could not be written: no space left on the device; free some space and run the command again"]
    import gpt.gguf_export

    def short_write(*args, **kwargs):
        raise OSError("16384 requested and 1216 written")

    monkeypatch.setattr(gpt.gguf_export.gguf.GGUFWriter, "write_tensors_to_file", short_write)
    out = tmp_path / "m.gguf"
    one_line(capsys, convert(["gguf", str(ckpt), str(out)]), f"{out}: no space left on the device")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, word", [(["--n-layer", "0"], "--n-layer"), (["--n-embd", "30", "--n-head", "4"], "--n-embd"),
                                        (["--min-chars", "500", "--max-chars", "100"], "--min-chars"),
                                        (["--per-genre-train", str(10**7)], "--per-genre-train"), (["--vocab-size", "10"], "--vocab-size")])
def test_genre_experiment_checks_its_options_before_any_work(tmp_path, capsys, args, word):
    from tools.genre_experiment import main as genre

    one_line(capsys, genre(["--work", str(tmp_path / "w"), *args]), word)
    assert not (tmp_path / "w").exists()


def test_genre_experiment_leaves_no_work_directory_after_an_early_error(tmp_path, capsys, monkeypatch):
    import tools.genre_experiment as genre

    def full(path, rows):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(genre, "write_csv", full)
    one_line(capsys, genre.main(["--work", str(tmp_path / "w"), "--data-only"]), "no space left")
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("where", ["bpe-export SRC", "gpt-prepare --tokenizer", "gpt-train --data", "gpt-train --resume",
                                   "gpt-train --tokenizer", "gpt-finetune --out", "gpt-genre-experiment --work"])
def test_a_symlink_loop_is_named_as_one_wherever_a_path_goes(where, ckpt, data_dir, tmp_path, capsys, monkeypatch):
    """Never "does not exist" or "no such run directory" for a link that loops."""
    from tools.bpe_export import main as bpe_export
    from tools.genre_experiment import main as genre

    monkeypatch.chdir(tmp_path)
    os.symlink("loop", "loop")
    Path("t.txt").write_text("some text " * 100)
    (tmp_path / "i.jsonl").write_text("".join(json.dumps({"instruction": f"a{i}", "output": "b"}) + "\n" for i in range(8)))
    run = {"bpe-export SRC": lambda: bpe_export(["loop", "--format", "hf", "-o", "x"]),
           "gpt-prepare --tokenizer": lambda: prepare(["t.txt", "--tokenizer", "loop", "-o", "d"]),
           "gpt-train --data": lambda: train(["--data", "loop", "--out", "r"]),
           "gpt-train --resume": lambda: train(["--resume", "loop"]),
           "gpt-train --tokenizer": lambda: train(["--data", str(data_dir), "--tokenizer", "loop", "--out", "r"]),
           "gpt-finetune --out": lambda: finetune(["instruct", "--model", str(ckpt), "--data", "i.jsonl", "--out", "loop"]),
           "gpt-genre-experiment --work": lambda: genre(["--work", "loop", "--data-only"])}[where]
    one_line(capsys, run(), "loop: a symbolic link loop")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["i.jsonl", "loop", "t.txt"]


def test_a_damaged_classifier_is_refused_by_classify_merge_and_inspect(ckpt, tmp_path, capsys):
    """NaN in a classifier's head or adapters, or a LoRA alpha that scales the update to inf: no
    command prints NaN probabilities or writes a merged model from them."""
    from tools.classify import main as classify
    from tools.inspect_checkpoint import main as inspect

    (tmp_path / "c.csv").write_text("text,label\n" + "".join(f"line {i} {'ab'[i % 2] * 5},{'ab'[i % 2]}\n" for i in range(16)))
    assert finetune(["classify", "--model", str(ckpt), "--train", str(tmp_path / "c.csv"), "--val", str(tmp_path / "c.csv"),
                     "--out", str(tmp_path / "cls"), "--max-steps", "2", "--lora-rank", "2", "--progress", "false"]) == 0
    good = tmp_path / "cls" / "final"
    capsys.readouterr()
    for part in ("classifier.safetensors", "adapters.safetensors"):
        bad = tmp_path / f"bad-{part}"
        shutil.copytree(good, bad)
        state = load_file(str(bad / part))
        save_file({k: torch.full_like(v, math.nan) for k, v in state.items()}, str(bad / part))
        one_line(capsys, classify(["--model", str(bad), "some text"]), "NaN or inf")
        one_line(capsys, convert(["merge-lora", str(bad), str(tmp_path / "merged")]), "NaN or inf")
        assert inspect([str(bad)]) == ExitCode.CHECK_FAILED and "FAIL  values: NaN or inf" in capsys.readouterr().out
    assert not (tmp_path / "merged").exists()
    bad = tmp_path / "bad-alpha"
    shutil.copytree(good, bad)
    config = json.loads((bad / "config.json").read_text())
    config["lora"]["alpha"] = 1e30
    (bad / "config.json").write_text(json.dumps(config))
    one_line(capsys, classify(["--model", str(bad), "some text"]), "lora-alpha must be > 0 and at most")


def test_worker_counts_are_bounded_by_the_machine(tmp_path, capsys):
    """--workers 10000 forked ten thousand processes (no answer in 60 s): at most 4 per core."""
    import tokenizers_bpe
    from tokenizers_bpe.errors import SettingError
    from tools.bpe_train import main as bpe_train
    from tools.cli import max_threads

    (tmp_path / "t.txt").write_text("some text " * 100)
    one_line(capsys, bpe_train([str(tmp_path / "t.txt"), "--vocab-size", "300", "-o", str(tmp_path / "t.json"),
                                "--workers", str(max_threads() + 1)]), "--workers")
    one_line(capsys, prepare([str(tmp_path / "t.txt"), "--tokenizer", str(tmp_path / "x.json"), "-o", str(tmp_path / "d"),
                              "--workers", str(max_threads() + 1)]), "--workers")
    with pytest.raises(SettingError, match="workers"):
        tokenizers_bpe.train_from_iterator(["abc"], 300, workers=10**6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.txt"]


def test_a_run_resumed_from_another_directory_trains_on_its_own_data(tok_data, tmp_path, monkeypatch, capsys):
    """run_config.json records paths resolved: `--data data` given in one directory and `--resume` from
    another that holds a different `data` (same tokenizer) silently trained on the other one."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    shutil.copytree(tok_data, tmp_path / "a" / "data")
    monkeypatch.chdir(tmp_path / "a")
    assert train(["--data", "data", "--out", "../run", "--preset", "tiny", "--batch-size", "2", "--block-size", "16",
                  "--max-steps", "1", *QUICK]) == 0
    assert json.loads((tmp_path / "run" / "run_config.json").read_text())["data"] == str(tmp_path / "a" / "data")
    monkeypatch.chdir(tmp_path / "b")
    shutil.copytree(tok_data, "data")
    with open("data/train.bin", "r+b") as f:  # other text, same tokenizer
        f.write(bytes(64))
    shutil.rmtree(tmp_path / "a" / "data")
    capsys.readouterr()
    one_line(capsys, train(["--resume", "../run", "--max-steps", "2", *QUICK]), str(tmp_path / "a" / "data"))


def test_a_run_does_not_resume_on_data_prepared_again(tok, tmp_path, capsys):
    """gpt-prepare replaces its own output: a run's data directory prepared again from other text (same
    tokenizer) was resumed on silently, its best/ then chosen by validation losses on two val sets."""
    tok.save(tmp_path / "tok.json")
    text = plays()[0].text()
    for name, part in (("a.txt", text), ("b.txt", text[: len(text) // 2])):
        (tmp_path / name).write_text(part)
    data = str(tmp_path / "data")
    assert prepare([str(tmp_path / "a.txt"), "--tokenizer", str(tmp_path / "tok.json"), "-o", data, "--quiet"]) == 0
    run = str(tmp_path / "run")
    assert train(["--data", data, "--out", run, "--preset", "tiny", "--batch-size", "2", "--block-size", "16", "--max-steps", "1",
                  *QUICK]) == 0
    assert train(["--resume", run, "--max-steps", "2", *QUICK]) == 0  # the same data: resumed
    assert prepare([str(tmp_path / "b.txt"), "--tokenizer", str(tmp_path / "tok.json"), "-o", data, "--quiet"]) == 0
    capsys.readouterr()
    one_line(capsys, train(["--resume", run, "--max-steps", "3", *QUICK]), "was prepared again since the run started")
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-000001", "step-000002"]


def test_a_fine_tuning_run_resumes_from_another_directory(ckpt, tmp_path, monkeypatch, capsys):
    """Its model and data are recorded resolved: the same files by another relative path are the same
    run; other files are refused."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "i.jsonl").write_text("".join(json.dumps({"instruction": f"say {i}", "output": f"ok {i}"}) + "\n" for i in range(8)))
    (tmp_path / "j.jsonl").write_text((tmp_path / "i.jsonl").read_text() + json.dumps({"instruction": "x", "output": "y"}) + "\n")
    shutil.copytree(ckpt, tmp_path / "model")
    monkeypatch.chdir(tmp_path / "a")
    base = ["instruct", "--model", "../model", "--out", "../sft", "--progress", "false", "--checkpoint-interval", "1"]
    assert finetune([*base, "--data", "../i.jsonl", "--max-steps", "1"]) == 0
    monkeypatch.chdir(tmp_path / "b")
    assert finetune([*base, "--data", str(tmp_path / "i.jsonl"), "--max-steps", "2", "--resume"]) == 0
    capsys.readouterr()
    one_line(capsys, finetune([*base, "--data", "../j.jsonl", "--max-steps", "3", "--resume"]), "--data cannot change")


@pytest.mark.parametrize("field, value", [(("splits", "train", "file"), 0), (("splits", "val", "file"), None),
                                          (("splits", "train", "file"), "../../../etc/passwd"), (("splits", "train", "file"), "/dev/zero"),
                                          (("splits", "train", "tokens"), "x"), (("splits", "val", "tokens"), None),
                                          (("splits", "train", "tokens"), 2**60), (("splits",), []), (("n_vocab",), "512"),
                                          (("eot_token",), 10**9), (("append_eot",), "yes"), (("val_fraction",), True),
                                          (("tokenizer_fingerprint",), ["a"]), (("sources",), 3)])
def test_a_data_directory_whose_meta_json_lies_is_one_line(data_dir, tmp_path, capsys, field, value):
    """meta.json's fields are checked for kind and range, and a split's file must be a name in the data
    directory (a path out of it, or a device, is refused before anything is opened)."""
    bad = tmp_path / "data"
    shutil.copytree(data_dir, bad)
    meta = json.loads((bad / "meta.json").read_text())
    target = meta
    for key in field[:-1]:
        target = target[key]
    target[field[-1]] = value
    (bad / "meta.json").write_text(json.dumps(meta))
    one_line(capsys, train(["--data", str(bad), "--out", str(tmp_path / "run"), "--max-steps", "1", *QUICK]), "meta.json")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("field, value", [("best", 0), ("best", {}), ("best", {"metric": "val_loss", "value": None, "step": 1, "dir": "x"}),
                                          ("last_eval", [1]), ("step", "3"), ("tokens", -1), ("world_size", 0)])
def test_a_trainer_state_that_lies_is_a_damaged_checkpoint(tok_data, tmp_path, capsys, field, value):
    """trainer_state.json's counters and best/last_eval entries are checked when read: a bad one was a
    TypeError traceback at the first evaluation; now that checkpoint is set aside (.corrupt) and the run
    resumes from the one before."""
    run = tmp_path / "run"
    assert train(["--data", str(tok_data), "--out", str(run), "--preset", "tiny", "--batch-size", "2", "--block-size", "16",
                  "--max-steps", "2", "--checkpoint-interval", "1", "--eval-interval", "1", "--eval-iters", "1", *QUICK]) == 0
    state = run / "checkpoints" / "step-000002" / "trainer_state.json"
    meta = json.loads(state.read_text())
    meta[field] = value
    state.write_text(json.dumps(meta))
    capsys.readouterr()
    assert train(["--resume", str(run), "--max-steps", "3", *QUICK]) == 0, capsys.readouterr().err
    assert "Traceback" not in capsys.readouterr().err
    assert (run / "checkpoints" / "step-000002.corrupt").is_dir() and (run / "checkpoints" / "step-000003").is_dir()
