"""Tests of Relation Networks: relation scores, MSE loss and chance-level metrics on a hand-made case (the
relation module's weights set by hand, k-shot class maps summed), the relation module's sizes on Omniglot
and mini-ImageNet feature maps and on flat embeddings, meta-gradients against a plain-autograd reference
(one pair at a time), batch statistics kept within a task, setup and argument checks, and learning on
real Omniglot episodes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from metalearn.algorithms.metric import class_sums
from metalearn.algorithms.relation import RelationNet
from metalearn.data.omniglot import Omniglot
from metalearn.models.conv import Conv4
from metalearn.objectives import Classification, Regression
from metalearn.tasks import Task, TaskBatch, stack_tasks
from tests.algorithms.helpers import Fixed, learning_run, meta_grads, random_batch, tiny_episodes


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# ---------------------------------------------------------------------------------------------
# 1. A hand-made case: 2-D points (read as 2x1x1 maps) and a relation module set by hand.
# ---------------------------------------------------------------------------------------------

# Class 0 has two shots, (1,0) + (0,1) = (1,1); class 1 is (2,1); class 2 is (0,0.5).
SUPPORT_X = torch.tensor([[1.0, 0.0], [2.0, 1.0], [0.0, 0.5], [0.0, 1.0]], dtype=torch.float64)
SUPPORT_Y = torch.tensor([0, 1, 2, 0])
QUERY_X = torch.tensor([[1.0, 2.0], [3.0, 0.0]], dtype=torch.float64)
QUERY_Y = torch.tensor([1, 0])
HAND_TASK = Task(SUPPORT_X, SUPPORT_Y, QUERY_X, QUERY_Y)
# The module set by hand computes sigmoid(relu(z) - 2) with z = 2 c0 + c1 - q0 + 0.5 q1 + 0.5 for the class
# sum (c0, c1) and the query (q0, q1). Query (1,2): z = 3.5, 5.5, 1; query (3,0): z = 0.5, 2.5, -2 (relu: 0).
SCORES = [[sigmoid(1.5), sigmoid(3.5), sigmoid(-1.0)], [sigmoid(-1.5), sigmoid(0.5), sigmoid(-2.0)]]


def hand_set_algorithm() -> RelationNet:
    """RelationNet on the identity embedding with 1 filter, 1 hidden unit, no normalisation, and weights
    set by hand. On 1x1 maps a padded 3x3 convolution only uses its centre tap: the other taps are random
    and must not matter."""
    algorithm = RelationNet(nn.Identity(), Classification(), filters=1, hidden=1, norm="none")
    algorithm.setup(Fixed(stack_tasks([HAND_TASK])))
    relation = algorithm.relation
    assert relation is not None
    conv1, conv2, linear1, linear2 = (m for m in relation if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert conv1.weight.shape == (1, 4, 3, 3) and conv2.weight.shape == (1, 1, 3, 3)
    assert not any(isinstance(m, nn.MaxPool2d) for m in relation)  # 1x1 maps are never pooled
    assert linear1.in_features == 1
    with torch.no_grad():
        torch.manual_seed(0)
        for conv in (conv1, conv2):
            conv.weight.normal_()
        conv1.weight[0, :, 1, 1] = torch.tensor([2.0, 1.0, -1.0, 0.5])  # class channels first, then the query's
        conv1.bias.fill_(0.5)
        conv2.weight[0, 0, 1, 1] = 1.0
        conv2.bias.zero_()
        linear1.weight.fill_(1.0)
        linear1.bias.zero_()
        linear2.weight.fill_(1.0)
        linear2.bias.fill_(-2.0)
    return algorithm


def test_relation_scores_and_mse_loss_by_hand() -> None:
    """Class maps are sums over shots; each pair is [class; query]; scores pass through the hand-set
    module; the loss is the mean squared error to one-hot labels over all Q x N scores; chance level is
    the constant score 1/3: loss (3 - 1) / 3^2, accuracy the label-0 rate."""
    algorithm = hand_set_algorithm()
    state = algorithm.adapt(HAND_TASK)
    expected_classes = torch.tensor([[1.0, 1.0], [2.0, 1.0], [0.0, 0.5]], dtype=torch.float64)
    torch.testing.assert_close(state["classes"], expected_classes[:, :, None, None], rtol=0, atol=0)
    before, after = algorithm.predict(HAND_TASK, QUERY_X)
    torch.testing.assert_close(after, torch.tensor(SCORES, dtype=torch.float64), rtol=1e-13, atol=0)
    assert torch.equal(before, torch.zeros(2, 3, dtype=torch.float64))

    scores = algorithm.evaluate(stack_tasks([HAND_TASK]))
    targets = [[0, 1, 0], [1, 0, 0]]
    mse = sum((s - t) ** 2 for row, trow in zip(SCORES, targets) for s, t in zip(row, trow)) / 6
    assert scores.loss.item() == pytest.approx(mse, rel=1e-13)
    assert scores.score.item() == 0.5  # both queries pick class 1: right for the first only
    assert scores.loss_pre.item() == pytest.approx(2 / 9, rel=1e-12)
    assert scores.score_pre.item() == 0.5
    result = algorithm.meta_train_step(stack_tasks([HAND_TASK]))
    assert (result.meta_loss, result.meta_loss_pre) == (pytest.approx(mse, rel=1e-13), pytest.approx(2 / 9))


def test_class_sums_for_any_shot() -> None:
    """Two tasks, uneven shots, maps [C, H, W] = [1, 1, 2]: each class's maps are added, not averaged."""
    maps = torch.arange(12.0).view(2, 3, 1, 1, 2)
    labels = torch.tensor([[1, 0, 1], [0, 0, 1]])
    expected = torch.tensor([[[2.0, 3.0], [4.0, 6.0]], [[14.0, 16.0], [10.0, 11.0]]]).view(2, 2, 1, 1, 2)
    assert torch.equal(class_sums(maps, labels, 2), expected)
    with pytest.raises(ValueError, match="every class 0..2 needs a support example"):
        class_sums(maps, labels, 3)


