"""gpt.finetune_data readers: strict UTF-8 (an InvalidTextError naming the file and the byte offset), a
UTF-8 BOM accepted, and the line numbers of the other errors unchanged by either."""

from __future__ import annotations

import json
import os

import pytest

from gpt.finetune_data import MAX_LABEL_CHARS, MAX_LABELS, evenly_spaced, label_names, read_examples, read_instructions, show_labels
from tokenizers_bpe.errors import SettingError
from tokenizers_bpe import InvalidTextError

BOM = b"\xef\xbb\xbf"
RECORDS = [{"instruction": "Say hi.", "input": "", "output": "hi"}, {"instruction": "Add 1 and 2.", "input": "", "output": "3"}]


@pytest.mark.parametrize("bom", [b"", BOM], ids=["plain", "bom"])
def test_every_format_reads_the_same_with_or_without_a_bom(tmp_path, bom):
    rows = [("café au lait", "drink"), ("naïve\u2028text", "word")]
    csv = tmp_path / "d.csv"
    csv.write_bytes(bom + ("text,label\r\n" + "".join(f'"{t}",{lab}\r\n' for t, lab in rows)).encode())
    tsv = tmp_path / "d.tsv"
    tsv.write_bytes(bom + ("text\tlabel\n" + "".join(f"{t}\t{lab}\n" for t, lab in rows)).encode())
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_bytes(bom + "".join(json.dumps({"text": t, "label": lab}, ensure_ascii=False) + "\n" for t, lab in rows).encode())
    for path in (csv, tsv, jsonl):
        assert read_examples(path) == rows, path.name
    records = tmp_path / "r.json"
    records.write_bytes(bom + json.dumps(RECORDS, indent=1, ensure_ascii=False).encode())
    records_jsonl = tmp_path / "r.jsonl"
    records_jsonl.write_bytes(bom + "".join(json.dumps(r) + "\n" for r in RECORDS).encode())
    assert read_instructions(records) == read_instructions(records_jsonl) == RECORDS


@pytest.mark.parametrize(
    "name, data, offset",
    [
        ("e.csv", BOM + b"text,label\nok,a\n" + b"caf\xe9,b\n", 3 + 16 + 3),
        ("e.tsv", b"text\tlabel\nx\xc3\ty\n", 12),
        ("e.jsonl", b'{"text": "a", "label": "b"}\n\n{"text": "\xff", "label": "b"}\n', 28 + 1 + 10),
    ],
)
def test_invalid_utf8_in_examples_is_an_error_naming_the_file_and_the_byte(tmp_path, name, data, offset):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(InvalidTextError) as e:
        read_examples(path)
    assert (e.value.source, e.value.offset) == (str(path), offset)
    assert str(e.value).startswith(f"{path}: not UTF-8 at byte offset {offset} (")


def test_invalid_utf8_in_records_is_an_error_naming_the_file_and_the_byte(tmp_path):
    good = json.dumps(RECORDS).encode()
    for name, data, offset in (("r.json", BOM + good[:-1] + b', {"instruction": "\xe9"}]', 3 + len(good) - 1 + 19),
                               ("r.jsonl", b'{"instruction": "a", "output": "\xed\xa0\x80"}\n', 32)):  # \xed\xa0\x80: a surrogate
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(InvalidTextError) as e:
            read_instructions(path)
        assert (e.value.source, e.value.offset) == (str(path), offset), name


