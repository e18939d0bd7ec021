"""Ready sweeps (conf/sweep/) and launchers through the installed `metalearn` command, at tiny sizes."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from metalearn.checkpoint import load_checkpoint
from tests.conftest import DATA_DIR
from tests.test_cli import METALEARN, cli_env, only_run_dir, run_cli


@pytest.fixture(autouse=True)
def data_dir(monkeypatch: pytest.MonkeyPatch, cache_dir: Path) -> None:
    monkeypatch.setenv("METALEARN_DATA_DIR", str(DATA_DIR))
    monkeypatch.setenv("METALEARN_CACHE_DIR", str(cache_dir))


def jobs(sweep: Path) -> list[Path]:
    return sorted((p for p in sweep.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


def test_grid_sweep_runs_every_combination(tmp_path: Path) -> None:
    proc = run_cli(tmp_path, "sweep=grid", "algorithm.inner_lr=0.01,0.1", "seed=0,1", multirun=True)
    assert proc.returncode == 0, proc.stderr
    sweep = only_run_dir(tmp_path / "outputs" / "multiruns" / "maml_sinusoid")
    settings = {(c["algorithm"]["inner_lr"], c["seed"])
                for c in (load_checkpoint(j / "checkpoints" / "last.pt")["config"] for j in jobs(sweep))}
    assert settings == {(0.01, 0), (0.01, 1), (0.1, 0), (0.1, 1)}  # command-line values replace the grid's


def test_optuna_sweep_optimises_the_returned_validation_metric(tmp_path: Path) -> None:
    proc = run_cli(tmp_path, "sweep=optuna", "hydra.sweeper.n_trials=3", multirun=True)
    assert proc.returncode == 0, proc.stderr
    sweep = only_run_dir(tmp_path / "outputs" / "multiruns" / "maml_sinusoid")
    trials = jobs(sweep)
    assert len(trials) == 3
    best_val = [json.loads((t / "results.json").read_text())["val"]["query_mse"] for t in trials]
    result = OmegaConf.load(sweep / "optimization_results.yaml")
    # The sweeper minimised what each run returned: the best checkpoint's validation MSE.
    assert result.best_value == pytest.approx(min(best_val))
    best = trials[best_val.index(min(best_val))]
    config = load_checkpoint(best / "checkpoints" / "last.pt")["config"]
    assert result.best_params["algorithm.inner_lr"] == pytest.approx(config["algorithm"]["inner_lr"])
    assert result.best_params["optimizer.lr"] == pytest.approx(config["optimizer"]["lr"])
    assert len({load_checkpoint(t / "checkpoints" / "last.pt")["config"]["optimizer"]["lr"] for t in trials}) == 3


def test_optuna_direction_must_match_the_metric(tmp_path: Path) -> None:
    proc = run_cli(tmp_path, "sweep=optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.direction=maximize",
                   multirun=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].endswith(
        "ConfigError: hydra.sweeper.direction=maximize: the sweep optimises val/query_mse, which is better lower "
        "(set hydra.sweeper.direction=minimize)")


@pytest.mark.parametrize("launcher", ["parallel", "joblib"])
def test_joblib_launcher_runs_jobs_in_parallel_processes(tmp_path: Path, launcher: str) -> None:
    proc = run_cli(tmp_path, f"hydra/launcher={launcher}", "hydra.launcher.n_jobs=2", "seed=0,1", multirun=True)
    assert proc.returncode == 0, proc.stderr
    sweep = only_run_dir(tmp_path / "outputs" / "multiruns" / "maml_sinusoid")
    assert [load_checkpoint(j / "checkpoints" / "last.pt")["config"]["seed"] for j in jobs(sweep)] == [0, 1]
    # Two processes: a TensorBoard event file's name ends with the writing process id and a counter.
    pids = {next(j.glob("events.out.tfevents.*")).name.split(".")[-2] for j in jobs(sweep)}
    assert len(pids) == 2


def test_submitit_launcher_with_the_local_executor(tmp_path: Path) -> None:
    proc = run_cli(tmp_path, "hydra/launcher=submitit_local", "seed=3", multirun=True)
    assert proc.returncode == 0, proc.stderr
    sweep = only_run_dir(tmp_path / "outputs" / "multiruns" / "maml_sinusoid")
    (job,) = jobs(sweep)
    assert json.loads((job / "results.json").read_text())["test"]["tasks"] == 6
    assert load_checkpoint(job / "checkpoints" / "last.pt")["config"]["seed"] == 3


def test_slurm_preset_composes_to_the_submitit_slurm_launcher(tmp_path: Path) -> None:
    proc = subprocess.run([METALEARN, "hydra/launcher=slurm", "hydra.launcher.partition=gpu", "--cfg", "hydra",
                           "--package", "hydra.launcher"], cwd=tmp_path, env=cli_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("# @package hydra.launcher\n")
    launcher = OmegaConf.create(proc.stdout)
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.partition, launcher.gpus_per_node, launcher.tasks_per_node) == ("gpu", 1, 1)
