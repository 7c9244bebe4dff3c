"""The README runs as written: every ```sh and ```python block, in the order shown, in a fresh
directory, with STEPS=2 (the variable the README documents for the training steps). Blocks marked
``download`` are replaced by copies of the same files (from ../shared/data, and a tiny stand-in for
OpenAI's 124M checkpoint with GPT-2's real vocabulary), blocks marked ``setup`` by this test's own
installation (the console scripts next to this Python)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

BLOCK = re.compile(r"^```(?P<lang>\w+)(?P<tags>[^\n]*)\n(?P<body>.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
OPENAI_HPARAMS = {"n_vocab": 50257, "n_ctx": 64, "n_embd": 16, "n_head": 2, "n_layer": 1}


def readme_blocks() -> list[tuple[str, str, str, int]]:
    """(language, tags, body, line number) of every fenced block of README.md."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return [(m["lang"], m["tags"].strip(), m["body"], text.count("\n", 0, m.start()) + 1) for m in BLOCK.finditer(text)]


def test_the_readme_has_runnable_blocks_and_marks_the_others():
    blocks = readme_blocks()
    runnable = [b for b in blocks if b[0] in ("sh", "python") and not b[1]]
    assert len(runnable) >= 7
    assert {tags for lang, tags, _, _ in blocks if lang == "sh"} <= {"", "download", "setup"}
    # the quick start leads with one command from text to a model
    first = runnable[0][2]
    assert first.lstrip().startswith("gpt-train downloads/tinyshakespeare.txt --out")


@pytest.fixture
def downloads(tmp_path, shared_file) -> Path:
    """What the README's download blocks fetch, at the same paths."""
    import tokenizers_bpe
    from tests.tools.test_convert import openai_arrays, write_openai_dir

    d = tmp_path / "downloads"
    (d / "gpt2").mkdir(parents=True)
    shutil.copy(shared_file("tinyshakespeare.txt"), d / "tinyshakespeare.txt")
    shutil.copy(shared_file("instruct/instruction-data.json"), d / "instruction-data.json")
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copy(shared_file(f"gpt2/{name}"), d / "gpt2" / name)
    import tensorflow as tf

    gpt2 = tokenizers_bpe.load_gpt2(d / "gpt2" / "encoder.json", d / "gpt2" / "vocab.bpe")
    write_openai_dir(tf, d / "124M", openai_arrays(OPENAI_HPARAMS), OPENAI_HPARAMS, gpt2)
    return d


@pytest.mark.slow
def test_every_readme_block_runs_as_written(tmp_path, downloads):
    bin_dir = Path(sys.executable).parent
    assert (bin_dir / "gpt-train").exists(), "the console scripts are installed next to this Python (pip install -e .)"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "STEPS": "2", "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    ran = 0
    for lang, tags, body, line in readme_blocks():
        if tags or lang not in ("sh", "python"):
            continue
        argv = ["bash", "-e", "-o", "pipefail", "-c", body] if lang == "sh" else [sys.executable, "-c", body]
        done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"README.md line {line}: the {lang} block failed:\n{body}\n--- stderr:\n{done.stderr[-4000:]}"
        ran += 1
    assert ran >= 7
    # Everything the tour wrote is under tour/ (the .gitignore covers it), next to the downloads.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["downloads", "tour"]
    gitignore = (ROOT / ".gitignore").read_text().split()
    assert "/tour/" in gitignore and "/downloads/" in gitignore
