"""`relora-ds` — one console script, several subcommands (also `python -m relora_ds`).

    relora-ds train --config RUN.yaml [--deepspeed_config DS.json] [--set key=value ...]
    relora-ds validate-config RUN.yaml [--set key=value ...]
    relora-ds schedule RUN.yaml --out lr.png [--set key=value ...]
    relora-ds tokenizer train --files a.jsonl b.txt --out DIR [--vocab-size 8192]
    relora-ds pretokenize --source FILES --out DIR [--tokenizer DIR] [--seq-len 256] [--num-proc N]
    relora-ds export CHECKPOINT --out DIR [--dtype fp32|bf16] [--max-shard-size 5GB]
    relora-ds eval CHECKPOINT_OR_MODEL_DIR [--source sotu --split validation]
    relora-ds analyze RUN_DIR | A B --out DIR [--compare RUN2 ...] [--labels ...] [--targets q_proj,...]
    relora-ds demo
    relora-ds bench --preset 1b --seq-len 2048 --micro-batch 4 [--max-microbatch] [--profile]
    relora-ds compare --config BASE.yaml --out DIR [--variants full,lora,lora_warm,relora] [--variant NAME]
"""

import argparse
import os
import sys

from relora_ds.train import add_train_arguments, run_guarded, run_train


# --- subcommands ------------------------------------------------------------------------------------------

def cmd_validate_config(args) -> int:
    from relora_ds.config import load_config

    cfg = load_config(args.file, args.overrides)
    print(cfg.to_yaml(), end="")
    return 0


def schedule_series(cfg) -> dict:
    """{label: the LR of every step 0..N-1} of a run config, as the trainer sets it (schedule.lr × the method's
    multiplier); for a method with a warm-start switch, under both schedule.at_switch modes, the config's first."""
    from relora_ds import methods

    modes = [cfg.schedule.at_switch]
    if methods.from_config(cfg).switch_step:  # a switch after step 0
        modes += [m for m in ("restart", "continue") if m != cfg.schedule.at_switch]
    series = {}
    for mode in modes:
        variant = cfg.resolved()
        variant.schedule.at_switch = mode
        method = methods.from_config(variant)
        series[f"at_switch {mode}" if len(modes) > 1 else cfg.method] = [
            cfg.schedule.lr * method.lr_multiplier(t) for t in range(cfg.train.total_steps)]
    return series


def cmd_schedule(args) -> int:
    from relora_ds import methods
    from relora_ds.config import load_config
    from relora_ds.plots import plot_schedule

    cfg = load_config(args.file, args.overrides)
    method = methods.from_config(cfg.resolved())
    restarts = [t for t in range(cfg.train.total_steps) if method.restart_due(t)]
    title = f"{os.path.basename(args.file)}: method {cfg.method}, schedule.kind {cfg.schedule.kind}"
    out = plot_schedule(schedule_series(cfg), args.out, switch_step=method.switch_step, restart_steps=restarts,
                        title=title)
    print(f"learning-rate schedule written to {out}")
    return 0


def cmd_tokenizer_train(args) -> int:
    from relora_ds.data.tokenize import train_tokenizer

    out = train_tokenizer(args.files, args.out, vocab_size=args.vocab_size, text_column=args.text_column)
    print(f"tokenizer written to {out}")
    return 0


def cmd_pretokenize(args) -> int:
    from relora_ds.data.pretokenize import pretokenize
    from relora_ds.data.tokenize import load_tokenizer

    from relora_ds.data.pretokenize import check_num_proc, parse_shard_size

    check_num_proc(args.num_proc)  # bad arguments fail before the tokenizer loads
    parse_shard_size(args.shard_size)
    manifest = pretokenize(args.source, args.out, tokenizer=load_tokenizer(args.tokenizer), seq_len=args.seq_len,
                           format=args.format, text_column=args.text_column, split=args.split,
                           hub_config=args.hub_config, streaming=args.streaming, max_tokens=args.max_tokens,
                           num_proc=args.num_proc, shard_size=args.shard_size, progress=not args.no_progress,
                           skip_bad_records=args.skip_bad_records)
    shards = len(manifest["shards"])
    print(f"{manifest['num_sequences']} sequences of {manifest['seq_len']} tokens "
          f"({manifest['num_tokens']} tokens, {shards} shard{'s' if shards > 1 else ''}) written to {args.out} "
          f"in {manifest['seconds']:.1f} s ({manifest['num_tokens'] / max(manifest['seconds'], 1e-3):,.0f} tokens/s)")
    return 0


