"""gpt-finetune (classify / instruct) and gpt-classify on tiny models made here."""

from __future__ import annotations

import json
import shutil
import string

import pytest
import torch

from gpt.classifier import CLASSIFIER_FILE, load_classifier
from gpt.finetune_data import ShuffledBatches, collate_instructions, encode_instruction, read_examples
from gpt.model import GPT, GPTConfig
from gpt.prompt_template import format_instruction_prompt
from tokenizers_bpe import CharTokenizer
from tools.classify import main as classify_main
from tools.convert import merge_checkpoint
from tools.finetune import main
from tools.generate import main as generate_main

TRAIN_ARGS = ["--device", "cpu", "--progress", "false", "--seed", "3"]


def make_tokenizer():
    return CharTokenizer.from_texts([string.printable], special_tokens=["<|endoftext|>"])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny random GPT checkpoint with a char tokenizer (fine-tuning does not need a good one)."""
    tok = make_tokenizer()
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.n_vocab, n_ctx=256, n_embd=32, n_layer=2, n_head=2, backend="torch"))
    path = tmp_path_factory.mktemp("base") / "ckpt"
    model.save_pretrained(path, tokenizer=tok)
    return path


def write_csv(path, rows, header=("text", "label"), sep=","):
    path.write_text("\n".join(sep.join(r) for r in [header, *rows]) + "\n", encoding="utf-8")
    return path


def genre_rows(n):
    """Two labels told apart by their characters (so a few steps learn them)."""
    return [("aaaa ab" * (1 + i % 3), "alpha") if i % 2 else ("zzzy zz" * (1 + i % 3), "zulu") for i in range(n)]


def run(capsys, fn, argv):
    rc = fn([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


# ---------------------------------------------------------------------------------------------- instruction masks


def test_instruction_masks_padding_and_prompt_exactly():
    tok = make_tokenizer()
    eot = tok.eot_token
    records = [{"instruction": "Add 1 and 2.", "input": "", "output": "3"},
               {"instruction": "Say hi.", "input": "to Bob", "output": "Hi, Bob!"}]
    prompts = [tok.encode_ordinary(format_instruction_prompt(r["instruction"], r["input"])) for r in records]
    full = [p + tok.encode_ordinary(r["output"]) + [eot] for p, r in zip(prompts, records)]
    T = max(len(f) for f in full) - 1

    for mask_prompt in (False, True):
        encoded = [encode_instruction(tok, r, 1000, mask_prompt) for r in records]
        inputs, targets = collate_instructions(encoded, pad_id=eot)
        assert inputs.shape == targets.shape == (2, T)
        for row, (p, f) in enumerate(zip(prompts, full)):
            n = len(f) - 1
            expected_inputs = f[:-1] + [eot] * (T - n)
            expected_targets = f[1:] + [-100] * (T - n)  # padding: -100
            if mask_prompt:  # targets 0 .. len(p) - 2 are prompt tokens 1 .. len(p) - 1
                expected_targets[: len(p) - 1] = [-100] * (len(p) - 1)
            assert inputs[row].tolist() == expected_inputs
            assert targets[row].tolist() == expected_targets
            # the first kept target (with masking) is the response's first token, the last real one the EOT
            kept = [t for t in targets[row].tolist() if t != -100]
            assert kept[-1] == eot
            if mask_prompt:
                assert kept == tok.encode_ordinary(records[row]["output"]) + [eot]


def test_instruction_truncation_and_prompt_that_fills_the_window():
    tok = make_tokenizer()
    record = {"instruction": "Repeat.", "input": "", "output": "x" * 50}
    prompt_len = len(tok.encode_ordinary(format_instruction_prompt("Repeat.")))
    x, y = encode_instruction(tok, record, prompt_len + 10, mask_prompt=True)
    assert len(x) == len(y) == prompt_len + 10
    assert y.count(-100) == prompt_len - 1 and y[-1] == tok.encode_ordinary("x")[0]
    assert encode_instruction(tok, record, prompt_len - 1, mask_prompt=True) is None  # nothing to learn
    assert encode_instruction(tok, record, prompt_len - 1, mask_prompt=False) is not None


def test_shuffled_batches_are_a_pure_function_of_the_step():
    examples = list(range(10))
    batches = ShuffledBatches(examples, 4, list, seed=1, grad_accum=2)
    first = [batches(s, m) for s in range(5) for m in range(2)]
    again = ShuffledBatches(examples, 4, list, seed=1, grad_accum=2)
    assert [again(s, m) for s in reversed(range(5)) for m in range(2)] == [first[2 * s + m] for s in reversed(range(5)) for m in range(2)]
    flat = [e for b in first for e in b]
    for epoch in range(4):  # each epoch is a permutation of all examples
        assert sorted(flat[epoch * 10 : (epoch + 1) * 10]) == examples
    ranks = [ShuffledBatches(examples, 4, list, seed=1, grad_accum=2, rank=r, world_size=2) for r in (0, 1)]
    assert [ranks[0](0, 0), ranks[1](0, 0), ranks[0](0, 1), ranks[1](0, 1)] == [
        ShuffledBatches(examples, 4, list, seed=1, grad_accum=4)(0, m) for m in range(4)]


# ---------------------------------------------------------------------------------------------- data files


def test_read_examples_formats_agree(tmp_path):
    rows = [("Hello, world", "a"), ('He said "no"', "b")]
    csv_path = tmp_path / "d.csv"
    csv_path.write_text('text,label\n"Hello, world",a\n"He said ""no""",b\n', encoding="utf-8")
    tsv_path = write_csv(tmp_path / "d.tsv", rows, sep="\t")
    jsonl_path = tmp_path / "d.jsonl"
    jsonl_path.write_text("".join(json.dumps({"sentence": t, "y": y}) + "\n" for t, y in rows), encoding="utf-8")
    assert read_examples(csv_path) == read_examples(tsv_path) == read_examples(jsonl_path, "sentence", "y") == rows


