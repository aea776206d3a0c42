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


def join_process_group(run_dir: Path, restart: int) -> None:
    """Form the default process group (Lightning then uses it) on a store
    prefix of this attempt: after a restart, the agent's store still holds the
    addresses the previous attempt's ranks published, and gloo would dial them."""
    import torch
    import torch.distributed as dist

    from dltrain.trainers.rundir import load_config

    env = os.environ
    world = int(env.get("WORLD_SIZE", "1"))
    if world == 1 or dist.is_initialized():
        return
    cfg = load_config(run_dir)
    on_gpu = torch.cuda.is_available() and cfg.trainer.accelerator.value != "cpu"
    if on_gpu:
        torch.cuda.set_device(int(env["LOCAL_RANK"]))
    backend = cfg.strategy.get("backend") or ("nccl" if on_gpu else "gloo")
    rank = int(env["RANK"])
    agent_store = env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        env["MASTER_ADDR"],
        int(env["MASTER_PORT"]),
        world,
        is_master=rank == 0 and not agent_store,
    )
    dist.init_process_group(
        backend,
        store=dist.PrefixStore(f"dltrain/attempt_{restart}", store),
        rank=rank,
        world_size=world,
    )


def _record_error(err: BaseException) -> None:
    from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

    ErrorHandler().record_exception(err)


def previous_failures(restart: int) -> list[str]:
    """What ended the previous attempt, rank by rank: the agent gives each
    attempt a folder .../attempt_N/<local rank>/ where a failing worker records
    its error; a rank with none there was killed (first in the list: the cause)."""
    import json

    own = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not own:
        return []
    previous = Path(own).parent.parent.with_name(f"attempt_{restart - 1}")
    killed, failed = [], []
    for folder in sorted(p for p in previous.glob("*") if p.is_dir()):
        try:
            data = json.loads((folder / "error.json").read_text())
            failed.append(f"local rank {folder.name}: {data['message']['message']}")
        except (OSError, ValueError, KeyError, TypeError):
            killed.append(
                f"local rank {folder.name} died without recording an error "
                "(killed by a signal, or out of memory)"
            )
    return killed + failed


def record_restart(run_dir: Path, restart: int, resumed: bool) -> None:
    """Rank 0 of a restarted group: the restart and its cause go into the manifest."""
    from dltrain.trainers import rundir

    manifest = rundir.read_manifest(run_dir)
    causes = previous_failures(restart) or [
        "a worker process died without recording an error (killed by a signal, "
        "or out of memory)"
    ]
    restarts = manifest.get("restarts", [])
    restarts.append(
        {
            "attempt": restart,
            "at": rundir.finished_at(),
            "causes": causes,
            "resumed_from": "checkpoints/last.ckpt" if resumed else "the beginning",
        }
    )
    rundir.update_manifest(run_dir, restarts=restarts, status="running")
    print(
        f"restart {restart}: {causes[0]}; resuming from "
        f"{'last.ckpt' if resumed else 'the beginning'}",
        file=sys.stderr,
        flush=True,
    )


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

    resume = args.resume
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if restart and args.job == "fit":  # the agent restarted us after a failure
        resume = (args.run_dir / "checkpoints" / "last.ckpt").is_file()
        if rank == "0":
            record_restart(args.run_dir, restart, resume)
    try:
        join_process_group(args.run_dir, restart)
        execute(args.run_dir, args.job, args.ckpt, resume=resume)
        code = 0
    except Stopped as err:  # every rank agreed to stop; last.ckpt is written
        if rank == "0":
            print(f"{err}; last.ckpt holds the last step", file=sys.stderr, flush=True)
        code = 128 + err.signum
    except (ConfigError, DataError) as err:
        if rank == "0":
            print(f"error: {err}", file=sys.stderr, flush=True)
        code = 2
    except Exception as err:
        _record_error(err)  # for the restart's manifest entry, and the agent
        if debug:
            raise
        kind = "" if type(err).__name__ == "LossDiverged" else f"{type(err).__name__}: "
        print(f"error: [rank {rank}] {kind}{err}", file=sys.stderr, flush=True)
        code = 1
    leave(code)


def leave(code: int) -> None:
    """End a process that joined a process group, with ``code``.

    The group is destroyed, the streams flushed, and the interpreter left at
    once: C++ destructors of torch's communication threads at interpreter exit
    once aborted a finished run ("terminate called without an active
    exception"), turning its exit code into SIGABRT.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # a peer already gone: nothing left to tear down
            pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
