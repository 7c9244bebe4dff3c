"""One command that checks the project on a CUDA GPU and writes down every figure:

    make gpu-check                       # = PYTHONPATH=. python3 -m benches.gpu_check --out gpu-check-out
    python -m benches.gpu_check --out DIR [--budget SECONDS]

Made for a borrowed GPU machine (H100/H200, PyTorch, Triton and transformers preinstalled, no
network): it installs nothing and fits in 8 minutes. Sections, in order, each in its own process
with its own time limit, so a crash, a CUDA error or a hang in one loses none of the others' rows:

    peaks    the machine, versions, and the peaks measured in this run (bf16 matmul TFLOP/s, copy GB/s)
    tests    pytest on tests/gpt2_kernels, tests/benches and every test file that uses the cuda marker
    kernels  each kernel vs its PyTorch peer, forward and forward+backward, bf16 and fp16, GPT-2 shapes
    train    a GPT-2 124M training step, bf16 autocast, backend triton vs torch, eager and compiled
    decode   gpt.generate tokens/s, batch 1, greedy
    ddp      one DistributedDataParallel step in a one-process NCCL group

DIR/gpu_check.json and DIR/gpu_check.md are rewritten after every section (rows of a section
are appended to DIR/sections/NAME.jsonl as they are measured), so a run that is cut short still
leaves its results; the table is printed at the end. The format is in benches/README.md.
Without a CUDA GPU it says so in one line and exits 0; usage errors are one line and exit 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = "gpu-check-out"
DEFAULT_BUDGET_S = 470.0  # the whole run, within the 8 minutes a GPU loan leaves for it
REPORT_JSON, REPORT_MD, SECTIONS_DIR = "gpu_check.json", "gpu_check.md", "sections"
FORMAT_VERSION = 1
# (section, seconds at most); the sum may exceed the budget: later sections get what is left.
SECTION_BUDGETS = {"peaks": 30, "tests": 150, "kernels": 110, "train": 150, "decode": 35, "ddp": 30}
MIN_SECTION_S = 10  # a section with less time left than this is recorded as skipped
TEST_PATHS = ("tests/gpt2_kernels", "tests/benches")
CUDA_MARKERS = ("requires_cuda", "mark.cuda")  # test files using these run in the tests section too


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse would print the usage too)
        raise UsageError(message)


def parse_args(argv):
    parser = _Parser(prog="python -m benches.gpu_check", description=__doc__.split("\n\n")[0],
                     formatter_class=argparse.RawDescriptionHelpFormatter,
                     epilog="Report format: benches/README.md, section 'GPU check'.")
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                        help=f"directory for {REPORT_JSON}, {REPORT_MD} and the sections' rows (default {DEFAULT_OUT})")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, metavar="SECONDS",
                        help=f"time for the whole run (default {DEFAULT_BUDGET_S:.0f})")
    # Internal: how run_all starts one section in a child process (--device cpu --shapes tiny: the tests).
    parser.add_argument("--section", choices=list(SECTION_BUDGETS), help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, default=float("inf"), help=argparse.SUPPRESS)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help=argparse.SUPPRESS)
    parser.add_argument("--shapes", choices=("gpt2", "tiny"), default="gpt2", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.budget > 0:
        raise UsageError(f"--budget must be a positive number of seconds, got {args.budget}")
    check_out_dir(Path(args.out))
    return args


def check_out_dir(out: Path) -> None:
    """--out must be a writable directory or creatable as one; nothing is created here."""
    if out.exists():
        if not out.is_dir():
            raise UsageError(f"--out {out}: exists and is not a directory")
        if not os.access(out, os.W_OK | os.X_OK):
            raise UsageError(f"--out {out}: directory is not writable")
        return
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: cannot create it ({parent} is not a writable directory)")


def cuda_gpu_missing() -> str | None:
    """Why there is no usable CUDA GPU, or None. Looks for the driver before importing torch."""
    if not (Path("/dev/nvidiactl").exists() or Path("/proc/driver/nvidia/version").exists()):
        return "no NVIDIA driver found"
    try:
        import torch
    except ImportError:
        return f"torch is not importable by {sys.executable}"
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False"
    return None


# ---------------------------------------------------------------------------------------------- report


def new_report() -> dict:
    return {"format_version": FORMAT_VERSION, "started": _now(), "finished": None, "seconds": 0.0,
            "machine": {}, "peaks": {}, "sections": []}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_report(out: Path, report: dict) -> None:
    """DIR/gpu_check.json and DIR/gpu_check.md, each replaced atomically."""
    for name, text in ((REPORT_JSON, json.dumps(report, indent=1, default=str)), (REPORT_MD, markdown(report))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text + "\n")
        tmp.replace(out / name)


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def throughput_cell(row: dict) -> str:
    for key, unit, spec in (("tflops", "TFLOP/s", ".1f"), ("gbps", "GB/s", ".0f"), ("tokens_per_s", "tok/s", ".0f")):
        if row.get(key) is not None:
            return f"{format(row[key], spec)} {unit}"
    return ""


COLUMNS = ("section", "case", "impl", "mode", "status", "ms", "throughput", "% peak", "peak MiB", "max abs diff", "note")


def markdown(report: dict) -> str:
    """The report as markdown: a header (machine, versions, peaks) and one table row per result."""
    m, p = report.get("machine", {}), report.get("peaks", {})
    lines = [f"# GPU check {report.get('started', '')}", "",
             f"Machine: {m.get('gpu', '?')} (sm {m.get('capability', '?')}, {m.get('sms', '?')} SMs, "
             f"{m.get('memory_gib', '?')} GiB); torch {m.get('torch', '?')}, CUDA {m.get('cuda', '?')}, "
             f"triton {m.get('triton', '?')}, transformers {m.get('transformers', '?')}.",
             f"Measured peaks: bf16 matmul {_fmt(p.get('bf16_matmul_tflops'), '.1f') or '?'} TFLOP/s, "
             f"device copy {_fmt(p.get('copy_gbps'), '.0f') or '?'} GB/s. Total {report.get('seconds', 0):.0f} s.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for section in report.get("sections", []):
        rows = [r for r in section.get("rows", []) if r.get("kind") != "machine"]
        if section.get("status") != "ok" or not rows:
            lines.append(_table_row([section["name"], "(section)", "", "", section.get("status"), "", "", "", "", "",
                                     f"{section.get('seconds', 0):.0f} s {section.get('error') or ''}"]))
        for r in rows:
            note = r.get("note") or r.get("error") or ""
            if r.get("loss") is not None:
                note = f"loss {r['loss']:.4f} {note}".strip()
            lines.append(_table_row([r.get("section", section["name"]), r.get("case", ""), r.get("impl", ""),
                                     r.get("mode", ""), r.get("status", ""), _fmt(r.get("ms"), ".3f"), throughput_cell(r),
                                     _fmt(r.get("pct_peak"), ".0f"), _fmt(r.get("peak_mib"), ".0f"),
                                     _fmt(r.get("max_abs_diff"), ".2e"), note]))
    return "\n".join(lines)


def _table_row(cells) -> str:
    return "| " + " | ".join(_cell(str(c)) for c in cells) + " |"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")[:300]


# ---------------------------------------------------------------------------------------------- tests


def cuda_test_files(root: Path = ROOT) -> list[str]:
    """tests/gpt2_kernels, tests/benches, and every other test file that mentions the cuda markers."""
    extra = sorted(p.relative_to(root).as_posix() for p in (root / "tests").rglob("test_*.py")
                   if not p.relative_to(root).as_posix().startswith(TEST_PATHS)
                   and any(m in p.read_text(errors="replace") for m in CUDA_MARKERS))
    return [*TEST_PATHS, *extra]


def junit_rows(xml_path: Path) -> dict:
    """Counts and failing test ids from pytest's --junitxml file."""
    suite = ET.parse(xml_path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    total, failures, errors, skipped = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
    failed = []
    for case in suite.iter("testcase"):
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            failed.append(f"{case.get('classname')}::{case.get('name')}: {(bad.get('message') or '')[:200]}")
    return {"passed": total - failures - errors - skipped, "failed": failures, "errors": errors, "skipped": skipped,
            "failures": failed}


def run_tests(out: Path, timeout: float, files: list[str] | None = None) -> dict:
    """pytest on the CUDA-relevant tests in a subprocess (xdist workers when installed)."""
    import importlib.util

    xml = out / "pytest.xml"
    xml.unlink(missing_ok=True)
    files = cuda_test_files() if files is None else files
    cmd = [sys.executable, "-m", "pytest", *files, "-q", "-p", "no:cacheprovider", f"--junitxml={xml}"]
    if importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", str(min(8, os.cpu_count() or 1))]  # the kernels' first compiles are CPU-bound
    start = time.time()
    status, tail = _run_child(cmd, timeout, out / "pytest.log")
    row = {"section": "tests", "case": "pytest " + " ".join(files), "impl": "pytest", "status": status,
           "ms": (time.time() - start) * 1e3}
    if xml.exists():
        row.update(junit_rows(xml))
        row["note"] = f"{row['passed']} passed, {row['failed']} failed, {row['errors']} errors, {row['skipped']} skipped"
        if row["failed"] or row["errors"]:
            row["status"] = "failed"
    else:
        row["error"] = tail
    return row


# ---------------------------------------------------------------------------------------------- sections


def _run_child(cmd: list[str], timeout: float, log: Path) -> tuple[str, str]:
    """Run cmd in its own process group (so a timeout kills its workers too); (status, output tail)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        status = "interrupted"
        try:
            status = "ok" if proc.wait(timeout=timeout) == 0 else "failed"
        except subprocess.TimeoutExpired:
            status = "timeout"
        finally:  # on a timeout, and on Ctrl-C: a child in its own session would outlive us
            if status in ("timeout", "interrupted"):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return status, log.read_text(errors="replace")[-2000:]


def run_section(out: Path, name: str, timeout: float, child_args: tuple[str, ...] = ()) -> dict:
    """One section in a child process; its rows are whatever it managed to write."""
    start = time.time()
    if name == "tests":
        row = run_tests(out, timeout)
        return {"name": name, "status": row["status"], "seconds": time.time() - start, "budget_s": timeout,
                "error": None if row["status"] == "ok" else (row.get("note") or row.get("error")), "rows": [row]}
    rows_file = out / SECTIONS_DIR / f"{name}.jsonl"
    rows_file.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "benches.gpu_check", "--out", str(out), "--section", name,
           "--deadline", str(start + timeout - 5), *child_args]  # cases stop starting 5 s before the kill
    status, tail = _run_child(cmd, timeout, out / SECTIONS_DIR / f"{name}.log")
    rows = [json.loads(line) for line in rows_file.read_text().splitlines() if line.strip()] if rows_file.exists() else []
    return {"name": name, "status": status, "seconds": time.time() - start, "budget_s": timeout,
            "error": None if status == "ok" else tail[-1000:], "rows": rows}


def section_child(out: Path, name: str, deadline: float, device: str = "cuda", shapes: str = "gpt2") -> int:
    """In the child: run one section, appending each row to DIR/sections/NAME.jsonl as it comes."""
    from benches.gpu_check_sections import SECTIONS, make_context

    report = json.loads((out / REPORT_JSON).read_text()) if (out / REPORT_JSON).exists() else {}
    ctx = make_context(device, shapes, deadline=deadline, peaks=report.get("peaks", {}))
    with open(out / SECTIONS_DIR / f"{name}.jsonl", "a") as f:
        for row in SECTIONS[name](ctx):
            f.write(json.dumps(row, default=str) + "\n")
            f.flush()
    return 0


def run_all(out: Path, budget: float, sections=tuple(SECTION_BUDGETS), child_args: tuple[str, ...] = (),
            log=print) -> dict:
    """Every section in turn within `budget` seconds, the report rewritten after each."""
    start = time.time()
    (out / SECTIONS_DIR).mkdir(parents=True, exist_ok=True)
    report = new_report()
    write_report(out, report)
    for name in sections:
        left = budget - (time.time() - start)
        if left < MIN_SECTION_S:
            result = {"name": name, "status": "skipped", "seconds": 0.0, "budget_s": 0.0,
                      "error": "the run's time budget is spent", "rows": []}
        else:
            result = run_section(out, name, min(SECTION_BUDGETS[name], left), child_args)
        report["sections"].append(result)
        for row in result["rows"]:
            if row.get("kind") == "machine":
                report["machine"] = {k: v for k, v in row.items() if k not in ("section", "case", "impl", "status", "kind")}
            if row.get("kind") == "peak" and row.get("status") == "ok":
                report["peaks"][row["peak"]] = row[row["unit"]]
        report["seconds"] = time.time() - start
        report["finished"] = _now()
        write_report(out, report)
        log(f"gpu-check: {name}: {result['status']} in {result['seconds']:.0f} s, {len(result['rows'])} rows")
    return report


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except UsageError as e:
        print(f"gpu-check: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    if args.section:
        return section_child(out, args.section, args.deadline, args.device, args.shapes)
    reason = cuda_gpu_missing()
    if reason:
        print(f"gpu-check: no CUDA GPU on this machine ({reason}); nothing to check")
        return 0
    try:
        (out / SECTIONS_DIR).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"gpu-check: error: --out {out}: {e.strerror or e}", file=sys.stderr)
        return 2
    report = run_all(out, args.budget)
    print(markdown(report))
    print(f"gpu-check: wrote {out / REPORT_JSON} and {out / REPORT_MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