def test_other_errors_keep_their_line_numbers_after_a_bom_and_crlf(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_bytes(BOM + b'{"text": "a", "label": "b"}\r\n{"text": "c", "label": \r\n')
    with pytest.raises(ValueError, match=r"d\.jsonl line 2: not valid JSON"):
        read_examples(jsonl)
    csv = tmp_path / "d.csv"
    csv.write_bytes(BOM + b"text,label\r\na,b\r\nc,d,e\r\n")
    with pytest.raises(ValueError, match=r"d\.csv line 3: 3 fields, not 2 like the header"):
        read_examples(csv)
    records = tmp_path / "r.json"
    records.write_bytes(BOM + b'[\n {"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}\n]\n')
    with pytest.raises(ValueError, match=r"r\.json line 3 column 22: not valid JSON"):
        read_instructions(records)


@pytest.mark.parametrize("reader, name", [(read_examples, "train.csv"), (read_instructions, "records.json")])
def test_a_data_path_that_is_not_a_file_is_named_for_what_it_is(tmp_path, reader, name):
    """Not opened: a FIFO would block the reader, a device never end."""
    os.mkfifo(tmp_path / name)
    with pytest.raises(ValueError, match=f"{name}: is a FIFO"):
        reader(tmp_path / name)
    with pytest.raises(ValueError, match=f"{name}: file not found"):
        reader(tmp_path / "missing" / name)


def test_a_csv_passage_longer_than_the_csv_module_s_field_limit_is_read(tmp_path):
    """Python's csv module stops at fields of 131,072 characters (a `_csv.Error` traceback): a long
    passage is data like any other (the model reads its first --max-length tokens), up to the file's size."""
    import csv

    long_text = "word " * 60_000  # 300,000 characters
    (tmp_path / "d.csv").write_text(f'text,label\n"{long_text}",pos\nshort,neg\n')
    limit = csv.field_size_limit()
    assert read_examples(tmp_path / "d.csv") == [(long_text, "pos"), ("short", "neg")]
    assert csv.field_size_limit() == limit  # the process-wide limit is put back


def test_lora_targets_of_another_type_in_a_file_are_a_setting_error():
    """A list inside "targets" (config.json's lora section) was an unhashable-type TypeError traceback."""
    from gpt.lora import LoRAConfig
    from tokenizers_bpe.errors import SettingError

    for targets in ([["attn"]], [{}], [1], ["attn", None]):
        with pytest.raises(SettingError, match="lora_targets must be a comma-separated subset"):
            LoRAConfig.from_dict({"rank": 2, "alpha": 4.0, "targets": targets})


def test_a_header_naming_the_text_or_label_column_twice_is_refused(tmp_path):
    """Which of the two columns was meant cannot be known (csv.DictReader took the last, silently)."""
    (tmp_path / "d.csv").write_text("text,label,label\na,x,y\n")
    with pytest.raises(SettingError, match="names column 'label' 2 times"):
        read_examples(tmp_path / "d.csv")
    (tmp_path / "ok.csv").write_text("text,label,note,note\na,x,1,2\n\nb,y,3,4\n")  # other columns may repeat; blank lines skipped
    assert read_examples(tmp_path / "ok.csv") == [("a", "x"), ("b", "y")]


def test_labels_are_bounded_in_length_and_number(tmp_path):
    (tmp_path / "long.csv").write_text(f"text,label\na,{'L' * (MAX_LABEL_CHARS + 1)}\n")
    with pytest.raises(ValueError, match=f"line 2: a label of {MAX_LABEL_CHARS + 1} characters"):
        read_examples(tmp_path / "long.csv")
    (tmp_path / "long.jsonl").write_text(json.dumps({"text": "a", "label": "L" * 100_000}) + "\n")
    with pytest.raises(ValueError, match="a label of 100,000 characters"):
        read_examples(tmp_path / "long.jsonl")
    many = [(f"t{i}", f"L{i}") for i in range(MAX_LABELS + 1)]
    with pytest.raises(ValueError, match=f"{MAX_LABELS + 1:,} distinct labels") as e:
        label_names(many, "--train t.csv")
    assert len(str(e.value)) < 300
    assert len(label_names(many[:MAX_LABELS], "--train t.csv")) == MAX_LABELS


def test_messages_show_a_few_labels_and_how_many():
    assert show_labels(["neg", "pos"]) == "neg, pos"
    shown = show_labels([f"L{i}" for i in range(100_000)] + ["x" * 1000])
    assert shown.endswith("... (100,001 labels)") and len(shown) < 200
    assert len(show_labels(["x" * 1000])) == 40


@pytest.mark.parametrize("line", ['{"text": "a\\ud800b", "label": "pos"}', '{"text": "a", "label": "\\udce9"}'])
def test_a_lone_surrogate_in_json_examples_is_refused_with_its_line(tmp_path, line):
    """A JSON escape of half a character is no text: tokenizers replace it, labels could not be written."""
    (tmp_path / "d.jsonl").write_text('{"text": "ok", "label": "neg"}\n' + line + "\n")
    with pytest.raises(ValueError, match=r"d\.jsonl line 2: column '(text|label)' holds a lone surrogate"):
        read_examples(tmp_path / "d.jsonl")
    (tmp_path / "r.json").write_text('[{"instruction": "say", "output": "\\ud800"}]')
    with pytest.raises(ValueError, match="record 1: field 'output' holds a lone surrogate"):
        read_instructions(tmp_path / "r.json")


def test_evenly_spaced_takes_every_part_of_a_sorted_list():
    rows = [("t", "a")] * 5000 + [("t", "b")] * 5000
    sample = evenly_spaced(rows, 2048)
    assert len(sample) <= 2048 and {x[1] for x in sample} == {"a", "b"}
    assert evenly_spaced(rows[:100], 2048) == rows[:100]
