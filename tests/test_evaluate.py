"""`metalearn-eval`: a trained run rebuilt from its checkpoint and evaluated on fixed held-out tasks."""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from metalearn.evaluate import EvalError, evaluate, parse_args
from metalearn.run import train
from tests.conftest import Composer
from tests.test_cli import cli_env

METALEARN_EVAL = str(Path(sys.executable).with_name("metalearn-eval"))


def trained_run(compose_cfg: Composer, *overrides: str) -> Path:
    cfg = compose_cfg(*overrides)
    train(cfg)
    return Path(cfg.paths.output_dir)


def run_eval(*args: str) -> dict:
    return evaluate(parse_args(list(args)))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_eval_repeats_the_runs_test_and_writes_every_episode(compose_cfg: Composer) -> None:
    run = trained_run(compose_cfg)  # sinusoid MAML, 6 test tasks from trainer.test_seed
    expected = json.loads((run / "results.json").read_text())["test"]
    results = run_eval(f"ckpt_path={run}", "eval.episodes=6")

    # The defaults are the run's own test: best checkpoint, test split, trainer.test_seed.
    assert results["mean"] == pytest.approx(expected["query_mse"], rel=1e-6)
    assert results["summary"]["query_mse_pre"] == pytest.approx(expected["query_mse_pre"], rel=1e-6)
    written = json.loads(Path(results["file"]).read_text())
    assert Path(results["file"]).parent == run and Path(results["file"]).name.startswith("eval_test_")
    values = written["per_episode"]["query_mse"]
    assert len(values) == 6 and len(written["per_episode"]["query_loss_pre"]) == 6
    # The CI by hand: Student's t(0.975; 5) = 2.5706 (a printed table) times the sample standard deviation
    # over sqrt(N).
    assert written["mean"] == pytest.approx(sum(values) / 6, rel=1e-9)
    assert written["ci95"] == pytest.approx(2.5706 * statistics.stdev(values) / math.sqrt(6), rel=1e-4)
    assert written["interval"] == "t"
    assert (written["split"], written["seed"], written["episodes"]) == ("test", 2, 6)


def test_same_seed_same_numbers_and_the_checkpoint_is_only_read(compose_cfg: Composer) -> None:
    run = trained_run(compose_cfg)
    best = run / "checkpoints" / "best.pt"
    before = sha256(best)
    first = run_eval(f"ckpt_path={best}", "eval.episodes=5", "eval.split=val", "eval.seed=11")
    second = run_eval(f"ckpt_path={best}", "eval.episodes=5", "eval.split=val", "eval.seed=11")
    assert first["per_episode"] == second["per_episode"]
    assert first["file"] != second["file"]  # a second evaluation never overwrites the first
    assert sha256(best) == before
    other_seed = run_eval(f"ckpt_path={best}", "eval.episodes=5", "eval.split=val", "eval.seed=12")
    assert other_seed["per_episode"] != first["per_episode"]
    # Test-time settings change the evaluation only: more shots and inner steps adapt better here.
    more = run_eval(f"ckpt_path={best}", "eval.episodes=5", "eval.split=val", "eval.seed=11",
                    "dataset.k_shot=20", "algorithm.eval_inner_steps=5")
    assert more["overrides"] == ["dataset.k_shot=20", "algorithm.eval_inner_steps=5"]
    assert more["per_episode"] != first["per_episode"]
    assert sha256(best) == before


def test_metric_learner_trained_5_way_evaluates_20_way(compose_cfg: Composer) -> None:
    run = trained_run(compose_cfg, "algorithm=protonet", "dataset=omniglot")
    results = run_eval(f"ckpt_path={run}", "eval.episodes=3", "dataset.n_way=20", "dataset.k_query=2",
                       "eval.checkpoint=last")
    # Before adaptation the learner guesses uniformly over the 20 classes of each task.
    assert results["summary"]["query_acc_pre"] == pytest.approx(1 / 20)
    assert results["summary"]["query_loss_pre"] == pytest.approx(math.log(20), rel=1e-5)
    assert results["mean"] > 1 / 20


def test_trained_head_fixes_the_number_of_ways(compose_cfg: Composer) -> None:
    run = trained_run(compose_cfg, "dataset=omniglot")  # MAML with a 5-output head
    with pytest.raises(EvalError, match=r"dataset.n_way=20: the checkpoint's model outputs 5 values .* need 20"):
        run_eval(f"ckpt_path={run}", "dataset.n_way=20")


def test_command_line_prints_the_interval_and_rejects_bad_input(compose_cfg: Composer, tmp_path: Path) -> None:
    run = trained_run(compose_cfg)
    proc = subprocess.run([METALEARN_EVAL, f"ckpt_path={run}", "eval.episodes=6"], capture_output=True, text=True,
                          env=cli_env(), cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    expected = json.loads((run / "results.json").read_text())["test"]
    assert f"test query_mse: {expected['query_mse']:.4f} ± {expected['query_mse_ci95']:.4f} " \
           "(95% CI over 6 episodes" in proc.stdout
    written = sorted(run.glob("eval_test_*.json"))
    assert len(written) == 1 and f"Per-episode values: {written[0]}" in proc.stdout

    for args, message in [
        ([f"ckpt_path={run}", "dataset.n_wya=3"], "dataset.n_wya=3: the run's config has no setting 'dataset.n_wya'"),
        ([f"ckpt_path={run}", "dataset=omniglot"], "dataset=omniglot: dataset is the run's dataset group"),
        ([f"ckpt_path={run}", "eval.split=dev"], "eval.split='dev': must be one of train, val, test"),
        ([f"ckpt_path={run}", "eval.episodes=0"], "eval.episodes=0"),
        ([f"ckpt_path={run}", "eval.shots=3"], "eval.shots: unknown option"),
        ([f"ckpt_path={run}", "eval.seed=1,2"], "no sweeps"),
        ([f"ckpt_path={tmp_path / 'nowhere'}"], f"ckpt_path='{tmp_path / 'nowhere'}': no checkpoint"),
        (["eval.episodes=5"], "ckpt_path: missing"),
    ]:
        proc = subprocess.run([METALEARN_EVAL, *args], capture_output=True, text=True, env=cli_env(), cwd=tmp_path,
                              timeout=300)
        assert proc.returncode == 2, (args, proc.stdout)
        assert proc.stderr.startswith("error: ") and message in proc.stderr, (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
