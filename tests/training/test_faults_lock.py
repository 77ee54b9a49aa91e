"""The run lock: one training process per run folder. A second one is refused with the holder's pid, host and
start time (also with --no-resume, which then leaves the live run's folder where it is); the lock of a killed run
is taken over with a notice; a finished run leaves no lock file behind. (Rank 0 holding it under torchrun is
checked in test_faults_dist.py.)"""
import signal
import socket
import subprocess
import sys

import pytest

from torchdiffusion.app import cli
from torchdiffusion.config import load_config
from torchdiffusion.training import Trainer, guard
from torchdiffusion.training.guard import LOCK_NAME, RunLockError

# another process holding a folder's lock: guard.py alone (standard library only), so it starts in a moment
HOLDER = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("guard", sys.argv[1])
guard = importlib.util.module_from_spec(spec)
spec.loader.exec_module(guard)
guard.RunLock.acquire(sys.argv[2])
print("locked", flush=True)
time.sleep(120)
"""


def cfg(out, *over):
    return load_config("toy2d", [f"out_dir={out}", "train.steps=4", "train.ckpt_every=2", *over])


@pytest.fixture
def holder(tmp_path):
    """A live process holding the lock of tmp_path/toy2d; yields it (kill it to simulate a crash)."""
    p = subprocess.Popen([sys.executable, "-c", HOLDER, guard.__file__, str(tmp_path / "toy2d")],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    yield p
    p.kill()
    p.wait()


def test_a_second_run_on_a_live_folder_is_refused_naming_the_holder(tmp_path, capsys):
    Trainer(cfg(tmp_path), progress=False).fit()  # an earlier run, finished
    assert not (tmp_path / "toy2d" / LOCK_NAME).exists()
    p = subprocess.Popen([sys.executable, "-c", HOLDER, guard.__file__, str(tmp_path / "toy2d")],
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "locked"
        holder = f"pid {p.pid} on host {socket.gethostname()}, started 20"
        with pytest.raises(RunLockError, match=holder):
            Trainer(cfg(tmp_path, "train.steps=6"), progress=False)
        with pytest.raises(RunLockError, match=holder):  # --no-resume must not move a live run's folder
            Trainer(cfg(tmp_path), progress=False, resume=False)
        assert sorted(q.name for q in tmp_path.iterdir()) == ["toy2d"]
        assert cli.main(["train", "--config", "toy2d", f"out_dir={tmp_path}", "train.steps=6"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and holder in err[0] and "choose another name=" in err[0]
    finally:
        p.kill()
        p.wait()


def test_the_lock_of_a_killed_run_is_taken_over_with_a_notice(tmp_path, holder, capsys):
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    tr = Trainer(cfg(tmp_path), progress=False)
    assert f"took over the lock of {tmp_path / 'toy2d'}" in capsys.readouterr().err
    assert f'"pid": {holder.pid}' not in (tmp_path / "toy2d" / LOCK_NAME).read_text()
    tr.fit()
    assert not (tmp_path / "toy2d" / LOCK_NAME).exists()


def test_no_resume_moves_a_finished_run_aside_with_its_lock_released(tmp_path):
    Trainer(cfg(tmp_path), progress=False).fit()
    tr = Trainer(cfg(tmp_path), progress=False, resume=False)
    (aside,) = [q for q in tmp_path.iterdir() if q.name.startswith("toy2d.")]
    assert (aside / "checkpoints" / "last.safetensors").exists() and not (aside / LOCK_NAME).exists()
    assert (tmp_path / "toy2d" / LOCK_NAME).exists() and tr.step == 0
    tr.fit()
    assert not (tmp_path / "toy2d" / LOCK_NAME).exists()


def test_a_trainer_built_again_in_the_same_process_takes_the_lock_over(tmp_path):
    """In a notebook, building the Trainer again must not be refused by its own earlier, unfinished self."""
    first = Trainer(cfg(tmp_path), progress=False)
    second = Trainer(cfg(tmp_path), progress=False)
    first.close()  # the earlier one no longer owns it: closing it leaves the lock in place
    assert (tmp_path / "toy2d" / LOCK_NAME).exists()
    second.fit()
    assert not (tmp_path / "toy2d" / LOCK_NAME).exists()
