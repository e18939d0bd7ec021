"""End to end through the installed `metalearn` command, run from a directory other than the project."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from metalearn.checkpoint import load_checkpoint
from tests.conftest import DATA_DIR, TINY

METALEARN = str(Path(sys.executable).with_name("metalearn"))


@pytest.fixture(autouse=True)
def data_and_cache(monkeypatch: pytest.MonkeyPatch, cache_dir: Path) -> None:
    """Runs start in a temporary directory: point them at the real data and the session's cache."""
    monkeypatch.setenv("METALEARN_DATA_DIR", str(DATA_DIR))
    monkeypatch.setenv("METALEARN_CACHE_DIR", str(cache_dir))


def cli_env() -> dict[str, str]:
    """One intra-op thread (tiny models; robust on a loaded machine) and Hydra's default error mode."""
    return {**os.environ, "HYDRA_FULL_ERROR": "", "OMP_NUM_THREADS": "1"}


def run_cli(
    cwd: Path, *overrides: str, multirun: bool = False, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run `metalearn` with the tiny settings, then `overrides` (later overrides win)."""
    env = cli_env()
    command = [METALEARN, *(["-m"] if multirun else []), *TINY, *overrides]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def only_run_dir(root: Path) -> Path:
    runs = [p for p in root.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def test_run_writes_everything(tmp_path: Path) -> None:
    """A run directory holds Hydra's files, log, events, checkpoints, results and the picture;
    TensorBoard's own reader finds the promised tags."""
    proc = run_cli(tmp_path)
    assert proc.returncode == 0, proc.stderr
    run = only_run_dir(tmp_path / "outputs" / "runs" / "maml_sinusoid")
    for name in (".hydra/config.yaml", ".hydra/overrides.yaml", ".hydra/hydra.yaml", "train.log", "config.yaml",
                 "checkpoints/last.pt", "checkpoints/best.pt", "results.json", "adaptation.png"):
        assert (run / name).is_file(), name
    assert f"Run directory: {run.resolve()}" in proc.stdout
    results = json.loads((run / "results.json").read_text())
    assert f"test query_mse: {results['test']['query_mse']:.4f}" in proc.stdout
    assert "step 4: val/query_mse" in (run / "train.log").read_text()

    events = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/meta_loss", "train/meta_loss_pre", "train/lr", "train/steps_per_sec", "val/query_mse",
            "val/query_mse_ci95", "test/query_mse", "val/best_query_mse"} <= scalars
    assert [e.step for e in events.Scalars("val/query_mse")] == [2, 4]
    assert "test/adaptation" in events.Tags()["images"]
    assert events.PluginTagToContent("hparams")  # the HParams tab has this run


def test_multirun_gives_one_directory_per_job(tmp_path: Path) -> None:
    proc = run_cli(tmp_path, "algorithm.inner_lr=0.001,0.01", multirun=True)
    assert proc.returncode == 0, proc.stderr
    sweep = only_run_dir(tmp_path / "outputs" / "multiruns" / "maml_sinusoid")
    assert (sweep / "multirun.yaml").is_file()
    for job, lr in (("0", 0.001), ("1", 0.01)):
        assert (sweep / job / "results.json").is_file()
        assert load_checkpoint(sweep / job / "checkpoints" / "last.pt")["config"]["algorithm"]["inner_lr"] == lr


def test_failing_jobs_are_recorded_and_the_sweep_goes_on(tmp_path: Path) -> None:
    """Each failed job leaves failed.json and its log line; the jobs after a failure still run; the last
    line counts and names every failed job, not just the first."""
    proc = run_cli(tmp_path, "model.hidden_sizes=[-1],[8],[-2],[-3]", multirun=True)
    sweep = only_run_dir(tmp_path / "outputs" / "multiruns" / "maml_sinusoid")
    assert (sweep / "1" / "results.json").is_file()  # the job after the first failure ran
    for job, size in (("0", -1), ("2", -2), ("3", -3)):
        failed = json.loads((sweep / job / "failed.json").read_text())
        assert failed["error"] == "ConfigError"
        assert failed["message"] == f"model.hidden_sizes[0]={size}: must be a positive integer"
        assert f"model.hidden_sizes=[{size}]" in failed["overrides"]
        assert (sweep / job / ".hydra" / "overrides.yaml").is_file()
        assert not (sweep / job / "results.json").exists()
        assert f"job failed: ConfigError: model.hidden_sizes[0]={size}" in (sweep / job / "train.log").read_text()
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: sweep finished with failed jobs; 3 of 4 jobs failed: "
        + "; ".join(f"job {job} ({sweep / job}): ConfigError: model.hidden_sizes[0]={size}: must be a positive integer"
                    for job, size in (("0", -1), ("2", -2), ("3", -3))))


