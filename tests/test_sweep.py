"""`dltrain sweep`: real trials (`dltrain fit` processes) on this machine's cores.

Each trial trains the CNN on scikit-learn's digits for one to four epochs; the
scheduler's promises are checked from the start and end times its journal holds.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from conftest import processes_mentioning, run_dltrain, start_until

pytestmark = pytest.mark.slow

SMALL = ("trainer.max_epochs=2", "report.plots=false")
ENV = {"OMP_NUM_THREADS": "1"}


def journal(folder: Path) -> list[dict]:
    return [
        json.loads(line) for line in (folder / "journal.jsonl").read_text().splitlines()
    ]


def attempts(folder: Path) -> list[tuple[float, float, list[str], str]]:
    """(start, end, slots, trial) of every finished attempt, from the journal."""
    started, spans = {}, []
    for event in journal(folder):
        if event["event"] == "started":
            started[event["trial"]] = event
        else:
            begin = started.pop(event["trial"])
            spans.append((begin["time"], event["time"], begin["slots"], event["trial"]))
    assert not started, f"attempts without an end: {started}"
    return spans


def most_at_once(spans) -> int:
    points = sorted([(s, 1) for s, *_ in spans] + [(e, -1) for _, e, *_ in spans])
    running = peak = 0
    for _, step in points:  # an end at the same instant as a start comes first
        running += step
        peak = max(peak, running)
    return peak


def assert_no_shared_device(spans) -> None:
    for i, (s1, e1, slots1, t1) in enumerate(spans):
        for s2, e2, slots2, t2 in spans[i + 1 :]:
            if s1 < e2 and s2 < e1:
                assert not set(slots1) & set(slots2), (t1, t2, slots1, slots2)


def results(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


def test_2x2_grid_on_2_slots_ranks_trials_and_keeps_its_folder(dltrain):
    grid = ("optim.lr=0.01,0.002", "model.hidden=32,64")
    r = dltrain("sweep", *grid, *SMALL, "sweep.dir=s", "--max-parallel", "2", env=ENV)
    assert r.code == 0, r
    folder = dltrain.cwd / "s"

    reports = sorted(folder.glob("trials/*/report.json"))
    assert [p.parent.name for p in reports] == ["000", "001", "002", "003"]
    table = results(folder)
    assert table["metric"] == "val_acc" and table["mode"] == "max"
    assert table["counts"]["finished"] == 4
    rows = table["trials"]
    scores = [row["metrics"]["val_acc"] for row in rows]
    assert scores == sorted(scores, reverse=True)
    assert rows[0]["best"] and not any(row["best"] for row in rows[1:])
    assert {
        (row["params"]["optim.lr"], row["params"]["model.hidden"]) for row in rows
    } == {
        ("0.01", "32"),
        ("0.01", "64"),
        ("0.002", "32"),
        ("0.002", "64"),
    }
    for row in rows:  # the table's test metrics are the trial's own report
        report = json.loads(
            (folder / "trials" / row["trial"] / "report.json").read_text()
        )
        assert row["metrics"]["accuracy"] == report["metrics"]["accuracy"]
        assert row["seconds"] > 0 and row["status"] == "finished"

    spans = attempts(folder)
    assert len(spans) == 4
    assert most_at_once(spans) <= 2
    assert_no_shared_device(spans)

    markdown = (folder / "results.md").read_text()
    assert "| best | " + rows[0]["trial"] + " |" in markdown
    assert "optim.lr" in markdown and "val_acc" in markdown

    again = dltrain("report", "s")
    assert again.code == 0, again
    lines = [line for line in again.out.splitlines() if "finished" in line]
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in lines]
    assert [c[1] for c in cells] == [row["trial"] for row in rows]
    assert [c[0] for c in cells] == ["best", "", "", ""]
    as_json = dltrain("report", "s", "--json")
    assert as_json.json()["trials"] == rows

    # The folder is this sweep's: another grid, or this one again, is refused.
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    other = dltrain("sweep", "optim.lr=0.5,0.6", *SMALL, "sweep.dir=s")
    assert other.code == 2, other
    assert "belongs to another sweep" in other.err and "--resume" in other.err
    same = dltrain("sweep", *grid, *SMALL, "sweep.dir=s", "--max-parallel", "2")
    assert same.code == 2 and "holds this sweep already" in same.err, same
    changed = dltrain("sweep", "--resume", "s", "optim.lr=0.1")
    assert changed.code == 2 and "drop --config and the overrides" in changed.err
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before
    nothing = dltrain("sweep", "--resume", "s")
    assert nothing.code == 0 and "nothing left to run" in nothing.err, nothing
    assert len(journal(folder)) == 8


def test_a_failing_trial_is_recorded_and_the_others_finish(dltrain):
    grid = "optim.lr=0.01,0.005,1e12,0.002"  # 1e12: the loss is NaN at step 1
    r = dltrain("sweep", grid, *SMALL, "sweep.dir=s", "--max-parallel", "2", env=ENV)
    assert r.code == 1, r
    assert "1 of 4 trials failed" in r.err
    folder = dltrain.cwd / "s"
    rows = results(folder)["trials"]
    failed = [row for row in rows if row["status"] == "failed"]
    assert [row["trial"] for row in failed] == ["002"]
    assert failed[0]["exit_code"] == 1
    assert "loss became nan" in failed[0]["error"]
    assert rows[-1]["trial"] == "002"  # no metric: ranked last
    finished = [row["trial"] for row in rows if row["status"] == "finished"]
    assert sorted(finished) == ["000", "001", "003"]
    for trial in finished:
        assert (folder / "trials" / trial / "report.json").is_file()
    assert "loss became nan" in (folder / "results.md").read_text()

    kept = dltrain("sweep", "--resume", "s")
    assert kept.code == 1 and "add --retry-failed" in kept.err, kept
    retried = dltrain("sweep", "--resume", "s", "--retry-failed", env=ENV)
    assert retried.code == 1, retried
    starts = [e["trial"] for e in journal(folder) if e["event"] == "started"]
    assert sorted(starts) == ["000", "001", "002", "002", "003"]


def test_an_interrupted_sweep_resumes_only_the_missing_trials(dltrain):
    folder = dltrain.cwd / "s"
    proc = start_until(
        dltrain.cwd,
        folder / "trials" / "001" / "checkpoints" / "last.ckpt",
        "sweep",
        "optim.lr=0.01,0.005",
        "model.hidden=32,64",
        "trainer.max_epochs=12",  # the stop lands well before the trial's end
        "report.plots=false",
        "sweep.dir=s",
        "--max-parallel",
        "1",
    )
    live = dltrain("report", "s", "--json")  # while the sweep runs
    assert {row["trial"]: row["status"] for row in live.json()["trials"]} == {
        "000": "finished",
        "001": "running",
        "002": "queued",
        "003": "queued",
    }
    os.kill(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "--resume" in err
    assert processes_mentioning(str(folder)) == []
    status = {row["trial"]: row["status"] for row in results(folder)["trials"]}
    assert status == {
        "000": "finished",
        "001": "interrupted",
        "002": "queued",
        "003": "queued",
    }

    # From another folder: the sweep runs from the one it started in.
    r = run_dltrain("sweep", "--resume", str(folder), cwd=folder / "logs", env=ENV)
    assert r.code == 0, r
    assert "3 to run, 1 kept" in r.err
    assert not (folder / "logs" / "runs").exists()
    starts = [e["trial"] for e in journal(folder) if e["event"] == "started"]
    assert starts == ["000", "001", "001", "002", "003"]
    manifest = json.loads((folder / "trials" / "001" / "manifest.json").read_text())
    assert manifest["status"] == "finished"
    assert len(manifest["resumes"]) == 1  # continued from its checkpoint
    assert results(folder)["counts"]["finished"] == 4
    assert most_at_once(attempts(folder)) == 1


def test_a_killed_sweep_stops_its_trials_and_resumes(dltrain):
    """SIGKILL leaves the sweep no chance to clean up: its trials still get
    SIGTERM from the kernel (they save their checkpoint), and nothing runs on."""
    folder = dltrain.cwd / "s"
    proc = start_until(
        dltrain.cwd,
        folder / "trials" / "000" / "checkpoints" / "last.ckpt",
        "sweep",
        "optim.lr=0.01,0.005",
        "trainer.max_epochs=12",
        "report.plots=false",
        "sweep.dir=s",
        "--max-parallel",
        "1",
    )
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    deadline = time.monotonic() + 60
    while processes_mentioning(str(folder)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_mentioning(str(folder)) == []
    manifest = json.loads((folder / "trials" / "000" / "manifest.json").read_text())
    assert manifest["status"] == "interrupted"

    r = dltrain("sweep", "--resume", "s", env=ENV)
    assert r.code == 0, r
    assert "2 to run, 0 kept" in r.err
    manifest = json.loads((folder / "trials" / "000" / "manifest.json").read_text())
    assert manifest["status"] == "finished" and len(manifest["resumes"]) == 1
    assert results(folder)["counts"]["finished"] == 2


def test_trials_are_packed_onto_free_cores_and_never_share_one(dltrain):
    cores = len(os.sched_getaffinity(0))
    if cores < 2:
        pytest.skip("packing a 1-core and a 2-core trial needs 2 cores")
    r = dltrain(
        "sweep",
        "strategy=ddp",
        "trainer.devices=1,2",
        "seed=1,2",
        "trainer.max_epochs=1",
        "report.plots=false",
        "sweep.dir=s",
        env=ENV,
    )
    assert r.code == 0, r
    folder = dltrain.cwd / "s"
    spans = attempts(folder)
    devices = {"000": 1, "001": 1, "002": 2, "003": 2}
    assert sorted(t for *_, t in spans) == sorted(devices)
    for start, _end, slots, trial in spans:
        assert len(slots) == devices[trial]
        busy = sum(
            devices[t] for s, e, _, t in spans if s <= start < e
        )  # devices held when this trial started
        assert busy <= cores, (trial, busy)
    assert_no_shared_device(spans)
    first, second = (next(sp for sp in spans if sp[3] == t) for t in ("000", "001"))
    assert (
        first[0] < second[1] and second[0] < first[1]
    )  # the two 1-core trials overlap


def test_fit_multirun_is_a_sweep(dltrain):
    # Run from a SLURM batch script's shell (task 0 of a 4-task allocation): the
    # trials are jobs of their own and must not wait for the allocation's tasks.
    slurm = {"SLURM_NTASKS": "4", "SLURM_PROCID": "0", "SLURM_NNODES": "1"}
    r = dltrain(
        "fit",
        "-m",
        "optim.lr=0.01,0.002",
        "trainer.max_epochs=1",
        "report.plots=false",
        "sweep.dir=m",
        env={**ENV, **slurm},
    )
    assert r.code == 0, r
    assert len(list((dltrain.cwd / "m").glob("trials/*/report.json"))) == 2
    assert "ranked by val_acc" in r.out


def test_submitit_runs_the_trials_and_records_a_failure(dltrain):
    r = dltrain(
        "sweep",
        "optim.lr=0.01,1e12",
        "trainer.max_epochs=1",
        "report.plots=false",
        "sweep.launcher=submitit_local",
        "sweep.dir=s",
        env=ENV,
    )
    assert r.code == 1, r
    folder = dltrain.cwd / "s"
    status = {row["trial"]: row for row in results(folder)["trials"]}
    assert status["000"]["status"] == "finished"
    assert status["001"]["status"] == "failed"
    assert "loss became nan" in status["001"]["error"]
    # submitit's own files: its pickled job and its logs.
    assert list((folder / "submitit").glob("*_submitted.pkl"))
    assert list((folder / "submitit").glob("*_log.out"))


def test_a_stopped_submitit_sweep_stops_its_trials_and_resumes(dltrain):
    folder = dltrain.cwd / "s"
    proc = start_until(
        dltrain.cwd,
        folder / "trials" / "000" / "checkpoints" / "last.ckpt",
        "sweep",
        "optim.lr=0.01,0.005",
        "trainer.max_epochs=300",  # stopped long before
        "report.plots=false",
        "sweep.launcher=submitit_local",
        "sweep.dir=s",
        "--max-parallel",
        "1",
    )
    os.kill(proc.pid, signal.SIGTERM)  # the sweep alone, as a scheduler would
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert processes_mentioning(str(folder)) == []
    status = {row["trial"]: row["status"] for row in results(folder)["trials"]}
    assert status == {"000": "interrupted", "001": "queued"}
    manifest = json.loads((folder / "trials" / "000" / "manifest.json").read_text())
    assert manifest["status"] == "interrupted"

    r = dltrain("sweep", "--resume", "s", "trainer.max_epochs=2")
    assert r.code == 2, r  # a resume runs the saved grid
    assert status == {row["trial"]: row["status"] for row in results(folder)["trials"]}


@pytest.mark.parametrize(
    "args, says",
    [
        (["trainer.max_epochs=1"], "the grid is empty"),
        (["optim.lrr=0.1,0.2"], "optim.lrr"),
        (["seed=range(1,1)"], "expands to no values"),
        (["strategy=ddp", "trainer.devices=1,64"], "needs trainer.devices=64"),
        (["optim.lr=0.1,0.2", "run.dir=x"], "sets run.dir itself"),
        (["optim.lr=0.1,0.2", "--max-parallel", "0"], "--max-parallel 0"),
        (["optim.lr=0.1,0.2", "sweep.launcher=slurm"], "sbatch"),
        (["--resume", "nowhere"], "no such sweep folder"),
        (["data=mnist", "data.root=nowhere", "optim.lr=0.1,0.2"], "data.root="),
        (["optim.lr=0.1,0.2", "sweep.metric=acc"], "sweep.metric='acc'"),
        (["seed=range(0,20000)"], "more than the 10,000"),
        (["--bogus", "optim.lr=0.1,0.2"], "unknown option '--bogus'"),
        (["optim.lr=0.1,0.2", "trainer.num_nodes=2", "strategy=ddp"], "num_nodes=2"),
    ],
)
def test_bad_input_starts_nothing(dltrain, args, says):
    r = dltrain("sweep", *args)
    assert r.code == 2, r
    assert says in r.err, r
    assert len(r.err.strip().splitlines()) == 1, r
    assert not (dltrain.cwd / "sweeps").exists()
    assert not (dltrain.cwd / "runs").exists()


def test_a_sweep_started_on_every_rank_is_refused(dltrain):
    torchrun = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}  # rank 0 says it
    r = dltrain("sweep", "optim.lr=0.1,0.2", env=torchrun)
    assert r.code == 2 and "one of 2 processes" in r.err, r
    assert not (dltrain.cwd / "sweeps").exists()


def test_slurm_jobs_ask_for_each_trials_resources(tmp_path, monkeypatch):
    """submitit writes the sbatch script from the trial's config. No SLURM here:
    a stand-in `srun` on PATH lets submitit's SLURM executor be built; the script
    is generated, never submitted."""
    import submitit

    from dltrain.trainers.slurm import slurm_parameters
    from dltrain.trainers.sweep import Trial

    stand_in = tmp_path / "bin" / "srun"
    stand_in.parent.mkdir()
    stand_in.write_text("#!/bin/sh\nexit 1\n")
    stand_in.chmod(0o755)
    monkeypatch.setenv("PATH", f"{stand_in.parent}:{os.environ['PATH']}")

    trial = Trial("003", ["optim.lr=0.1"], {"optim.lr": "0.1"}, 4, 2, "gpu")
    slurm = {
        "partition": "gpu",
        "account": "proj",
        "timeout_min": 90,
        "cpus_per_task": 8,
    }
    executor = submitit.AutoExecutor(folder=tmp_path / "jobs", cluster="slurm")
    executor.update_parameters(**slurm_parameters(trial, slurm, "sweep-003"))
    script = executor._executor._make_submission_file_text("dltrain fit", "uid")
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj",
        "#SBATCH --time=90",
        "#SBATCH --signal=USR2@120",
        "#SBATCH --job-name=sweep-003",
    ):
        assert line in script, (line, script)

    cpu = Trial("000", [], {}, 2, 1, "cpu")
    assert "gpus_per_node" not in slurm_parameters(cpu, slurm, "x")
