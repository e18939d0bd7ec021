"""torch.compile of the per-task computation (trainer.compile) and reduced precision (trainer.precision):
the same meta-gradients, a fallback when compiling fails, and the per-device choices of `auto`."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from metalearn import runtime
from metalearn.algorithms.anil import ANIL
from metalearn.algorithms.functional import InnerSGD
from metalearn.algorithms.maml import MAML
from metalearn.algorithms.mamlpp import MAMLPlusPlus
from metalearn.algorithms.matching import MatchingNet
from metalearn.algorithms.metasgd import MetaSGD
from metalearn.algorithms.protonet import ProtoNet
from metalearn.algorithms.reptile import Reptile
from metalearn.metrics import TensorBoardLogger
from metalearn.models.conv import Conv4
from metalearn.models.mlp import MLP
from metalearn.objectives import Classification, Regression
from metalearn.runtime import autocast, resolve_precision
from metalearn.tasks import TaskBatch

CPU = torch.device("cpu")
Maker = Callable[[nn.Module], MAML]


def tiny_conv(norm: str = "batch") -> Conv4:
    torch.manual_seed(0)
    return Conv4(1, 3, 12, hidden=8, norm=norm, downsample="stride", norm_steps=2)


def episodes(seed: int = 0, tasks: int = 3) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)

    def labels(per_class: int) -> Tensor:
        return torch.arange(3).repeat(per_class).expand(tasks, -1).contiguous()

    return TaskBatch(torch.rand(tasks, 6, 1, 12, 12, generator=g), labels(2),
                     torch.rand(tasks, 9, 1, 12, 12, generator=g), labels(3))


def meta_gradient(algorithm: MAML, batch: TaskBatch) -> dict[str, Tensor]:
    algorithm.zero_grad(set_to_none=True)
    algorithm.set_progress(0, 10)
    algorithm.meta_train_step(batch)
    return {name: p.grad.clone() for name, p in algorithm.named_parameters() if p.grad is not None}


def assert_same_gradients(make: Maker, norm: str = "batch") -> None:
    """The compiled per-task path gives the eager path's meta-gradient, parameter by parameter."""
    eager, compiled = make(tiny_conv(norm)), make(tiny_conv(norm))
    assert not eager.use_compile(False, CPU) and compiled.use_compile(True, CPU)
    batch = episodes()
    expected, actual = meta_gradient(eager, batch), meta_gradient(compiled, batch)
    assert compiled._compiled is not None and compiled._compiled.works is True, "the compiled path was not taken"
    assert expected.keys() == actual.keys()
    for name in expected:
        # Conv biases before batch-statistics BatchNorm have a zero gradient up to rounding, which is that of
        # float32 sums of terms near 1 (measured up to 7e-7 on an AMD EPYC, varying from run to run): atol.
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)


def test_compiled_second_order_maml_equals_eager() -> None:
    assert_same_gradients(lambda m: MAML(m, Classification(), inner_lr=0.3, inner_steps=2))


def test_compiled_metasgd_equals_eager_including_the_learned_rates() -> None:
    assert_same_gradients(lambda m: MetaSGD(m, Classification()))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fomaml", "mamlpp", "reptile"])
def test_compiled_variants_equal_eager(name: str) -> None:
    makers: dict[str, tuple[Maker, str]] = {
        "fomaml": (lambda m: MAML(m, Classification(), inner_lr=0.3, inner_steps=2, first_order=True), "batch"),
        "mamlpp": (lambda m: MAMLPlusPlus(m, Classification(), inner_steps=2), "batch_per_step"),
        # SGD inside: Adam would turn the rounding noise of zero gradients (conv biases before BatchNorm)
        # into full-size steps of either sign.
        "reptile": (lambda m: Reptile(m, Classification(), inner_steps=3, inner_optimizer=InnerSGD(), inner_lr=0.1),
                    "batch"),
    }
    make, norm = makers[name]
    assert_same_gradients(make, norm)