def test_sigterm_then_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    """A run killed with SIGTERM saves last.pt and exits non-zero; `trainer.resume=true` continues it
    in place to the same final parameters as a run that was never interrupted."""
    steps = ["trainer.max_steps=1500", "trainer.checkpoint_every=20", "trainer.eval_every=500"]
    straight = tmp_path / "straight"
    straight.mkdir()
    assert run_cli(straight, *steps).returncode == 0
    reference = load_checkpoint(only_run_dir(straight / "outputs/runs/maml_sinusoid") / "checkpoints/last.pt")

    cut = tmp_path / "cut"
    cut.mkdir()
    proc = subprocess.Popen([METALEARN, *TINY, *steps], cwd=cut, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(cut.glob("outputs/runs/maml_sinusoid/*/checkpoints/last.pt")) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    run = only_run_dir(cut / "outputs/runs/maml_sinusoid")
    stopped_at = load_checkpoint(run / "checkpoints/last.pt")["step"]
    assert 0 < stopped_at < 1500, "the run finished before the signal arrived; nothing was tested"

    resumed = run_cli(cut, *steps, "trainer.resume=true")
    assert resumed.returncode == 0, resumed.stderr
    assert only_run_dir(cut / "outputs/runs/maml_sinusoid") == run  # continued in place
    final = load_checkpoint(run / "checkpoints/last.pt")
    assert final["step"] == 1500
    for name, tensor in reference["algorithm"].items():
        assert torch.equal(tensor, final["algorithm"][name]), name


def test_ckpt_path_continues_that_run(tmp_path: Path) -> None:
    assert run_cli(tmp_path).returncode == 0
    run = only_run_dir(tmp_path / "outputs/runs/maml_sinusoid")
    proc = run_cli(tmp_path, f"ckpt_path={run}", "trainer.max_steps=6")
    assert proc.returncode == 0, proc.stderr
    assert only_run_dir(tmp_path / "outputs/runs/maml_sinusoid") == run
    assert load_checkpoint(run / "checkpoints/last.pt")["step"] == 6
    assert "Resumed from" in (run / "train.log").read_text()


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("algorithm=nope", ["algorithm", "nope"]),
        ("trainer.nope=1", ["trainer.nope"]),
        ("dataset.k_shot=0", ["dataset.k_shot=0"]),
        ("optimizer.lr=-0.1", ["optimizer.lr=-0.1"]),
        ("algorithm.inner_lr=-1", ["algorithm.inner_lr=-1"]),
        ("ckpt_path=/no/such/run/last.pt", ["ckpt_path=/no/such/run/last.pt"]),
        ("trainer.device=tpu", ["trainer.device='tpu'"]),
        ("experiment=maml_omniglot_5w1s_quick paths.data_dir=/no/data", ["dataset.root='/no/data/omniglot'"]),
        ("experiment=maml_omniglot_5w1s_quick dataset.n_way=700", ["dataset.n_way=700", "688 classes"]),
        ("experiment=maml_omniglot_5w1s_quick model=mlp", ["model:"]),
        ("experiment=maml_omniglot_5w1s_quick dataset.k_query=20", ["dataset.k_query=20: with k_shot=1", "only 20 "]),
        ("experiment=maml_omniglot_5w1s_quick dataset.channels=3", ["dataset.channels=3", "1 channel"]),
        ("experiment=maml_miniimagenet_5w1s paths.data_dir=/no/data", ["/no/data/miniimagenet", "images/"]),
        ("experiment=maml_cifarfs_5w1s paths.data_dir=/no/data", ["/no/data/cifar100", "download cifar100"]),
        ("experiment=maml_omniglot_5w1s_quick algorithm.vectorize=maybe", ["algorithm.vectorize='maybe'"]),
        ("experiment=maml_omniglot_5w1s_quick dataset.augment.degrees=-1", ["dataset.augment.degrees=-1"]),
        ("algorithm.inner_lr=1e6", ["step 1: meta-loss", "no checkpoint written yet", "algorithm.inner_lr=1000000.0"]),
        ("seed=1.5", ["seed=1.5: must be an integer"]),
        ("experiment=maml_omniglot_5w1s_quick dataset.n_wya=5", ["dataset.n_wya: no such setting",
                                                                "did you mean dataset.n_way?"]),
        ("paths.output_root=/dev/null/outputs", ["paths.output_root", "/dev/null/outputs/runs", "Not a directory"]),
        ("hydra.run.dir=/dev/null/run", ["/dev/null/run: Not a directory", "hydra.run.dir"]),
    ],
)
def test_bad_input_gives_one_clear_line(tmp_path: Path, override: str, expected: list[str]) -> None:
    proc = run_cli(tmp_path, *override.split())
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: "), proc.stderr
    for text in expected:
        assert text in errors[0]
    assert not list(tmp_path.glob("outputs/**/*.pt")), "no checkpoint may be left behind"
    if "step 1" not in expected[0]:  # refused before training: no run directory is left behind either
        assert not list(tmp_path.glob("outputs/runs/*/*")), list(tmp_path.glob("outputs/runs/*/*"))


