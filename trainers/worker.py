"""Entry point of one worker process: ``python -m dltrain.trainers.worker RUN_DIR``.

Started by :mod:`dltrain.trainers.launch` through PyTorch's elastic agent. A
mistake the user can fix (a ConfigError or a DataError) exits with code 2 after
rank 0 has printed it; anything else is recorded for the agent, which ends the
other workers and reports the first failure.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from dltrain.data.readers import DataError
from dltrain.trainers.errors import ConfigError
from dltrain.trainers.logs import quiet_libraries


@record
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dltrain-worker")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--job", choices=("fit", "eval"), required=True)
    parser.add_argument("--ckpt", type=Path)
    args = parser.parse_args(argv)
    quiet_libraries(debug=os.environ.get("DLTRAIN_DEBUG") == "1")

    from dltrain.trainers.run import execute

    try:
        execute(args.run_dir, args.job, args.ckpt)
    except (ConfigError, DataError) as err:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
