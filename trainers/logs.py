"""Log levels shared by the CLI process and the worker processes."""

from __future__ import annotations

import logging
import os
import sys

LIBRARY_LOGGERS = (
    "pytorch_lightning",
    "pytorch_lightning.utilities.rank_zero",
    "lightning_fabric",
    "lightning_fabric.utilities.rank_zero",
    "lightning_fabric.utilities.distributed",
    "torch.distributed.elastic",
)


def quiet_libraries(debug: bool) -> None:
    """Library chatter at INFO only with --debug; warnings always; all on stderr.

    Lightning sets its own level when imported: trainers.run calls this again
    right after importing it.
    """
    logging.basicConfig(
        level=logging.INFO if debug else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if debug else logging.WARNING)


def debug_requested() -> bool:
    """The CLI's --debug, as the environment passes it to workers."""
    return os.environ.get("DLTRAIN_DEBUG") == "1"
