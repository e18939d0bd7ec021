"""Run directories belong to one run: exclusive creation, a lifetime lock, records written only once a
run is accepted, resumes that continue the right run or refuse, names that say what ran."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metalearn import checkpoint
from metalearn.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from metalearn.compose import ConfigError
from metalearn.resolvers import _run_dir, _sweep_dir
from metalearn.run import train
from metalearn.rundir import RunDirError, RunLock, create_fresh, write_new
from tests.conftest import Composer


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file below `folder` with its bytes and modification time."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


def test_new_run_directories_are_created_exclusively(tmp_path: Path) -> None:
    """Two runs started in the same second get two directories, even when both resolve the name before
    either has written anything (each resolution creates its directory)."""
    first = Path(_run_dir.__wrapped__(str(tmp_path / "runs"), "2026-01-01_00-00-00", False, None))
    second = Path(_run_dir.__wrapped__(str(tmp_path / "runs"), "2026-01-01_00-00-00", False, None))
    assert first != second and first.is_dir() and second.is_dir()
    assert second.name == "2026-01-01_00-00-00_1"
    (tmp_path / "other" / "x").mkdir(parents=True)  # another process took the name between check and create
    assert create_fresh(tmp_path / "other", "x").name == "x_1"


def test_lock_names_the_holder_and_dies_with_it(tmp_path: Path) -> None:
    """A locked directory is refused with its holder's pid; a holder killed with SIGKILL leaves no lock."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from metalearn.rundir import RunLock; "
         "lock = RunLock(Path(sys.argv[1])); lock.announce(); print('locked', flush=True); time.sleep(60)",
         str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirError, match=rf"^{tmp_path}: the run directory is in use by process {holder.pid};"):
            RunLock(tmp_path)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    RunLock(tmp_path).release()  # free again


def test_a_run_in_a_locked_directory_stops_before_writing(tmp_path: Path, compose_cfg: Composer) -> None:
    cfg = compose_cfg()
    run = Path(cfg.paths.output_dir)
    run.mkdir(parents=True)
    lock = RunLock(run)
    lock.announce()
    try:
        with pytest.raises(RunDirError, match=f"in use by process {os.getpid()}"):
            train(cfg)
        assert sorted(p.name for p in run.iterdir()) == [".lock"]
    finally:
        lock.release()


def test_refused_commands_leave_a_finished_run_as_it_was(compose_cfg: Composer) -> None:
    """Bad input, other settings or a new run aimed at an existing run's directory: each is refused with a
    one-line error naming what is wrong, and not one byte of the run changes (config, .hydra, log,
    checkpoints, results)."""
    train(compose_cfg())
    run = Path(compose_cfg().paths.output_dir)
    before = snapshot(run)
    assert {".hydra/config.yaml", ".hydra/overrides.yaml", "config.yaml", "checkpoints/last.pt"} <= set(before)

    with pytest.raises(ConfigError, match=r"^dataset\.k_shot=0: must be a positive integer$"):
        train(compose_cfg("trainer.resume=true", "dataset.k_shot=0"))
    with pytest.raises(CheckpointError, match=r"other settings \(algorithm\.first_order: False -> True\).*new run"):
        train(compose_cfg("trainer.resume=true", "algorithm.first_order=true"))
    with pytest.raises(CheckpointError, match=r"model\.hidden_sizes: \[40, 40\] -> \[20, 20\]"):
        train(compose_cfg("trainer.resume=true", "model.hidden_sizes=[20,20]"))
    with pytest.raises(RunDirError, match="already holds a run; continue it with trainer.resume=true"):
        train(compose_cfg("seed=5"))
    assert snapshot(run) == before