# ---------------------------------------------------------------------------------------------
# 2. Sizes: the paper's feature maps on Omniglot and mini-ImageNet, and flat embeddings.
# ---------------------------------------------------------------------------------------------


def image_task(size: int, channels: int = 1, n_way: int = 3, seed: int = 0) -> TaskBatch:
    """One random task of `n_way` classes, one shot and one query each."""
    g = torch.Generator().manual_seed(seed)
    return TaskBatch(torch.rand(1, n_way, channels, size, size, generator=g), torch.arange(n_way).unsqueeze(0),
                     torch.rand(1, n_way, channels, size, size, generator=g), torch.arange(n_way).unsqueeze(0))


@pytest.mark.parametrize(("size", "channels", "map_side", "pooled_side"), [(28, 1, 7, 1), (84, 3, 21, 5)])
def test_relation_module_sizes_for_omniglot_and_miniimagenet(size: int, channels: int, map_side: int,
                                                             pooled_side: int) -> None:
    """Conv-4 with two pooling blocks: 7x7 maps pool to 3x3 then 1x1 (Omniglot), 21x21 to 10x10 then 5x5
    (mini-ImageNet); the hidden layer gets filters x side^2 inputs; scores are [T, Q, N] in (0, 1)."""
    batch = image_task(size, channels)
    model = Conv4(channels, None, size, hidden=4, pool_blocks=2, flatten=False)
    assert model.feature_shape == (4, map_side, map_side)
    algorithm = RelationNet(model, Classification())
    algorithm.setup(Fixed(batch))
    assert algorithm.relation is not None
    linear = next(m for m in algorithm.relation if isinstance(m, nn.Linear))
    convs = [m for m in algorithm.relation if isinstance(m, nn.Conv2d)]
    assert [c.in_channels for c in convs] == [8, 4] and linear.in_features == 4 * pooled_side**2
    assert linear.out_features == 8
    algorithm.eval()
    _, after = algorithm.predict(batch[0], batch.query_x[0])
    assert after.shape == (3, 3) and bool(((after > 0) & (after < 1)).all())


def test_flat_embeddings_are_one_by_one_maps() -> None:
    """A flat embedding (Conv-4's default, 64 values) becomes 64x1x1 maps: no pooling, 64 filters."""
    batch = image_task(28)
    algorithm = RelationNet(Conv4(1, None, 28, hidden=64), Classification())
    algorithm.setup(Fixed(batch))
    assert algorithm.relation is not None
    assert not any(isinstance(m, nn.MaxPool2d) for m in algorithm.relation)
    assert next(m for m in algorithm.relation if isinstance(m, nn.Linear)).in_features == 64
    assert algorithm.meta_train_step(batch).meta_loss > 0


