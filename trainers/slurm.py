"""Sweep trials as SLURM jobs through submitit (or submitit's local executor).

submitit writes the sbatch script, submits, requeues on preemption and reports
each job's end; dltrain only says what a trial needs: nodes, one task per
device, GPUs, CPUs, time. Each task runs the trial's `dltrain fit` line, which
under srun joins its ranks through SLURM's variables.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import submitit

from dltrain.trainers.sweep import STOP_SIGNALS, trial_environment


class TrialCommand(submitit.helpers.Checkpointable):
    """Run one trial's command in a SLURM task; output to the sweep's log.

    On preemption or time-out submitit calls :meth:`checkpoint` on task 0: the
    trial is told to stop (SIGUSR1: it saves last.ckpt at its next step, and its
    other ranks stop with it), and the job is requeued with the same command,
    which continues the trial from that checkpoint (run.resume=auto).
    """

    def __init__(
        self, command: list[str], env: dict[str, str], log: str, alone: bool = False
    ):
        self.command = command
        self.env = env
        self.log = log
        self.alone = alone  # a one-task job on this machine: no launcher variables
        self._proc: subprocess.Popen | None = None

    def __call__(self) -> int:
        rank = submitit.JobEnvironment().global_rank
        log = Path(self.log if rank == 0 else f"{self.log[:-4]}.rank{rank}.log")
        with log.open("ab") as out:
            self._proc = subprocess.Popen(
                self.command,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**(trial_environment() if self.alone else os.environ), **self.env},
            )
            # A stop from the sweep (its signal, or scancel --signal) reaches the
            # trial, which saves its last.ckpt and ends with 128 + signal.
            for signum in STOP_SIGNALS:
                signal.signal(signum, self._forward)
            if rank == 0:
                Path(pid_file(self.log)).write_text(str(os.getpid()))
            return self._proc.wait()

    def _forward(self, signum: int, _frame: Any) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signum)

    def checkpoint(
        self, *args: Any, **kwargs: Any
    ) -> submitit.helpers.DelayedSubmission:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGUSR1)
            self._proc.wait()
        return submitit.helpers.DelayedSubmission(
            TrialCommand(self.command, self.env, self.log, self.alone)
        )

    def __getstate__(self) -> dict[str, Any]:
        return {
            "command": self.command,
            "env": self.env,
            "log": self.log,
            "alone": self.alone,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)


def pid_file(log: str | Path) -> str:
    """Where a job's task 0 writes its pid, beside the trial's log."""
    return str(log)[: -len(".log")] + ".pid"


def slurm_parameters(trial, slurm: dict[str, Any], name: str) -> dict[str, Any]:
    """submitit's parameters for one trial: its resources come from its config."""
    gpus = trial.accelerator != "cpu"
    params: dict[str, Any] = {
        "name": name,
        "nodes": trial.num_nodes,
        "tasks_per_node": trial.devices,  # one task per device, as srun launches
        "cpus_per_task": slurm.get("cpus_per_task", 4),
        "timeout_min": slurm.get("timeout_min", 60),
        "slurm_signal_delay_s": 120,  # time to write last.ckpt before the kill
    }
    if gpus:
        params["gpus_per_node"] = trial.devices
    for key in ("partition", "account", "qos", "constraint"):
        if slurm.get(key):
            params[f"slurm_{key}"] = slurm[key]
    if slurm.get("mem_gb"):
        params["mem_gb"] = slurm["mem_gb"]
    return params


class SubmititLauncher:
    """Start trials as submitit jobs: on SLURM, or on this machine (``local``)."""

    def __init__(self, sweep, launcher: str, kind: str):
        self.sweep = sweep
        self.local = launcher == "submitit_local"
        self.kind = kind
        self.folder = sweep.folder / "submitit"

    def start(self, command: list[str], log: Path, slots: list[str], devices: int):
        trial_id = log.stem
        trial = next(t for t in self.sweep.trials if t.id == trial_id)
        executor = submitit.AutoExecutor(
            folder=self.folder, cluster="local" if self.local else "slurm"
        )
        env: dict[str, str] = {}
        if self.local:
            # One task: the trial's own launcher starts its processes; it gets the
            # devices the scheduler gave it.
            executor.update_parameters(
                timeout_min=self.sweep.spec["slurm"].get("timeout_min", 60),
                tasks_per_node=1,
                nodes=1,
            )
            if self.kind == "gpu":
                env["CUDA_VISIBLE_DEVICES"] = ",".join(slots)
            else:
                env["OMP_NUM_THREADS"] = str(max(1, len(slots) // devices))
        else:
            name = f"{Path(self.sweep.folder).name}-{trial_id}"
            executor.update_parameters(
                **slurm_parameters(trial, self.sweep.spec["slurm"], name)
            )
        Path(pid_file(log)).unlink(missing_ok=True)
        job = executor.submit(TrialCommand(command, env, str(log), self.local))
        job.pid_file = Path(pid_file(log))
        return job

    def poll(self, job) -> int | None:
        if not job.done():
            return None
        if self.local and not job.paths.result_pickle.exists():
            # Its controller ended without a result (a signal reached it too).
            code = job._process.returncode if job._process is not None else None
            return 128 - code if code is not None and code < 0 else (code or 1)
        try:
            codes = job.results()
        except Exception:  # the job died before reporting (cancelled, node failure)
            state = str(job.state).upper()
            return 128 + int(signal.SIGTERM) if "CANCEL" in state else 1
        bad = [c for c in codes if c]
        return bad[0] if bad else 0

    def stop(self, job, signum: int) -> None:
        """Pass the sweep's stop signal on to the trial's own process."""
        if job.done():
            return
        if self.local:
            for _ in range(50):  # a job that has just started writes it at once
                try:
                    os.kill(int(job.pid_file.read_text()), signum)
                    return
                except (OSError, ValueError):
                    time.sleep(0.1)
            job.cancel(check=False)  # it never started its trial: nothing to save
            return
        if str(job.state).upper() == "PENDING":
            job.cancel(check=False)
            return
        name = signal.Signals(signum).name.removeprefix("SIG")
        subprocess.run(
            ["scancel", f"--signal={name}", str(job.job_id)],
            check=False,
            capture_output=True,
        )