def cmd_export(args) -> int:
    from relora_ds.tools.export import export

    out = export(args.checkpoint, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size)
    print(f"exported a Hugging Face model ({args.dtype}) to {out} (load with AutoModelForCausalLM.from_pretrained)")
    return 0


def cmd_eval(args) -> int:
    """Held-out loss and perplexity of a checkpoint or a model dir (relora_ds/tools/eval.py)."""
    from relora_ds.tools.eval import run_from_args

    return run_from_args(args)


def cmd_analyze(args) -> int:
    """Singular-value spectra of ΔW (relora_ds/tools/analyze.py): spectra.json and spectra.png in --out."""
    from relora_ds.tools.analyze import analyze, parse_targets, summarize

    results, json_path, png_path = analyze(args.paths, args.out, compare=args.compare or (), labels=args.labels,
                                           targets=parse_targets(args.targets), progress=not args.no_progress)
    for label, result in results.items():
        summary = summarize(result)
        ranks = ", ".join(f"{p} {s['mean_effective_rank']:.1f}" for p, s in summary["by_projection"].items())
        print(f"{label}: {summary['num_above_0_1']} of {summary['num_singular_values']} singular values of ΔW above "
              f"0.1 over {len(result['entries'])} weights; mean effective rank {ranks}")
    print(f"  spectra  {json_path}\n  figure   {png_path}")
    return 0


def cmd_plan(args) -> int:
    """Per-rank memory of each phase of a run, before it runs (relora_ds/plan.py)."""
    from relora_ds.tools.plan import run_plan

    print(run_plan(args.config, args.overrides, args.deepspeed_config, args.ranks, args.device_memory,
                   args.accelerator), end="")
    return 0


def cmd_demo(args) -> int:
    """Train the tiny LLaMA on the shipped SOTU corpus with warm start → ReLoRA, evaluate, export."""
    import time

    from relora_ds.config import load_config
    from relora_ds.trainer import train_command

    here = os.path.dirname(os.path.abspath(__file__))
    out = args.output_dir or time.strftime("runs/demo-%Y%m%d-%H%M%S")
    overrides = [f"train.output_dir={out}"] + list(args.overrides)
    cfg = load_config(os.path.join(here, "configs", "demo.yaml"), overrides)
    started = time.time()
    summary = train_command(cfg, "the demo did not finish")
    export_dir = os.path.join(out, "export")
    from relora_ds.tools.export import export

    export(summary["checkpoint"], export_dir)
    first, last = summary["evals"][0], summary["evals"][-1]
    print()
    print(f"demo finished in {time.time() - started:.0f} s: {summary['step']} steps, "
          f"{len(summary['restarts'])} ReLoRA restarts after {cfg.relora.warm_start_steps} warm-start steps")
    print(f"held-out perplexity (SOTU 2000-2021): {first['perplexity']:.1f} at step {first['step']} -> "
          f"{last['perplexity']:.1f} at step {last['step']}")
    for what, path in (("run directory", out), ("metrics", os.path.join(out, "metrics.jsonl")),
                       ("loss plot", os.path.join(out, "loss.png")), ("checkpoint", summary["checkpoint"]),
                       ("exported model", export_dir)):
        print(f"  {what:15s} {path}")
    return 0


def cmd_bench(args) -> int:
    """Throughput, MFU and memory of ReLoRA against full-rank (relora_ds/bench, benchmarks/README.md)."""
    from relora_ds.bench import throughput

    try:
        throughput.check_args(args)
        return throughput.run(args)
    except SystemExit as e:  # the benchmark's one-line argument and run errors
        if isinstance(e.code, str):
            print(f"error: {e.code}", file=sys.stderr)
            return 2
        raise


def cmd_compare(args) -> int:
    """The paper's Table 2 / Table 6 comparisons: one run per variant of a base config, and a report."""
    from relora_ds.tools.compare import run_from_args

    return run_from_args(args)


