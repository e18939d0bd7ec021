"""Trainer: exact resume, signals, atomic checkpoints, non-finite losses, evaluation sets."""

from __future__ import annotations

import functools
import math
import os
import signal
from pathlib import Path

import pytest
import torch
from torch.utils._pytree import tree_flatten

from metalearn.algorithms.maml import MAML
from metalearn.algorithms.reptile import Reptile
from metalearn.checkpoint import config_changes, load_checkpoint, save_checkpoint
from metalearn.data.sinusoid import SinusoidTasks
from metalearn.metrics import TensorBoardLogger
from metalearn.models.mlp import MLP
from metalearn.trainer import NonFiniteLossError, Trainer


def make_trainer(out: Path, *, max_steps: int = 12, inner_lr: float = 0.01, resume: bool = False,
                 algorithm: str = "maml") -> Trainer:
    """A small, fully seeded trainer with Adam and a cosine schedule (both carry state). `reptile`: Reptile
    with its inner Adam state carried across tasks (state that lives in the algorithm, not the optimizer)."""
    torch.manual_seed(0)
    tasks = SinusoidTasks()
    model = MLP(1, 1, hidden_sizes=[16])
    algorithm = (MAML(model, tasks.objective, inner_lr=inner_lr) if algorithm == "maml"
                 else Reptile(model, tasks.objective, inner_lr=inner_lr, inner_steps=2))
    optimizer = torch.optim.Adam(algorithm.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max_steps)
    logger = functools.partial(TensorBoardLogger, log_dir=out)
    return Trainer(algorithm, tasks, optimizer, logger, out, scheduler=scheduler, max_steps=max_steps,
                   meta_batch_size=4, eval_every=5, log_every=2, checkpoint_every=5, val_tasks=8, test_tasks=8,
                   eval_batch_size=8, device="cpu", seed=3, resume=resume, progress=False)


def interrupt_at(trainer: Trainer, step: int) -> None:
    """Send this process SIGTERM during meta-step `step`, as a scheduler or a user would."""
    original = trainer.algorithm.meta_train_step

    def step_and_maybe_signal(batch):  # type: ignore[no-untyped-def]
        if trainer.step + 1 == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(batch)

    trainer.algorithm.meta_train_step = step_and_maybe_signal  # type: ignore[method-assign]


@pytest.mark.parametrize("algorithm", ["maml", "reptile"])
def test_interrupted_run_resumes_to_identical_parameters(tmp_path: Path, algorithm: str) -> None:
    """SIGTERM mid-run saves last.pt at a step boundary; resuming reaches bitwise the same weights,
    algorithm state, optimizer and scheduler state as an uninterrupted run."""
    straight = make_trainer(tmp_path / "a", algorithm=algorithm)
    straight.fit()
    reference = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")

    interrupted = make_trainer(tmp_path / "b", algorithm=algorithm)
    interrupt_at(interrupted, 8)
    with pytest.raises(KeyboardInterrupt, match="step 8"):
        interrupted.fit()
    assert load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")["step"] == 8

    resumed = make_trainer(tmp_path / "b", resume=True, algorithm=algorithm)
    assert resumed.fit()["step"] == 12
    final = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")
    assert reference["algorithm"].keys() == final["algorithm"].keys()
    for name, value in reference["algorithm"].items():
        expected, structure = tree_flatten(value)
        actual, final_structure = tree_flatten(final["algorithm"][name])
        assert structure == final_structure, name
        assert all(torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b for a, b in zip(actual, expected)), name
    if algorithm == "reptile":  # the carried inner Adam state is in the checkpoint: 12 steps x 4 tasks x 2 steps
        assert reference["algorithm"]["_extra_state"]["inner_state"][0] == 12 * 4 * 2
    ref_state, final_state = reference["optimizer"]["state"], final["optimizer"]["state"]
    for key in ref_state:
        for field in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(ref_state[key][field], final_state[key][field])
    assert reference["scheduler"] == final["scheduler"]
    assert reference["best_metric"] == final["best_metric"] and reference["best_step"] == final["best_step"]


def test_checkpoint_is_self_describing(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, max_steps=5)
    trainer.fit()
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert {"algorithm", "optimizer", "scheduler", "step", "best_metric", "rng", "config", "metric"} <= set(state)
    assert state["step"] == 5 and state["metric"] == "query_mse" and math.isfinite(state["best_metric"])