# ---------------------------------------------------------------------------------------------
# 3. Meta-gradients equal those of a plain-autograd reference.
# ---------------------------------------------------------------------------------------------


def reference_loss(algorithm: RelationNet, batch: TaskBatch) -> Tensor:
    """Mean over tasks of the mean over queries and classes of (r(sum of class k's maps, query) - [y = k])^2,
    with r the relation module on one [class; query] pair at a time."""
    relation = algorithm.relation
    assert relation is not None
    losses = []
    for task in batch:
        support, queries = algorithm.model(task.support_x), algorithm.model(task.query_x)
        n_way = int(task.support_y.max()) + 1
        classes = [sum(m for m, y in zip(support, task.support_y.tolist()) if y == k) for k in range(n_way)]
        errors = [(relation(torch.cat([classes[k], query]).unsqueeze(0))[0] - float(y == k)) ** 2
                  for query, y in zip(queries, task.query_y.tolist()) for k in range(n_way)]
        losses.append(torch.stack(errors).mean())
    return torch.stack(losses).mean()


@pytest.mark.parametrize("shots", [1, 3])
def test_meta_gradient_matches_reference(shots: int) -> None:
    """The .grad of every meta-parameter (a conv embedding's and the relation module's) after
    meta_train_step equals autograd of the reference loss (3 tasks, 4-way), as does the meta-loss."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh()).double()
        batch = random_batch(seed=shots, tasks=3, n_way=4, shots=shots, queries=2, shape=(1, 4, 4))
        algorithm = RelationNet(model, Classification(), filters=3, hidden=5, norm="none")
        algorithm.setup(Fixed(batch))
    grads, result = meta_grads(algorithm, batch, of=algorithm)

    loss = reference_loss(algorithm, batch)
    names = [name for name, _ in algorithm.named_parameters()]
    expected = torch.autograd.grad(loss, list(algorithm.parameters()))
    assert list(grads) == names and any(name.startswith("relation.") for name in names)
    for name, reference in zip(names, expected):
        torch.testing.assert_close(grads[name], reference, rtol=1e-10, atol=1e-13, msg=name)
        assert reference.abs().max() > 1e-5, name
    assert result.meta_loss == pytest.approx(loss.item(), rel=1e-12)
    assert result.meta_loss_pre == pytest.approx(3 / 16, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# 4. Batch statistics within a task; evaluation leaves no gradients; chance metrics are optional.
# ---------------------------------------------------------------------------------------------


def tiny_maps(norm: str) -> Conv4:
    """A two-block Conv-4 keeping 4x2x2 maps of 8x8 images, seeded without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Conv4(1, None, 8, hidden=4, blocks=2, norm=norm, flatten=False)


def test_relation_batchnorm_statistics_stay_within_a_task() -> None:
    """Relation norm=batch (batch statistics even in evaluation): task 0's loss does not depend on the
    other tasks of the batch; evaluate and adapt leave no gradients."""
    episodes = tiny_episodes()
    algorithm = RelationNet(tiny_maps("batch"), Classification(), norm="batch")
    algorithm.setup(episodes)
    algorithm.double().eval()
    base = episodes.sample(3, "test", torch.Generator().manual_seed(3))
    other = episodes.sample(3, "test", torch.Generator().manual_seed(4))
    base, other = (TaskBatch(b.support_x.double(), b.support_y, b.query_x.double(), b.query_y) for b in (base, other))
    mixed = TaskBatch(torch.cat([base.support_x[:1], other.support_x[1:]]), base.support_y,
                      torch.cat([base.query_x[:1], other.query_x[1:]]), base.query_y)
    scores = algorithm.evaluate(base)
    torch.testing.assert_close(scores.loss[0], algorithm.evaluate(mixed).loss[0], rtol=1e-12, atol=0)
    assert not torch.equal(scores.loss[1:], algorithm.evaluate(mixed).loss[1:])
    assert all(p.grad is None for p in algorithm.parameters())
    assert not any(getattr(scores, name).requires_grad for name in ("loss", "loss_pre", "score", "score_pre"))
    assert algorithm.adapt(base[0], create_graph=True)["classes"].requires_grad