# ---------------------------------------------------------------------------------------------- classify end to end


def test_classify_trains_saves_labels_and_gpt_classify_uses_them(base, tmp_path, capsys):
    train = write_csv(tmp_path / "train.csv", genre_rows(24))
    val = write_csv(tmp_path / "val.csv", genre_rows(6))
    test = write_csv(tmp_path / "test.csv", genre_rows(8))
    out = tmp_path / "run"
    rc, stdout, err = run(capsys, main, ["classify", "--model", base, "--train", train, "--val", val, "--test", test, "--out", out,
                                         "--max-steps", 40, "--lr", 3e-3, "--warmup-steps", 2, "--eval-interval", 20, *TRAIN_ARGS])
    assert rc == 0, err
    assert "confusion matrix (test" in stdout
    report = json.loads((out / "evaluation.json").read_text())
    assert report["labels"] == ["alpha", "zulu"]  # sorted training labels -> ids 0, 1
    assert report["test"]["accuracy"] == 1.0 and report["test"]["examples"] == 8
    assert sum(map(sum, report["test"]["confusion"])) == 8
    meta = json.loads((out / "final" / CLASSIFIER_FILE).read_text())
    assert meta["labels"] == ["alpha", "zulu"]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("val_acc" in m for m in metrics)

    # the body is an ordinary checkpoint: the last block changed, the embeddings (frozen) did not
    body = GPT.from_pretrained(out / "final")
    original = GPT.from_pretrained(base)
    assert torch.equal(body.transformer.wte.weight, original.transformer.wte.weight)
    assert not torch.equal(body.transformer.h[-1].mlp.c_fc.weight, original.transformer.h[-1].mlp.c_fc.weight)
    assert torch.equal(body.transformer.h[0].mlp.c_fc.weight, original.transformer.h[0].mlp.c_fc.weight)

    rc, stdout, err = run(capsys, classify_main, ["--model", out, "aaaa ab", "zzzy zzzzzy zz"])  # a run dir: uses final/
    assert rc == 0, err
    lines = [line.split("\t") for line in stdout.splitlines()]
    assert [label for label, _, _ in lines] == ["alpha", "zulu"]
    assert all(0.5 < float(p) <= 1 for _, p, _ in lines)
    model, _ = load_classifier(out / "final")
    assert model.labels == ["alpha", "zulu"]
    rc, _, err = run(capsys, classify_main, ["--model", out, "caf\u00e9"])  # a character the char tokenizer lacks
    assert rc == 2 and err.startswith("gpt-classify: error: TEXT: character '\u00e9'") and err.count("\n") == 1, err