def test_failed_write_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash while writing leaves the old file intact and no temporary file behind."""
    path = tmp_path / "last.pt"
    save_checkpoint({"step": 1}, path)

    def broken_save(obj: object, f) -> None:  # type: ignore[no-untyped-def]
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_non_finite_loss_stops_without_writing_nan_weights(tmp_path: Path) -> None:
    """A learning rate that diverges at step 7 stops the run naming the step and the settings; the
    weights stay finite and the checkpoint of step 5 (checkpoint_every=5) is kept, untouched."""
    trainer = make_trainer(tmp_path, max_steps=50)
    original = trainer.algorithm.meta_train_step

    def diverge_from_step_7(batch):  # type: ignore[no-untyped-def]
        if trainer.step + 1 >= 7:
            trainer.algorithm.inner_lr = 1e9  # type: ignore[assignment]
        return original(batch)

    trainer.algorithm.meta_train_step = diverge_from_step_7  # type: ignore[method-assign]
    with pytest.raises(NonFiniteLossError, match=r"^step 7: .*last good checkpoint: .*last\.pt.*algorithm\.inner_lr"):
        trainer.fit()
    assert all(torch.isfinite(p).all() for p in trainer.algorithm.parameters())
    saved = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert saved["step"] == 5
    assert all(torch.isfinite(t).all() for t in saved["algorithm"].values())


def test_evaluation_sets_are_fixed(tmp_path: Path) -> None:
    """Validation scores are identical across trainers and never consume the training generator."""
    a, b = make_trainer(tmp_path / "a"), make_trainer(tmp_path / "b")
    state = a.generator.get_state()
    assert a.evaluate("val") == b.evaluate("val")
    assert torch.equal(a.generator.get_state(), state)
    val, test = a.evaluate("val"), a.evaluate("test")
    assert val["val/query_mse"] != test["test/query_mse"]  # values, not keys: two different task sets


def test_best_checkpoint_follows_validation_and_is_the_one_tested(tmp_path: Path) -> None:
    """Validation (scripted: best at step 5, worse later) and test disagree; the kept best.pt is step 5's,
    and results.json's test scores are those of best.pt's weights, not of the final ones."""
    trainer = make_trainer(tmp_path, max_steps=12)
    scripted = {5: 0.1, 10: 0.5, 12: 0.9}  # query_mse: lower is better
    real_evaluate = trainer.evaluate

    def evaluate(split):  # type: ignore[no-untyped-def]
        metrics = real_evaluate(split)
        if split == "val":
            metrics["val/query_mse"] = scripted[trainer.step]
        return metrics

    trainer.evaluate = evaluate  # type: ignore[method-assign]
    results = trainer.fit()
    assert results["best_step"] == 5
    best, last = (load_checkpoint(tmp_path / "checkpoints" / name) for name in ("best.pt", "last.pt"))
    assert best["step"] == 5 and last["step"] == 12

    def test_score(state: dict) -> float:
        fresh = make_trainer(tmp_path / "fresh")
        fresh.algorithm.load_state_dict(state["algorithm"])
        return fresh.evaluate("test")["test/query_mse"]

    assert results["test"]["query_mse"] == test_score(best)
    assert results["test"]["query_mse"] != test_score(last)


@pytest.mark.parametrize(("setting", "message"), [({"max_steps": 0}, "max_steps=0"),
                                                   ({"device": "tpu"}, "device='tpu'"),
                                                   ({"precision": "half"}, "precision='half'"),
                                                   ({"compile": "yes"}, "compile='yes'"),
                                                   ({"compile": True}, "compile=true: compiles the per-task path")])
def test_bad_trainer_settings_name_the_argument(tmp_path: Path, setting: dict, message: str) -> None:
    tasks = SinusoidTasks()
    algorithm = MAML(MLP(1, 1), tasks.objective)
    optimizer = torch.optim.Adam(algorithm.parameters())
    with pytest.raises(ValueError, match=message):
        Trainer(algorithm, tasks, optimizer, TensorBoardLogger, tmp_path, **setting)


def test_config_changes_lists_real_differences_only() -> None:
    saved = {"trainer": {"max_steps": 10, "resume": False}, "algorithm": {"inner_lr": 0.01}, "paths": {"x": "a"}}
    current = {"trainer": {"max_steps": 20, "resume": True}, "algorithm": {"inner_lr": 0.1}, "paths": {"x": "b"}}
    assert config_changes(saved, current) == ["algorithm.inner_lr: 0.01 -> 0.1"]


def test_a_run_that_predates_a_setting_continues_with_what_it_did_then() -> None:
    """A ProtoNet run saved before algorithm.train_pass and dataset.resample existed embedded per set
    Lanczos-resampled drawings: it resumes with per_set and lanczos, nothing else; trainer.allocator may
    be anything."""
    saved = {"algorithm": {"distance": "euclidean"}, "dataset": {"split": "vinyals"}, "trainer": {"max_steps": 10}}
    current = {"algorithm": {"distance": "euclidean", "train_pass": "per_set"},
               "dataset": {"split": "vinyals", "resample": "lanczos"},
               "trainer": {"max_steps": 10, "allocator": "retain"}}
    assert config_changes(saved, current) == []
    current["algorithm"]["train_pass"] = "per_task"
    current["dataset"]["resample"] = "nearest"
    assert config_changes(saved, current) == ["algorithm.train_pass: per_set -> per_task",
                                              "dataset.resample: lanczos -> nearest"]
