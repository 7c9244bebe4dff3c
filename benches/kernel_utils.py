"""What bench_attention, bench_layer_norm and bench_gelu share: timing, throughput, peak memory and
a comparison table printed at the end of each module.

Timing is pytest-benchmark's (`benchmark.pedantic`, rounds fixed from one timed call so a CPU run
stays short). On CUDA one round launches the op `calls` times and synchronises once, with `calls`
picked so a round lasts about 2 ms: otherwise the sync would swamp kernels that take microseconds.
Figures are the best round (the least disturbed by other processes). pytest-benchmark's
own table therefore shows the time of a round; the per-call figures are in `extra_info`
(`ms_per_call`, `calls_per_round`, `tflops` or `gbps`, `peak_mem_mib`) and in the table printed here.
"""

from __future__ import annotations

import time

import pytest
import torch

CUDA_ROUNDS, ROUND_SECONDS = 20, 2e-3
CPU_SECONDS = 0.5  # per case, at least 3 rounds

# Peak DRAM bandwidth (bytes/s) by device name, to put GB/s against the roofline.
PEAK_BANDWIDTH = {"H100 80GB HBM3": 3.35e12, "H100 PCIe": 2.0e12, "H100 NVL": 3.9e12, "H200": 4.8e12,
                  "A100-SXM4-80GB": 2.04e12, "A100-SXM4-40GB": 1.56e12, "A100 80GB PCIe": 1.94e12}


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def peak_bandwidth(device: torch.device) -> float | None:
    name = device_name(device)
    return next((bw for key, bw in PEAK_BANDWIDTH.items() if key in name), None)


def make_call(fn, inputs: list[torch.Tensor], mode: str):
    """A closure running fn(*inputs) forward only ("fwd") or forward and backward ("fwd+bwd")."""
    if mode == "fwd":
        inputs = [t.detach() for t in inputs]
        return lambda: fn(*inputs)
    inputs = [t.detach().requires_grad_() for t in inputs]
    grad_out = torch.randn_like(fn(*inputs))
    return lambda: torch.autograd.grad(fn(*inputs), inputs, grad_out)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(benchmark, table: list[dict], call, *, device: torch.device, group: str, impl: str,
        flops: float | None = None, bytes_moved: float | None = None) -> None:
    """Time `call` in pytest-benchmark group `group`; record throughput and peak memory."""
    call()  # warm-up: compiles Triton kernels, lets PyTorch pick its kernels
    _sync(device)
    peak_mib = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        call()
        _sync(device)
        peak_mib = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    start = time.perf_counter()
    call()
    _sync(device)
    once = time.perf_counter() - start
    if device.type == "cuda":
        calls, rounds = max(1, min(1000, int(ROUND_SECONDS / once))), CUDA_ROUNDS
    else:
        calls, rounds = 1, max(3, min(30, int(CPU_SECONDS / once)))

    def one_round():
        for _ in range(calls):
            call()
        _sync(device)

    benchmark.group = group
    benchmark.pedantic(one_round, rounds=rounds, warmup_rounds=1)
    if benchmark.stats is None:  # --benchmark-disable: ran once, nothing measured
        return
    seconds = benchmark.stats.stats.min / calls  # best round: least disturbed by other processes
    row = {"group": group, "impl": impl, "ms": seconds * 1e3, "peak_mib": peak_mib, "tflops": None, "gbps": None,
           "roofline": None}
    if flops is not None:
        row["tflops"] = flops / seconds / 1e12
    if bytes_moved is not None:
        row["gbps"] = bytes_moved / seconds / 1e9
        if (bw := peak_bandwidth(device)) is not None:
            row["roofline"] = bytes_moved / seconds / bw
    benchmark.extra_info.update({"ms_per_call": row["ms"], "calls_per_round": calls, "peak_mem_mib": peak_mib,
                                 "device": device_name(device)})
    benchmark.extra_info.update({k: row[k] for k in ("tflops", "gbps", "roofline") if row[k] is not None})
    table.append(row)


def _cell(value, spec: str, width: int) -> str:
    return f"{'-' if value is None else format(value, spec):>{width}}"


# The PyTorch built-in each group is compared with: on CPU that is the kernels' fallback path.
BASELINES = ("builtin", "fallback")


def comparison_table(title: str, rows: list[dict]) -> list[str]:
    """Lines of a table: one row per (group, impl), with its speed-up over the group's baseline."""
    base_ms = {r["group"]: r["ms"] for r in rows if r["impl"] in BASELINES}
    lines = [title, f"{'group':<34} {'impl':<10} {'ms/call':>10} {'TFLOP/s':>8} {'GB/s':>8} {'roofline':>8} "
                    f"{'peak MiB':>9} {'speed-up':>9}"]
    for r in rows:
        speedup = base_ms[r["group"]] / r["ms"] if r["group"] in base_ms else None
        lines.append(f"{r['group']:<34} {r['impl']:<10} {r['ms']:>10.4f} {_cell(r['tflops'], '.3g', 8)} "
                     f"{_cell(r['gbps'], '.1f', 8)} {_cell(r['roofline'], '.0%', 8)} {_cell(r['peak_mib'], '.1f', 9)} "
                     f"{_cell(speedup, '.2f', 8)}x")
    return lines


def table_fixture(title: str):
    """A module-scoped fixture collecting rows and printing the comparison table after the module."""

    @pytest.fixture(scope="module")
    def table(request):
        rows: list[dict] = []
        yield rows
        if rows:  # written past pytest's output capture, like capsys.disabled()
            plugins = request.config.pluginmanager
            with plugins.get_plugin("capturemanager").global_and_fixture_disabled():
                for line in ["", *comparison_table(title, rows)]:
                    plugins.get_plugin("terminalreporter").write_line(line)

    return table
