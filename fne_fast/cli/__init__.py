"""The ``fne-fast`` command: train, eval, compare and search.

    fne-fast train --dataset emoji --sampler fne --epochs 5 --out runs/emoji-fne --seed 0 [--resume]
    fne-fast eval --checkpoint runs/emoji-fne [--split test]      (a run folder, or a checkpoint file in one)
    fne-fast compare --dataset emoji --samplers inbatch-hardest hardest uniform fne fne:fn_tau=inf --seeds 0 1 2 \\
        --out runs/cmp [--baseline inbatch-hardest [uniform ...]]
    torchrun --nproc_per_node 2 -m fne_fast.cli train ...   (W processes; --batch-size is per process)
    fne-fast train --tags                     (TAGS-DC synthetic negatives beside the sampler)
    fne-fast train --preset recommended       (named settings: authors, recommended)
    fne-fast search --checkpoint runs/emoji-fne --text "a red heart"   (or --image PATH)

A user's mistake (a setting, a data file, a checkpoint that does not verify, a folder in use) is one line on
stderr, ``fne-fast: error: …``, and exit code 2; a diverged run (NaN) or a system error (disk full) exit code 1;
SIGINT / SIGTERM exit codes 130 / 143 with where to resume. A traceback means a bug in fne_fast.

Under torchrun, train and compare run over the process group torchrun describes in the environment
(fne_fast/sampling/distributed.py); rank 0 prints and writes. A rank that fails makes the others stop with a
``PeerFailure`` (exit code 1); each rank's error line names it (``fne-fast: error: rank 1 of 2: …``), and a
traceback goes to torchrun's error file too, which torchrun reports as the failing rank's root cause.
"""

from __future__ import annotations

import os
import sys
import warnings

from torch.distributed.elastic.multiprocessing.errors import record

from fne_fast.cli.commands import check_compare_args, run_compare, run_eval, run_search, run_train
from fne_fast.cli.parser import build_parser, config_from_args, preset_named_in
from fne_fast.data import DatasetFormatError
from fne_fast.errors import NonFiniteError, UsageError
from fne_fast.models import MissingEncoderError
from fne_fast.runs.checkpoint import CheckpointError
from fne_fast.runs.folder import RunInterrupted, RunLockedError
from fne_fast.sampling import distributed

__all__ = ["main", "build_parser", "config_from_args"]

# Errors that are the user's to fix (exit code 2), and those of the run or the system (exit code 1).
_USER_ERRORS = (UsageError, DatasetFormatError, CheckpointError, RunLockedError, MissingEncoderError)
_RUN_ERRORS = (NonFiniteError, OSError, distributed.PeerFailure)


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"fne-fast: warning: {message}", file=sys.stderr if file is None else file, flush=True)


def _error_line(error) -> str:
    """``fne-fast: error: …``, naming this process under torchrun (each rank prints its own line)."""
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    rank = f"rank {os.environ.get('RANK', '0')} of {processes}: " if processes > 1 else ""
    return f"fne-fast: error: {rank}{error}"


# ``record``: under torchrun, an unexpected exception's traceback goes to torchrun's error file, which it reports
# as the failing rank's root cause.
@record
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(preset_named_in(argv))
    args = parser.parse_args(argv)
    if args.command == "compare":
        check_compare_args(parser, args)
    args.argv = argv  # the results table quotes the command that produced it
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warning
        try:
            if args.command in ("eval", "search"):  # one process's work
                return {"eval": run_eval, "search": run_search}[args.command](args)
            with distributed.process_group_from_environment(args.device) as group:
                return {"train": run_train, "compare": run_compare}[args.command](args, group)
        except RunInterrupted as interrupted:
            print(f"fne-fast: {interrupted}", file=sys.stderr, flush=True)
            return interrupted.exit_code
        except KeyboardInterrupt:  # Ctrl-C outside a run folder (eval)
            print("fne-fast: interrupted", file=sys.stderr, flush=True)
            return 130
        except _USER_ERRORS as error:
            print(_error_line(error), file=sys.stderr, flush=True)
            return 2
        except _RUN_ERRORS as error:
            print(_error_line(error), file=sys.stderr, flush=True)
            return 1
