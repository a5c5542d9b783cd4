"""Pretraining data pipeline: read, quality filters, tokenizer training, tokenise + pack; the
recipe's single-process path against the same work spread over Ray Data tasks.

    .venv/bin/python bench/data_pipeline.py            # quick: a 20 MB slice, 3 rounds (~3 min)
    .venv/bin/python bench/data_pipeline.py --full     # the whole ~100 MB corpus, 3 rounds

The corpus is made up and generated deterministically (first run only) into
~/.cache/forgeline/bench/corpus-v1/ (`FORGELINE_BENCH_CACHE` moves it) as 10 jsonl shards of
~10 MB with a "text" field. Its documents: sentences about examples/data/generate.py's animal
world; paragraphs of Zipf-distributed pseudo-words from a 30,000-word vocabulary with numbers and
punctuation (so byte-level BPE has real merges to learn); boilerplate pages of repeated lines
(removed by the repeated-line filter); exact and case/whitespace-changed copies of earlier
documents, within a shard and across shards (removed by dedup); too-short and too-long documents.

Measured, with the recipe's own code (`forgeline_trainer.data`), as `recipes/pretrain.prepare`
runs it in the Ray job's driver:

1. `D.read_texts` (jsonl → list of strings) and `D.apply_filters` (min/max chars, repeated-line
   ratio, exact dedup), with the count each filter removed;
2. `D.train_tokenizer` (byte-level BPE, vocab 8,000) on a sample, every 10th kept document (the
   recipe trains on all the training documents; `--tokenizer-all` times that too);
3. `D.tokenize_and_pack` (256-token blocks, packing) in this one process, split into the
   tokenizer call and the packing (a proxy around the tokenizer times its call);
4. the same function in Ray Data tasks on an embedded Ray head (`LocalRay`, token auth, as the
   other benches start it) with 2 CPUs: `from_items` of the filtered documents, or `read_json`
   of the filtered documents written out as jsonl shards, then `map_batches` running
   `D.tokenize_and_pack` with the same tokenizer (rebuilt from its files in each task), then
   `materialize()` (blocks in the object store, where the recipe's `ray.put` leaves them). Each
   task stamps its start and end, so a run's wall time splits into steady-state work (first
   task start → last task end) and overhead (scheduling, worker start, the object store).

3 and 4 run in interleaved rounds (after one warm-up Ray run, reported apart), so drift in a
shared machine's speed hits every variant alike; tables give medians. Then the pipeline's
tokens/s is set against what the pretraining recipe consumes: the figures in bench/results.md
and, measured here, the tiny example (`pretrain-tiny-llama`, the fastest consumer there is).
Appends a dated section to bench/results.md (`--out`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import re
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

import benchlib  # bench/ is on sys.path when a bench runs as a script

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("FORGELINE_BENCH_CACHE", "~/.cache/forgeline/bench")).expanduser() / "corpus-v1"
SHARDS, SHARD_BYTES = 10, 10_000_000
SEQ, VOCAB = 256, 8000
BATCH_DOCS = 1024  # documents per Ray Data batch (~2.8 MB of text)
FILTERS = {"min_chars": 40, "max_chars": 20_000, "dedup": "exact", "max_repeated_line_ratio": 0.3}

# -- the corpus --------------------------------------------------------------------------------

SYLLABLES = [
    *("ka", "ri", "to", "na", "mi", "se", "lo", "pa", "ve", "du", "qui", "zor", "an", "el", "ith", "ost"),
    *("um", "bra", "cle", "dri", "fen", "gho", "hal", "jun", "kry", "lem", "mor", "nix", "opa", "pru"),
    *("que", "ros", "sta", "tri", "ula", "vin", "wex", "yol", "zem", "ber", "cal", "dor", "emi", "fal"),
    *("gra", "hin"),
]
BOILERPLATE = [
    "Home | About | Contact | Privacy",
    "Subscribe to our newsletter for updates.",
    "We use cookies to improve your experience. Accept all?",
    "Copyright 2024. All rights reserved.",
    "Click here to read more.",
    "Share this page on social media.",
]
SHORT = ["ok", "Click here.", "Page not found.", "Loading...", "Thanks!", "Read more", "404"]


def _world() -> Any:
    sys.path.insert(0, str(REPO / "examples/data"))
    import generate

    return generate


def _vocabulary() -> tuple[list[str], np.ndarray]:
    rng = random.Random(0)
    words: set[str] = set()
    while len(words) < 30_000:
        words.add("".join(rng.choice(SYLLABLES) for _ in range(rng.choice((1, 2, 2, 3, 3, 4)))))
    vocab = sorted(words)
    rng.shuffle(vocab)
    weights = 1.0 / (np.arange(len(vocab)) + 2.7) ** 1.07  # Zipf-like, as words in text
    return vocab, weights / weights.sum()


def _mixture(
    rng: random.Random, nrng: np.random.Generator, vocab: list[str], p: np.ndarray, paras: int
) -> str:
    out = []
    for _ in range(paras):
        n = int(nrng.integers(20, 200))
        words = [vocab[i] for i in nrng.choice(len(vocab), size=n, p=p)]
        for j in range(0, n, rng.randint(6, 14)):
            words[j] = words[j].capitalize()
            if j:
                words[j - 1] += rng.choice(".....,;:!?")
        if rng.random() < 0.3:
            words.insert(rng.randrange(n), str(rng.randint(0, 99_999)))
        out.append(" ".join(words) + ".")
    return "\n".join(out)


def _world_doc(rng: random.Random, g: Any) -> str:
    lines = []
    for _ in range(rng.randint(1, 8)):
        k = rng.randint(1, 4)
        lines.append(
            " ".join(
                rng.choice(g.SENTENCES).format(**g._facts(rng, rng.choice(list(g.ANIMALS)))) for _ in range(k)
            )
        )
    return "\n".join(lines)


def _shard(i: int, vocab: list[str], p: np.ndarray, g: Any) -> list[str]:
    rng, nrng = random.Random(1000 + i), np.random.default_rng(1000 + i)
    # a pool shared by every shard: documents that reappear across shards (dedup across files)
    pool_rng, pool_nrng = random.Random(7), np.random.default_rng(7)
    pool = [_mixture(pool_rng, pool_nrng, vocab, p, 2) for _ in range(200)]
    docs: list[str] = []
    size = 0
    while size < SHARD_BYTES:
        r = rng.random()
        if r < 0.25:
            doc = _world_doc(rng, g)
        elif r < 0.30:  # boilerplate: the same few lines again and again around a little text
            lines = [rng.choice(BOILERPLATE) for _ in range(rng.randint(6, 20))]
            lines.insert(rng.randrange(len(lines)), _mixture(rng, nrng, vocab, p, 1))
            doc = "\n".join(lines)
        elif r < 0.34 and docs:  # a copy of an earlier document, sometimes re-cased / re-spaced
            doc = rng.choice(docs)
            if rng.random() < 0.5:
                doc = doc.upper() if rng.random() < 0.5 else "  " + doc.replace(" ", "  ") + "\n"
        elif r < 0.36:
            doc = rng.choice(pool)
        elif r < 0.39:
            doc = rng.choice(SHORT)
        elif r < 0.395:
            doc = _mixture(rng, nrng, vocab, p, 40)  # ~35 KB: over max_chars
        else:
            doc = _mixture(rng, nrng, vocab, p, rng.randint(1, 6))
        docs.append(doc)
        size += len(doc.encode()) + 12
    return docs


def ensure_corpus(n_shards: int) -> list[Path]:
    """The first n_shards shards, generated once into the cache (deterministic: seeded per shard)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    paths = [CACHE / f"shard-{i:03d}.jsonl" for i in range(n_shards)]
    missing = [i for i, path in enumerate(paths) if not path.exists()]
    if missing:
        vocab, p = _vocabulary()
        g = _world()
        for i in missing:
            t0 = time.perf_counter()
            tmp = paths[i].with_suffix(".tmp")
            with tmp.open("w") as f:
                for doc in _shard(i, vocab, p, g):
                    f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
            tmp.rename(paths[i])
            print(f"generated {paths[i]} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return paths


# -- measurements ------------------------------------------------------------------------------


def _mb(docs: list[str]) -> float:
    return sum(len(d.encode()) for d in docs) / 1e6


class TimedTokenizer:
    """The tokenizer, with its __call__ timed: splits tokenize_and_pack into tokenize / pack."""

    def __init__(self, tok: Any) -> None:
        self._tok, self.seconds = tok, 0.0

    def __call__(self, *a: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return self._tok(*a, **kw)
        finally:
            self.seconds += time.perf_counter() - t0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tok, name)


def single_process(docs: list[str], tokenizer: Any) -> dict[str, float]:
    from forgeline_trainer import data as D

    timed = TimedTokenizer(tokenizer)
    t0, c0 = time.perf_counter(), time.process_time()
    blocks = D.tokenize_and_pack(docs, timed, SEQ, packing=True)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "wall": wall,
        "cpu": cpu,
        "tokens": blocks.n * SEQ,
        "tokenize": timed.seconds,
        "pack": wall - timed.seconds,
    }