def test_training_way_differs_from_evaluation_way_and_chance_loss_is_optional() -> None:
    """A 6-way 2-shot meta-step fills every gradient (chance loss 5/36, or NaN when not measured, with
    the same loss); 3-way evaluation reuses the module (chance loss 2/9)."""
    episodes, generator = tiny_episodes(), torch.Generator().manual_seed(1)
    algorithm = RelationNet(tiny_maps("batch_running"), Classification())
    algorithm.setup(episodes)
    batch = episodes.sample(2, "train", generator)
    grads, result = meta_grads(algorithm, batch, of=algorithm)
    assert result.meta_loss_pre == pytest.approx(5 / 36)
    assert len(grads) == len(list(algorithm.parameters())) and all(g.abs().sum() > 0 for g in grads.values())
    algorithm.measure_pre_adaptation = False
    lean_grads, lean = meta_grads(algorithm, batch, of=algorithm)
    assert math.isnan(lean.meta_loss_pre) and math.isnan(lean.score_pre) and lean.meta_loss == result.meta_loss

    algorithm.eval()
    scores = algorithm.evaluate(episodes.sample(4, "test", generator))
    torch.testing.assert_close(scores.loss_pre, torch.full((4,), 2 / 9))


# ---------------------------------------------------------------------------------------------
# 5. Setup and argument checks.
# ---------------------------------------------------------------------------------------------


def test_setup_is_required_and_checks_the_feature_shape() -> None:
    algorithm = RelationNet(nn.Identity(), Classification())
    with pytest.raises(RuntimeError, match="creates its relation module in setup"):
        algorithm.evaluate(stack_tasks([HAND_TASK]))
    sequences = nn.Flatten(2)  # [n, C, H, W] -> [n, C, H * W]: neither maps nor vectors
    with pytest.raises(ValueError, match=r"feature maps \[C, H, W\] or vectors, but the model gives .*\(1, 16\)"):
        RelationNet(sequences, Classification()).setup(Fixed(random_batch(0, 1, 2, 1, 1, shape=(1, 4, 4))))


def test_regression_objective_is_refused() -> None:
    with pytest.raises(ValueError, match="RelationNet needs a classification dataset.*Regression"):
        RelationNet(nn.Identity(), Regression())


@pytest.mark.parametrize(("options", "message"), [
    ({"norm": "batch_per_step"}, "norm='batch_per_step': must be one of batch, batch_running, group, none"),
    ({"hidden": 0}, "hidden=0: must be a positive integer"),
    ({"filters": 0}, "filters=0: must be a positive integer"),
])
def test_bad_options_are_named(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RelationNet(nn.Identity(), Classification(), **options)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# 6. Learning on real Omniglot.
# ---------------------------------------------------------------------------------------------


def test_learns_omniglot_5way_1shot(omniglot_root: Path, cache_dir: Path) -> None:
    """The paper's embedding at 16 filters (Conv-4 pooling in two blocks of four, 7x7 maps), 200 meta-steps
    of 5-way 1-shot episodes (meta-batch 4, Adam 1e-3): held-out test-split accuracy is far above chance
    (20%) and well above the untrained network's."""
    episodes = Omniglot(str(omniglot_root), n_way=5, k_shot=1, k_query=5, cache_dir=str(cache_dir))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Conv4(1, None, 28, hidden=16, norm="batch_running", pool_blocks=2, flatten=False)
        algorithm = RelationNet(model, Classification())
        algorithm.setup(episodes)
    untrained, scores, _ = learning_run(algorithm, episodes, lambda g: episodes.sample(4, "train", g),
                                        steps=200, lr=1e-3)
    accuracy = scores.score.mean().item()
    # Measured: 0.20 untrained (equal scores from the untrained module), 0.79 after.
    assert accuracy > 0.65 and accuracy > untrained + 0.3, (untrained, accuracy)
    assert scores.score_pre.mean().item() == pytest.approx(0.2)
    assert scores.loss.mean().item() < scores.loss_pre.mean().item() == pytest.approx(4 / 25)
