"""Shared fixtures: the real data folder and the real `dltrain` entry point."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# One setting finds the real data: DLTRAIN_DATA, by default ../shared/data.
DATA = Path(os.environ.get("DLTRAIN_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not DATA.is_dir():
        pytest.fail(f"real data folder {DATA} is missing; set DLTRAIN_DATA to its path")
    return DATA


def dltrain_exe() -> str:
    """The installed console script, next to this interpreter."""
    exe = Path(sys.executable).with_name("dltrain")
    return str(exe) if exe.exists() else shutil.which("dltrain") or "dltrain"


class Result:
    def __init__(self, proc: subprocess.CompletedProcess):
        self.code = proc.returncode
        self.out = proc.stdout
        self.err = proc.stderr

    def json(self) -> dict:
        return json.loads(self.out)

    def __repr__(self) -> str:
        return f"exit {self.code}\n--- stdout\n{self.out[-3000:]}\n--- stderr\n{self.err[-3000:]}"


def run_dltrain(
    *args: str, cwd: Path, timeout: float = 600, env: dict | None = None
) -> Result:
    """Run the real `dltrain` command, as a user would, in ``cwd``."""
    full_env = {**os.environ, "PYTHONWARNINGS": "default", **(env or {})}
    full_env.pop("COLUMNS", None)
    proc = subprocess.run(
        [dltrain_exe(), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        stdin=subprocess.DEVNULL,
    )
    return Result(proc)


@pytest.fixture
def dltrain(tmp_path: Path):
    """``dltrain(*args)`` runs the CLI in a fresh folder and returns a Result."""

    def call(*args: str, timeout: float = 600, env: dict | None = None) -> Result:
        return run_dltrain(*args, cwd=tmp_path, timeout=timeout, env=env)

    call.cwd = tmp_path
    return call


def start_until(
    cwd: Path, path: Path, *args: str, timeout: float = 300
) -> subprocess.Popen:
    """Start `dltrain ARGS` in its own session (like a job in a terminal, so a
    signal can go to its whole process group); return once ``path`` exists."""
    proc = subprocess.Popen(
        [dltrain_exe(), *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)
    return proc


def processes_mentioning(text: str) -> list[int]:
    """Pids of the other processes whose command line holds ``text``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if text in cmdline:
                pids.append(int(entry.name))
    return pids


def last_weights(run_dir: Path) -> dict:
    """The model weights in a run's checkpoints/last.ckpt."""
    import torch

    path = run_dir / "checkpoints" / "last.ckpt"
    return torch.load(path, weights_only=True, map_location="cpu")["state_dict"]


def assert_same_weights(a: Path, b: Path) -> None:
    """The last checkpoints of two runs hold bitwise equal weights."""
    import torch

    wa, wb = last_weights(a), last_weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