def test_failed_compilation_falls_back_to_eager_with_one_warning(monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    def no_compiler(fn: Callable[..., object], **_: object) -> Callable[..., object]:
        def broken(*args: object) -> object:
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found\nmore detail")
        return broken

    monkeypatch.setattr(torch, "compile", no_compiler)
    eager = MAML(tiny_conv(), Classification(), inner_lr=0.3)
    eager.use_compile(False, CPU)
    failing = MAML(tiny_conv(), Classification(), inner_lr=0.3)
    assert failing.use_compile("auto", CPU)
    batch = episodes()
    with caplog.at_level(logging.WARNING):
        first = meta_gradient(failing, batch)
        meta_gradient(failing, batch)
    assert failing._compiled is not None and failing._compiled.works is False  # eager from the first call on
    warnings = [r.getMessage() for r in caplog.records if "torch.compile failed" in r.getMessage()]
    assert warnings == ["torch.compile failed (RuntimeError: InvalidCxxCompiler: no working C++ compiler found); "
                        "training continues without compiling (trainer.compile=false skips the attempt)"]
    expected = meta_gradient(eager, batch)
    for name in expected:
        torch.testing.assert_close(first[name], expected[name])


def test_compile_auto_follows_device_model_and_path() -> None:
    maml = MAML(tiny_conv(), Classification())
    assert maml.use_compile("auto", CPU)
    assert not maml.model.features[3].weight.is_contiguous()  # channels-last (8 input channels)
    assert not MAML(tiny_conv(), Classification()).use_compile("auto", torch.device("cuda"))  # GPUs stay eager
    assert not MAML(MLP(1, 1), Regression()).use_compile("auto", CPU)  # vmap path
    assert not MAML(tiny_conv(), Classification(), vectorize=False).use_compile(False, CPU)
    with pytest.raises(ValueError, match="compile=true: compiles the per-task path; it needs algorithm.vectorize"):
        MAML(MLP(1, 1), Regression(), vectorize=True).use_compile(True, CPU)
    anil = ANIL(tiny_conv(), Classification())  # its own per-task path, never compiled
    assert not anil.use_compile("auto", CPU)
    assert anil.model.features[3].weight.is_contiguous()  # and no channels-last weights for eager convolutions
    with pytest.raises(ValueError, match="compile=true: ANIL has no compiled path"):
        anil.use_compile(True, CPU)
    protonet = ProtoNet(tiny_conv(), Classification())
    assert not protonet.use_compile("auto", CPU)
    with pytest.raises(ValueError, match="compile=true: ProtoNet has no compiled path"):
        protonet.use_compile(True, CPU)


def test_precision_auto_is_bfloat16_only_for_convolutions_on_cpus_that_have_it(monkeypatch: pytest.MonkeyPatch) -> None:
    conv, mlp = tiny_conv(), MLP(1, 1)
    monkeypatch.setattr(runtime, "native_bfloat16", lambda device: True)
    assert resolve_precision("auto", CPU, conv) == torch.bfloat16
    assert resolve_precision("auto", CPU, mlp) == torch.float32
    assert resolve_precision("auto", torch.device("cuda"), conv) == torch.float32  # GPUs keep float32
    assert resolve_precision("float32", CPU, conv) == torch.float32
    assert resolve_precision("bfloat16", CPU, mlp) == torch.bfloat16
    monkeypatch.setattr(runtime, "native_bfloat16", lambda device: False)
    assert resolve_precision("auto", CPU, conv) == torch.float32
    with pytest.raises(ValueError, match="precision='bfloat16': this cpu device has no native bfloat16"):
        resolve_precision("bfloat16", CPU, conv)
    with pytest.raises(ValueError, match="precision='float16': must be one of auto, float32, bfloat16"):
        resolve_precision("float16", CPU, conv)


def test_meta_training_in_bfloat16_learns_as_float32_does() -> None:
    """A few meta-steps on a fixed batch under bfloat16 autocast lower the query loss as far as in float32,
    with float32 losses and gradients throughout."""
    batch = episodes(tasks=4)
    final = {}
    for dtype in (torch.float32, torch.bfloat16):
        algorithm = MAML(tiny_conv(), Classification(), inner_lr=0.3)
        algorithm.measure_pre_adaptation = False
        optimizer = torch.optim.Adam(algorithm.parameters(), lr=3e-3)
        losses = []
        for _ in range(40):
            optimizer.zero_grad(set_to_none=True)
            with autocast(CPU, dtype):
                loss, _, score, _ = algorithm._batch_outcome(batch, steps=1, create_graph=True, backward=True)
            assert loss.dtype == score.dtype == torch.float32
            assert all(p.grad is None or p.grad.dtype == torch.float32 for p in algorithm.parameters())
            optimizer.step()
            losses.append(loss.mean().item())
        assert losses[-1] < 0.5 * losses[0], (dtype, losses[0], losses[-1])
        final[dtype] = losses[-1]
    assert abs(final[torch.bfloat16] - final[torch.float32]) < 0.15 * final[torch.float32] + 0.05, final


def test_losses_and_embeddings_are_computed_at_least_in_float32() -> None:
    logits = torch.randn(6, 3, dtype=torch.bfloat16)
    assert Classification().loss(logits, torch.tensor([0, 1, 2] * 2)).dtype == torch.float32
    assert Regression().loss(torch.randn(4, 1, dtype=torch.float64), torch.randn(4, 1)).dtype == torch.float64
    protonet = ProtoNet(Conv4(1, None, 12, hidden=8, blocks=3), Classification())
    with autocast(CPU, torch.bfloat16):
        support, _ = protonet.embed([episodes().support_x, episodes().query_x])
    assert support.dtype == torch.float32


@pytest.mark.parametrize("make", [ProtoNet, MatchingNet], ids=["protonet", "matching"])
def test_metric_learners_compare_embeddings_in_float32_under_bfloat16_autocast(make: Callable[..., nn.Module]) -> None:
    """Autocast must not reach the distances: squared distances of 64-d embeddings near 1,000 computed
    with bfloat16 matrix products were off by about 1.6, which scrambles logits and their softmax."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(5).repeat(3).expand(2, -1).contiguous()
    batch = TaskBatch(3 * torch.randn(2, 15, 64, generator=g), labels, 3 * torch.randn(2, 15, 64, generator=g), labels)
    algorithm = make(nn.Identity(), Classification())  # embeddings are the float32 inputs themselves
    reference = algorithm.evaluate(batch)
    with autocast(CPU, torch.bfloat16):
        reduced = algorithm.evaluate(batch)
        state = algorithm.adapt(batch[0])
    torch.testing.assert_close(reduced.loss, reference.loss, rtol=1e-6, atol=1e-6)
    assert all(value.dtype == torch.float32 for value in state.values() if value.is_floating_point())


def test_results_record_the_precision_and_compilation(tmp_path: Path) -> None:
    from metalearn.data.sinusoid import SinusoidTasks
    from metalearn.trainer import Trainer

    tasks = SinusoidTasks()
    algorithm = MAML(MLP(1, 1, hidden_sizes=[8]), tasks.objective)
    logger = functools.partial(TensorBoardLogger, log_dir=tmp_path)
    trainer = Trainer(algorithm, tasks, torch.optim.Adam(algorithm.parameters()), logger, tmp_path,
                      max_steps=2, meta_batch_size=2, eval_every=2, val_tasks=2, test_tasks=2, eval_batch_size=2,
                      device="cpu", progress=False)
    results = trainer.fit()
    assert (results["precision"], results["compiled"]) == ("float32", False)  # an MLP: float32, vmap
