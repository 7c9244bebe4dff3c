"""The memory a process can still get: the machine's, or its memory cgroup's where that is less (a
container's limit, which /proc/meminfo does not show: the checks against the machine alone let the
OOM killer end commands run under `docker run -m` or `systemd-run -p MemoryMax=`)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tokenizers_bpe import membudget

GiB = 1 << 30


def fake_cgroups(tmp_path: Path, monkeypatch, proc_line: str, groups: dict[str, dict[str, str]]) -> None:
    """A /proc/self/cgroup of ``proc_line`` and cgroup files under a fake /sys/fs/cgroup."""
    root = tmp_path / "cgroup"
    for group, files in groups.items():
        directory = root / group
        directory.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (directory / name).write_text(text)
    (tmp_path / "proc_cgroup").write_text(proc_line)
    monkeypatch.setattr(membudget, "CGROUP_ROOT", str(root))
    monkeypatch.setattr(membudget, "PROC_CGROUP", str(tmp_path / "proc_cgroup"))


def test_cgroup_v2_limit_less_usage_with_inactive_file_cache_free(tmp_path, monkeypatch):
    fake_cgroups(tmp_path, monkeypatch, "0::/user.slice/job.scope\n", {
        "user.slice/job.scope": {"memory.max": f"{2 * GiB}\n", "memory.current": f"{GiB}\n", "memory.stat": f"anon 1\ninactive_file {GiB // 4}\n"},
        "user.slice": {"memory.max": "max\n", "memory.current": "5\n", "memory.stat": ""},
    })
    assert membudget.cgroup_memory_left() == GiB + GiB // 4
    assert membudget.available_memory() <= GiB + GiB // 4


def test_the_tightest_cgroup_above_counts_too(tmp_path, monkeypatch):
    fake_cgroups(tmp_path, monkeypatch, "0::/a/b\n", {
        "a/b": {"memory.max": f"{8 * GiB}\n", "memory.current": "0\n", "memory.stat": ""},
        "a": {"memory.max": f"{GiB}\n", "memory.current": f"{GiB // 2}\n", "memory.stat": ""},
    })
    assert membudget.cgroup_memory_left() == GiB // 2


def test_cgroup_v1_memory_controller(tmp_path, monkeypatch):
    fake_cgroups(tmp_path, monkeypatch, "4:memory:/docker/abc\n3:cpu:/docker/abc\n0::/\n", {
        "memory/docker/abc": {"memory.limit_in_bytes": f"{3 * GiB}\n", "memory.usage_in_bytes": f"{GiB}\n",
                              "memory.stat": f"cache 9\ntotal_inactive_file {GiB}\n"},
        "memory": {"memory.limit_in_bytes": "9223372036854771712\n", "memory.usage_in_bytes": "1\n", "memory.stat": ""},
    })
    assert membudget.cgroup_memory_left() == 3 * GiB


@pytest.mark.parametrize("proc", ["", "0::/\n", "garbage\n", "4:memory:/../../etc\n"])
def test_no_limit_or_nothing_readable_is_none_and_the_machine_decides(tmp_path, monkeypatch, proc):
    fake_cgroups(tmp_path, monkeypatch, proc, {"": {"memory.stat": ""}})
    assert membudget.cgroup_memory_left() is None
    assert membudget.available_memory() == membudget._meminfo_available()


def test_a_real_cgroup_limit_is_seen(tmp_path):
    """Run in a memory cgroup of 1 GiB where this machine lets us make one (root, cgroup v1 or v2)."""
    for base, limit_file in (("/sys/fs/cgroup/memory", "memory.limit_in_bytes"), ("/sys/fs/cgroup", "memory.max")):
        group = Path(base) / f"gpt-toolkit-test-{uuid.uuid4().hex[:8]}"
        try:
            group.mkdir()
            if (group / "cgroup.procs").exists():  # (a cgroup file system, not a plain directory)
                (group / limit_file).write_text(str(GiB))
                break
        except OSError:
            pass
        if group.is_dir():
            group.rmdir()
    else:
        pytest.skip("no memory cgroup can be made here (not root, or no memory controller)")
    script = (f"import os\ntry:\n    open({str(group / 'cgroup.procs')!r}, 'w').write(str(os.getpid()))\n"
              "except OSError:\n    print('cannot join'); raise SystemExit(0)\n"
              "from tokenizers_bpe.membudget import available_memory; print(available_memory())")
    try:
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    finally:
        with contextlib.suppress(OSError):  # (empty once the process has ended)
            group.rmdir()
    assert proc.returncode == 0, proc.stderr
    if proc.stdout.strip() == "cannot join":
        pytest.skip("this process may not move into a memory cgroup here (no delegation)")
    assert 0 < int(proc.stdout) <= GiB