# --- parser ---------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relora-ds", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model (single process, torchrun, or under the deepspeed launcher)")
    add_train_arguments(p)
    p.set_defaults(fn=run_train)

    p = sub.add_parser("validate-config", help="print the resolved run config, or its errors (exit 2)")
    p.add_argument("file", help="run config (YAML/JSON)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one field, e.g. --set relora.rank=64 (repeatable)")
    p.set_defaults(fn=cmd_validate_config)

    p = sub.add_parser("schedule", help="draw a config's learning rate per step (both schedule.at_switch modes)")
    p.add_argument("file", help="run config (YAML/JSON)")
    p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one field, e.g. --set relora.warm_start_steps=300 (repeatable)")
    p.set_defaults(fn=cmd_schedule)

    p = sub.add_parser("tokenizer", help="tokenizer tools")
    tok = p.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")
    t = tok.add_parser("train", help="train a byte-level BPE tokenizer on local text and save it as an HF dir")
    t.add_argument("--files", nargs="+", required=True, help="local json/jsonl(.gz)/txt/parquet files")
    t.add_argument("--out", required=True, help="output directory (an HF tokenizer dir)")
    t.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size (default 8192)")
    t.add_argument("--text-column", default="text", help="text field of json/parquet records (default text)")
    t.set_defaults(fn=cmd_tokenizer_train)

    p = sub.add_parser("pretokenize", help="tokenize + pack a dataset to disk with a manifest")
    p.add_argument("--source", required=True, help="'sotu', local file/dir/glob, or a datasets hub name")
    p.add_argument("--out", required=True, help="output directory (tokens + manifest.json)")
    p.add_argument("--tokenizer", default=None, help="HF tokenizer dir or hub name (default: the shipped SOTU one)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per packed sequence (default 256)")
    p.add_argument("--format", default="auto", choices=("auto", "json", "text", "parquet", "hub"),
                   help="input format (default: from the file names)")
    p.add_argument("--text-column", default="text", help="text field (default text)")
    p.add_argument("--split", default="train", help="split to read (default train)")
    p.add_argument("--hub-config", default=None, help="datasets config name for hub datasets")
    p.add_argument("--streaming", action="store_true", help="stream a hub dataset instead of downloading it")
    p.add_argument("--max-tokens", type=int, default=None, help="stop after this many tokens")
    p.add_argument("--num-proc", type=int, default=1, metavar="N",
                   help="tokenizer processes, one core each (default 1: tokenize in this process); the output is "
                        "the same for every N")
    p.add_argument("--shard-size", default="1GiB", metavar="SIZE",
                   help="largest token file, e.g. 1GiB, 500MB (default 1GiB); the output is tokens-00000.bin, "
                        "tokens-00001.bin, ... with their sizes in manifest.json")
    p.add_argument("--skip-bad-records", action="store_true",
                   help="count and log bad records (broken JSON lines, records without the text column) instead of "
                        "stopping at the first (as data.skip_bad_records)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (default: a bar with tokens/s and ETA on a terminal, else a line every 30 s)")
    p.set_defaults(fn=cmd_pretokenize)

    p = sub.add_parser("export", help="merge adapters and write a plain HF model of the run's family (safetensors)")
    p.add_argument("checkpoint", help="run dir, its checkpoints/ dir, or one step_* checkpoint dir")
    p.add_argument("--out", required=True,
                   help="output directory (new, empty, or a previous export, which is replaced)")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="dtype of the written weights "
                   "(default fp32; adapters are merged in fp32 either way)")
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                   help="largest safetensors file, e.g. 5GB, 500MB, 2GiB (default 5GB); the export holds about one "
                        "shard in memory, so this bounds its memory")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("eval", help="held-out perplexity of a checkpoint or an exported model")
    p.add_argument("model", help="a relora-ds checkpoint (run dir / step_* dir) or an HF model dir")
    p.add_argument("--source", default="sotu", help="data source (default: the shipped SOTU corpus)")
    p.add_argument("--split", default="validation", help="split (default validation)")
    p.add_argument("--format", default="auto", help="data format (default auto)")
    p.add_argument("--text-column", default="text", help="text field (default text)")
    p.add_argument("--tokenizer", default=None, help="tokenizer (default: the run's / the model dir's)")
    p.add_argument("--seq-len", type=int, default=256, help="sequence length (default 256)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per batch (default 8)")
    p.add_argument("--max-batches", type=int, default=50, help="number of batches (default 50)")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("analyze", help="singular values of ΔW of a run (final - reference) or of two models (B - A)",
                       description="ΔW = W_final - W_reference of RUN_DIR, or W_B - W_A; writes spectra.json and "
                                   "spectra.png (one histogram per projection) to --out. See "
                                   "relora_ds/tools/analyze.py.")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="a run dir (its reference checkpoint against its newest), or A and B: each a run dir, a "
                        "step_* checkpoint dir or an exported model dir")
    p.add_argument("--out", required=True, help="output directory (spectra.json, spectra.png)")
    p.add_argument("--compare", nargs="+", default=[], metavar="RUN_DIR",
                   help="more run dirs (final - reference each), overlaid in the same figure")
    p.add_argument("--labels", nargs="+", default=None, metavar="LABEL",
                   help="one label per run (default: the directory names)")
    p.add_argument("--targets", default=None, metavar="NAMES",
                   help="comma-separated linear modules to analyse, e.g. q_proj,v_proj (default: the run config's "
                        "relora.target_modules, or its model family's projections; for exported models the family's)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress on stderr (default: a bar on a terminal, else a line every 30 s)")
    p.set_defaults(fn=cmd_analyze)

    p = sub.add_parser("plan", help="per-rank memory of each phase of a run before it runs; whether it fits, and if "
                                    "not the cheapest change that makes it fit")
    p.add_argument("--config", required=True, help="run config (YAML/JSON)")
    p.add_argument("--deepspeed_config", default=None, help="DeepSpeed JSON (default: the config's "
                   "train.deepspeed_config)")
    p.add_argument("--ranks", type=int, default=1, help="data-parallel ranks (default 1)")
    p.add_argument("--device-memory", default=None, metavar="SIZE", help="memory of one device, e.g. 24GiB, 80GB: "
                   "say whether the run fits")
    p.add_argument("--accelerator", default="auto", choices=("auto", "cpu", "cuda"),
                   help="what the ranks run on (default: cuda when this machine has it, else cpu)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one field of the run config (repeatable)")
    p.set_defaults(fn=cmd_plan)

    p = sub.add_parser("demo", help="CPU demo: tiny LLaMA on the shipped SOTU corpus, warm start -> ReLoRA")
    p.add_argument("--output-dir", "--output_dir", default=None, help="run directory (default runs/demo-<time>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of relora_ds/configs/demo.yaml (repeatable)")
    p.set_defaults(fn=cmd_demo)

    from relora_ds.bench.throughput import add_arguments as add_bench_arguments

    p = sub.add_parser("bench", help="throughput, MFU and memory: ReLoRA against full-rank, one process per mode",
                       description="Results go to benchmarks/results/ under the current directory "
                                   "(--results-dir). See benchmarks/README.md.")
    add_bench_arguments(p)
    p.set_defaults(fn=cmd_bench)

    from relora_ds.tools.compare import __doc__ as compare_doc, add_arguments as add_compare_arguments

    p = sub.add_parser("compare", help="full / LoRA / LoRA+warm start / ReLoRA and ablations on one base config, "
                                       "with a report", description=compare_doc,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_compare_arguments(p)
    p.set_defaults(fn=cmd_compare)
    return parser


def take_launcher_local_rank(argv: list[str]) -> list[str]:
    """The deepspeed launcher runs `python -m relora_ds --local_rank=N COMMAND ...`: the option comes before the
    command. Take it out (into LOCAL_RANK, unless set) so that every subcommand runs under the launcher."""
    argv = list(argv)
    if argv and argv[0].startswith(("--local_rank", "--local-rank")):
        option = argv.pop(0)
        value = option.partition("=")[2] if "=" in option else (argv.pop(0) if argv else "")
        os.environ.setdefault("LOCAL_RANK", value)
    return argv


def main(argv=None) -> int:
    args = build_parser().parse_args(take_launcher_local_rank(sys.argv[1:] if argv is None else argv))
    return run_guarded(args.fn, args)


if __name__ == "__main__":
    sys.exit(main())
