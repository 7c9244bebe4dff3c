"""Tokenizer speed and memory next to its peers, in one run: `python benches/bench_tokenizer.py`.

- Training (vocab 16384, min frequency 2) on 1, 10 and 100 MB of mixed prose and code: ours
  (`tokenizers_bpe.train`) against HF `tokenizers` (`BpeTrainer` + `ByteLevel` pre-tokenizer, the
  GPT-2 split), on one thread (ours: workers=1; HF: RAYON_NUM_THREADS=1) and on all cores (both with
  their defaults: ours then counts in-process below 16 MB, in worker processes above). Each run is a
  fresh process; its time is the training call's, its peak RSS the largest sum over the process and
  its children (worker processes included), sampled every 10 ms from /proc.
- Encoding, one thread, a fresh tokenizer (cold: no piece cache; tiktoken builds its core when the
  tokenizer is built, ours when it first encodes, which is timed apart): ours (its default backend,
  native for these patterns) against tiktoken built from the same ranks and pattern, GPT-2's and
  cl100k's, on prose, code and adversarial Unicode; `encode_batch` on all cores against tiktoken's
  `encode_batch`.
- A corpus of any size in a memory budget: `bpe-train --max-memory 256MB` (vocab 16384, min frequency
  1, all cores) on 300 MB of varied text (the .py files of the installed packages and the standard
  library, then documents: few repeats, so many distinct pieces) against the same run unbounded: peak
  RSS of the process tree, byte-identical output, no spill directory left; then a bounded run killed
  with SIGKILL three quarters of the way through and run again (`--bounded CORPUS_MB,BUDGET_MB`).
Runs alternate ours/peer, ROUNDS times; the table gives the best time of each and the ratio.

The corpus is assembled reproducibly (`--corpus-only` writes it and stops): documents taken in sorted
path order, alternately prose (the shared tinyshakespeare.txt, the built-in plays, then .md/.rst/.txt
files of the installed Python packages and /usr/share/doc) and code (.py files of the standard library
and the installed packages), until the size is reached; each source is cycled if it runs out.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("GPT_TOOLKIT_SHARED_DATA", ROOT.parent / "shared" / "data"))
CORES = os.cpu_count() or 1
VOCAB, MIN_FREQUENCY = 16384, 2
MB = 1_000_000


# ------------------------------------------------------------------------------------ corpora
def _files(roots, suffixes, limit=2 * MB):
    out = []
    for root in roots:
        root = Path(root)
        if root.is_dir():
            out += sorted(p for p in root.rglob("*") if p.suffix in suffixes and p.is_file() and 0 < p.stat().st_size < limit)
    return out


def _documents(paths):
    for p in paths:
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            yield text


def _cycled(make):
    while True:
        empty = True
        for doc in make():
            empty = False
            yield doc
        if empty:
            raise RuntimeError("no documents found for the corpus")


def _prose():
    from tools.corpus import plays

    shakespeare = SHARED / "tinyshakespeare.txt"
    if shakespeare.is_file():
        yield shakespeare.read_text(encoding="utf-8")
    for play in plays():
        yield play.text()
    site = sysconfig.get_paths()["purelib"]
    yield from _documents(_files([site, "/usr/share/doc"], {".md", ".rst", ".txt"}))


def _code():
    yield from _documents(_files([sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"]], {".py"}))


def make_corpus(size: int, path: Path) -> Path:
    """``size`` bytes (about) of alternating prose and code documents at ``path`` (kept and reused)."""
    if path.is_file() and path.stat().st_size >= size:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    prose, code = _cycled(_prose), _cycled(_code)
    written = 0
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        while written < size:
            for source in (prose, code):
                doc = next(source)[: size - written]
                f.write(doc + "\n")
                written += len(doc.encode("utf-8")) + 1
    os.replace(tmp, path)
    return path


def make_varied_corpus(size: int, path: Path) -> Path:
    """``size`` bytes of documents that repeat as little as the machine allows (the hard case for a
    memory budget: many distinct pieces): every .py file of the installed packages and the standard
    library, then the .md/.rst/.txt documents, in sorted path order, cycled only if they run out."""
    if path.is_file() and path.stat().st_size >= size:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    paths = sysconfig.get_paths()
    sources = [_files([paths["purelib"], paths["stdlib"]], {".py"}), _files([paths["purelib"], "/usr/share/doc"], {".md", ".rst", ".txt"})]
    docs = _cycled(lambda: _documents([p for group in sources for p in group]))
    written = 0
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        while written < size:
            doc = next(docs)[: size - written]
            f.write(doc + "\n")
            written += len(doc.encode("utf-8")) + 1
    os.replace(tmp, path)
    return path


def adversarial_text(n_chars: int, seed: int = 0) -> str:
    """Unicode that is hard for a byte-level BPE: random code points of every plane, combining marks,
    emoji sequences, long runs of one character, mixed scripts without spaces."""
    rng = random.Random(seed)
    parts, total = [], 0
    while total < n_chars:
        kind = rng.random()
        if kind < 0.4:
            s = "".join(chr(rng.choice([rng.randint(0x20, 0xD7FF), rng.randint(0xE000, 0x10FFFF)])) for _ in range(rng.randint(1, 40)))
        elif kind < 0.6:
            s = "".join(rng.choice("aeé中文ع") + "\u0301\u0308\u0323"[: rng.randint(0, 3)] for _ in range(rng.randint(1, 30)))
        elif kind < 0.8:
            s = "".join(rng.choice(["👨‍👩‍👧", "👍🏽", "🎉", "🏳️‍🌈"]) for _ in range(rng.randint(1, 20)))
        else:
            s = rng.choice("^ a1.\n\t-") * rng.randint(10, 3000)
        parts.append(s)
        total += len(s)
    return "".join(parts)


# ------------------------------------------------------------------------------------ measuring
def _tree(pid: int) -> dict[int, int]:
    """A process and all its descendants (from /proc): pid -> resident bytes."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(d))
        rss[int(d)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    tree, todo = {}, [pid]
    while todo:
        p = todo.pop()
        tree[p] = rss.get(p, 0)
        todo += children.get(p, [])
    return tree


def _tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants."""
    return sum(_tree(pid).values())


def run_measured(code: str, env: dict | None = None) -> dict:
    """Run ``code`` in a fresh Python; it prints one JSON line. Adds ``peak_rss`` (tree, sampled)."""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, **(env or {})})
    peak = 0
    done = threading.Event()

    def poll():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _tree_rss(proc.pid))
            time.sleep(0.01)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    out, _ = proc.communicate()
    done.set()
    t.join()
    if proc.returncode:
        raise RuntimeError(f"a measured run failed (exit {proc.returncode})")
    return {**json.loads(out.strip().splitlines()[-1]), "peak_rss": peak}


OURS_TRAIN = """
import json, time, tokenizers_bpe
t = time.perf_counter()
tok = tokenizers_bpe.train([{path!r}], {vocab}, min_frequency={minf}, workers={workers}, progress=False)
print(json.dumps({{"time": time.perf_counter() - t, "vocab": tok.n_vocab}}))
"""
HF_TRAIN = """
import json, time
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
t = time.perf_counter()
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
trainer = trainers.BpeTrainer(vocab_size={vocab}, min_frequency={minf}, special_tokens=["<|endoftext|>"],
                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
tok.train([{path!r}], trainer)
print(json.dumps({{"time": time.perf_counter() - t, "vocab": tok.get_vocab_size()}}))
"""


def bench_training(path: Path, rounds: int) -> list[dict]:
    rows = []
    for threads in sorted({1, CORES}):
        best: dict[str, dict] = {}
        for _ in range(rounds):  # interleaved: ours, peer, ours, peer, ...
            for impl, code, env in (
                # all cores: ours as a user runs it (workers=None: all cores, in-process below 16 MB),
                # HF with its default thread pool
                ("ours", OURS_TRAIN.format(path=str(path), vocab=VOCAB, minf=MIN_FREQUENCY,
                                           workers=1 if threads == 1 else None), {}),
                ("hf", HF_TRAIN.format(path=str(path), vocab=VOCAB, minf=MIN_FREQUENCY),
                 {"RAYON_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "true" if threads > 1 else "false"}),
            ):
                r = run_measured(code, env)
                b = best.setdefault(impl, {"time": float("inf"), "peak_rss": float("inf")})
                b["time"], b["peak_rss"] = min(b["time"], r["time"]), min(b["peak_rss"], r["peak_rss"])
        rows.append({"work": f"train {path.stat().st_size / MB:.0f} MB, {threads} thread(s)", "ours_s": best["ours"]["time"],
                     "peer_s": best["hf"]["time"], "time_ratio": best["ours"]["time"] / best["hf"]["time"],
                     "ours_rss_mb": best["ours"]["peak_rss"] / MB, "peer_rss_mb": best["hf"]["peak_rss"] / MB,
                     "rss_ratio": best["ours"]["peak_rss"] / best["hf"]["peak_rss"]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


ENCODE = """
import json, time, tiktoken, tokenizers_bpe
from pathlib import Path
shared = Path({shared!r})
gpt2 = tokenizers_bpe.load_gpt2(shared / "gpt2/encoder.json", shared / "gpt2/vocab.bpe")
cl100k = tokenizers_bpe.load_tiktoken(shared / "cl100k/cl100k_base.tiktoken", pattern="gpt4")
texts = json.loads(Path({texts!r}).read_text(encoding="utf-8"))
out = {{}}
for vocab, tok in (("gpt2", gpt2), ("cl100k", cl100k)):
    ranks, pattern, specials = tok.mergeable_ranks, tok.pattern, tok.special_tokens
    for name, text in texts.items():
        for r in range({rounds}):
            t = time.perf_counter(); peer = tiktoken.Encoding(vocab, pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)
            build_peer = time.perf_counter() - t
            t = time.perf_counter(); a = peer.encode_ordinary(text); peer_s = time.perf_counter() - t
            t = time.perf_counter(); ours = tokenizers_bpe.BPETokenizer(ranks, pattern, specials); ours.encode_ordinary("")
            build_ours = time.perf_counter() - t
            t = time.perf_counter(); b = ours.encode_ordinary(text); ours_s = time.perf_counter() - t
            assert a == b
            docs = [text[i : i + 100_000] for i in range(0, len(text), 100_000)]
            t = time.perf_counter(); peer.encode_batch(docs, num_threads={cores}); peer_b = time.perf_counter() - t
            t = time.perf_counter(); ours.encode_batch(docs, num_threads={cores}); ours_b = time.perf_counter() - t
            o = out.setdefault(vocab + " " + name, {{"ours": 1e9, "peer": 1e9, "ours_batch": 1e9, "peer_batch": 1e9,
                                                     "ours_build": 1e9, "peer_build": 1e9, "backend": ours.backend}})
            for k, v in (("ours", ours_s), ("peer", peer_s), ("ours_batch", ours_b), ("peer_batch", peer_b),
                         ("ours_build", build_ours), ("peer_build", build_peer)):
                o[k] = min(o[k], v)
            o["mb"] = len(text.encode("utf-8")) / 1e6
print(json.dumps(out))
"""


def bench_encoding(workdir: Path, rounds: int) -> list[dict]:
    """GPT-2's and cl100k's ranks, each with its pattern, on 3 MB of prose, 3 MB of code and 1 MB of
    adversarial Unicode."""
    texts = {"prose": "".join(p for p in _take(_prose(), 3 * MB)), "code": "".join(_take(_code(), 3 * MB)),
             "adversarial": adversarial_text(1_000_000)}
    path = workdir / "encode_texts.json"
    path.write_text(json.dumps(texts, ensure_ascii=False), encoding="utf-8")
    res = run_measured(ENCODE.format(shared=str(SHARED), texts=str(path), rounds=rounds, cores=CORES))
    rows = []
    for name, o in res.items():
        if name == "peak_rss":
            continue
        rows.append({"work": f"encode {name} {o['mb']:.1f} MB, 1 thread", "ours_s": o["ours"], "peer_s": o["peer"],
                     "speed_ratio": o["peer"] / o["ours"], "ours_build_s": o["ours_build"], "peer_build_s": o["peer_build"],
                     "backend": o["backend"]})
        rows.append({"work": f"encode_batch {name}, {CORES} threads", "ours_s": o["ours_batch"], "peer_s": o["peer_batch"],
                     "speed_ratio": o["peer_batch"] / o["ours_batch"]})
        print(json.dumps(rows[-2]), json.dumps(rows[-1]), sep="\n", flush=True)
    return rows


def bench_bounded(corpus: Path, budget_mb: int, rounds: int) -> list[dict]:
    """`bpe-train --max-memory BUDGET` against the same run unbounded (vocab 16384, min frequency 1, all
    cores): peak RSS of the process tree, byte-identical output, no spill directory left; then a run
    killed with SIGKILL in its merge phase and run again (the next run removes what the killed one left)."""
    bpe_train = str(Path(sys.executable).with_name("bpe-train"))
    spill_parent = Path(os.environ.get("TMPDIR", "/tmp"))
    leftovers = lambda: sorted(p.name for p in spill_parent.glob("bpe-spill-*"))  # noqa: E731

    def run(out: Path, *extra: str, kill_after: float | None = None) -> dict:
        args = [bpe_train, str(corpus), "--vocab-size", str(VOCAB), "--min-frequency", "1", "--quiet", "-o", str(out), *extra]
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        peak, start = 0, time.perf_counter()
        while proc.poll() is None:
            peak = max(peak, _tree_rss(proc.pid))
            if kill_after is not None and time.perf_counter() - start > kill_after:
                for pid in _tree(proc.pid):
                    os.kill(pid, 9)
                break
            time.sleep(0.01)
        proc.wait()
        return {"rc": proc.returncode, "time": time.perf_counter() - start, "peak_rss": peak}

    out_dir = corpus.parent
    budget = ["--max-memory", f"{budget_mb}MB"]
    best = {}
    for _ in range(rounds):
        for name, extra in (("bounded", budget), ("unbounded", [])):
            r = run(out_dir / f"tok-{name}.json", *extra)
            if r["rc"]:
                raise RuntimeError(f"bpe-train {' '.join(extra)} failed (exit {r['rc']})")
            b = best.setdefault(name, r)
            b["time"], b["peak_rss"] = min(b["time"], r["time"]), min(b["peak_rss"], r["peak_rss"])
    identical = (out_dir / "tok-bounded.json").read_bytes() == (out_dir / "tok-unbounded.json").read_bytes()
    left_after = leftovers()
    killed = run(out_dir / "tok-killed.json", *budget, kill_after=best["bounded"]["time"] * 0.75)
    left_by_kill = leftovers()
    rerun = run(out_dir / "tok-killed.json", *budget)
    row = {"work": f"bpe-train --max-memory {budget_mb}MB, {corpus.stat().st_size / MB:.0f} MB ({corpus.name})",
           "ours_s": best["bounded"]["time"], "peer_s": best["unbounded"]["time"],
           "ours_rss_mb": best["bounded"]["peak_rss"] / MB, "peer_rss_mb": best["unbounded"]["peak_rss"] / MB,
           "under_budget": best["bounded"]["peak_rss"] < budget_mb * MB, "identical": identical,
           "spill_dirs_left": left_after, "killed_rc": killed["rc"], "left_by_kill": len(left_by_kill),
           "rerun_identical": rerun["rc"] == 0 and (out_dir / "tok-killed.json").read_bytes() == (out_dir / "tok-unbounded.json").read_bytes(),
           "spill_dirs_left_after_rerun": leftovers()}
    print(json.dumps(row), flush=True)
    return [row]


def _take(docs, size):
    total = 0
    for d in docs:
        if total >= size:
            return
        d = d[: size - total]
        total += len(d.encode("utf-8"))
        yield d


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1,10,100", help="training corpus sizes in MB, comma-separated")
    p.add_argument("--rounds", type=int, default=2, help="runs of each implementation (interleaved); the best counts")
    p.add_argument("--workdir", default=str(ROOT / ".bench_tokenizer"), help="where the corpora are written (reused)")
    p.add_argument("--skip", choices=("train", "encode", "bounded"), action="append", default=[], help="leave out a part")
    p.add_argument("--bounded", default="300,256", metavar="CORPUS_MB,BUDGET_MB",
                   help="the bounded-memory part: a varied corpus of CORPUS_MB trained with --max-memory BUDGET_MB")
    p.add_argument("--corpus-only", action="store_true", help="write the corpora and stop")
    p.add_argument("--out", help="also write the rows as JSON here")
    args = p.parse_args(argv)
    workdir = Path(args.workdir)
    sizes = [int(s) for s in args.sizes.split(",")]
    corpora = [make_corpus(s * MB, workdir / f"mixed_{s}MB.txt") for s in sizes]
    if args.corpus_only:
        print("\n".join(map(str, corpora)))
        return 0
    rows = []
    if "encode" not in args.skip:
        rows += bench_encoding(workdir, args.rounds)
    if "train" not in args.skip:
        for c in corpora:
            rows += bench_training(c, args.rounds)
    if "bounded" not in args.skip:
        corpus_mb, budget_mb = (int(x) for x in args.bounded.split(","))
        varied = make_varied_corpus(corpus_mb * MB, workdir / f"varied_{corpus_mb}MB.txt")
        rows += bench_bounded(varied, budget_mb, 1)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
