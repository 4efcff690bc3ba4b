"""`gradmix-train`: run a job from its TOML file (alone, or under torchrun / deepspeed).

    gradmix-train --config job.toml [--server HOST:PORT] [--store URL] [--output-dir DIR]
                  [--upload]

A run resumes from `<output_dir>/checkpoints` when a checkpoint is there.
Before anything heavy is built the job is checked (`trainer.preflight`): a
bad file, policy, server or store ends the run in seconds with one line and
exit status 2. A run the server refuses later ends with one line and status 1
(`on_server_error`). Every run ends with a summary (`trainer.summary`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from gradmix.trainer.config import load_config
from gradmix.trainer.errors import ConfigError, DataError, TrainerError


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (flags override the file and GRADMIX_* variables)."""
    parser = argparse.ArgumentParser(prog="gradmix-train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the job's TOML file")
    parser.add_argument("--server", help="host:port of the selection server")
    parser.add_argument("--store", help="sketch store path or fsspec URL")
    parser.add_argument("--output-dir", help="checkpoints and per-rank logs")
    parser.add_argument("--upload", action="store_true", default=None,
                        help="send sketch rows over gRPC; the store is never opened")
    parser.add_argument("--log-level", default="INFO", help="Python logging level")
    parser.add_argument(
        "--local_rank",
        "--local-rank",
        type=int,
        default=None,
        help="set by the deepspeed launcher (LOCAL_RANK wins when set)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code (2 for a configuration error)."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    try:
        config = load_config(
            args.config,
            server=args.server,
            store=args.store,
            upload=args.upload,
            output_dir=str(Path(args.output_dir).resolve()) if args.output_dir else None,
        )
    except TrainerError as error:
        print(f"gradmix-train: {error}", file=sys.stderr)
        return 2
    try:  # heavy imports (torch, deepspeed) after a valid config
        from gradmix.trainer.preflight import preflight
        from gradmix.trainer.setup import build_tokenizer
        from gradmix.trainer.train import train
    except ImportError as error:
        print(
            f"gradmix-train: {error.name or error} is not installed: the trainer needs "
            "the trainer extra, pip install 'gradmix[trainer]'",
            file=sys.stderr,
        )
        return 2
    try:
        config = preflight(config, build_tokenizer(config.tokenizer))
        result = train(config)
    except (ConfigError, DataError) as error:
        print(f"gradmix-train: {error}", file=sys.stderr)
        return 2
    except TrainerError as error:
        print(f"gradmix-train: {error}", file=sys.stderr)
        return 1
    logging.getLogger("gradmix.trainer").info(
        "done: %d steps, mixture version %d, anchor %s",
        result.steps,
        result.mixture_version,
        result.anchor or "-",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
