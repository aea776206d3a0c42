"""Entry point of one worker process: ``python -m dltrain.trainers.worker RUN_DIR``.

Started by :mod:`dltrain.trainers.launch` through PyTorch's elastic agent. A
mistake the user can fix (a ConfigError or a DataError) exits with code 2 after
rank 0 has printed it; any other failure prints one line (the traceback with
--debug) and exits 1. The agent then ends the other workers.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from dltrain.data.readers import DataError
from dltrain.trainers.errors import ConfigError, Stopped
from dltrain.trainers.logs import debug_requested, quiet_libraries


def die_with_parent() -> None:
    """Ask Linux to end this worker if the process that started it dies."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


def main(argv: list[str] | None = None) -> None:
    die_with_parent()
    parser = argparse.ArgumentParser(prog="dltrain-worker")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--job", choices=("fit", "eval"), required=True)
    parser.add_argument("--ckpt", type=Path)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    debug = debug_requested()
    quiet_libraries(debug)
    rank = os.environ.get("RANK", "0")

    from dltrain.trainers.run import execute

    try:
        execute(args.run_dir, args.job, args.ckpt, resume=args.resume)
    except Stopped as err:  # every rank agreed to stop; last.ckpt is written
        if rank == "0":
            print(f"{err}; last.ckpt holds the last step", file=sys.stderr, flush=True)
        sys.exit(128 + err.signum)
    except (ConfigError, DataError) as err:
        if rank == "0":
            print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    except Exception as err:
        if debug:
            raise
        kind = "" if type(err).__name__ == "LossDiverged" else f"{type(err).__name__}: "
        print(f"error: [rank {rank}] {kind}{err}", file=sys.stderr, flush=True)
        sys.exit(1)

    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