def wait_for(path_glob: Callable[[], list[Path]], proc: subprocess.Popen[str], timeout: float = 120) -> list[Path]:
    """Poll until `path_glob()` finds something (or the process ends, or time runs out)."""
    deadline = time.monotonic() + timeout
    while not (found := path_glob()) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


def test_second_process_on_a_run_directory_is_refused_and_kill_9_does_not_block_resume(tmp_path: Path) -> None:
    """Two commands on one hydra.run.dir: the second stops with one line naming the directory and the
    holding process, writing nothing; after the holder is killed with SIGKILL (no clean-up at all) its
    lock is gone, the leftover temporary checkpoint is removed, and the run resumes in place."""
    run = tmp_path / "shared_run"
    long = ["trainer.max_steps=100000", "trainer.checkpoint_every=50", f"hydra.run.dir={run}"]
    holder = subprocess.Popen([METALEARN, *TINY, *long], cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: list(run.glob("checkpoints/last.pt")), holder), holder.communicate()
        before = {p: p.read_bytes() for p in run.rglob("*.yaml")}
        second = run_cli(tmp_path, f"hydra.run.dir={run}", "seed=2")
        assert second.returncode == 2
        assert second.stderr.strip().splitlines() == [
            f"error: {run}: the run directory is in use by process {holder.pid}; wait for it to finish or stop "
            "it, or start a new run elsewhere"]
        assert {p: p.read_bytes() for p in run.rglob("*.yaml")} == before  # its config and overrides untouched
    finally:
        holder.kill()  # SIGKILL: no handler runs, the lock is only dropped by the kernel
        holder.communicate()
    (run / "checkpoints" / ".last.pt.killed.tmp").write_bytes(b"half a checkpoint")  # as a kill mid-write leaves
    target = load_checkpoint(run / "checkpoints" / "last.pt")["step"] + 20
    resumed = run_cli(tmp_path, *long, f"trainer.max_steps={target}", "trainer.resume=true")
    assert resumed.returncode == 0, resumed.stderr
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == target
    assert not list(run.glob("checkpoints/*.tmp"))
    assert (run / ".hydra" / "resume-1" / "overrides.yaml").is_file()


def test_sigterm_during_set_up_or_final_test_exits_130_with_one_line(tmp_path: Path) -> None:
    early = subprocess.Popen([METALEARN, *TINY], cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)  # still importing
    early.send_signal(signal.SIGTERM)
    _, stderr = early.communicate(timeout=60)
    assert early.returncode == 130, stderr
    assert stderr.strip().splitlines() == ["interrupted: stopped by signal 15 during set-up"]

    # A long final test: 200,000 sinusoid tasks after 4 steps of training.
    testing = subprocess.Popen([METALEARN, *TINY, "trainer.test_tasks=200000", "trainer.eval_batch_size=1000"],
                               cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    logs = wait_for(lambda: [p for p in tmp_path.glob("outputs/runs/*/*/train.log") if "step 4:" in p.read_text()],
                    testing)
    assert logs, testing.communicate()
    time.sleep(0.5)
    testing.send_signal(signal.SIGTERM)
    _, stderr = testing.communicate(timeout=60)
    assert testing.returncode == 130, stderr
    last = logs[0].parent / "checkpoints" / "last.pt"
    assert [line for line in stderr.splitlines() if not line.startswith("[")] == [
        f"interrupted: stopped by signal 15 while testing at step 4; resume with trainer.resume=true "
        f"(checkpoint {last})"]
