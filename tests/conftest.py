"""Shared fixtures: configs composed with Hydra's compose API at tiny sizes, outputs in tmp_path."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

import metalearn.compose  # noqa: F401  (registers the ${metalearn.head:...} resolver the model options use)
from tests.fakes import make_fake_cifar100, make_fake_image_folder, make_fake_miniimagenet

ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = ROOT / "conf"
# The real datasets: ../shared/data beside the project, or $METALEARN_DATA_DIR.
DATA_DIR = Path(os.environ.get("METALEARN_DATA_DIR", ROOT.parent / "shared" / "data")).resolve()

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
    "trainer.compile=false",  # compiling takes half a minute; tests/algorithms/test_compile.py covers it
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


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One decoded-dataset cache for the whole test session (decoding Omniglot once takes ~10 s)."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def omniglot_root() -> Path:
    root = DATA_DIR / "omniglot"
    assert (root / "images_background.zip").is_file(), f"Omniglot archives not found in {root}; set METALEARN_DATA_DIR"
    return root


@pytest.fixture(scope="session")
def fake_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, object]]:
    """Generated stand-ins, in the real layouts, for the datasets whose files are not available here:
    the dataset settings (per `dataset` option) that point a composed config at them, at tiny sizes."""
    root = tmp_path_factory.mktemp("fake_data")
    split_dir = make_fake_miniimagenet(root / "miniimagenet", classes_per_split=(6, 5, 5), images_per_class=6)
    make_fake_cifar100(root / "cifar100", train_per_class=2, test_per_class=2)
    make_fake_image_folder(root / "my_dataset", classes_per_split=(6, 5, 5), images_per_class=4)
    tiny = {"image_size": 16, "k_query": 2}
    return {
        "miniimagenet": {"root": str(root / "miniimagenet"), "split_dir": str(split_dir), **tiny},
        "cifarfs": {"root": str(root / "cifar100"), **tiny},
        "fc100": {"root": str(root / "cifar100"), **tiny},
        "image_folder": {"root": str(root / "my_dataset"), **tiny},
    }


@pytest.fixture
def compose_cfg(tmp_path: Path, cache_dir: Path, fake_data: dict[str, dict[str, object]]) -> Iterator[Composer]:
    """Compose `train.yaml` with overrides (tiny trainer settings first), writing into tmp_path.

    Datasets without real files here (see `fake_data`) are pointed at generated data of the same layout.
    """

    def _compose(*overrides: str, tiny: bool = True) -> DictConfig:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("train", overrides=[*(TINY if tiny else []), *overrides], return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)  # lets ${hydra:...} interpolations resolve
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / "run")
            cfg.paths.data_dir = str(DATA_DIR)
            cfg.paths.cache_dir = str(cache_dir)
            fake = fake_data.get(cfg.hydra.runtime.choices.dataset)
            for key, value in (fake or {}).items():
                cfg.dataset[key] = value
            # A paper's larger training episodes (ProtoNet trains 30-way 15-query) do not fit the fakes.
            shrink = {"train_n_way": 5, "train_k_query": fake["k_query"]} if fake else {}
            for key, value in shrink.items():
                if cfg.dataset.get(key) is not None:
                    cfg.dataset[key] = value
            del cfg.hydra
        return cfg

    yield _compose
    GlobalHydra.instance().clear()


def constructor_parameters(cls: type) -> dict[str, inspect.Parameter]:
    """The keyword arguments `cls(...)` takes, with their defaults, following `**kwargs` to the base
    classes' constructors (a subclass's own parameter wins over its base's)."""
    found: dict[str, inspect.Parameter] = {}
    for base in cls.__mro__:
        parameters = inspect.signature(base.__init__).parameters  # type: ignore[misc]
        for name, parameter in parameters.items():
            if parameter.kind is not inspect.Parameter.VAR_KEYWORD:
                found.setdefault(name, parameter)
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            break
    return found
