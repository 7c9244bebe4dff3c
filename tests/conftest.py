"""Project-wide test set-up.

- Triton kernels are decorated at import time, so the interpreter is chosen here, before any test
  module imports `gpt2_kernels`: without CUDA, TRITON_INTERPRET=1 runs the Triton code paths on the CPU.
- `shared_data` gives the path of ../shared/data (or $GPT_TOOLKIT_SHARED_DATA). Where it is absent
  (a user's clone) the tests that need it skip with a reason; under CI=true they fail instead, so CI
  can never pass by skipping.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

# A suite started in the background of a script (`make test &`, nohup) inherits SIGINT ignored, and so
# does every process a test starts: a test sending one SIGINT then waited for a process that ignored it.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # the tokenizer tests do not need torch
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Triton must be imported before TensorFlow in a process: the other order aborts it with an LLVM
# "option registered more than once" error. Some test workers import both (gpt-convert openai tests).
try:
    import triton  # noqa: F401
except ImportError:
    pass

# One intra-op thread per test process: the tests' models are small, and `make test` runs two
# pytest workers on two cores, where more threads only wait for each other (small CPU ops ran up to
# ~100x slower oversubscribed). Subprocesses that tests start get OMP_NUM_THREADS=1 for the same reason.
if "torch" in globals():
    torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("GPT_TOOLKIT_SHARED_DATA", ROOT.parent / "shared" / "data"))


def _missing(what: str) -> None:
    msg = f"{what} not found (expected under {SHARED_DATA}; set GPT_TOOLKIT_SHARED_DATA)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{msg}: CI must have ../shared/data", pytrace=False)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to ../shared/data; skips (fails under CI=true) where it is absent."""
    if not SHARED_DATA.is_dir():
        _missing("shared data directory")
    return SHARED_DATA


@pytest.fixture(scope="session")
def shared_file(shared_data):
    """shared_file("gpt2/vocab.bpe") -> Path, skipping (failing under CI) if that file is absent."""

    def get(relpath: str) -> Path:
        p = shared_data / relpath
        if not p.is_file():
            _missing(str(relpath))
        return p

    return get


requires_cuda = pytest.mark.skipif(not _HAS_CUDA, reason="needs a CUDA GPU (none found)")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A gpt-prepare data directory: the first built-in play, char-level (small and quick to train on)."""
    import tokenizers_bpe
    from tools.corpus import plays
    from tools.prepare import main as prepare_main

    root = tmp_path_factory.mktemp("data")
    text = plays()[0].text()
    (root / "play.txt").write_text(text, encoding="utf-8")
    tokenizers_bpe.train_char([text]).save(root / "char.json")
    assert prepare_main([str(root / "play.txt"), "--tokenizer", str(root / "char.json"), "-o", str(root / "data"), "--workers", "1", "--quiet"]) == 0
    return root / "data"


def read_losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss, from a run's metrics.jsonl."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}
