"""Decoding speed of gpt.generate next to transformers' generate (with its KV cache), the same weights,
in one run, with the memory bound measured in the same run.

GPT-2 124M (random weights: speed does not depend on them; its tokenizer from ../shared/data), a
16-token prompt, 128 new tokens, greedy (so every implementation runs all 128 steps), on the CPU:

- ``test_decode[threads1-batch1]``: fp32, bf16 and int8 (gpt.quantize; ``int8`` with the output head
  quantized, ``int8-blocks`` without), ours eager (the default) and compiled (``compile=True``), next
  to transformers in fp32 and bf16; plus two memory probes: a sum over 1 GiB of fp32 (the issue's
  measure of read bandwidth) and the same sum over 1 GiB in transparent huge pages (gpt.arena: the
  memory our CPU weights live in, so the honest bound for them). The bound of a variant is
  (bytes of weights it reads per token) / (the best bandwidth of the run).
- ``threads1-batch8``, ``threads2-batch1``, ``threads2-batch8``: fp32 and bf16, ours eager and compiled
  next to transformers (int8 at one thread only). Compiled code is specialised to the thread count
  it was compiled for (inductor), so the two-thread cases compile again.
- ``test_prefill``: a 512-token prompt to its first new token, fp32 and bf16, ours eager and compiled.
- ``test_speculative``: a trained target and a trained draft (``GPT_BENCH_TARGET=DIR`` and
  ``GPT_BENCH_DRAFT=DIR``, checkpoints or runs sharing one tokenizer; benches/README.md says how they
  were trained; skipped without them), 200 new tokens, greedy and sampled (temperature 0.8, top-k
  40): the target alone and with the draft, eager and compiled, next to transformers' generate
  alone and with ``assistant_model`` (its assisted generation); acceptance rates and tokens/s.

Method: one benchmark round runs every variant of a case once, in the same order (so load from other
users of a shared machine hits them alike); figures are the best and the median round, with the
spread (max / min) as the noise, and ratios are taken per round. At one thread the clock is this
thread's CPU time (``time.thread_time``: it leaves out time the core was given to other processes)
next to wall time; at two threads wall time only. Greedy outputs are checked against transformers'
in the same dtype (identical, or the first differing position).

    pytest benches/bench_generate.py -s                    # ~35 min on 2 cores, compiling included
    GPT_BENCH_ROUNDS=3 pytest benches/bench_generate.py -s -k "threads1-batch1"
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch._dynamo

from gpt.arena import Arena, thp_mode
from gpt.decode import inference_weights
from gpt.model import GPT, GPTConfig
from gpt.quantize import quantize
from gpt.run_state import resolve_model_dir
from gpt.sampling import generate
from tools import convert

transformers = pytest.importorskip("transformers")

PROMPT = list(range(1000, 1016))
NEW_TOKENS = 128
PREFILL_LEN = 512
ROUNDS = int(os.environ.get("GPT_BENCH_ROUNDS", "5"))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
GIB = 2**30


@pytest.fixture(scope="module")
def export(tmp_path_factory, shared_file):
    """Our 124M checkpoint and its transformers export (gpt-convert hf-export): the same weights."""
    import tokenizers_bpe

    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("gpt2", backend="torch"))
    model.tokenizer = tokenizers_bpe.load_gpt2(shared_file("gpt2/encoder.json"), shared_file("gpt2/vocab.bpe"))
    root = tmp_path_factory.mktemp("bench")
    model.save_pretrained(root / "ckpt")
    assert convert.main(["hf-export", str(root / "ckpt"), str(root / "hf")]) == 0
    return root / "ckpt", root / "hf"


def load_hf(directory: Path, dtype: torch.dtype):
    hf = transformers.GPT2LMHeadModel.from_pretrained(directory, dtype=dtype).eval()
    hf.generation_config.eos_token_id = None  # always decode every step, like stop_tokens=()
    hf.generation_config.pad_token_id = 0
    return hf


@pytest.fixture(scope="module")
def models(export):
    """name -> model, loaded once: ours in fp32/bf16/int8/int8-blocks, transformers in fp32/bf16."""
    ckpt, hf_dir = export

    @functools.cache
    def get(name: str):
        if name.startswith("hf-"):
            return load_hf(hf_dir, DTYPES[name[3:]])
        if name.startswith("int8"):
            return quantize(GPT.from_pretrained(ckpt), "int8", head=name == "int8")
        return GPT.from_pretrained(ckpt, dtype=DTYPES[name])

    return get


def hf_run(hf, prompt, n, batch=1, **kwargs):
    ids = torch.tensor([prompt] * batch)
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, **kwargs)
    return out[:, len(prompt):].tolist()


def weight_bytes_per_token(model: GPT) -> int:
    """Bytes of weights one decoding step of a model with a tied head reads: every block weight once,
    the output head in full, one row of each embedding (int8 layers: their int8 weights and fp32 scales)."""
    n = sum(t.numel() * t.element_size() for name, t in [*model.named_parameters(), *model.named_buffers()]
            if not name.startswith("transformer.wpe") and not (name.startswith("transformer.wte") and not model.config.tie_embeddings))
    c = model.config
    row = c.n_embd * model.transformer.wte.weight.element_size()
    if model.quantization is not None and model.quantization["head"]:
        n -= c.vocab_size * row - row  # the tied wte is only looked up: one row; the head is int8
    return n + row  # wpe's row


def bandwidth_probes() -> tuple[dict, Arena]:
    """Two memory probes of 1 GiB of fp32, summed: in ordinary memory (the issue's bound) and in huge
    pages (and the arena holding the latter, to report how much of it the kernel backs with them)."""
    ordinary = torch.randn(GIB // 4)
    arena, (huge,) = Arena.holding([ordinary])
    return {"sum 1 GiB": ordinary.sum, "sum 1 GiB huge pages": huge.sum}, arena


def interleaved(benchmark, variants: dict, rounds: int, cpu_clock: bool) -> dict[str, dict[str, list[float]]]:
    """One benchmark round runs every variant once; per variant the seconds of each round."""
    times = {name: {"wall": [], "cpu": []} for name in variants}

    def round_():
        for name, fn in variants.items():
            c0, w0 = time.thread_time(), time.perf_counter()
            fn()
            times[name]["wall"].append(time.perf_counter() - w0)
            times[name]["cpu"].append(time.thread_time() - c0)

    benchmark.pedantic(round_, rounds=rounds, iterations=1)
    if not cpu_clock:
        for t in times.values():
            t["cpu"] = []
    return times


def summary(times: list[float], work: float) -> dict:
    """work / seconds: best, median, and the spread (max / min) as the noise."""
    return {"best": work / min(times), "median": work / statistics.median(times), "spread": max(times) / min(times)}


def per_round_ratio(a: list[float], b: list[float]) -> dict:
    ratios = [y / x for x, y in zip(a, b)]  # b's time over a's: a's speed-up over b
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


DECODE_CASES = [(1, 1), (1, 8), (2, 1), (2, 8)]


@pytest.mark.parametrize("threads, batch", DECODE_CASES, ids=[f"threads{t}-batch{b}" for t, b in DECODE_CASES])
def test_decode(benchmark, models, capsys, threads, batch):
    torch.set_num_threads(threads)
    torch._dynamo.reset()  # compiled code is specialised to the thread count it was compiled for
    try:
        _decode_case(benchmark, models, capsys, threads, batch)
    finally:
        torch.set_num_threads(1)
        torch._dynamo.reset()


def _decode_case(benchmark, models, capsys, threads, batch):
    ours = ["fp32", "bf16", "int8"] + (["int8-blocks"] if threads == 1 else [])
    variants, checks = {}, {}
    for dtype in DTYPES:
        peer = f"transformers {dtype}"
        reference = hf_run(models(f"hf-{dtype}"), PROMPT, NEW_TOKENS, batch, do_sample=False)
        variants[peer] = functools.partial(hf_run, models(f"hf-{dtype}"), PROMPT, NEW_TOKENS, batch, do_sample=False)
        for name in [o for o in ours if (o == dtype) or (dtype == "fp32" and o.startswith("int8"))]:
            # int8 runs eagerly (the C kernel); compiled once more at one thread and one row, as before it
            for compiled in ((False,) + ((True,) if (threads, batch) == (1, 1) else ()) if name.startswith("int8") else (False, True)):
                label = f"ours {name}{' compiled' if compiled else ''}"
                run = functools.partial(generate, models(name), PROMPT, NEW_TOKENS, temperature=0, stop_tokens=(),
                                        num_samples=batch, compile=compiled)
                start = time.perf_counter()
                out = run()  # the first call compiles
                checks[label] = {"first_call_s": time.perf_counter() - start, "identical_to_transformers": out == reference,
                                 "first_difference": first_difference(out[0], reference[0]), "peer": peer}
                variants[label] = run
    probe_arena = None
    if batch == 1:
        probes, probe_arena = bandwidth_probes()
        variants.update(probes)
    times = interleaved(benchmark, variants, ROUNDS, cpu_clock=threads == 1)
    clocks = ["cpu", "wall"] if threads == 1 else ["wall"]
    best_bandwidth = {probe: GIB / min(times[probe][clocks[0]]) for probe in variants if probe.startswith("sum")}
    lines = [f"decode 124M, batch {batch}, {threads} thread(s), {NEW_TOKENS} new tokens, {ROUNDS} rounds; "
             f"THP {thp_mode()}; load {os.getloadavg()[0]:.1f}"]
    huge = {"probe": probe_arena.huge_page_bytes() if probe_arena else None}
    for name in ours:
        for compiled in (False, True):
            arena = inference_weights(models(name), compiled)[1] if f"ours {name}{' compiled' if compiled else ''}" in variants else None
            if arena is not None:
                huge[f"{name}{' compiled' if compiled else ''}"] = (arena.huge_page_bytes(), arena.nbytes)
    benchmark.extra_info["huge_page_bytes"] = huge
    lines.append("  huge pages backing: " + ", ".join(
        f"{k} {v / GIB:.2f} GiB" if not isinstance(v, tuple) else f"{k} weights {v[0] / 1e6:.0f} of {v[1] / 1e6:.0f} MB"
        for k, v in huge.items() if v is not None))
    for name, t in times.items():
        if name.startswith("sum"):
            lines.append(f"  {name:28s} {best_bandwidth[name] / 1e9:.1f} GB/s (best), median {GIB / statistics.median(t['wall']) / 1e9:.1f}")
            benchmark.extra_info[name] = {"best_gb_s": best_bandwidth[name] / 1e9}
            continue
        info = {clock: summary(t[clock], NEW_TOKENS * batch) for clock in clocks}
        info.update(checks.get(name, {}))
        text = "  ".join(f"{clock} {s['best']:6.1f} tok/s (median {s['median']:.1f}, spread {s['spread']:.2f}x)" for clock, s in info.items() if clock in clocks)
        peer = checks.get(name, {}).get("peer")
        if peer:
            info["x_peer"] = {clock: per_round_ratio(t[clock], times[peer][clock]) for clock in clocks}
            r = info["x_peer"][clocks[0]]
            text += f"; x {peer} {r['median']:.2f} [{r['min']:.2f}, {r['max']:.2f}]"
            text += f"; identical {info['identical_to_transformers']}" + (
                "" if info["identical_to_transformers"] else f" (from token {info['first_difference']})")
            text += f"; first call {info['first_call_s']:.1f} s"
        if batch == 1 and not name.startswith("transformers"):
            wbytes = weight_bytes_per_token(models(name.split()[1]))
            info["weight_mb_per_token"] = wbytes / 1e6
            for probe, bw in best_bandwidth.items():
                fraction = info[clocks[0]]["best"] * wbytes / bw
                info[f"fraction_of_bound[{probe}]"] = fraction
                text += f"; {100 * fraction:.0f}% of the {probe} bound ({bw / wbytes:.1f} tok/s)"
        benchmark.extra_info[name] = info
        lines.append(f"  {name:28s} {text}")
    if threads == 1 and batch == 1:
        base = times["transformers fp32"]["cpu"]
        for name in ("ours fp32", "ours fp32 compiled", "ours bf16", "ours bf16 compiled", "ours int8", "ours int8 compiled",
                     "ours int8-blocks", "ours int8-blocks compiled"):
            r = per_round_ratio(times[name]["cpu"], base)
            benchmark.extra_info[name]["x_transformers_fp32"] = r
            lines.append(f"  {name} x transformers fp32 (cpu, per round): {r['median']:.2f} [{r['min']:.2f}, {r['max']:.2f}]")
    pairs = [("ours int8", "ours fp32"), ("ours int8", "ours fp32 compiled")]
    if threads == 1 and batch == 1:
        pairs += [("ours int8", "ours int8 compiled"), ("ours int8-blocks", "ours fp32"), ("ours bf16", "ours fp32"),
                  ("ours bf16 compiled", "ours fp32 compiled")]
    for name, over in pairs:
        r = per_round_ratio(times[name][clocks[0]], times[over][clocks[0]])
        benchmark.extra_info[name][f"x_{over}"] = r
        lines.append(f"  {name} x {over} ({clocks[0]}, per round): {r['median']:.2f} [{r['min']:.2f}, {r['max']:.2f}]")
    with capsys.disabled():
        print("\n" + "\n".join(lines))


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_prefill(benchmark, models, capsys, dtype):
    """A 512-token prompt to its first new token (generate(..., 1)): ours eager and compiled, transformers."""
    prompt = [(i * 7919) % 50000 for i in range(PREFILL_LEN)]
    hf, ours = models(f"hf-{dtype}"), models(dtype)
    reference = hf_run(hf, prompt, 1, do_sample=False)
    variants = {f"transformers {dtype}": functools.partial(hf_run, hf, prompt, 1, do_sample=False)}
    for compiled in (False, True):
        run = functools.partial(generate, ours, prompt, 1, temperature=0, stop_tokens=(), compile=compiled)
        assert run() == reference  # the first call compiles
        variants[f"ours {dtype}{' compiled' if compiled else ''}"] = run
    times = interleaved(benchmark, variants, ROUNDS, cpu_clock=True)
    peer = times[f"transformers {dtype}"]["cpu"]
    lines = [f"prefill {PREFILL_LEN} tokens to the first new one, {dtype}, 1 thread, {ROUNDS} rounds"]
    for name, t in times.items():
        info = {"cpu_ms_best": 1e3 * min(t["cpu"]), "cpu_ms_median": 1e3 * statistics.median(t["cpu"]),
                "wall_ms_best": 1e3 * min(t["wall"]), "spread": max(t["cpu"]) / min(t["cpu"]),
                "x_transformers": per_round_ratio(t["cpu"], peer)}
        benchmark.extra_info[name] = info
        r = info["x_transformers"]
        lines.append(f"  {name:22s} cpu {info['cpu_ms_best']:7.1f} ms (median {info['cpu_ms_median']:.1f}, spread {info['spread']:.2f}x), "
                     f"wall {info['wall_ms_best']:.1f} ms; x transformers {r['median']:.3f} [{r['min']:.3f}, {r['max']:.3f}]")
    with capsys.disabled():
        print("\n" + "\n".join(lines))


# ---------------------------------------------------------------------------------------------- llama.cpp


def llama_bench_ggufs(ckpt: Path, root: Path) -> dict[str, Path]:
    """The GGUF files llama.cpp runs, by our name of the precision: $GPT_BENCH_GGUF_F32 / _Q8_0, else
    written by our own export (``gpt-convert gguf``) where this checkout has it."""
    files = {name: Path(os.environ[env]) for name, env in (("fp32", "GPT_BENCH_GGUF_F32"), ("int8", "GPT_BENCH_GGUF_Q8_0"))
             if os.environ.get(env)}
    commands = next(a.choices for a in convert.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    if len(files) < 2 and "gguf" in commands:
        for name, kind in (("fp32", "f32"), ("int8", "q8_0")):
            if name not in files:
                out = root / f"model-{kind}.gguf"
                assert convert.main(["gguf", str(ckpt), str(out), "--dtype", kind]) == 0
                files[name] = out
    return files


def llama_bench(binary: str, gguf: Path, threads: int) -> float:
    """llama.cpp's generation speed, tokens/s, for one run of NEW_TOKENS tokens (no prompt: -p 0)."""
    result = subprocess.run([binary, "-m", str(gguf), "-t", str(threads), "-p", "0", "-n", str(NEW_TOKENS), "-r", "1",
                             "-o", "json"], capture_output=True, text=True, check=True)
    return json.loads(result.stdout)[0]["avg_ts"]


@pytest.mark.parametrize("threads", [1, 2])
def test_llama_cpp(benchmark, models, export, tmp_path, capsys, threads):
    """Batch 1, greedy, NEW_TOKENS tokens: ours fp32 (eager and compiled) and int8 (eager) next to llama.cpp's
    F32 and Q8_0 of the same weights (``llama-bench -p 0 -n 128``), alternating, wall time on both
    sides (llama-bench reports wall-clock tokens/s; ours includes its 16-token prefill)."""
    binary = shutil.which("llama-bench")
    if binary is None:
        pytest.skip("no llama-bench on PATH: build llama.cpp (cmake -DGGML_NATIVE=ON; target llama-bench) to compare")
    ggufs = llama_bench_ggufs(export[0], tmp_path)
    if len(ggufs) < 2:
        pytest.skip("no GGUF of the bench model: set GPT_BENCH_GGUF_F32 and GPT_BENCH_GGUF_Q8_0 (or use a checkout "
                    "with gpt-convert gguf)")
    torch.set_num_threads(threads)
    torch._dynamo.reset()
    try:
        ours = {"ours fp32": ("fp32", False), "ours fp32 compiled": ("fp32", True), "ours int8": ("int8", False)}
        speeds: dict[str, list[float]] = {name: [] for name in (*ours, "llama.cpp F32", "llama.cpp Q8_0")}
        runs = {name: functools.partial(generate, models(m), PROMPT, NEW_TOKENS, temperature=0, stop_tokens=(), compile=c)
                for name, (m, c) in ours.items()}
        for run in runs.values():
            run()  # compiles where it compiles

        def round_():
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                speeds[name].append(NEW_TOKENS / (time.perf_counter() - start))
            speeds["llama.cpp F32"].append(llama_bench(binary, ggufs["fp32"], threads))
            speeds["llama.cpp Q8_0"].append(llama_bench(binary, ggufs["int8"], threads))

        benchmark.pedantic(round_, rounds=ROUNDS, iterations=1)
    finally:
        torch.set_num_threads(1)
        torch._dynamo.reset()
    lines = [f"llama.cpp peer: batch 1, {threads} thread(s), {NEW_TOKENS} new tokens, {ROUNDS} rounds, wall time; "
             f"load {os.getloadavg()[0]:.1f}; {binary}"]
    for name, v in speeds.items():
        benchmark.extra_info[name] = {"best_tok_s": max(v), "median_tok_s": statistics.median(v)}
        lines.append(f"  {name:20s} {max(v):6.1f} tok/s (median {statistics.median(v):.1f})")
    for name, peer in (("ours int8", "llama.cpp Q8_0"), ("ours fp32", "llama.cpp F32"), ("ours fp32 compiled", "llama.cpp F32")):
        ratios = [a / b for a, b in zip(speeds[name], speeds[peer])]
        benchmark.extra_info[name][f"x_{peer}"] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
        lines.append(f"  {name} x {peer} (per round): {statistics.median(ratios):.2f} [{min(ratios):.2f}, {max(ratios):.2f}]")
    with capsys.disabled():
        print("\n" + "\n".join(lines))


# ---------------------------------------------------------------------------------------------- time to first token

TTFT_MODES = {  # name -> (gpt-generate options, caches: "cold" empty, "warm" left by the previous mode)
    "fp32 eager": ([], "cold"),
    "int8 (kernel built)": (["--quantize", "int8"], "cold"),
    "int8 (kernel cached)": (["--quantize", "int8"], "warm"),
    "fp32 --compile, first run": (["--compile"], "cold"),
    "fp32 --compile, second run": (["--compile"], "warm"),
}


def gpt_generate_timed(ckpt: Path, options: list[str], env: dict) -> dict:
    """One gpt-generate process: its reported time to first token and generation time, and the process's
    wall time (imports and loading included)."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "tools.generate", "--model", str(ckpt), "--temperature", "0",
                             "-n", str(NEW_TOKENS), "--seed", "1", "Once upon a time", *options],
                            capture_output=True, text=True, env=env, check=True)
    wall = time.perf_counter() - start
    match = re.search(r"tokens in ([\d.]+) s .*time to first token (\d+) ms", result.stderr)
    assert match, result.stderr
    return {"ttft_s": int(match[2]) / 1e3, "generate_s": float(match[1]), "process_s": wall,
            "announced_compiling": "compiling the decoding step" in result.stderr}


def test_time_to_first_token(benchmark, export, tmp_path, capsys):
    """What a user waits for: each mode as a new gpt-generate process (one thread), with empty caches
    ("cold": no inductor cache, no built int8 kernel, no compile cache beside the model) or with what the
    mode before it left ("warm"). Rounds alternate the modes; each round starts cold."""
    ckpt = tmp_path / "model"
    shutil.copytree(export[0], ckpt)  # its .compile-cache/ is written beside this copy
    results: dict[str, list[dict]] = {name: [] for name in TTFT_MODES}
    rounds = min(ROUNDS, 3)  # a cold compile costs about a minute per round

    def round_():
        caches = tempfile.mkdtemp(dir=tmp_path)
        shutil.rmtree(ckpt.parent / f"{ckpt.name}.compile-cache", ignore_errors=True)
        env = dict(os.environ, OMP_NUM_THREADS="1", TORCHINDUCTOR_CACHE_DIR=f"{caches}/inductor", GPT2_KERNELS_CACHE=f"{caches}/kernels")
        for name, (options, _) in TTFT_MODES.items():
            results[name].append(gpt_generate_timed(ckpt, options, env))

    benchmark.pedantic(round_, rounds=rounds, iterations=1)
    lines = [f"time to first token, {NEW_TOKENS} new tokens, 1 thread, new process per run, {rounds} rounds; load {os.getloadavg()[0]:.1f}"]
    for name, runs in results.items():
        info = {key: {"best": min(r[key] for r in runs), "median": statistics.median(r[key] for r in runs)}
                for key in ("ttft_s", "generate_s", "process_s")}
        info["announced_compiling"] = [r["announced_compiling"] for r in runs]
        benchmark.extra_info[name] = info
        lines.append(f"  {name:28s} first token {info['ttft_s']['best']:5.2f} s (median {info['ttft_s']['median']:.2f}); "
                     f"{NEW_TOKENS} tokens {info['generate_s']['best']:5.2f} s (median {info['generate_s']['median']:.2f}); "
                     f"process {info['process_s']['best']:5.2f} s" + ("; compiling announced" if all(info["announced_compiling"]) else ""))
    ratios = [f["generate_s"] / i["generate_s"] for f, i in zip(results["fp32 eager"], results["int8 (kernel built)"])]
    benchmark.extra_info["int8 first run x fp32 eager, end to end"] = ratios
    lines.append(f"  end to end, {NEW_TOKENS} tokens, int8 first run x fp32 eager (per round): {statistics.median(ratios):.2f} "
                 f"[{min(ratios):.2f}, {max(ratios):.2f}]")
    with capsys.disabled():
        print("\n" + "\n".join(lines))


# ---------------------------------------------------------------------------------------------- speculative


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    dirs = [os.environ.get("GPT_BENCH_TARGET"), os.environ.get("GPT_BENCH_DRAFT")]
    if None in dirs:
        pytest.skip("set GPT_BENCH_TARGET and GPT_BENCH_DRAFT to a trained target and draft (benches/README.md, Generation)")
    target_dir, draft_dir = (resolve_model_dir(d)[0] for d in dirs)
    root = tmp_path_factory.mktemp("pair")
    for name, d in (("target", target_dir), ("draft", draft_dir)):
        assert convert.main(["hf-export", str(d), str(root / name)]) == 0
    target, draft = GPT.from_pretrained(target_dir, backend="torch"), GPT.from_pretrained(draft_dir, backend="torch")
    return target, draft, load_hf(root / "target", torch.float32), load_hf(root / "draft", torch.float32)


SPECULATIVE_NEW_TOKENS, DRAFT_TOKENS = 200, 4
SAMPLING = {"greedy": dict(temperature=0), "sampled": dict(temperature=0.8, top_k=40)}


@pytest.mark.parametrize("mode", list(SAMPLING))
def test_speculative(benchmark, pair, capsys, mode):
    target, draft, hf_target, hf_draft = pair
    tok = target.tokenizer
    prompt = tok.encode_ordinary("ROMEO:\nWhat say you, my lord?")
    n, settings = SPECULATIVE_NEW_TOKENS, SAMPLING[mode]
    hf_settings = dict(do_sample=False) if mode == "greedy" else dict(do_sample=True, temperature=0.8, top_k=40)
    variants, acceptance = {}, {}
    variants["transformers alone"] = functools.partial(hf_run, hf_target, prompt, n, **hf_settings)
    variants["transformers assisted"] = functools.partial(hf_run, hf_target, prompt, n, assistant_model=hf_draft, **hf_settings)
    outputs = {}
    for compiled in (False, True):
        suffix = " compiled" if compiled else ""
        for with_draft in (False, True):
            label = f"ours {'+ draft' if with_draft else 'alone'}{suffix}"
            stats: dict = {}
            kwargs = dict(stop_tokens=(), seed=1, compile=compiled, **settings)
            if with_draft:
                kwargs.update(draft=draft, draft_tokens=DRAFT_TOKENS, stats=stats)
            run = functools.partial(generate, target, prompt, n, **kwargs)
            outputs[label] = run()
            if with_draft:
                acceptance[label] = stats
            variants[label] = run
    if mode == "greedy":
        reference = variants["transformers alone"]()
        identical = {label: out == reference for label, out in outputs.items()}
        assert all(out == outputs["ours alone"] for out in outputs.values()), identical
        benchmark.extra_info["identical_to_transformers"] = identical
    times = interleaved(benchmark, variants, ROUNDS, cpu_clock=True)
    lines = [f"speculative decoding, {mode}, {n} new tokens, draft_tokens {DRAFT_TOKENS}, 1 thread, {ROUNDS} rounds: "
             f"target {target.num_parameters():,} parameters ({target.config.n_layer} layers x {target.config.n_embd}), "
             f"draft {draft.num_parameters():,} ({draft.config.n_layer} x {draft.config.n_embd})"]
    for name, t in times.items():
        info = {clock: summary(t[clock], n) for clock in ("cpu", "wall")}
        base = "ours alone" + (" compiled" if "compiled" in name else "") if name.startswith("ours") else "transformers alone"
        info["x_alone"] = per_round_ratio(t["cpu"], times[base]["cpu"])
        if name in acceptance:
            s = acceptance[name]
            info.update(acceptance_rate=s["accepted"] / max(1, s["drafted"]), tokens_per_round=n / max(1, s["rounds"]), **s)
        benchmark.extra_info[name] = info
        r = info["x_alone"]
        lines.append(f"  {name:24s} cpu {info['cpu']['best']:7.1f} tok/s (median {info['cpu']['median']:.1f}, spread "
                     f"{info['cpu']['spread']:.2f}x); x {base} {r['median']:.2f} [{r['min']:.2f}, {r['max']:.2f}]"
                     + (f"; accepted {100 * info['acceptance_rate']:.0f}% of drafted tokens, {info['tokens_per_round']:.2f} tokens per round"
                        if name in acceptance else ""))
    with capsys.disabled():
        print("\n" + "\n".join(lines))

