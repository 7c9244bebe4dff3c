"""benches/gpu_check.py on a machine without a GPU: its CPU-side behaviour, and its GPU sections run
on the CPU with tiny shapes through the `--device cpu --shapes tiny` seam (Triton kernels under the
interpreter, gloo instead of NCCL), so that no code path reaches the GPU machine untested."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import gpt2_kernels
from benches import gpu_check
from benches.gpu_check_sections import SECTIONS, make_context, measure

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args, env=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "benches.gpu_check", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_without_cuda_one_line_and_exit_0(tmp_path):
    # CUDA_VISIBLE_DEVICES="" hides any GPU, so this holds on a GPU machine too.
    out = tmp_path / "report"
    result = run_cli("--out", str(out), env={"CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1 and "no CUDA GPU" in result.stdout
    assert result.stderr == ""
    assert not out.exists()  # nothing written when there is nothing to check


def test_help():
    result = run_cli("--help")
    assert result.returncode == 0 and "--out DIR" in result.stdout and "--budget" in result.stdout
    assert "--section" not in result.stdout  # internal


@pytest.mark.parametrize("args,message", [
    (["--out", "{file}"], "exists and is not a directory"),
    (["--out", "{file}/sub/dir"], "cannot create it"),
    (["--budget", "0"], "--budget must be a positive number"),
    (["--budget", "soon"], "invalid float value"),
    (["--frobnicate"], "unrecognized arguments"),
])
def test_usage_errors_are_one_line_and_exit_2(tmp_path, args, message):
    file = tmp_path / "a_file"
    file.write_text("x")
    result = run_cli(*(a.format(file=file) for a in args))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to a read-only directory")
def test_unwritable_out_dir_is_a_usage_error(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        for out in (locked, locked / "new"):
            with pytest.raises(gpu_check.UsageError, match="not writable|cannot create"):
                gpu_check.check_out_dir(out)
    finally:
        locked.chmod(0o700)


def sample_report():
    report = gpu_check.new_report()
    report["machine"] = {"gpu": "NVIDIA H200", "capability": "9.0", "sms": 132, "memory_gib": 139.8,
                         "torch": "2.11.0", "cuda": "12.8", "triton": "3.6.0", "transformers": "4.57.0"}
    report["peaks"] = {"bf16_matmul_tflops": 712.5, "copy_gbps": 4012.0}
    report["sections"] = [
        {"name": "kernels", "status": "ok", "seconds": 61.0, "budget_s": 110, "error": None, "rows": [
            {"section": "kernels", "case": "attention B8 H12 T1024 D64 bfloat16", "impl": "ours", "mode": "fwd",
             "status": "ok", "ms": 0.25, "tflops": 203.4, "pct_peak": 28.5, "peak_mib": 12.0},
            {"section": "kernels", "case": "attention B8 H12 T1024 D64 bfloat16", "impl": "sdpa flash", "mode": "fwd",
             "status": "ok", "ms": 0.2, "tflops": 254.0, "pct_peak": 35.6, "peak_mib": 12.0, "max_abs_diff": 0.0039},
            {"section": "kernels", "case": "gelu a|b", "impl": "ours", "status": "failed", "error": "boom\nline 2"}]},
        {"name": "train", "status": "timeout", "seconds": 150.0, "budget_s": 150, "error": "killed", "rows": [
            {"section": "train", "case": "gpt2 train step", "impl": "torch eager", "status": "ok", "ms": 95.0,
             "tokens_per_s": 86231.0, "loss": 10.97}]},
        {"name": "ddp", "status": "skipped", "seconds": 0.0, "budget_s": 0, "error": "the run's time budget is spent",
         "rows": []},
    ]
    return report


def test_report_is_written_as_json_and_markdown(tmp_path):
    report = sample_report()
    gpu_check.write_report(tmp_path, report)
    assert json.loads((tmp_path / gpu_check.REPORT_JSON).read_text()) == report
    md = (tmp_path / gpu_check.REPORT_MD).read_text()
    assert "NVIDIA H200 (sm 9.0, 132 SMs, 139.8 GiB); torch 2.11.0" in md
    assert "bf16 matmul 712.5 TFLOP/s, device copy 4012 GB/s" in md
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert table[0] == "| " + " | ".join(gpu_check.COLUMNS) + " |"
    assert all(line.count(" | ") == len(gpu_check.COLUMNS) - 1 for line in table[2:]), table  # pipes escaped
    assert ("| kernels | attention B8 H12 T1024 D64 bfloat16 | sdpa flash | fwd | ok | 0.200 | 254.0 TFLOP/s | 36 | 12 "
            "| 3.90e-03 |") in md
    assert "gelu a\\|b" in md and "boom line 2" in md
    assert "| train | (section) |  |  | timeout |" in md and "86231 tok/s" in md and "loss 10.9700" in md
    assert "| ddp | (section) |  |  | skipped |" in md and "time budget is spent" in md
    assert not list(tmp_path.glob(".*.tmp"))


def test_cuda_test_files_adds_files_using_the_cuda_markers(tmp_path):
    for name, text in [("tests/gpt/test_a.py", "from tests.conftest import requires_cuda\n"),
                       ("tests/gpt/test_b.py", "import torch\n"), ("tests/gpt2_kernels/test_c.py", "requires_cuda\n"),
                       ("tests/tools/test_d.py", "@pytest.mark.cuda\n")]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert gpu_check.cuda_test_files(tmp_path) == ["tests/gpt2_kernels", "tests/benches", "tests/gpt/test_a.py",
                                                   "tests/tools/test_d.py"]


def test_tests_section_counts_passes_failures_and_skips(tmp_path):
    test_file = tmp_path / "test_sample.py"
    test_file.write_text("import pytest\n\ndef test_ok():\n    pass\n\ndef test_bad():\n    assert 1 == 2, 'wrong'\n\n"
                         "@pytest.mark.skip(reason='no')\ndef test_skip():\n    pass\n")
    row = gpu_check.run_tests(tmp_path, 120, files=[str(test_file)])
    assert (row["passed"], row["failed"], row["errors"], row["skipped"]) == (1, 1, 0, 1)
    assert row["status"] == "failed" and len(row["failures"]) == 1 and "test_bad" in row["failures"][0]
    assert "wrong" in row["failures"][0]


def test_a_child_past_its_time_is_killed_with_its_workers(tmp_path):
    code = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            "print('started', flush=True); time.sleep(60)")
    start = time.time()
    status, tail = gpu_check._run_child([sys.executable, "-c", code], 3, tmp_path / "log")
    assert status == "timeout" and "started" in tail and time.time() - start < 30


def test_run_all_runs_sections_in_children_and_writes_the_report(tmp_path, monkeypatch):
    # The real orchestration (a child process per section, rows appended, report rewritten after
    # each section), on the CPU with tiny shapes.
    for name in ("peaks", "decode", "ddp"):
        monkeypatch.setitem(gpu_check.SECTION_BUDGETS, name, 150)  # room for a loaded 2-core machine
    lines = []
    report = gpu_check.run_all(tmp_path, 600, sections=("peaks", "decode", "ddp"),
                               child_args=("--device", "cpu", "--shapes", "tiny"), log=lines.append)
    on_disk = json.loads((tmp_path / gpu_check.REPORT_JSON).read_text())
    assert on_disk["sections"] == json.loads(json.dumps(report["sections"], default=str))
    assert [s["status"] for s in report["sections"]] == ["ok", "ok", "ok"], report["sections"]
    assert report["peaks"]["bf16_matmul_tflops"] > 0 and report["peaks"]["copy_gbps"] > 0
    assert report["machine"]["torch"] == torch.__version__
    assert len(lines) == 3 and lines[0].startswith("gpu-check: peaks: ok")
    rows = (tmp_path / "sections" / "decode.jsonl").read_text().splitlines()
    assert rows and all(json.loads(r)["section"] == "decode" for r in rows)
    decode = [r for s in report["sections"] if s["name"] == "decode" for r in s["rows"]]
    assert decode and all(r["status"] == "ok" and r["tokens_per_s"] > 0 for r in decode)
    assert "| ddp | tiny DDP step" in (tmp_path / gpu_check.REPORT_MD).read_text()


def test_sections_without_time_left_are_recorded_as_skipped(tmp_path):
    report = gpu_check.run_all(tmp_path, gpu_check.MIN_SECTION_S - 1, sections=("peaks", "train"),
                               child_args=("--device", "cpu", "--shapes", "tiny"), log=lambda line: None)
    assert [(s["name"], s["status"], s["rows"]) for s in report["sections"]] == [("peaks", "skipped", []),
                                                                                ("train", "skipped", [])]
    assert "time budget is spent" in (tmp_path / gpu_check.REPORT_MD).read_text()


def run_section(name, **fields):
    ctx = make_context("cpu", "tiny", **fields)
    return list(SECTIONS[name](ctx)), ctx


def test_kernels_section_compares_every_kernel_with_its_peer(monkeypatch):
    # int8_linear is issue 13's kernel: stand its reference math in, so its rows' code path runs here.
    monkeypatch.setattr(gpt2_kernels, "quantize_int8", lambda w: ((w / 0.01).round().clamp(-127, 127).to(torch.int8),
                                                             torch.full((w.shape[0],), 0.01)), raising=False)
    monkeypatch.setattr(gpt2_kernels, "int8_linear", lambda x, w8, scale, bias=None, *, backend="auto":
                        F.linear(x, (w8.float() * scale[:, None]).to(x.dtype), bias), raising=False)
    rows, _ = run_section("kernels", peaks={"bf16_matmul_tflops": 1.0, "copy_gbps": 10.0})
    cases = {(r["case"].split()[0], r["impl"], r.get("mode")) for r in rows if r["status"] == "ok"}
    for op, peer in [("attention", "sdpa math"), ("layer_norm", "F.layer_norm"), ("gelu", "F.gelu tanh"),
                     ("linear_cross_entropy", "F.cross_entropy(F.linear)")]:
        for mode in ("fwd", "fwd+bwd"):
            assert (op, "ours", mode) in cases and (op, peer, mode) in cases, (op, mode, cases)
    assert ("int8_linear", "ours", "fwd") in cases
    for r in rows:
        if r["status"] == "ok":
            assert r["ms"] > 0 and (r.get("tflops") or r.get("gbps")) and r.get("pct_peak") is not None
            if r["impl"] != "ours":  # fp32 on the CPU: the same results
                assert r["max_abs_diff"] < 1e-4, r
        else:  # e.g. SDPA's efficient back-end, which has no CPU kernel: recorded, not raised
            assert r["status"] == "failed" and r["error"]


def test_train_decode_and_ddp_sections_on_cpu():
    rows, ctx = run_section("train")
    assert [r["impl"] for r in rows] == list(dict.fromkeys(["torch eager", f"{ctx.backend} eager"]))
    assert all(r["status"] == "ok" and r["tokens_per_s"] > 0 and r["loss"] > 0 for r in rows), rows
    if len(rows) == 2:  # the same seed and batch: triton's first loss matches torch's
        assert rows[1]["max_abs_diff"] < 1e-3
    rows, _ = run_section("decode")
    assert rows and all(r["status"] == "ok" and r["tokens_per_s"] > 0 for r in rows), rows
    assert len({r["note"] for r in rows}) == 1  # greedy: the same tokens from both backends
    (row,), _ = run_section("ddp")
    assert row["status"] == "ok" and row["loss"] > 0 and "gloo" in row["note"], row


def test_cases_past_the_deadline_are_recorded_as_skipped():
    rows, _ = run_section("decode", deadline=time.time() - 1)
    assert rows and all(r["status"] == "skipped" and "budget" in r["error"] for r in rows)


def test_measure_times_calls():
    calls = []
    ms, peak = measure(lambda: (calls.append(1), time.sleep(0.01)), "cpu", seconds=0.05, max_calls=10)
    assert 9 <= ms <= 100 and peak is None and 1 + 1 + 3 <= len(calls) <= 1 + 1 + 10
