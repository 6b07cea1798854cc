#!/usr/bin/env python
"""Data pipeline throughput, against the tokenizer's own speed.

    (a) the tokenizer alone: relora_ds.data.tokenize.encode_documents (encode_batch, 256 documents a call), one
        process, documents already in memory; also the Rust tokenizer's encode_batch_fast (no offsets), which
        is what the pretokenize workers and the training streams call (tokenize.Encoder); both timed in turn with
        the (b) runs, so that the ratios (b)/(a) compare runs made under the same machine conditions
    (b) one rank's training stream (loader.stream_batches: what the trainer builds with data.streaming: true,
        world size 1) with data.num_workers 0, 1 and 2: read, tokenize, pack and hand out micro-batches; timed
        from the first batch on, so worker start-up is reported apart
    (c) `relora-ds pretokenize` (pretokenize.pretokenize) with --num-proc 1 and 2, wall time including the
        process start-up, the files written
    resume: the wall time from building the stream to its first micro-batch when it resumes (load_state_dict)
        at micro-step 10 and at micro-step 10 000, with 0 and 2 workers; the resumed batch is checked against
        the one the uninterrupted stream gave

each with the shipped byte-level BPE tokenizer (relora_ds/data/sample/sotu-bpe-8k) and with a SentencePiece-style
Unigram tokenizer of 32,000 pieces (NFKC normalizer, Metaspace pre-tokenizer: the model of T5's 32,100-piece
vocabulary that the 1b recipe uses, and of LLaMA's) trained here with `tokenizers` on the SOTU train text and
wrapped as a transformers PreTrainedTokenizerFast.

The corpus: --copies copies of the shipped SOTU train split (2.0 M tokens each with the BPE), one jsonl.gz file per
copy. Everything runs with TOKENIZERS_PARALLELISM=false, so one process tokenizes on one core and "N workers /
processes" means N cores. Medians of --repeats runs (--resume-repeats for the resumes, the steps timed in turn).

    python benchmarks/data.py                      # everything; results to benchmarks/results/<date>-data-cpu.{json,md}
    python benchmarks/data.py --quick --out /tmp/d # a smoke run: small corpus, few steps

Targets on the 2-core CPU machine: (b) with 2 workers >= 1.6x (a); (c) with 2 processes >= 1.7x 1 process;
resume at step 10 000 <= 1.2x resume at step 10.
"""

import os

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # before tokenizers is imported: one core per process

import argparse  # noqa: E402
import datetime  # noqa: E402
import gzip  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# relora_ds.data.loader (torch) is imported where it is used: the spawned pretokenize workers import this script
# as their __main__ module, as they import relora_ds/cli.py under `relora-ds pretokenize`, and should not pay
# for torch either
from relora_ds.data import pretokenize as pt  # noqa: E402
from relora_ds.data.sources import resolve_source  # noqa: E402
from relora_ds.hardware import host, package_versions  # noqa: E402
from relora_ds.data.tokenize import Encoder, encode_documents, load_tokenizer  # noqa: E402
from relora_ds.files import atomic_write  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
TARGETS = {"pipeline_2_workers_vs_tokenizer": 1.6, "pretokenize_2_vs_1": 1.7, "resume_10000_vs_10": 1.2}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--copies", type=int, default=4, help="copies of the SOTU train split in the corpus (default 4)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (default 512, the 1b recipe's)")
    p.add_argument("--micro-batch", type=int, default=16,
                   help="sequences per micro-batch for (b) (default 16, the 1b recipe's per GPU)")
    p.add_argument("--pipeline-tokens", type=float, default=4e6, help="tokens timed per (b) run (default 4e6)")
    p.add_argument("--resume-steps", type=int, nargs="+", default=[10, 10000],
                   help="micro-steps to resume at (default 10 10000)")
    p.add_argument("--resume-micro-batch", type=int, default=1,
                   help="sequences per micro-batch of the resume runs (default 1: step 10000 is 5.1 M tokens in)")
    p.add_argument("--resume-repeats", type=int, default=9,
                   help="timed resumes per step, the steps in turn (default 9; a resume costs ~0.1 s)")
    p.add_argument("--resume-workers", type=int, nargs="+", default=[0, 2], help="num_workers of the resume runs")
    p.add_argument("--resume-formats", nargs="+", default=["jsonl.gz", "jsonl"], choices=["jsonl.gz", "jsonl"],
                   help="corpus files of the resume runs (default both: a .gz file is decompressed up to the offset)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="num_workers for (b)")
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="--num-proc for (c)")
    p.add_argument("--tokenizers", nargs="+", default=["bpe", "unigram"], choices=["bpe", "unigram"])
    p.add_argument("--repeats", type=int, default=3, help="runs per measurement; the median is reported")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 copy, 1 repeat, 0.5 M pipeline tokens, "
                                                         "resume at 10 and 1000; writes only with --out")
    p.add_argument("--out", default=None, help="results directory (default benchmarks/results; --quick: none)")
    p.add_argument("--tag", default="", help="suffix of the result file names")
    args = p.parse_args(argv)
    if args.quick:
        args.copies, args.repeats, args.pipeline_tokens, args.resume_repeats = 1, 1, 5e5, 1
        args.resume_steps = [10, 1000]
    if args.out is None and not args.quick:
        args.out = os.path.join(HERE, "results")
    return args


