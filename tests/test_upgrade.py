"""Runs saved before a strategy became an object chosen by `_target_` (the inner optimizer, Siamese's pair
loss, MAML-RL's outer step) are read in today's shape: they resume without a reported change and rebuild
with the objects they were trained with."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from hydra.utils import get_class, instantiate

from metalearn.algorithms.functional import InnerAdam, InnerSGD
from metalearn.algorithms.siamese import ContrastiveLoss, KochLoss
from metalearn.checkpoint import config_changes, upgrade_config
from metalearn.rl.outer import PPO, TRPO, VPG
from tests.conftest import constructor_parameters

ROOT = Path(__file__).resolve().parent.parent
ARCHIVED = sorted((ROOT / "docs" / "results").rglob("config.yaml"))

CASES = [
    ({"inner_optimizer": "adam", "inner_betas": [0.0, 0.999], "inner_eps": 1e-8, "inner_lr": 0.001},
     {"inner_optimizer": {"_target_": "metalearn.algorithms.functional.InnerAdam", "betas": [0.0, 0.999],
                          "eps": 1e-8}, "inner_lr": 0.001}),
    ({"inner_optimizer": "sgd", "inner_betas": [0.9, 0.999], "inner_eps": 1e-8},
     {"inner_optimizer": {"_target_": "metalearn.algorithms.functional.InnerSGD"}}),
    ({"inner_optimizer": {"_target_": "metalearn.l2o.optimizer.LSTMOptimizer", "hidden": 20},
      "inner_betas": [0.9, 0.999], "inner_eps": 1e-8},
     {"inner_optimizer": {"_target_": "metalearn.l2o.optimizer.LSTMOptimizer", "hidden": 20}}),
    ({"loss": "contrastive", "margin": 2.0, "pairs": True},
     {"loss": {"_target_": "metalearn.algorithms.siamese.ContrastiveLoss", "margin": 2.0}, "pairs": True}),
    ({"loss": "koch", "margin": 1.0}, {"loss": {"_target_": "metalearn.algorithms.siamese.KochLoss"}}),
    ({"outer": "ppo", "ppo_clip": 0.1, "ppo_epochs": 3, "max_kl": 0.01, "cg_iterations": 10, "cg_damping": 1e-5,
      "line_search_steps": 15, "line_search_backtrack": 0.8},
     {"outer": {"_target_": "metalearn.rl.outer.PPO", "clip": 0.1, "epochs": 3}}),
    ({"outer": "trpo", "ppo_clip": 0.2, "ppo_epochs": 5, "max_kl": 0.02, "cg_iterations": 10, "cg_damping": 1e-5,
      "line_search_steps": 15, "line_search_backtrack": 0.8},
     {"outer": {"_target_": "metalearn.rl.outer.TRPO", "max_kl": 0.02, "cg_iterations": 10, "cg_damping": 1e-5,
                "line_search_steps": 15, "line_search_backtrack": 0.8}}),
]


@pytest.mark.parametrize(("saved", "today"), CASES)
def test_named_strategies_read_as_the_objects_that_do_the_same(saved: dict[str, Any], today: dict[str, Any]) -> None:
    assert upgrade_config({"algorithm": saved, "seed": 0}) == {"algorithm": today, "seed": 0}
    assert config_changes({"algorithm": saved}, {"algorithm": today}) == []
    changed = {**today, **{k: {**v, "_target_": "x.Y"} for k, v in today.items() if isinstance(v, dict)}}
    assert config_changes({"algorithm": saved}, {"algorithm": changed}) != []


def test_upgraded_strategies_build_with_their_settings() -> None:
    built = [instantiate(upgrade_config({"algorithm": saved})["algorithm"][key])
             for saved, _ in CASES[:2] + CASES[3:] for key in ("inner_optimizer", "loss", "outer") if key in saved]
    adam, sgd, contrastive, koch, ppo, trpo = built
    assert isinstance(adam, InnerAdam) and adam.betas == (0.0, 0.999) and isinstance(sgd, InnerSGD)
    assert isinstance(contrastive, ContrastiveLoss) and contrastive.margin == 2.0 and isinstance(koch, KochLoss)
    assert isinstance(ppo, PPO) and (ppo.clip, ppo.epochs) == (0.1, 3)
    assert isinstance(trpo, TRPO) and trpo.max_kl == 0.02
    assert isinstance(instantiate({"_target_": "metalearn.rl.outer.VPG"}), VPG)


@pytest.mark.parametrize("path", ARCHIVED, ids=[str(p.relative_to(ROOT / "docs" / "results")) for p in ARCHIVED])
def test_every_archived_run_rebuilds_in_todays_shape(path: Path) -> None:
    """Every archived run's algorithm settings, upgraded, are arguments its learner's constructor takes."""
    algorithm = upgrade_config(yaml.safe_load(path.read_text()))["algorithm"]
    accepted = constructor_parameters(get_class(algorithm["_target_"]))
    unknown = sorted(set(algorithm) - {"_target_", "_partial_"} - set(accepted))
    assert unknown == [], f"{path}: {unknown}"
