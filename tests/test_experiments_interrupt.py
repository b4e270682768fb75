"""The experiment runner owns its workers: signals stop them all, none outlives the runner,
an interrupted grid resumes exactly, and one run directory has one writer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import process_alive
from safetensors.torch import load_file

import medmoe.experiments.runner as runner
from medmoe.experiments import RunSpec, main, run_spec
from medmoe.run_lock import LOCK_FILE, RunDirectoryBusy, RunDirectoryLock

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
RUN = "med_moe_lora/seed_0"  # the grid's one trained run (the other is the base model)


def tiny_grid(folder: Path) -> Path:
    """Two runs: the base model, and a 200-step fit of a tiny Llama (seconds)."""
    grid = {
        "name": "tiny",
        "base": [str(ROOT / "configs" / "demo.yaml"), str(ROOT / "tests/configs/tiny_fit.yaml")],
        "seeds": [0],
        "overrides": {"trainer.max_steps": 200},
        "eval": {"limit": 4, "batch_size": 8, "max_new_tokens": 4, "tasks": ["medqa", "pubmedqa"]},
        "methods": [{"name": "med_moe_lora", "configs": []}],
    }
    path = folder / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def grid_args(grid: Path, out: Path, *extra: str) -> list[str]:
    return [str(grid), "--out", str(out), "--threads", "1", *extra]


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def wait_gone(pids: list[int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while any(process_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [p for p in pids if process_alive(p)]


def raising(error: BaseException):
    def execute(spec):
        raise error

    return execute


def same_results(got: Path, want: Path) -> None:
    for run in ("base", RUN):
        a = json.loads((got / run / "results.json").read_text())
        b = json.loads((want / run / "results.json").read_text())
        for key in ("scores", "metrics", "global_step", "params"):
            assert a[key] == b[key], (run, key)
    a = load_file(got / RUN / "adapter" / "adapter_model.safetensors")
    b = load_file(want / RUN / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path]:
    """The tiny grid, uninterrupted (in this process): its grid file and output folder."""
    folder = tmp_path_factory.mktemp("reference")
    grid = tiny_grid(folder)
    assert main(grid_args(grid, folder / "out", "--in-process")) == 0
    return grid, folder / "out"


# ------------------------------------------------------------------ signals to the runner
@pytest.mark.slow
@pytest.mark.parametrize(
    "signum, fresh",
    [
        (signal.SIGINT, False),
        (signal.SIGTERM, False),
        (signal.SIGKILL, False),
        (signal.SIGKILL, True),
    ],
    ids=["SIGINT", "SIGTERM", "SIGKILL", "SIGKILL-fresh-processes"],
)
def test_a_signal_to_the_runner_stops_every_worker_and_the_grid_resumes_exactly(
    tmp_path, reference, capsys, signum, fresh
):
    grid, want = reference
    out = tmp_path / "out"
    command = [sys.executable, "-m", "medmoe.experiments", *grid_args(grid, out)]
    if fresh:
        command.append("--fresh-processes")
    proc = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    last = out / RUN / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 180
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # the first rolling checkpoint (step 5): the fit is training
    assert last.exists(), proc.communicate(timeout=60)[0].decode()[-3000:]
    workers = children(proc.pid)
    assert workers, "the runner has no worker process"
    began = time.monotonic()
    proc.send_signal(signum)
    printed = proc.communicate(timeout=60)[0].decode()
    assert time.monotonic() - began < 60
    assert wait_gone(workers, 60 - (time.monotonic() - began)) == [], "a worker outlived it"
    if signum == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 128 + signum, printed[-3000:]
        name = signal.Signals(signum).name
        assert f"stopped by {name}: 1 of 2 runs have results (base)" in printed
        assert (
            f"left: med_moe_lora seed 0 (interrupted, resumes from {Path('checkpoints/last.ckpt')})"
            in printed
        )
        assert "run the same command again to resume" in printed
    assert not (out / RUN / "results.json").exists()  # exit 143 is not a finished run
    step = torch.load(last, weights_only=True)["global_step"]
    assert 5 <= step < 200  # the fit saved where the signal stopped it

    capsys.readouterr()
    assert main(grid_args(grid, out, "--in-process")) == 0  # the restart
    printed = capsys.readouterr().out
    assert "base: results exist, skipped" in printed and "med_moe_lora seed 0: done" in printed
    resumed = json.loads((out / RUN / "results.json").read_text())
    assert resumed["resumed_from"] == str(last)
    same_results(out, want)


def test_an_interrupted_fit_is_never_recorded_as_finished(tmp_path, monkeypatch) -> None:
    spec = RunSpec(method="m", seed=0, run_dir=tmp_path / "m", cli_args=["fit"])
    for code, status in ((143, "interrupted"), (130, "interrupted"), (2, "failed")):
        monkeypatch.setattr(runner, "execute", raising(SystemExit(code)))
        outcome = run_spec(spec, mode="in-process")
        assert outcome.status == status, code
        assert not (tmp_path / "m" / "results.json").exists()
    assert outcome.error == "RuntimeError: the run exited with status 2"
    monkeypatch.setattr(runner, "execute", raising(KeyboardInterrupt()))
    outcome = run_spec(spec, mode="in-process")
    assert (outcome.status, outcome.interrupted_by) == ("interrupted", "SIGINT")
    assert outcome.error == "stopped by SIGINT; starts over: no checkpoint yet"


def test_a_fresh_worker_that_exits_143_is_interrupted(tmp_path, monkeypatch) -> None:
    real = subprocess.Popen

    def exits_143(command, **kwargs):
        return real([sys.executable, "-c", "raise SystemExit(143)"], **kwargs)

    monkeypatch.setattr(runner.subprocess, "Popen", exits_143)
    spec = RunSpec(method="m", seed=0, run_dir=tmp_path / "m", cli_args=["fit"])
    outcome = run_spec(spec, mode="process")
    assert (outcome.status, outcome.interrupted_by) == ("interrupted", "SIGTERM")
    assert not (tmp_path / "m" / "results.json").exists()
    assert not (tmp_path / "m" / "error.txt").exists()


# ------------------------------------------------------------------ workers die with the runner
PARENT = """
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", {child!r}])
child.wait()
"""


@pytest.mark.parametrize("armed", [True, False], ids=["prctl", "watchdog-only"])
def test_a_worker_dies_with_its_parent_even_a_killed_one(tmp_path, armed) -> None:
    """kill -9 of the parent: the child ends (PR_SET_PDEATHSIG's SIGTERM, or the watchdog's
    own, then its SIGKILL after the grace when SIGTERM is ignored)."""
    pid_file = tmp_path / "child.pid"
    start = (
        "die_with_parent(os.getppid())"
        if armed
        else "signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "threading.Thread(target=_watch_parent, args=(os.getppid(), False, 1.0)).start()"
    )
    child = textwrap.dedent(
        f"""
        import os, signal, threading, time
        from medmoe.experiments.worker import _watch_parent, die_with_parent
        {start}
        open({str(pid_file)!r}, "w").write(str(os.getpid()))
        time.sleep(120)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", PARENT.format(child=child)], env=ENV)
    deadline = time.monotonic() + 60
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline and parent.poll() is None
        time.sleep(0.05)
    pid = int(pid_file.read_text())
    assert process_alive(pid)
    parent.kill()
    parent.wait()
    assert wait_gone([pid], 15) == []


