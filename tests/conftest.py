"""Shared fixtures: configs composed with Hydra's compose API at tiny sizes, outputs in tmp_path."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

# Explicit keys (not trainer=debug) so they win over values an experiment file sets.
TINY = [
    "trainer.max_steps=4",
    "trainer.meta_batch_size=2",
    "trainer.eval_every=2",
    "trainer.log_every=1",
    "trainer.checkpoint_every=2",
    "trainer.val_tasks=4",
    "trainer.test_tasks=6",
    "trainer.eval_batch_size=4",
    "trainer.device=cpu",
    "trainer.progress=false",
]

Composer = Callable[..., DictConfig]


@pytest.fixture(autouse=True)
def one_intra_op_thread() -> Iterator[None]:
    """Run each test on one intra-op thread. The test models are tiny and dispatch-bound; a second
    thread only fights other jobs for the cores (a learning test took 56 s with 2 threads on a busy
    2-core machine and 3 s with 1)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def compose_cfg(tmp_path: Path) -> Iterator[Composer]:
    """Compose `train.yaml` with overrides (tiny trainer settings first), writing into tmp_path."""

    def _compose(*overrides: str, tiny: bool = True) -> DictConfig:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("train", overrides=[*(TINY if tiny else []), *overrides], return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)  # lets ${hydra:...} interpolations resolve
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / "run")
            del cfg.hydra
        return cfg

    yield _compose
    GlobalHydra.instance().clear()
