"""Tests of ProtoNet: prototypes, logits and scores on hand-made 2-D embeddings (distances written out),
the cosine option and its learned scale, meta-gradients against a plain-autograd reference,
training way unlike evaluation way, no leaks through batch-statistics BatchNorm, evaluation without
gradients, argument checks, and learning on real Omniglot episodes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalearn.algorithms.protonet import ProtoNet, class_means
from metalearn.models.mlp import MLP
from metalearn.objectives import Classification, Regression
from metalearn.tasks import Task, TaskBatch, stack_tasks
from tests.algorithms.helpers import meta_grads, omniglot_learning, random_batch, tiny_conv, tiny_episodes

# ---------------------------------------------------------------------------------------------
# 1. Prototypes, logits and scores on hand-made 2-D points (the model is the identity).
# ---------------------------------------------------------------------------------------------

# Uneven shots, labels out of order: class 0 {(0,0), (2,0)} -> (1,0); class 1 {(0,3)} -> (0,3);
# class 2 {(4,4), (4,2), (4,0)} -> (4,2).
SUPPORT_X = torch.tensor([[0.0, 3.0], [0.0, 0.0], [4.0, 4.0], [2.0, 0.0], [4.0, 2.0], [4.0, 0.0]], dtype=torch.float64)
SUPPORT_Y = torch.tensor([1, 0, 2, 0, 2, 2])
PROTOTYPES = torch.tensor([[1.0, 0.0], [0.0, 3.0], [4.0, 2.0]], dtype=torch.float64)
QUERY_X = torch.tensor([[1.0, 1.0], [3.0, 3.0]], dtype=torch.float64)
QUERY_Y = torch.tensor([0, 1])
# Squared distances of (1,1): 0+1, 1+4, 9+1; of (3,3): 4+9, 9+0, 1+1.
EUCLIDEAN_LOGITS = -torch.tensor([[1.0, 5.0, 10.0], [13.0, 9.0, 2.0]], dtype=torch.float64)
# Cosines of (1,1)/sqrt2 and (3,3)/sqrt18 (the same direction) with (1,0), (0,1) and (4,2)/sqrt20.
COSINES = torch.tensor([[1 / math.sqrt(2), 1 / math.sqrt(2), 6 / math.sqrt(40)]] * 2, dtype=torch.float64)

HAND_TASK = Task(SUPPORT_X, SUPPORT_Y, QUERY_X, QUERY_Y)


def cross_entropy_by_hand(logits: Tensor, labels: Tensor) -> float:
    """Mean over rows of log(sum exp(logits)) - logits[label], written out."""
    rows = [math.log(sum(math.exp(v) for v in row)) - row[y] for row, y in zip(logits.tolist(), labels.tolist())]
    return sum(rows) / len(rows)


def test_class_means_for_any_shot() -> None:
    """Two tasks at once, uneven shots: each row is the mean of its class's embeddings."""
    second = torch.tensor([[1.0, 1.0], [3.0, 5.0], [0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [5.0, 3.0]], dtype=torch.float64)
    labels = torch.stack([SUPPORT_Y, torch.tensor([2, 0, 1, 1, 1, 0])])
    means = class_means(torch.stack([SUPPORT_X, second]), labels, 3)
    expected = torch.stack([PROTOTYPES, torch.tensor([[4.0, 4.0], [1.0, 1.0], [1.0, 1.0]], dtype=torch.float64)])
    torch.testing.assert_close(means, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="every class 0..3 needs a support example"):
        class_means(SUPPORT_X.unsqueeze(0), SUPPORT_Y.unsqueeze(0), 4)


def test_prototypes_logits_and_scores_by_hand() -> None:
    """adapt gives the class means; predict gives uniform logits before and minus the squared distances
    after; evaluate scores them: cross-entropy and accuracy after, chance (log 3, label-0 rate) before."""
    algorithm = ProtoNet(nn.Identity(), Classification())
    torch.testing.assert_close(algorithm.adapt(HAND_TASK)["prototypes"], PROTOTYPES, rtol=0, atol=0)
    before, after = algorithm.predict(HAND_TASK, QUERY_X)
    torch.testing.assert_close(after, EUCLIDEAN_LOGITS, rtol=0, atol=1e-12)
    assert torch.equal(before, torch.zeros(2, 3, dtype=torch.float64))

    scores = algorithm.evaluate(stack_tasks([HAND_TASK]))
    assert scores.loss.item() == pytest.approx(cross_entropy_by_hand(EUCLIDEAN_LOGITS, QUERY_Y), rel=1e-12)
    assert scores.score.item() == 0.5  # (1,1) -> class 0 is right; (3,3) -> class 2, not 1
    assert scores.loss_pre.item() == pytest.approx(math.log(3), rel=1e-12)
    assert scores.score_pre.item() == 0.5  # argmax of equal logits is class 0: one query of two


def test_cosine_logits_and_learned_scale_gradient() -> None:
    """Cosine logits are scale * cos; with learn_scale the scale is a meta-parameter whose gradient is
    the hand-derived d CE(s * cos) / ds = mean over queries of softmax(s * cos) . cos - cos[label]."""
    algorithm = ProtoNet(nn.Identity(), Classification(), distance="cosine", scale=10.0, learn_scale=True).double()
    _, after = algorithm.predict(HAND_TASK, QUERY_X)
    torch.testing.assert_close(after, 10 * COSINES, rtol=1e-12, atol=0)
    assert [name for name, _ in algorithm.named_parameters()] == ["scale"]

    result = algorithm.meta_train_step(stack_tasks([HAND_TASK]))

    probabilities = F.softmax(10 * COSINES, dim=-1)
    expected = ((probabilities * COSINES).sum(-1) - COSINES[torch.arange(2), QUERY_Y]).mean()
    assert algorithm.scale.grad is not None
    assert algorithm.scale.grad.item() == pytest.approx(expected.item(), rel=1e-10)
    assert result.meta_loss == pytest.approx(cross_entropy_by_hand(10 * COSINES, QUERY_Y), rel=1e-12)


def test_fixed_scale_is_a_buffer_that_scales_euclidean_logits() -> None:
    algorithm = ProtoNet(nn.Identity(), Classification(), scale=0.5)
    assert not list(algorithm.parameters()) and "scale" in algorithm.state_dict()
    torch.testing.assert_close(algorithm.predict(HAND_TASK, QUERY_X)[1], 0.5 * EUCLIDEAN_LOGITS, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# 2. Meta-gradients equal those of a plain-autograd reference.
# ---------------------------------------------------------------------------------------------


def reference_loss(model: nn.Module, batch: TaskBatch, joint: bool = False) -> Tensor:
    """Mean over tasks of the query cross-entropy with logits -||f(x) - c_k||^2, c_k the mean of f over
    class k's support points: one task, one class and one difference at a time. `joint`: support and
    query images go through f in one pass (batch statistics over both), as Snell et al.'s code trains."""
    losses = []
    for task in batch:
        if joint:
            embedded = model(torch.cat([task.support_x, task.query_x])).flatten(1)
            support, query = embedded[:len(task.support_y)], embedded[len(task.support_y):]
        else:
            support, query = model(task.support_x), model(task.query_x)
        n_way = int(task.support_y.max()) + 1
        prototypes = torch.stack([support[task.support_y == k].mean(0) for k in range(n_way)])
        logits = -((query.unsqueeze(1) - prototypes.unsqueeze(0)) ** 2).sum(-1)
        losses.append(F.cross_entropy(logits, task.query_y))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("shots", [1, 3])
def test_meta_gradient_matches_reference(shots: int) -> None:
    """The encoder's .grad after meta_train_step equals autograd of the reference loss (3 tasks,
    4-way, through a tanh MLP), and the reported meta-loss equals that loss."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = MLP(3, 2, hidden_sizes=(5,), activation="tanh").double()
    batch = random_batch(seed=shots, tasks=3, n_way=4, shots=shots, queries=2)
    algorithm = ProtoNet(model, Classification())

    grads, result = meta_grads(algorithm, batch)

    loss = reference_loss(model, batch)
    expected = torch.autograd.grad(loss, list(model.parameters()))
    assert grads.keys() == dict(model.named_parameters()).keys()
    for (name, actual), reference in zip(grads.items(), expected):
        torch.testing.assert_close(actual, reference, rtol=1e-10, atol=1e-13, msg=name)
    # Every weight receives a real gradient; the output bias none, as shifting all embeddings alike
    # changes no distance.
    magnitudes = {name: g.abs().max().item() for name, g in zip(grads, expected)}
    assert magnitudes.pop("net.2.bias") < 1e-12 and min(magnitudes.values()) > 1e-3, magnitudes
    assert result.meta_loss == pytest.approx(loss.item(), rel=1e-12)
    assert result.meta_loss_pre == pytest.approx(math.log(4), rel=1e-12)


# ---------------------------------------------------------------------------------------------
# 3. Training way differs from evaluation way; evaluation leaves no gradients.
# ---------------------------------------------------------------------------------------------


def test_training_way_differs_from_evaluation_way() -> None:
    """A 6-way 2-shot meta-step, then 3-way 1-shot evaluation and prediction with the same network."""
    episodes, generator = tiny_episodes(), torch.Generator().manual_seed(1)
    algorithm = ProtoNet(tiny_conv("batch_running"), Classification())
    result = algorithm.meta_train_step(episodes.sample(2, "train", generator))
    assert result.meta_loss_pre == pytest.approx(math.log(6))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in algorithm.parameters())

    algorithm.eval()
    test = episodes.sample(4, "test", generator)
    scores = algorithm.evaluate(test)
    assert scores.loss.shape == (4,)
    torch.testing.assert_close(scores.loss_pre, torch.full((4,), math.log(3)))
    before, after = algorithm.predict(test[0], test[0].query_x)
    assert before.shape == after.shape == (6, 3)
    assert algorithm.adapt(test[0])["prototypes"].shape == (3, 4 * 2 * 2)


def test_evaluate_and_adapt_leave_no_gradients() -> None:
    episodes = tiny_episodes()
    algorithm = ProtoNet(tiny_conv("batch"), Classification(), distance="cosine", scale=5.0, learn_scale=True)
    batch = episodes.sample(3, "test", torch.Generator().manual_seed(2))
    scores = algorithm.evaluate(batch)
    assert all(p.grad is None for p in algorithm.parameters())
    assert not any(getattr(scores, name).requires_grad for name in ("loss", "loss_pre", "score", "score_pre"))
    assert not algorithm.adapt(batch[0])["prototypes"].requires_grad
    assert algorithm.adapt(batch[0], create_graph=True)["prototypes"].requires_grad


# ---------------------------------------------------------------------------------------------
# 4. Batch statistics never leak between tasks or from query into prototypes; fusing is exact.
# ---------------------------------------------------------------------------------------------


def test_no_batchnorm_leak_across_tasks_or_from_query_into_prototypes() -> None:
    """norm=batch: task 0's scores do not depend on the other tasks, nor its prototypes on its query."""
    episodes = tiny_episodes()
    algorithm = ProtoNet(tiny_conv("batch").double(), Classification())
    base = episodes.sample(3, "test", torch.Generator().manual_seed(3))
    other = episodes.sample(3, "test", torch.Generator().manual_seed(4))
    base, other = (TaskBatch(b.support_x.double(), b.support_y, b.query_x.double(), b.query_y) for b in (base, other))
    mixed = TaskBatch(torch.cat([base.support_x[:1], other.support_x[1:]]), base.support_y,
                      torch.cat([base.query_x[:1], other.query_x[1:]]), base.query_y)
    torch.testing.assert_close(algorithm.evaluate(base).loss[0], algorithm.evaluate(mixed).loss[0], rtol=1e-12, atol=0)
    new_query = Task(base[0].support_x, base[0].support_y, other[0].query_x, base[0].query_y)
    assert torch.equal(algorithm.adapt(base[0])["prototypes"], algorithm.adapt(new_query)["prototypes"])
    assert not torch.equal(algorithm.evaluate(base).loss[1:], algorithm.evaluate(mixed).loss[1:])


@pytest.mark.parametrize("norm", ["batch_running", "group"])
def test_one_pass_over_the_meta_batch_equals_one_task_at_a_time(norm: str) -> None:
    """Per-example normalisation (running statistics in eval mode, GroupNorm): the fused forward pass
    over all tasks gives each task the scores it gets alone, and leaves running statistics alone."""
    episodes = tiny_episodes()
    model = tiny_conv(norm)
    algorithm = ProtoNet(model, Classification())
    algorithm.meta_train_step(episodes.sample(2, "train", torch.Generator().manual_seed(5)))  # non-trivial stats
    algorithm.eval()
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    batch = episodes.sample(4, "test", torch.Generator().manual_seed(6))
    together = algorithm.evaluate(batch)
    alone = [algorithm.evaluate(stack_tasks([task])) for task in batch]
    torch.testing.assert_close(together.loss, torch.cat([a.loss for a in alone]), rtol=1e-5, atol=1e-6)
    assert all(torch.equal(buffers[name], b) for name, b in model.named_buffers())


def test_per_task_training_pass_is_the_papers_joint_pass_and_evaluation_stays_per_set() -> None:
    """train_pass=per_task: a training step's loss and gradient equal the joint-pass reference (and
    differ from per_set's, whose support and query are normalised apart); evaluation with batch
    statistics is per set either way, so a query set never shapes the prototypes."""
    episodes = tiny_episodes()
    batch = episodes.sample(2, "train", torch.Generator().manual_seed(7))
    batch = TaskBatch(batch.support_x.double(), batch.support_y, batch.query_x.double(), batch.query_y)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = tiny_conv("batch").double()
    joint, apart = (ProtoNet(model, Classification(), train_pass=mode) for mode in ("per_task", "per_set"))

    grads, result = meta_grads(joint, batch)
    loss = reference_loss(model, batch, joint=True)
    for (name, actual), reference in zip(grads.items(), torch.autograd.grad(loss, list(model.parameters()))):
        torch.testing.assert_close(actual, reference, rtol=1e-9, atol=1e-12, msg=name)
    assert result.meta_loss == pytest.approx(loss.item(), rel=1e-10)
    _, separate = meta_grads(apart, batch)
    assert abs(separate.meta_loss - result.meta_loss) > 1e-3

    test = episodes.sample(2, "test", torch.Generator().manual_seed(8))
    test = TaskBatch(test.support_x.double(), test.support_y, test.query_x.double(), test.query_y)
    joint.eval(), apart.eval()
    torch.testing.assert_close(joint.evaluate(test).loss, apart.evaluate(test).loss, rtol=0, atol=0)
    new_query = Task(test[0].support_x, test[0].support_y, test[1].query_x, test[0].query_y)
    assert torch.equal(joint.adapt(test[0])["prototypes"], joint.adapt(new_query)["prototypes"])


# ---------------------------------------------------------------------------------------------
# 5. Argument checks.
# ---------------------------------------------------------------------------------------------


def test_regression_objective_is_refused() -> None:
    with pytest.raises(ValueError, match="ProtoNet needs a classification dataset.*Regression"):
        ProtoNet(nn.Identity(), Regression())


@pytest.mark.parametrize(("options", "message"), [
    ({"distance": "manhattan"}, "distance='manhattan': must be one of euclidean, cosine"),
    ({"scale": 0.0}, "scale=0.0: must be a finite number > 0"),
    ({"scale": math.inf}, "scale=inf: must be a finite number > 0"),
    ({"train_pass": "joint"}, "train_pass='joint': must be one of per_set, per_task"),
])
def test_bad_options_are_named(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ProtoNet(nn.Identity(), Classification(), **options)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# 6. Learning on real Omniglot.
# ---------------------------------------------------------------------------------------------


def test_learns_omniglot_5way_1shot(omniglot_root: Path, cache_dir: Path) -> None:
    """A Conv-4 with 16 filters, 150 meta-steps of 5-way 1-shot episodes (meta-batch 4, Adam 1e-3):
    held-out test-split accuracy is far above chance (20%) and well above the untrained network's."""
    untrained, scores = omniglot_learning(lambda model: ProtoNet(model, Classification()), omniglot_root, cache_dir)
    accuracy = scores.score.mean().item()
    # Measured: 0.45 untrained (random Conv-4 features already separate some characters), 0.81 after.
    assert accuracy > 0.7 and accuracy > untrained + 0.2, (untrained, accuracy)
    assert scores.score_pre.mean().item() == pytest.approx(0.2)


def test_pre_adaptation_metrics_are_optional_and_change_nothing_else() -> None:
    """measure_pre_adaptation=False (the trainer's setting on steps it does not log): NaN chance
    metrics while training, the same loss, score and gradients; evaluation still measures them."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        algorithm = ProtoNet(MLP(3, 2, hidden_sizes=(5,), activation="tanh").double(), Classification())
    batch = random_batch(seed=9, tasks=2, n_way=3, shots=2, queries=2)
    grads, result = meta_grads(algorithm, batch)
    algorithm.measure_pre_adaptation = False
    lean_grads, lean = meta_grads(algorithm, batch)
    assert math.isnan(lean.meta_loss_pre) and math.isnan(lean.score_pre)
    assert result.meta_loss_pre == pytest.approx(math.log(3))
    assert (lean.meta_loss, lean.score) == (result.meta_loss, result.score)
    assert all(torch.equal(lean_grads[name], grads[name]) for name in grads)
    torch.testing.assert_close(algorithm.evaluate(batch).loss_pre, torch.full((2,), math.log(3), dtype=torch.float64))