# ------------------------------------------------------------------ one writer per run directory
def test_a_second_writer_is_refused_naming_the_holder(tmp_path: Path) -> None:
    run_dir = tmp_path / "lora" / "seed_0"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from medmoe.run_lock import RunDirectoryLock; "
            f"RunDirectoryLock({str(run_dir)!r}).acquire(); print('held', flush=True); "
            "time.sleep(120)",
        ],
        env=ENV,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirectoryBusy) as busy:
            RunDirectoryLock(run_dir).acquire()
        message = str(busy.value)
        assert "\n" not in message and f"in use by process {holder.pid}" in message
        assert str(run_dir) in message

        spec = RunSpec(method="lora", seed=0, run_dir=run_dir, cli_args=["fit"])
        outcome = run_spec(spec, mode="in-process", rerun=True)
        assert outcome.status == "failed" and outcome.error == message
        assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_FILE]  # nothing touched
    finally:
        holder.kill()
        holder.wait()
    with RunDirectoryLock(run_dir) as lock:  # its holder is gone: the lock is free
        assert lock.took_over == holder.pid  # (it was killed without releasing it)
        assert (run_dir / LOCK_FILE).read_text() == f"{os.getpid()}\n"
    assert (run_dir / LOCK_FILE).read_text() == ""  # a clean release leaves no process id
    with RunDirectoryLock(run_dir) as lock:
        assert lock.took_over is None


def test_a_stale_lock_is_taken_over(tmp_path: Path, capsys, monkeypatch) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / LOCK_FILE).write_text(f"{gone.pid}\n")  # a holder killed with -9
    monkeypatch.setattr(runner, "execute", raising(ValueError("x")))
    spec = RunSpec(method="m", seed=0, run_dir=run_dir, cli_args=["fit"])
    assert run_spec(spec, mode="in-process").status == "failed"
    assert f"took over the stale lock of process {gone.pid} (gone)" in capsys.readouterr().err
    assert (run_dir / LOCK_FILE).read_text() == ""


def test_a_child_given_the_lock_holds_it_after_its_parent_is_gone(tmp_path: Path) -> None:
    """--fresh-processes: the runner passes the lock to the run's interpreter; a runner killed
    with -9 leaves it held by that child until the child ends."""
    lock = RunDirectoryLock(tmp_path / "run").acquire()
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)"], pass_fds=(lock.fd,)
    )
    try:
        lock.set_holder(child.pid)
        os.close(lock.fd)  # the runner's end, gone without unlocking (as a kill -9 does)
        lock.fd = None
        with pytest.raises(RunDirectoryBusy, match=f"in use by process {child.pid} "):
            RunDirectoryLock(tmp_path / "run").acquire()
    finally:
        child.kill()
        child.wait()
    with RunDirectoryLock(tmp_path / "run") as again:
        assert again.took_over == child.pid