def test_resume_keeps_the_original_overrides_and_adds_its_own(compose_cfg: Composer) -> None:
    train(compose_cfg())
    run = Path(compose_cfg().paths.output_dir)
    original = (run / ".hydra" / "overrides.yaml").read_text()
    (run / "checkpoints" / ".last.pt.x1y2.tmp").write_bytes(b"left by kill -9")
    results = train(compose_cfg("trainer.resume=true", "trainer.max_steps=6", "trainer.eval_every=3"))
    assert results["step"] == 6
    assert (run / ".hydra" / "overrides.yaml").read_text() == original
    assert "trainer.max_steps=6" in (run / ".hydra" / "resume-1" / "overrides.yaml").read_text()
    assert not list((run / "checkpoints").glob("*.tmp"))
    train(compose_cfg("trainer.resume=true", "trainer.max_steps=8"))
    assert "trainer.max_steps=8" in (run / ".hydra" / "resume-2" / "overrides.yaml").read_text()


def test_runs_are_named_after_their_experiment_or_their_choices(compose_cfg: Composer) -> None:
    assert compose_cfg().name == "maml_sinusoid"
    assert compose_cfg("algorithm=protonet", "dataset=omniglot").name == "protonet-omniglot"
    assert compose_cfg("algorithm=fomaml").name == "fomaml-sinusoid"
    assert compose_cfg("experiment=maml_omniglot_5w1s_quick", "algorithm=fomaml").name == "maml_omniglot_5w1s_quick"


def test_resume_picks_only_runs_of_its_own_name(tmp_path: Path) -> None:
    """`trainer.resume=true` looks for runs under the command's own name; another method's runs are
    never candidates."""
    other = tmp_path / "runs" / "protonet-omniglot" / "2026-01-01_00-00-00"
    (other / "checkpoints").mkdir(parents=True)
    save_checkpoint({"step": 1}, other / "checkpoints" / "last.pt")
    chosen = Path(_run_dir.__wrapped__(str(tmp_path / "runs" / "maml_sinusoid"), "stamp", True, None))
    assert chosen.parent.name == "maml_sinusoid" and chosen.name == "stamp"
    again = Path(_run_dir.__wrapped__(str(tmp_path / "runs" / "protonet-omniglot"), "stamp", True, None))
    assert again == other


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_checkpoint_is_one_line_without_torch_advice(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint({"step": 1, "weights": torch.zeros(1000)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else os.urandom(len(data)))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert message.startswith(f"ckpt_path='{path}': not a readable metalearn checkpoint (the file is truncated")
    assert "\n" not in message and "weights_only" not in message


def test_architecture_mismatch_names_the_parameter(tmp_path: Path) -> None:
    saved = torch.nn.Sequential(torch.nn.Linear(1, 40), torch.nn.Linear(40, 1))
    built = torch.nn.Sequential(torch.nn.Linear(1, 20), torch.nn.Linear(20, 1))
    with pytest.raises(CheckpointError, match=r"^x\.pt: the checkpoint's weights do not fit the model: 0\.weight "
                       r"has shape \[40, 1\] in the checkpoint but \[20, 1\] in the model these settings build "
                       r"\(and 2 more"):
        checkpoint.load_weights(built, saved.state_dict(), Path("x.pt"))


def test_checkpoint_rename_is_made_durable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After the rename, the directory itself is fsynced (else a power loss can undo the rename)."""
    synced: list[bool] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.path.isdir(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    save_checkpoint({"step": 1}, tmp_path / "last.pt")
    assert synced == [False, True]  # the file's data, then the directory entry


def test_evaluation_records_never_overwrite_each_other(tmp_path: Path) -> None:
    first = write_new(tmp_path / "eval_test_stamp.json", "first")
    second = write_new(tmp_path / "eval_test_stamp.json", "second")
    assert (first.name, second.name) == ("eval_test_stamp.json", "eval_test_stamp_1.json")
    assert first.read_text() == "first" and second.read_text() == "second"


def test_sweep_directories_are_created_exclusively(tmp_path: Path) -> None:
    first, second = (_sweep_dir(str(tmp_path / "multiruns"), "2026-01-01_00-00-00") for _ in range(2))
    assert Path(second).name == "2026-01-01_00-00-00_1" and Path(first).is_dir() and Path(second).is_dir()
