"""Two classes of hostile input (issue 23), each one line and exit 2 before any work, never a
traceback: a run directory's run_config.json that lies, read back by --resume (gpt-train and
gpt-finetune), whatever it holds, and never a resume that takes a changed option for the same; and
numbers too large for any machine type (an option of 400 digits, a file integer beyond a float's range,
an integer beyond Python's 4300 digits), which overflowed float conversions deep in the commands."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.gpt.test_sampling import make_tiny_model, small_tokenizer
from tools.cli import MAX_MESSAGE_CHARS, ExitCode
from tools.bpe_train import main as bpe_train
from tools.finetune import main as finetune
from tools.generate import main as generate
from tools.train import main as train

QUICK = ["--progress", "false", "--sample-tokens", "0"]


def one_line(capsys, rc, *words):
    err = capsys.readouterr().err
    assert rc == ExitCode.USER_ERROR, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert len(lines[0]) < MAX_MESSAGE_CHARS + 100, lines[0]  # a long recorded value is shown cut, not whole
    for word in words:
        assert word in lines[0], err
    return lines[0]


def edited(run: Path, tmp_path: Path, edit) -> Path:
    """A copy of the run directory ``run`` whose run_config.json is ``edit(config)`` (edited in place)."""
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    config = json.loads((copy / "run_config.json").read_text())
    edit(config)
    (copy / "run_config.json").write_text(json.dumps(config))
    return copy


def listing(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """A finished instruction fine-tuning run of a tiny model (and its model and data)."""
    root = tmp_path_factory.mktemp("sft")
    make_tiny_model(small_tokenizer()).save_pretrained(root / "model")
    (root / "i.jsonl").write_text("".join(json.dumps({"instruction": f"say {i}", "output": f"ok {i}"}) + "\n" for i in range(8)))
    assert finetune(["instruct", "--model", str(root / "model"), "--data", str(root / "i.jsonl"), "--out", str(root / "run"),
                     "--max-steps", "1", "--checkpoint-interval", "1", "--progress", "false"]) == 0
    return root


def resume_sft(root: Path, run: Path) -> int:
    return finetune(["instruct", "--model", str(root / "model"), "--data", str(root / "i.jsonl"), "--out", str(run), "--resume",
                     "--max-steps", "2", "--checkpoint-interval", "1", "--progress", "false"])


@pytest.mark.parametrize("key, value, word", [
    ("format", "gpt-trainer-state", "not a gpt-run v1"), ("format_version", True, "not a gpt-run v1"),
    ("format_version", 2, "not a gpt-run v1"), ("model", [1], "--model cannot change"), ("data", ["a", {"b": 1}], "--data cannot change"),
    ("data", {"a": 1}, "--data cannot change"), ("seed", True, "--seed cannot change"), ("max_length", "a" * 100_000, "--max-length"),
    ("lora_rank", 0.0, "--lora-rank cannot change")])
def test_a_fine_tuning_run_config_that_lies_is_one_line(sft_run, tmp_path, capsys, key, value, word):
    """A list in a path option was a TypeError traceback; format and version were never checked, so a
    file of another kind resumed; `true` passed for a seed of 1 (Python's True == 1)."""
    copy = edited(sft_run / "run", tmp_path, lambda config: config.update({key: value}))
    before = listing(copy)
    capsys.readouterr()
    if key == "seed":  # a run recorded with seed `true` resumed with --seed 1 must not pass for the same
        rc = finetune(["instruct", "--model", str(sft_run / "model"), "--data", str(sft_run / "i.jsonl"), "--out", str(copy),
                       "--resume", "--seed", "1", "--max-steps", "2", "--progress", "false"])
    else:
        rc = resume_sft(sft_run, copy)
    one_line(capsys, rc, word)
    assert listing(copy) == before


@pytest.mark.parametrize("what", ["fifo", "directory", "loop", "deep", "not an object"])
def test_a_fine_tuning_run_config_that_is_not_a_file_or_not_json(sft_run, tmp_path, capsys, what):
    copy = tmp_path / "copy"
    shutil.copytree(sft_run / "run", copy)
    path = copy / "run_config.json"
    path.unlink()
    if what == "fifo":
        import os
        os.mkfifo(path)
    elif what == "directory":
        path.mkdir()
    elif what == "loop":
        path.symlink_to(path.name)
    else:
        path.write_text("[" * 100_000 + "]" * 100_000 if what == "deep" else "[]")
    capsys.readouterr()
    one_line(capsys, resume_sft(sft_run, copy), "run_config.json")


@pytest.mark.parametrize("recorded", ["classify", None, ["instruct"]])
def test_a_fine_tuning_run_resumes_only_with_its_own_subcommand(sft_run, tmp_path, capsys, recorded):
    """`command` was not compared: an instruct run resumed by `classify` was refused for another reason
    ("--train cannot change (the run used None)"), and a recorded command that lies was not noticed."""
    copy = edited(sft_run / "run", tmp_path, lambda config: config.update(command=recorded))
    capsys.readouterr()
    one_line(capsys, resume_sft(sft_run, copy), "resume it with the subcommand that started it")


def test_the_same_fine_tuning_run_resumes(sft_run, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(sft_run / "run", copy)
    assert resume_sft(sft_run, copy) == 0, capsys.readouterr().err


@pytest.fixture(scope="module")
def train_run(data_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("train") / "run"
    assert train(["--data", str(data_dir), "--out", str(run), "--preset", "tiny", "--batch-size", "2", "--block-size", "16",
                  "--max-steps", "1", "--checkpoint-interval", "1", *QUICK]) == 0
    return run


@pytest.mark.parametrize("edit, words", [
    (lambda c: c.update(format="x"), ("not a gpt-run v1",)), (lambda c: c.update(format_version=None), ("not a gpt-run v1",)),
    (lambda c: c.pop("format"), ("not a gpt-run v1",)),
    # the run's model shape, recorded only under "derived", is what a changed option is compared against
    (lambda c: c.update(n_layer=None, derived=[1]), ("--n-layer cannot change", "its default")),
    (lambda c: c.update(n_layer=None, derived={"model": [1], "n_layer": 1}), ("--n-layer cannot change", "1")),
    (lambda c: c.update(seed="a" * 100_000), ("option 'seed'",)),
    # null is "unset" only for an option unset by default (these were TypeError/AttributeError tracebacks)
    (lambda c: c.update(device=None), ("option 'device' cannot be null",)),
    (lambda c: c.update(sample_prompt=None), ("option 'sample_prompt' cannot be null",))])
def test_a_training_run_config_that_lies_is_one_line(train_run, tmp_path, capsys, edit, words):
    copy = edited(train_run, tmp_path, edit)
    before = listing(copy)
    capsys.readouterr()
    one_line(capsys, train(["--resume", str(copy), "--n-layer", "3", "--max-steps", "2", *QUICK]), *words)
    assert listing(copy) == before


def test_a_huge_value_is_cut_in_the_one_line_message(capsys, tmp_path):
    """An option or a recorded value of 100,000 characters is echoed cut in the middle: the line still
    starts with what it is about and ends with what to do."""
    one_line(capsys, train(["--seed", "7" * 100_000]), "--seed", "(see --help)")
    one_line(capsys, train(["--batch-size", "9" * 400, "--data", "d", "--out", str(tmp_path / "r")]), "--batch-size", "at most")
    (tmp_path / "i.jsonl").write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    one_line(capsys, finetune(["instruct", "--model", "m" * 100_000, "--data", str(tmp_path / "i.jsonl"), "--out", str(tmp_path / "o")]))


BIG = "9" * 400


@pytest.mark.parametrize("args, word", [
    (["--batch-size", BIG], "--batch-size"), (["--grad-accum", BIG], "--grad-accum"), (["--keep-last", BIG], "--keep-last"),
    (["--batch-tokens", BIG], "--batch-tokens"), (["--max-steps", "9223372036854775808"], "--max-steps"),
    (["--max-memory", BIG + "MB", "--vocab-size", "300"], "--max-memory"), (["--lr", "1e400"], "--lr")])
def test_an_option_beyond_int64_is_refused_by_its_parser(data_dir, tmp_path, capsys, args, word):
    """400 digits were OverflowError tracebacks (the memory check's float division, torch's int64)."""
    text = tmp_path / "t.txt"
    text.write_text("some text to train on " * 50)
    source = [str(text)] if "--max-memory" in args else ["--data", str(data_dir)]
    one_line(capsys, train([*source, "--out", str(tmp_path / "run"), *args, *QUICK]), word)
    assert not (tmp_path / "run").exists()


def test_options_of_other_commands_beyond_int64(sft_run, tmp_path, capsys):
    one_line(capsys, finetune(["instruct", "--model", str(sft_run / "model"), "--data", str(sft_run / "i.jsonl"),
                               "--out", str(tmp_path / "o"), "--lora-rank", BIG]), "--lora-rank")
    one_line(capsys, finetune(["instruct", "--model", str(sft_run / "model"), "--data", str(sft_run / "i.jsonl"),
                               "--out", str(tmp_path / "o"), "--lora-rank", "9223372036854775807"]), "--lora-rank", "65536")
    (tmp_path / "t.txt").write_text("abc " * 100)
    one_line(capsys, bpe_train([str(tmp_path / "t.txt"), "-o", str(tmp_path / "t.json"), "--max-memory", "1" + "0" * 400]), "--max-memory")
    one_line(capsys, bpe_train([str(tmp_path / "t.txt"), "-o", str(tmp_path / "t.json"), "--vocab-size", BIG]), "--vocab-size")
    one_line(capsys, generate(["--model", str(sft_run / "model"), "hi", "--top-k", "9" * 5000]), "--top-k")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.txt"]


@pytest.mark.parametrize("literal, word", [("9" * 400, "an integer of 400 digits"), ("-" + "9" * 400, "an integer of 400 digits"),
                                           ("9" * 5000, "4300 digits")])
def test_a_file_integer_beyond_any_float_is_one_line(sft_run, tmp_path, capsys, literal, word):
    """In a checkpoint's config.json, instruction data, a --config file (JSON and TOML): a number that
    overflows every float conversion is refused where the file is read, naming it."""
    model = tmp_path / "model"
    shutil.copytree(sft_run / "model", model)
    config = (model / "config.json").read_text()
    (model / "config.json").write_text(config.replace('"n_layer": ', f'"n_layer": {literal}, "was": ', 1))
    one_line(capsys, generate(["--model", str(model), "hi"]), "config.json", word)
    (tmp_path / "i.json").write_text(f'[{{"instruction": "a", "output": {literal}}}]')
    one_line(capsys, finetune(["instruct", "--model", str(sft_run / "model"), "--data", str(tmp_path / "i.json"),
                               "--out", str(tmp_path / "o")]), "i.json")
    for name, text in (("c.json", f'{{"seed": {literal}}}'), ("c.toml", f"seed = {literal}")):
        (tmp_path / name).write_text(text)
        one_line(capsys, train(["--config", str(tmp_path / name), "--data", str(tmp_path), "--out", str(tmp_path / "r")]), name)
    assert not (tmp_path / "o").exists() and not (tmp_path / "r").exists()


@pytest.mark.parametrize("setting, value", [("temperature", None), ("temperature", -1), ("top_p", 2), ("top_k", 0.5),
                                            ("repetition_penalty", True), ("max_new_tokens", 10**30)])
def test_a_generation_json_out_of_range_fails_inspect_as_it_fails_generate(sft_run, tmp_path, capsys, setting, value):
    """gpt-inspect reported "ok" for sampling defaults that gpt-generate refuses: both now check them
    where the file is read (gpt.checkpoint.read_generation)."""
    from tools.inspect_checkpoint import main as inspect

    model = tmp_path / "model"
    shutil.copytree(sft_run / "model", model)
    (model / "generation.json").write_text(json.dumps({setting: value}))
    one_line(capsys, generate(["--model", str(model), "hi"]), "generation.json", setting)
    assert inspect([str(model)]) == 1
    assert "FAIL  generation.json" in capsys.readouterr().out


@pytest.mark.parametrize("setting", ["temperature", "repetition_penalty"])
def test_an_integer_setting_beyond_int64_samples_as_a_float(sft_run, tmp_path, capsys, setting):
    """A temperature of 10**30 (an int, from generation.json or the Python API) was an OverflowError in
    torch's division; it is that float."""
    model = tmp_path / "model"
    shutil.copytree(sft_run / "model", model)
    (model / "generation.json").write_text(json.dumps({setting: 10**30}))
    assert generate(["--model", str(model), "hi", "-n", "3", "--no-stream"]) == 0, capsys.readouterr().err