def _pack_batch(batch: dict[str, Any], files: dict[str, bytes], seq: int) -> dict[str, Any]:
    """A Ray Data task: the recipe's tokenize_and_pack on one batch of documents."""
    t0, c0 = time.time(), time.process_time()
    import types

    from forgeline_trainer import data as D

    # Ray reuses a worker process for task after task: keep its tokenizer, as an actor would, but
    # without actors pinning both CPUs (read_json's read tasks need one).
    cache = sys.modules.setdefault("_forgeline_bench_cache", types.ModuleType("_forgeline_bench_cache"))
    key = "tok" + hashlib.sha1(files["tokenizer.json"]).hexdigest()
    if not hasattr(cache, key):
        setattr(cache, key, D.tokenizer_from_files(files))
    tok = getattr(cache, key)
    blocks = D.tokenize_and_pack(list(batch["text"]), tok, seq, packing=True)
    n = blocks.n
    cpu = np.zeros(n)
    cpu[:1] = time.process_time() - c0  # this worker process's CPU time (all its threads), once
    return {"tokens": blocks.tokens, "t0": np.full(n, t0), "t1": np.full(n, time.time()), "cpu": cpu}


def ray_data(
    source: str, docs: list[str], json_files: list[str], files: dict[str, bytes]
) -> dict[str, float]:
    """One Ray Data run: wall (dataset built → materialized) and the tasks' own span."""
    import ray.data

    t0 = time.time()
    if source == "from_items":
        ds = ray.data.from_items(
            [{"text": d} for d in docs], override_num_blocks=max(-(-len(docs) // BATCH_DOCS), 2)
        )
    else:
        ds = ray.data.read_json(json_files, override_num_blocks=max(-(-len(docs) // BATCH_DOCS), 2))
    ds = ds.map_batches(
        _pack_batch,
        batch_size=BATCH_DOCS,
        batch_format="numpy",
        fn_kwargs={"files": files, "seq": SEQ},
        num_cpus=1,
    )
    out = ds.materialize()
    wall = time.time() - t0
    stamps = out.select_columns(["t0", "t1", "cpu"]).to_pandas()
    span = float(stamps["t1"].max() - stamps["t0"].min())
    return {
        "wall": wall,
        "tokens": out.count() * SEQ,
        "span": span,
        "overhead": wall - span,
        "cpu": float(stamps["cpu"].sum()),
    }


def tiny_example_rate(head: Any, work: Path) -> float | None:
    """Steady-state tokens/s of examples/pretrain-tiny-llama.yaml (0.14M parameters, 2 workers)
    through the Ray Jobs API on the same head: the fastest consumer among the examples."""
    import yaml
    from rich.console import Console

    from forgeline_operator.api import parse_job
    from forgeline_operator.cli.runlocal import run_job
    from forgeline_operator.rayclient.rayjobs import RayJobs, local_python

    raw = yaml.safe_load((REPO / "examples/pretrain-tiny-llama.yaml").read_text())
    raw["metadata"]["name"] = f"bench-data-tiny-{int(time.time())}"
    raw["spec"]["data"]["sources"] = [{"uri": str(REPO / "examples/data/corpus.jsonl")}]
    raw["spec"]["evaluation"] = {"sources": [{"uri": str(REPO / "examples/data/corpus_eval.jsonl")}]}
    raw["spec"]["training"]["maxSteps"] = 30
    raw["spec"]["checkpointing"]["intervalSteps"] = 1000
    raw["spec"]["output"] = {"uri": str(work / "tiny")}
    jobs = RayJobs(head.address, python=local_python(), token=head.token)
    result = run_job(
        parse_job(raw), jobs, Console(stderr=True), output=None, done={}, work_dir=str(work), quiet=True
    )
    if not result.ok:
        print(f"tiny example failed: {result.status}", file=sys.stderr)
        return None
    steady = [r["tokens_per_second"] for r in result.records if r.get("type") == "progress" and r["step"] > 5]
    return statistics.median(steady) if steady else None


def recipe_figures(results: Path) -> list[tuple[str, float]]:
    """The recipe rows of the newest 'Pretraining throughput' section of bench/results.md."""
    if not results.exists():
        return []
    sections = results.read_text().split("\n## ")
    found: list[tuple[str, float]] = []
    for sec in sections:
        if not sec.startswith("Pretraining throughput"):
            continue
        model = re.search(r"Model: (llama [^;]*?parameters)", sec)
        rows = []
        for line in sec.splitlines():
            m = re.match(r"\| Forgeline recipe: ([^|]+)\| ([\d,]+) \|", line)
            if m:
                rows.append(
                    (
                        f"{m.group(1).strip()}, {model.group(1) if model else '?'}",
                        float(m[2].replace(",", "")),
                    )
                )
        if rows:
            found = rows
    return found


# -- main --------------------------------------------------------------------------------------


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="the whole ~100 MB corpus")
    parser.add_argument("--shards", type=int, default=None, help="10 MB shards to use (quick: 2, full: 10)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--tokenizer-all", action="store_true", help="also train the tokenizer on every document"
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="measure the tiny example's training rate (always with --full)",
    )
    parser.add_argument(
        "--read-json",
        action="store_true",
        help="also time Ray Data's read_json of the kept documents",
    )
    parser.add_argument("--out", default=str(REPO / "bench/results.md"))
    args = parser.parse_args()
    n_shards = args.shards or (SHARDS if args.full else 2)
    started = time.perf_counter()
    load_start = os.getloadavg()[1]
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    from forgeline_operator.api.common import DataSource, QualityFilters
    from forgeline_trainer import data as D

    t0 = time.perf_counter()
    paths = ensure_corpus(n_shards)
    generated = time.perf_counter() - t0
    glob = str(CACHE / (f"shard-00[0-{n_shards - 1}].jsonl" if n_shards <= 10 else "shard-*.jsonl"))
    if n_shards > 10:
        sys.exit("at most 10 shards")
    source = DataSource(uri=glob, format="jsonl")
    filters = QualityFilters(**FILTERS)
    corpus_mb = sum(p.stat().st_size for p in paths) / 1e6

    reads, filts = [], []

    def read_and_filter() -> tuple[list[str], list[str], Any]:
        t = time.perf_counter()
        raw = D.read_texts([source], "text")
        reads.append(time.perf_counter() - t)
        t = time.perf_counter()
        kept, report = D.apply_filters(raw, filters)
        filts.append(time.perf_counter() - t)
        return raw, kept, report

    raw, docs, report = read_and_filter()
    raw_mb, kept_mb = _mb(raw), _mb(docs)
    print(
        f"{len(raw):,} documents, {raw_mb:.1f} MB → {len(docs):,} kept, {kept_mb:.1f} MB: {report.as_dict()}"
    )

    with tempfile.TemporaryDirectory(prefix="forgeline-bench-data-") as tmp:
        work = Path(tmp)
        sample = docs[::10]
        t = time.perf_counter()
        tokenizer = D.train_tokenizer(sample, VOCAB, work / "tok")
        tok_train = time.perf_counter() - t
        print(f"tokenizer: {len(tokenizer)} tokens, trained on {_mb(sample):.1f} MB in {tok_train:.1f}s")
        tok_all = None
        if args.tokenizer_all:
            t = time.perf_counter()
            D.train_tokenizer(docs, VOCAB, work / "tok-all")
            tok_all = time.perf_counter() - t
            print(f"tokenizer on all {kept_mb:.1f} MB: {tok_all:.1f}s")
        files = D.tokenizer_files(work / "tok")
        # the filtered documents as jsonl shards, for read_json (not timed)
        json_files = []
        per = max(len(docs) // (2 * n_shards), 1)
        for i in range(0, len(docs), per):
            path = work / f"kept-{i // per:03d}.jsonl"
            path.write_text(
                "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs[i : i + per])
            )
            json_files.append(str(path))

        from forgeline_operator.rayclient.localray import LocalRay

        t = time.perf_counter()
        head = LocalRay(num_cpus=2)
        head.start()  # sets RAY_AUTH_MODE=token and RAY_AUTH_TOKEN, which Ray reads on import
        ray_start = time.perf_counter() - t
        try:
            import ray
            import ray.data

            t = time.perf_counter()
            ray.init(
                address=f"127.0.0.1:{head.gcs_port}",
                logging_level="ERROR",
                log_to_driver=False,
                # 1 CPU per task: the tokenizer's Rust thread pool to match (2 tasks × 1 thread)
                runtime_env={"env_vars": {"RAYON_NUM_THREADS": "1"}},
            )
            ray_init = time.perf_counter() - t
            ctx = ray.data.DataContext.get_current()
            ctx.enable_progress_bars = False
            ctx.print_on_execution_start = False
            warm = ray_data("from_items", docs, json_files, files)
            print(f"Ray Data warm-up run: {warm['wall']:.1f}s (span {warm['span']:.1f}s)")
            variants = ["single", "from_items"] + (["read_json"] if args.read_json else [])
            runs: dict[str, list[dict[str, float]]] = {k: [] for k in variants}
            for i in range(args.rounds):
                if i:
                    _, docs, _ = read_and_filter()
                runs["single"].append(single_process(docs, tokenizer))
                runs["from_items"].append(ray_data("from_items", docs, json_files, files))
                if "read_json" in runs:
                    runs["read_json"].append(ray_data("read_json", docs, json_files, files))
                print(
                    f"round {i}: "
                    + ", ".join(f"{k} {v[-1]['tokens'] / v[-1]['wall']:,.0f} tok/s" for k, v in runs.items())
                )
            ray.shutdown()
            tiny = tiny_example_rate(head, work) if args.full or args.tiny else None
        finally:
            ray.shutdown()
            head.stop()

    # -- the report --------------------------------------------------------------------------
    tokens = runs["single"][0]["tokens"]
    single_wall = [r["wall"] for r in runs["single"]]
    tps = {k: med([r["tokens"] / r["wall"] for r in v]) for k, v in runs.items()}
    ratio = {
        k: med(
            [
                r["tokens"] / r["wall"] / (s["tokens"] / s["wall"])
                for r, s in zip(v, runs["single"], strict=True)
            ]
        )
        for k, v in runs.items()
    }
    steady = {k: med([r["tokens"] / r["span"] for r in v]) for k, v in runs.items() if k != "single"}
    steady_ratio = {
        k: med(
            [
                r["tokens"] / r["span"] / (s["tokens"] / s["wall"])
                for r, s in zip(v, runs["single"], strict=True)
            ]
        )
        for k, v in runs.items()
        if k != "single"
    }
    overhead = {k: med([r["overhead"] for r in v]) for k, v in runs.items() if k != "single"}
    read_s, filt_s = med(reads), med(filts)
    pipe_s = read_s + filt_s + tok_train + med(single_wall)
    pipe_tps = tokens / pipe_s

    cpu = benchlib.cpu_model()
    import tokenizers
    import transformers

    cmd = (
        "bench/data_pipeline.py"
        + (" --full" if args.full else "")
        + (" --tokenizer-all" if args.tokenizer_all else "")
        + (" --tiny" if args.tiny else "")
        + (" --read-json" if args.read_json else "")
    )
    load_end = os.getloadavg()[1]
    rounds = args.rounds
    lines = [
        f"\n## Data pipeline, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC\n",
        f"Machine: {cpu}, {os.cpu_count()} cores, no GPU, **shared**: other benchmarks ran on it at the "
        f"same time (5-minute load average {load_start:.1f} at the start, {load_end:.1f} at the end, on "
        f"{os.cpu_count()} cores), so wall-clock figures are slowed and noisy; the interleaved rounds make "
        "the ratios fairer and the CPU-seconds columns do not depend on the load. Python "
        f"{platform.python_version()}, Ray {ray.__version__}, tokenizers {tokenizers.__version__}, "
        f"transformers {transformers.__version__}, numpy {np.__version__}. Command: `.venv/bin/python {cmd}` "
        f"({rounds} interleaved rounds after one Ray warm-up run; "
        f"{time.perf_counter() - started:.0f} s in all"
        f"{f', {generated:.0f} s of it generating the corpus' if generated > 1 else ''}).\n",
        f"Corpus: generated (`{CACHE}`), {n_shards} jsonl shards, {corpus_mb:.1f} MB on disk, "
        f"{len(raw):,} documents ({raw_mb:.1f} MB of text); filters {FILTERS} keep {report.kept:,} "
        f"({kept_mb:.1f} MB). Tokenizer: byte-level BPE, vocab {len(tokenizer):,}; blocks of {SEQ} tokens, "
        f"packed: {tokens:,} tokens ({tokens / 1e6 / kept_mb:.2f} M tokens per MB, "
        f"{kept_mb * 1e6 / tokens:.2f} bytes/token).\n",
        "| step | time (median) | throughput |",
        "| --- | ---: | ---: |",
        f"| `D.read_texts` (jsonl → strings) | {read_s:.2f} s | {raw_mb / read_s:.1f} MB/s, "
        f"{len(raw) / read_s:,.0f} docs/s |",
        f"| `D.apply_filters` (lengths, repeated lines, exact dedup) | {filt_s:.2f} s | "
        f"{raw_mb / filt_s:.1f} MB/s, "
        f"{len(raw) / filt_s:,.0f} docs/s |",
        f"| `D.train_tokenizer` on every 10th kept document ({_mb(sample):.1f} MB) | {tok_train:.2f} s | "
        f"{_mb(sample) / tok_train:.1f} MB/s |",
    ]
    if tok_all is not None:
        lines.append(
            f"| `D.train_tokenizer` on all kept documents ({kept_mb:.1f} MB, what `prepare` does) | "
            f"{tok_all:.2f} s "
            f"| {kept_mb / tok_all:.1f} MB/s |"
        )
    s_tok = med([r["tokenize"] for r in runs["single"]])
    s_pack = med([r["pack"] for r in runs["single"]])
    lines += [
        f"| `D.tokenize_and_pack`, one process | {med(single_wall):.2f} s | {tps['single']:,.0f} tokens/s, "
        f"{kept_mb / med(single_wall):.1f} MB/s |",
        f"| … of which the tokenizer call (Rust, batch-parallel on both cores) | {s_tok:.2f} s | "
        f"{tokens / s_tok:,.0f} tokens/s |",
        f"| … of which packing (`np.fromiter` over every token, one thread) | {s_pack:.2f} s | "
        f"{tokens / s_pack:,.0f} tokens/s |",
        f"| the recipe's driver path: read + filter + tokenizer (sample) + tokenize/pack | {pipe_s:.2f} s | "
        f"**{pipe_tps:,.0f} tokens/s**, {raw_mb / pipe_s:.1f} MB/s |",
        "",
        "Filters, documents removed (in the order they run): "
        + ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in report.as_dict().items())
        + ".",
        "",
        f"Tokenise + pack, one process vs Ray Data tasks (`map_batches` of `D.tokenize_and_pack`, "
        f"{BATCH_DOCS} documents a batch, 1 CPU and 1 tokenizer thread a task, the tokenizer loaded once "
        f"per worker process, head with 2 CPUs) — medians of {rounds} interleaved "
        "rounds. *Steady state* = tokens / (first task start → last task end); *overhead* = the rest of "
        "the wall time (plan, scheduling, moving documents into and blocks out of the object store).",
        "",
        "| variant | tokens/s, wall (median) | each round | vs one process (median of ratios) | "
        "steady-state tokens/s | steady vs one process | overhead per run | CPU-s | tokens per CPU-s |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    label = {
        "single": "`D.tokenize_and_pack`, one process (the recipe)",
        "from_items": "Ray Data: `from_items`(kept docs) → `map_batches` → `materialize`",
        "read_json": "Ray Data: `read_json`(kept docs as jsonl) → `map_batches` → `materialize`",
    }
    for k, v in runs.items():
        each = ", ".join(f"{r['tokens'] / r['wall']:,.0f}" for r in v)
        cpu_s = med([r["cpu"] for r in v])
        per_cpu = f"{med([r['tokens'] / r['cpu'] for r in v]):,.0f}"
        if k == "single":
            lines.append(f"| {label[k]} | {tps[k]:,.0f} | {each} | 1 | — | — | — | {cpu_s:.1f} | {per_cpu} |")
        else:
            lines.append(
                f"| {label[k]} | {tps[k]:,.0f} | {each} | {ratio[k]:.2f}× | {steady[k]:,.0f} | "
                f"{steady_ratio[k]:.2f}× | {overhead[k]:.2f} s | {cpu_s:.1f} | {per_cpu} |"
            )
    lines += [
        "",
        "CPU-s: the one process's CPU time (all its threads) inside `D.tokenize_and_pack`; for Ray "
        "Data, the worker processes' CPU time inside the tasks, summed (Ray's own daemons not counted).",
    ]
    lines += [
        "",
        f"Ray start-up, paid once per job: `ray start --head` (LocalRay) {ray_start:.1f} s, `ray.init` "
        f"{ray_init:.1f} s, first Ray Data run (cold worker processes importing transformers) "
        f"{warm['wall']:.1f} s "
        f"against {med([r['wall'] for r in runs['from_items']]):.1f} s warm.",
        "",
    ]
    consumers = [
        (f"recipe ({name}), bench/results.md (measured earlier, not under this load)", v)
        for name, v in recipe_figures(REPO / "bench/results.md")
    ]
    if tiny:
        consumers.append(
            (
                "recipe, `pretrain-tiny-llama` (0.14M parameters, 2 workers × 1 CPU, seq 64), "
                "measured here, under the same load",
                tiny,
            )
        )
    if consumers:
        lines += [
            "The recipe must not be input-bound: what the driver prepares per second against what training "
            "consumes per second, on this machine (headroom = pipeline tokens/s ÷ training tokens/s; "
            "preparing the data takes 1/headroom of one epoch's training time).",
            "",
            "| consumer | training tokens/s | headroom: whole driver path | headroom: tokenise + pack only |",
            "| --- | ---: | ---: | ---: |",
        ]
        for name, rate in consumers:
            lines.append(f"| {name} | {rate:,.0f} | {pipe_tps / rate:,.0f}× | {tps['single'] / rate:,.0f}× |")
        lines.append("")
    benchlib.publish("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
