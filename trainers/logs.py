"""Log levels shared by the CLI process and the worker processes."""

from __future__ import annotations

import logging
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
    """Library chatter at INFO only with --debug; warnings always; all on stderr."""
    import pytorch_lightning  # noqa: F401  (its import sets its own log level)

    logging.basicConfig(
        level=logging.INFO if debug else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if debug else logging.WARNING)