# --- inputs --------------------------------------------------------------------------------------------------

def write_corpus(directory: str, copies: int, compressed: bool = True) -> list[str]:
    """`copies` jsonl(.gz) files of the SOTU train split in `directory`; returns the documents of one copy."""
    docs = list(resolve_source("sotu").documents())
    os.makedirs(directory, exist_ok=True)
    for i in range(copies):
        name = os.path.join(directory, f"train-{i:03d}.jsonl" + (".gz" if compressed else ""))
        with (gzip.open(name, "wt", compresslevel=6) if compressed else open(name, "w")) as f:
            for text in docs:
                f.write(json.dumps({"text": text}) + "\n")
    return docs


def unigram_tokenizer(docs: list[str], vocab_size: int = 32000):
    """A SentencePiece-style Unigram tokenizer trained on `docs`, as a transformers PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.Unigram())
    backend.normalizer = normalizers.NFKC()
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>", "<s>"],
                                      unk_token="<unk>", show_progress=False)
    backend.train_from_iterator(docs, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                                  bos_token="<s>")
    tok.name_or_path = f"unigram-{vocab_size // 1000}k (SentencePiece-style Unigram, trained in-process on SOTU train)"
    return tok


# --- measurements --------------------------------------------------------------------------------------------

def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def tokenizer_run(tok, docs: list[str], which: str, encoder=None) -> dict:
    """One pass of the tokenizer alone over `docs`, 256 documents a call: which "encode_batch" (transformers,
    (a)) or "encode_batch_fast" (the Rust call of tokenize.Encoder, (a'))."""
    started = time.perf_counter()
    if which == "encode_batch":
        tokens = sum(len(ids) for ids in encode_documents(tok, docs))
    else:
        tokens = sum(len(encoder(docs[i:i + 256])) - len(docs[i:i + 256]) for i in range(0, len(docs), 256))
    seconds = time.perf_counter() - started
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def _stream(corpus: str, tok, seq_len: int, micro_batch: int, workers: int):
    from relora_ds.data import loader

    if hasattr(loader, "stream_batches"):
        return loader.stream_batches(corpus, tokenizer=tok, seq_len=seq_len, micro_batch_size=micro_batch,
                                     num_workers=workers)
    if workers:  # the loader of this checkout has no worker pipeline
        raise SystemExit(f"relora_ds.data.loader has no stream_batches(): cannot measure num_workers {workers}")
    dataset = loader.build_dataset(corpus, tokenizer=tok, seq_len=seq_len, streaming=True)
    return loader.DistributedBatches(dataset, micro_batch_size=micro_batch, rank=0, world_size=1, seed=0)


def _close(batches) -> None:
    close = getattr(batches, "close", None)
    if close is not None:
        close()


def pipeline_run(corpus: str, tok, args, workers: int) -> dict:
    per_batch = args.micro_batch * args.seq_len
    batches_timed = max(1, int(args.pipeline_tokens // per_batch))
    started = time.perf_counter()
    batches = _stream(corpus, tok, args.seq_len, args.micro_batch, workers)
    try:
        next(batches)
        first = time.perf_counter()
        for _ in range(batches_timed):
            next(batches)
        seconds = time.perf_counter() - first
    finally:
        _close(batches)
    return {"first_batch_s": first - started, "tokens": batches_timed * per_batch, "seconds": seconds,
            "tokens_per_s": batches_timed * per_batch / seconds}


def pretokenize_run(corpus: str, tok, args, procs: int, scratch: str) -> dict:
    out = os.path.join(scratch, f"packed-{procs}")
    started = time.perf_counter()
    manifest = pt.pretokenize(corpus, out, tokenizer=tok, seq_len=args.seq_len, num_proc=procs)
    seconds = time.perf_counter() - started
    digest = hashlib.sha256()
    for shard in manifest["shards"]:
        with open(os.path.join(out, shard["file"]), "rb") as f:
            digest.update(f.read())
    shutil.rmtree(out)
    return {"tokens": manifest["num_tokens"], "seconds": seconds, "tokens_per_s": manifest["num_tokens"] / seconds,
            "shards": len(manifest["shards"]), "sha256": digest.hexdigest()}


def interleaved(settings: list, run, repeats: int) -> dict:
    """{setting: [runs]}, the settings taken in turn within each repeat (alternating order), so that a load
    that comes and goes on a shared machine falls on all of them alike."""
    runs = {setting: [] for setting in settings}
    for i in range(repeats):
        for setting in (settings if i % 2 == 0 else settings[::-1]):
            before = _cpu_seconds()
            started = time.perf_counter()
            result = run(setting)
            after = _cpu_seconds()
            result["other_processes_cores"] = round(((after[0] - before[0]) - (after[1] - before[1]))
                                                    / (time.perf_counter() - started), 2)
            runs[setting].append(result)
    return runs


def _cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of this process and its reaped children)."""
    import resource

    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    own = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for f in ("ru_utime", "ru_stime"))
    return busy, own


def resume_runs(corpus: str, tok, args, workers: int) -> list[dict]:
    """For each of args.resume_steps: run the stream there (one pass, states taken on the way, not timed), keep its
    state and the next batch; then time fresh streams resumed from each state up to their first batch, which must
    be that next batch. The steps are timed in turn within each of args.resume_repeats rounds (alternating order),
    so that machine noise and the cost of starting workers fall on every step alike."""
    steps = sorted(args.resume_steps)
    states, expected, reach_s = {}, {}, {}
    batches = _stream(corpus, tok, args.seq_len, args.resume_micro_batch, workers)
    try:
        started, done = time.perf_counter(), 0
        for step in steps:
            for _ in range(step - done):
                next(batches)
            done = step
            reach_s[step] = time.perf_counter() - started
            states[step] = json.loads(json.dumps(batches.state_dict()))  # as a checkpoint holds it
            expected[step] = next(batches)["input_ids"]
            done += 1
    finally:
        _close(batches)

    def resume(step: int) -> dict:
        started = time.perf_counter()
        resumed = _stream(corpus, tok, args.seq_len, args.resume_micro_batch, workers)
        try:
            resumed.load_state_dict(states[step])
            got = next(resumed)["input_ids"]
            seconds = time.perf_counter() - started
        finally:
            _close(resumed)
        assert got.equal(expected[step]), f"resume at step {step} with {workers} workers gave another batch"
        return {"seconds": seconds}

    runs = interleaved(steps, resume, args.resume_repeats)
    return [{"step": step, "workers": workers, "reach_s": reach_s[step], "runs": runs[step],
             "seconds": median_of(runs[step], "seconds"), "state_bytes": len(json.dumps(states[step]))}
            for step in args.resume_steps]


# --- report --------------------------------------------------------------------------------------------------

def hardware() -> dict:
    machine = host()
    return {"cpu_model": machine["cpu_model"], "cpu_count": machine["cpu_count"], "cpu_usable": machine["cpu_usable"],
            "memory_gib": round(machine["memory_bytes"] / 2**30, 1), "load_average_before": list(os.getloadavg()),
            "platform": platform.platform()}


def versions() -> dict:
    return {"python": platform.python_version(),
            **package_versions(("tokenizers", "transformers", "datasets", "numpy", "torch", "relora-ds"))}


def _k(value: float) -> str:
    return f"{value / 1e3:,.0f}k"


def markdown(record: dict) -> str:
    hw, a = record["hardware"], record["settings"]
    lines = [f"# Data pipeline throughput, {record['date']}", "",
             f"Command: `{record['command']}`", "",
             f"Machine: {hw['cpu_model']}, {hw['cpu_usable']} of {hw['cpu_count']} cores usable, "
             f"{hw['memory_gib']} GiB, shared: 1-minute load average {hw['load_average_before'][0]:.2f} before "
             f"the run; other processes kept at most {hw.get('other_processes_cores_max') or 0:.2f} cores busy "
             f"during a (b) or (c) run (/proc/stat less this process tree). Versions: "
             + ", ".join(f"{k} {v}" for k, v in record["versions"].items() if v) + ".", "",
             f"Corpus: {a['copies']} x the SOTU train split as {a['copies']} jsonl.gz files; seq_len {a['seq_len']}; "
             f"(b) micro-batch {a['micro_batch']}, {a['pipeline_tokens'] / 1e6:g} M tokens timed from the first "
             f"batch on; resume runs with micro-batch {a['resume_micro_batch']}. TOKENIZERS_PARALLELISM=false "
             f"(1 process = 1 core). Medians of {a['repeats']} runs ({a.get('resume_repeats', a['repeats'])} for each resume, "
             f"the steps timed in turn).", ""]
    names = list(record["tokenizers"])
    tok_of = record["tokenizers"]
    lines += ["| tokens/s (x of (a)) | " + " | ".join(tok_of[n]["tokenizer"] for n in names) + " |",
              "|---|" + "---:|" * len(names)]

    def row(label, value_of):
        cells = []
        for n in names:
            r = tok_of[n]
            base = r["tokenizer_alone"]["tokens_per_s"]
            value = value_of(r)
            cells.append("" if value is None else f"{_k(value)} ({value / base:.2f}x)")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    row("(a) tokenizer alone: `encode_batch`, 1 process", lambda r: r["tokenizer_alone"]["tokens_per_s"])
    row("(a') Rust `encode_batch_fast` alone (the pretokenize workers' call)",
        lambda r: r["tokenizer_alone"]["encode_batch_fast_tokens_per_s"])
    for w in a["workers"]:
        row(f"(b) training stream, one rank, {w} worker{'s' if w != 1 else ''}",
            lambda r, w=w: next((p["tokens_per_s"] for p in r["pipeline"] if p["workers"] == w), None))
    for n in a["procs"]:
        row(f"(c) pretokenize --num-proc {n}",
            lambda r, n=n: next((p["tokens_per_s"] for p in r["pretokenize"] if p["procs"] == n), None))
    lines += ["", "Time to the first batch of a fresh stream (worker start-up): " + "; ".join(
        f"{n} " + ", ".join(f"{p['workers']} workers {p['first_batch_s']:.2f} s" for p in tok_of[n]["pipeline"])
        for n in names) + ".", "",
        "| resume at micro-step | corpus files | workers | " + " | ".join(names) + " |",
        "|---:|---|---:|" + "---:|" * len(names)]
    for i, res in enumerate(tok_of[names[0]]["resume"]):
        lines.append(f"| {res['step']:,} | {res['format']} | {res['workers']} | "
                     + " | ".join(f"{tok_of[n]['resume'][i]['seconds']:.3f} s" for n in names) + " |")
    lines += ["", "Resume: wall time from building the stream to its first batch after load_state_dict(state at "
              "that micro-step); the batch equals the uninterrupted stream's. Reaching the step (not timed) took "
              + "; ".join(f"{n} " + ", ".join(f"{res['reach_s']:.1f} s" for res in tok_of[n]["resume"])
                          for n in names) + ".", "",
              "| target | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key in tok_of[names[0]]["targets"]:
        cells = []
        for n in names:
            t = tok_of[n]["targets"].get(key)
            cells.append("" if t is None else f"{t['value']:.2f} ({'met' if t['met'] else 'NOT met'})")
        target = tok_of[names[0]]["targets"][key]["target"]
        lines.append(f"| {key} {'<=' if key.startswith('resume') else '>='} {target} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(r: dict) -> dict:
    out = {}
    base = r["tokenizer_alone"]["tokens_per_s"]
    two = [p for p in r["pipeline"] if p["workers"] == 2]
    if two:
        value = two[0]["tokens_per_s"] / base
        out["pipeline_2_workers_vs_tokenizer"] = {"value": value, "target": TARGETS["pipeline_2_workers_vs_tokenizer"],
                                                  "met": value >= TARGETS["pipeline_2_workers_vs_tokenizer"]}
    procs = {p["procs"]: p["tokens_per_s"] for p in r["pretokenize"]}
    if 1 in procs and 2 in procs:
        value = procs[2] / procs[1]
        out["pretokenize_2_vs_1"] = {"value": value, "target": TARGETS["pretokenize_2_vs_1"],
                                     "met": value >= TARGETS["pretokenize_2_vs_1"]}
    for fmt, workers in sorted({(res["format"], res["workers"]) for res in r["resume"]}):
        by_step = {res["step"]: res["seconds"] for res in r["resume"]
                   if res["workers"] == workers and res["format"] == fmt}
        if len(by_step) >= 2:
            lo, hi = min(by_step), max(by_step)
            value = by_step[hi] / by_step[lo]
            out[f"resume_{hi}_vs_{lo}_{fmt}_{workers}_workers"] = {
                "value": value, "target": TARGETS["resume_10000_vs_10"], "met": value <= TARGETS["resume_10000_vs_10"]}
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    record = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__)] + sys.argv[1:]),
              "hardware": hardware(), "versions": versions(),
              "settings": {k: v for k, v in vars(args).items() if k not in ("out", "tag")}, "tokenizers": {}}
    scratch = tempfile.mkdtemp(prefix="relora-data-bench-")
    try:
        corpus = os.path.join(scratch, "corpus-gz")
        docs = write_corpus(corpus, args.copies)
        corpora = {"jsonl.gz": corpus}
        if "jsonl" in args.resume_formats:
            corpora["jsonl"] = os.path.join(scratch, "corpus-plain")
            write_corpus(corpora["jsonl"], args.copies, compressed=False)
        for name in args.tokenizers:
            tok = load_tokenizer(None) if name == "bpe" else unigram_tokenizer(docs)
            r = {"tokenizer": tok.name_or_path if name == "unigram" else "sotu-bpe-8k (shipped, byte-level BPE)",
                 "vocab_size": len(tok)}
            print(f"[{name}] (c) pretokenize", flush=True)
            runs = interleaved(args.procs, lambda n: pretokenize_run(corpus, tok, args, n, scratch), args.repeats)
            r["pretokenize"] = [{"procs": n, "runs": runs[n], "tokens_per_s": median_of(runs[n], "tokens_per_s")}
                                for n in args.procs]
            digests = {run["sha256"] for n in args.procs for run in runs[n]}
            r["pretokenize_outputs_identical"] = len(digests) == 1
            assert r["pretokenize_outputs_identical"], "pretokenize output differs between runs or --num-proc values"
            print(f"[{name}] (a) tokenizer alone and (b) training stream, in turn", flush=True)
            encoder = Encoder.of(tok)
            alone = ["encode_batch", "encode_batch_fast"]  # (a), (a'): timed in turn with (b), same conditions
            runs = interleaved(alone + args.workers, lambda w: tokenizer_run(tok, docs, w, encoder) if w in alone
                               else pipeline_run(corpus, tok, args, w), args.repeats)
            r["tokenizer_alone"] = {"runs": runs["encode_batch"], "tokens_per_s": median_of(runs["encode_batch"],
                                                                                             "tokens_per_s"),
                                    "encode_batch_fast_runs": runs["encode_batch_fast"],
                                    "encode_batch_fast_tokens_per_s": median_of(runs["encode_batch_fast"],
                                                                                "tokens_per_s")}
            r["pipeline"] = [{"workers": w, "runs": runs[w], "tokens_per_s": median_of(runs[w], "tokens_per_s"),
                              "first_batch_s": median_of(runs[w], "first_batch_s")} for w in args.workers]
            print(f"[{name}] resume", flush=True)
            r["resume"] = [{"format": fmt, **res} for fmt in args.resume_formats for w in args.resume_workers
                           for res in resume_runs(corpora[fmt], tok, args, w)]
            r["targets"] = targets(r)
            r["corpus_tokens"] = r["pretokenize"][0]["runs"][0]["tokens"]
            record["tokenizers"][name] = r
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    record["hardware"]["load_average_after"] = list(os.getloadavg())
    record["hardware"]["other_processes_cores_max"] = max(
        (run["other_processes_cores"] for r in record["tokenizers"].values() for part in ("pipeline", "pretokenize")
         for setting in r[part] for run in setting["runs"]), default=None)
    text = markdown(record)
    print(text)
    if args.out:
        stem = os.path.join(args.out, f"{datetime.date.today().isoformat()}-data-cpu{'-' + args.tag if args.tag else ''}")
        atomic_write(stem + ".json", json.dumps(record, indent=2))
        atomic_write(stem + ".md", text + "\n")
        print(f"written: {stem}.json, {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
