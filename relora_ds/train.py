"""`deepspeed --module relora_ds.train --config RUN.yaml --deepspeed_config ds_configs/X.json [--set k=v ...]`.

Also what `relora-ds train` and `torchrun -m relora_ds.train` run. Accepts the launcher's --local_rank. Holds the
one error policy of every command (`run_guarded`: the project's errors are one line and exit code 2; a run a stop
signal ended is one line and exit code 75), which the CLI imports from here.
"""

import argparse
import sys


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="RUN.yaml", default=None,
                        help="run config (YAML/JSON); defaults apply to every field it leaves out")
    parser.add_argument("--deepspeed_config", "--deepspeed-config", metavar="DS.json", default=None,
                        help="DeepSpeed JSON (batch sizes, precision, ZeRO, optimizer); overrides "
                             "train.deepspeed_config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config field, e.g. --set relora.rank=64 (repeatable)")
    parser.add_argument("--output_dir", "--output-dir", default=None, help="overrides train.output_dir")
    parser.add_argument("--resume", nargs="?", const="true", default=None, choices=("true", "auto", "false"),
                        metavar="auto",
                        help="continue the run in train.output_dir from its newest complete checkpoint: "
                             "--resume sets train.resume=true (error without a checkpoint); --resume auto sets "
                             "train.resume=auto (start fresh without one: for preemptible/requeued jobs); "
                             "--resume true / false are accepted too")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher; the rank comes from the environment")


def config_from_args(args):
    from relora_ds.config import load_config

    overrides = list(args.overrides)
    if args.deepspeed_config:
        overrides.append(f"train.deepspeed_config={args.deepspeed_config}")
    if args.output_dir:
        overrides.append(f"train.output_dir={args.output_dir}")
    if args.resume is not None:
        overrides.append(f"train.resume={args.resume}")
    return load_config(args.config, overrides)


def run_train(args) -> int:
    import os

    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    cfg = config_from_args(args)
    from relora_ds import trainer

    trainer.train_command(cfg, "run the same command with --resume to continue")
    return 0


def project_errors() -> tuple:
    """The error classes whose message is the whole story: print one line, exit 2, no traceback."""
    from relora_ds.config import ConfigError
    from relora_ds.data import DataError
    from relora_ds.engine.checkpoint import CheckpointError
    from relora_ds.engine.ds_config import DSConfigError
    from relora_ds.engine.versions import UnsupportedVersionError
    from relora_ds.errors import RunError

    return ConfigError, DataError, CheckpointError, DSConfigError, UnsupportedVersionError, RunError


def run_guarded(fn, args) -> int:
    from relora_ds import dist
    from relora_ds.stop import EXIT_STOPPED, Stopped, record_stop

    try:
        return fn(args)
    except project_errors() as e:
        for line in str(e).splitlines() or [type(e).__name__]:
            print(f"error: {line}", file=sys.stderr)
        return 2
    except Stopped as e:  # a stop signal ended a run at a checkpoint: not an error, resumable
        if dist.is_rank_zero():
            print(str(e), file=sys.stderr)
            record_stop(e)
        return EXIT_STOPPED


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="relora_ds.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    return run_guarded(run_train, args)


if __name__ == "__main__":
    sys.exit(main())