def test_classify_with_lora_trains_only_adapters_and_head(base, tmp_path, capsys):
    train = write_csv(tmp_path / "train.csv", genre_rows(16))
    val = write_csv(tmp_path / "val.csv", genre_rows(4))
    out = tmp_path / "run"
    rc, _, err = run(capsys, main, ["classify", "--model", base, "--train", train, "--val", val, "--out", out, "--lora-rank", 2,
                                    "--lora-targets", "attn,mlp", "--max-steps", 6, "--lr", 3e-3, "--eval-interval", 3, *TRAIN_ARGS])
    assert rc == 0, err
    assert "training" in err and "LoRA rank 2" in err
    final = out / "final"
    assert (final / "adapters.safetensors").is_file()
    config = json.loads((final / "config.json").read_text())
    assert config["lora"] == {"rank": 2, "alpha": 4.0, "targets": ["attn", "mlp"]}
    from safetensors.torch import load_file

    base_weights, saved = load_file(str(base / "model.safetensors")), load_file(str(final / "model.safetensors"))
    assert saved.keys() == base_weights.keys() and all(torch.equal(saved[k], base_weights[k]) for k in saved)
    adapters = load_file(str(final / "adapters.safetensors"))
    assert any(k.endswith("lora_B") and v.abs().sum() > 0 for k, v in adapters.items())  # they trained

    merged = tmp_path / "merged"

    merge_checkpoint(final, merged)
    assert not (merged / "adapters.safetensors").exists()
    a, _ = load_classifier(final)
    b, _ = load_classifier(merged)
    idx, lengths = torch.randint(0, 100, (3, 12)), torch.tensor([12, 5, 1])
    with torch.no_grad():
        torch.testing.assert_close(a(idx, lengths), b(idx, lengths), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- instruct end to end


def instruction_records(n):
    return [{"instruction": f"Repeat the word {w}.", "input": "" if i % 2 else "please", "output": w}
            for i, w in enumerate(["cat", "dog", "sun", "sky", "red", "big"] * (n // 6 + 1))][:n]


def test_instruct_lowers_val_loss_and_is_generated_with_the_template(base, tmp_path, capsys):
    data = tmp_path / "data.json"
    data.write_text(json.dumps(instruction_records(30), indent=1), encoding="utf-8")
    out = tmp_path / "sft"
    rc, stdout, err = run(capsys, main, ["instruct", "--model", base, "--data", data, "--out", out, "--mask-prompt", "--max-steps", 30,
                                         "--lr", 3e-3, "--warmup-steps", 2, "--eval-interval", 15, "--batch-size", 4, "--show", 2, *TRAIN_ARGS])
    assert rc == 0, err
    report = json.loads((out / "evaluation.json").read_text())
    assert report["val_loss_after"] < report["val_loss_before"] - 1.0
    assert len(report["answers"]) == 2 and "validation loss:" in stdout
    model = GPT.from_pretrained(out / "final")
    assert model.generation_config["temperature"] == 0.0

    rc, answer, err = run(capsys, generate_main, ["--model", out / "final", "--instruct", "Repeat the word sun.", "--device", "cpu", "-n", 20])
    assert rc == 0, err
    assert "### Response" not in answer  # only the response is printed


def test_instruct_with_lora_saves_adapters_apart(base, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in instruction_records(12)), encoding="utf-8")
    out = tmp_path / "sft"
    rc, _, err = run(capsys, main, ["instruct", "--model", base, "--data", data, "--out", out, "--lora-rank", 4, "--max-steps", 4,
                                    "--eval-interval", 2, "--batch-size", 4, "--show", 0, *TRAIN_ARGS])
    assert rc == 0, err
    model = GPT.from_pretrained(out / "final")
    assert model.lora_config.rank == 4 and (out / "final" / "adapters.safetensors").is_file()
    # resuming at the end of the run is accepted (same options) and changes nothing
    rc, _, err = run(capsys, main, ["instruct", "--model", base, "--data", data, "--out", out, "--lora-rank", 4, "--max-steps", 4,
                                    "--eval-interval", 2, "--batch-size", 4, "--show", 0, "--resume", *TRAIN_ARGS])
    assert rc == 0, err
    rc, _, err = run(capsys, main, ["instruct", "--model", base, "--data", data, "--out", out, "--lora-rank", 8, "--max-steps", 6,
                                    "--resume", *TRAIN_ARGS])
    assert rc == 2 and "--lora-rank cannot change when resuming" in err
    # the same file name with other examples: resumed, the run would have trained and compared on them silently
    data.write_text("".join(json.dumps(r) + "\n" for r in instruction_records(11)), encoding="utf-8")
    rc, _, err = run(capsys, main, ["instruct", "--model", base, "--data", data, "--out", out, "--lora-rank", 4, "--max-steps", 6,
                                    "--eval-interval", 2, "--batch-size", 4, "--show", 0, "--resume", *TRAIN_ARGS])
    assert rc == 2 and f"--data {data}: its content changed since the run started" in err
    rc, _, err = run(capsys, main, ["instruct", "--model", base, "--data", data, "--out", out, *TRAIN_ARGS])
    assert rc == 2 and "already holds a run; continue it with --resume" in err


# ---------------------------------------------------------------------------------------------- bad input


def bad_inputs(tmp_path, base):
    ok = write_csv(tmp_path / "ok.csv", genre_rows(6))
    no_tok = tmp_path / "no_tok"
    shutil.copytree(base, no_tok)
    (no_tok / "tokenizer.json").unlink()
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('[\n {"instruction": "a", "input": "", "output": "b"},\n {"instruction": "c" "output": "d"}\n]\n')
    missing_field = tmp_path / "missing.json"
    missing_field.write_text(json.dumps([{"instruction": "a", "input": "", "output": "b"}, {"instruction": "c", "input": ""}]))
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": \n')
    classify = ["classify", "--model", base, "--out", tmp_path / "o", "--val", ok]
    return {
        "missing column": (classify + ["--train", write_csv(tmp_path / "c.csv", [("a", "b")], header=("sentence", "label"))],
                           "no column 'text' in the header (columns: sentence, label)"),
        "missing jsonl field": (classify + ["--train", ok, "--val", write_jsonl(tmp_path / "v.jsonl", [{"text": "a"}])],
                                "v.jsonl line 1: missing field 'label'"),
        "empty train": (classify + ["--train", write_csv(tmp_path / "e.csv", [])], "has no examples"),
        "single class": (classify + ["--train", write_csv(tmp_path / "s.csv", [("a", "x"), ("b", "x")])], "has only one label ('x')"),
        "unseen val label": (classify + ["--train", ok, "--val", write_csv(tmp_path / "u.csv", [("a", "alpha"), ("b", "omega")])],
                             "label(s) 'omega' do not occur in the training data (training labels: alpha, zulu)"),
        "malformed jsonl": (classify + ["--train", bad_jsonl], "bad.jsonl line 2: not valid JSON"),
        "malformed json": (["instruct", "--model", base, "--out", tmp_path / "o", "--data", bad_json], "bad.json line 3 column 22: not valid JSON"),
        "template field missing": (["instruct", "--model", base, "--out", tmp_path / "o", "--data", missing_field],
                                   "missing.json record 2: missing field 'output'"),
        "no tokenizer": (["instruct", "--model", no_tok, "--out", tmp_path / "o", "--data", write_json(tmp_path / "x.json", instruction_records(6))],
                         "tokenizer.json: file not found"),
        "model without tokenizer": (classify + ["--train", ok, "--model", no_tok], "tokenizer.json: file not found"),
        "lora with trainable": (classify + ["--train", ok, "--lora-rank", "2", "--trainable", "all"], "only the adapters and the head train"),
        "bad lora targets": (classify + ["--train", ok, "--lora-rank", "2", "--lora-targets", "attn,ffn"], "--lora-targets must be"),
        "character the tokenizer lacks": (classify + ["--train", write_csv(tmp_path / "accent.csv", [("caf\u00e9", "alpha"), ("b", "zulu")])],
                                          "its tokenizer cannot encode the examples (character '\u00e9' (U+00E9)"),
        "record the tokenizer lacks": (["instruct", "--model", base, "--out", tmp_path / "o", "--data",
                                        write_json(tmp_path / "accent.json", [{"instruction": "a", "input": "", "output": "\u00e9"}] * 4)],
                                       "its tokenizer cannot encode the train records"),
        "batch beyond memory": (classify + ["--train", ok, "--batch-size", str(10**10)], f"a micro-batch of --batch-size {10**10} x --max-length"),
    }


def write_json(path, records):
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_bad_inputs_are_one_line_errors(base, tmp_path, capsys):
    for name, (argv, expected) in bad_inputs(tmp_path, base).items():
        rc, out, err = run(capsys, main, argv + TRAIN_ARGS)
        assert rc == 2, (name, err)
        assert expected in err, (name, err)
        assert err.startswith("gpt-finetune: error: ") and err.count("\n") == 1, (name, err)
        assert not (tmp_path / "o").exists(), name  # not even an empty --out directory


def test_invalid_utf8_in_any_data_file_names_the_file_and_the_byte(base, tmp_path, capsys):
    """A Latin-1 byte in a CSV/TSV/JSONL of examples or a JSON/JSONL of records: one line naming the file
    and the offset of the byte (the BOM of a good file counts), nothing written, every file as it was."""
    ok = write_csv(tmp_path / "ok.csv", genre_rows(6))
    good_records = json.dumps(instruction_records(6)).encode()
    files = {  # name: (bytes, the offset of the first invalid byte)
        "bad.csv": (b"text,label\n" + "caf\xe9,alpha\n".encode("latin-1") + b"b,zulu\n", 14),
        "bad.tsv": (b"\xef\xbb\xbftext\tlabel\na\talpha\n" + "z\xfc\tzulu\n".encode("latin-1"), 3 + 11 + 8 + 1),
        "bad.jsonl": (b'{"text": "a", "label": "alpha"}\n{"text": "\xe9", "label": "zulu"}\n', 32 + 10),
        "bad.json": (good_records[:-1] + b', {"instruction": "\xff", "output": "x"}]', len(good_records) - 1 + 19),
        "bad_records.jsonl": (b'{"instruction": "a", "output": "b"}\n{"instruction": "\xc3(", "output": "b"}\n', 36 + 17),
    }
    for name, (data, offset) in files.items():
        assert data.decode("latin-1")[offset] in "\xe9\xfc\xff\xc3", name  # the offsets above point at the bad byte
        (tmp_path / name).write_bytes(data)
    classify = ["classify", "--model", base, "--out", tmp_path / "o"]
    cases = {
        "bad.csv": classify + ["--train", tmp_path / "bad.csv", "--val", ok],
        "bad.tsv": classify + ["--train", ok, "--val", tmp_path / "bad.tsv"],
        "bad.jsonl": classify + ["--train", tmp_path / "bad.jsonl", "--val", ok],
        "bad.json": ["instruct", "--model", base, "--out", tmp_path / "o", "--data", tmp_path / "bad.json"],
        "bad_records.jsonl": ["instruct", "--model", base, "--out", tmp_path / "o", "--data", tmp_path / "bad_records.jsonl"],
    }
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    dirs = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    for name, argv in cases.items():
        rc, out, err = run(capsys, main, argv + TRAIN_ARGS)
        assert rc == 2, (name, err)
        assert err.startswith("gpt-finetune: error: ") and err.count("\n") == 1, (name, err)
        assert f"{tmp_path / name}: not UTF-8 at byte offset {files[name][1]} (" in err, (name, err)
        assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before, name
        assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == dirs, name  # no --out, no temp dir


def test_gpt_classify_bad_model(base, tmp_path, capsys):
    rc, _, err = run(capsys, classify_main, ["--model", base, "some text"])
    assert rc == 2 and "classifier.json: file not found" in err and err.count("\n") == 1


def test_the_confusion_matrix_columns_line_up():
    from tools.finetune import format_confusion

    table = format_confusion(["comedies", "histories", "tragedies"], [[100, 2, 3], [4, 1000, 6], [7, 8, 9]]).splitlines()
    assert len({len(line) for line in table}) == 1  # every row as wide as the header
    header = table[0]
    for label in ("comedies", "histories", "tragedies"):
        end = header.index(label) + len(label)
        assert all(line[end - 1] != " " for line in table[1:]), (label, table)  # numbers end where their label ends


def test_large_sets_are_evaluated_on_samples_during_training_and_the_training_set_at_the_end(base, tmp_path, capsys, monkeypatch):
    """The whole training set was evaluated at the end (3M rows: longer than training) and the whole
    validation set at every evaluation: now samples spread over each, the validation set whole at the end."""
    import tools.finetune
    from gpt import classifier

    monkeypatch.setattr(tools.finetune, "FINAL_TRAIN_EXAMPLES", 8)
    monkeypatch.setattr(tools.finetune, "EVAL_EXAMPLES", 4)
    seen = []
    evaluate = classifier.evaluate_classifier
    monkeypatch.setattr(tools.finetune, "evaluate_classifier", lambda m, ex, *a, **k: seen.append(len(ex)) or evaluate(m, ex, *a, **k))
    train = write_csv(tmp_path / "train.csv", sorted(genre_rows(40), key=lambda r: r[1]))  # sorted: a head slice holds one label
    val = write_csv(tmp_path / "val.csv", genre_rows(12))
    rc, stdout, err = run(capsys, main, ["classify", "--model", base, "--train", train, "--val", val, "--out", tmp_path / "run",
                                         "--max-steps", 2, "--eval-interval", 1, *TRAIN_ARGS])
    assert rc == 0, err
    assert "train: loss" in stdout and "(8 of 40 examples)" in stdout and "(12 examples)" in stdout
    assert seen[-2:] == [8, 12] and set(seen[:-2]) == {4, 40}  # during training: the val sample, the train monitor (<= 512)
    report = json.loads((tmp_path / "run" / "evaluation.json").read_text())
    assert report["train"]["examples"] == 8 and report["val"]["examples"] == 12


def test_many_labels_print_a_summary_and_keep_the_matrix_in_the_file(base, tmp_path, capsys, monkeypatch):
    import tools.finetune

    monkeypatch.setattr(tools.finetune, "MAX_PRINTED_CONFUSION", 2)
    rows = [(f"{c * 4} text", c) for c in "abc"] * 4
    train, val = write_csv(tmp_path / "train.csv", rows), write_csv(tmp_path / "val.csv", rows[:3])
    rc, stdout, err = run(capsys, main, ["classify", "--model", base, "--train", train, "--val", val, "--out", tmp_path / "run",
                                         "--max-steps", 1, *TRAIN_ARGS])
    assert rc == 0, err
    assert "3 labels (a, b, c)" in err and "confusion matrix (val): 3 x 3, in" in stdout
    assert len(json.loads((tmp_path / "run" / "evaluation.json").read_text())["val"]["confusion"]) == 3
