"""Tests of SNAIL: the DenseBlock's causal dilated convolution and gated activation by hand, the attention
block against masked softmax attention written out, causality of every block and of the whole network,
queries read in one shared-prefix pass equal to separate sequences, relabelling the classes, meta-gradients
against a plain-autograd reference (one sequence per query), setup and the way check, and learning on
real Omniglot episodes."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalearn.algorithms.snail import SNAIL
from metalearn.data.omniglot import Omniglot
from metalearn.models.conv import Conv4
from metalearn.models.snail import AttentionBlock, DenseBlock, SNAILNetwork, TCBlock
from metalearn.objectives import Classification, Regression
from metalearn.tasks import TaskBatch
from tests.algorithms.helpers import Fixed, learning_run, meta_grads, random_batch, tiny_episodes

SMALL = {"attention_sizes": [[4, 3], [5, 4], [6, 5]], "tc_filters": [3, 2]}


def seeded(seed: int, make: Callable[..., nn.Module], *args: object) -> nn.Module:
    """A float64 module whose initialisation depends only on `seed` (the global RNG is restored)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make(*args).double()


def small_snail(batch: TaskBatch, model: nn.Module | None = None, seed: int = 0) -> SNAIL:
    """SNAIL with small blocks on `model` (default: the identity on points), set up for `batch`, float64."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        algorithm = SNAIL(model or nn.Identity(), Classification(), **SMALL)  # type: ignore[arg-type]
        algorithm.setup(Fixed(batch))
    return algorithm.double()


# ---------------------------------------------------------------------------------------------
# 1. The blocks by hand.
# ---------------------------------------------------------------------------------------------


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


@pytest.mark.parametrize("dilation", [1, 2, 4])
def test_dense_block_is_a_gated_causal_dilated_convolution_by_hand(dilation: int) -> None:
    """One channel, one filter: f[t] = a0 x[t-d] + a1 x[t] + bf and g[t] = c0 x[t-d] + c1 x[t] + bg with x zero
    before the start; the block outputs [x[t], tanh(f[t]) sigmoid(g[t])]."""
    block = DenseBlock(1, dilation, 1).double()
    (a0, a1, bf), (c0, c1, bg) = (0.5, -1.0, 0.25), (2.0, 0.75, -0.5)
    with torch.no_grad():
        block.conv.weight.copy_(torch.tensor([[a0, a1], [c0, c1]]))  # columns: x[t - d], then x[t]
        block.conv.bias.copy_(torch.tensor([bf, bg]))
    x = [1.0, -2.0, 0.5, 3.0, -1.5, 2.5]
    out = block(torch.tensor(x, dtype=torch.float64).view(1, 6, 1))
    assert out.shape == (1, 6, 2)
    for t in range(6):
        past = x[t - dilation] if t >= dilation else 0.0
        gated = math.tanh(a0 * past + a1 * x[t] + bf) * sigmoid(c0 * past + c1 * x[t] + bg)
        assert out[0, t, 0].item() == x[t]
        assert out[0, t, 1].item() == pytest.approx(gated, rel=1e-14, abs=1e-15), t


def test_tc_block_depth_and_dilations() -> None:
    """ceil(log2 T) DenseBlocks with dilations 1, 2, 4, ...; each adds its filters to the channels."""
    for length, depth in [(2, 1), (6, 3), (8, 3), (9, 4), (26, 5)]:
        block = TCBlock(7, length, 3)
        assert [layer.dilation for layer in block.layers] == [2**i for i in range(depth)]
        assert block.out_channels == 7 + 3 * depth
    assert len(TCBlock(7, 1, 3).layers) == 0


def attention_by_hand(block: AttentionBlock, x: Tensor) -> Tensor:
    """For each position t: softmax over s <= t of q_t . k_s / sqrt(key size), the read sum_s w_s v_s."""
    q, k, v = block.query(x[0]), block.key(x[0]), block.value(x[0])
    reads = []
    for t in range(x.shape[1]):
        logits = torch.stack([torch.dot(q[t], k[s]) / math.sqrt(block.key_size) for s in range(t + 1)])
        weights = torch.exp(logits - logits.max()) / torch.exp(logits - logits.max()).sum()
        reads.append(sum(w * v[s] for s, w in enumerate(weights)))
    return torch.cat([x[0], torch.stack(reads)], dim=-1)  # type: ignore[arg-type]


def test_attention_block_is_masked_softmax_attention() -> None:
    """A 4-position sequence of 3 channels, key size 2 and value size 2, against the sums written out;
    position 0 reads its own value only."""
    block = seeded(0, AttentionBlock, 3, 2, 2)
    assert isinstance(block, AttentionBlock)
    x = torch.randn(1, 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = block(x)
    torch.testing.assert_close(out[0], attention_by_hand(block, x), rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(out[0, 0, 3:], block.value(x[0, 0]), rtol=1e-14, atol=0)


# ---------------------------------------------------------------------------------------------
# 2. Causality, and queries read in one pass as continuations of the shared support prefix.
# ---------------------------------------------------------------------------------------------

BLOCKS = {
    "dense": lambda: seeded(0, DenseBlock, 5, 2, 3),
    "tc": lambda: seeded(0, TCBlock, 5, 7, 3),
    "attention": lambda: seeded(0, AttentionBlock, 5, 4, 3),
    "network": lambda: seeded(0, SNAILNetwork, 5, 3, 7, SMALL["attention_sizes"], SMALL["tc_filters"]),
}


@pytest.mark.parametrize("name", list(BLOCKS))
@pytest.mark.parametrize("changed", [0, 3, 6])
def test_outputs_never_depend_on_later_positions(name: str, changed: int) -> None:
    """Changing position `changed` of a 7-position sequence leaves every earlier output exactly as it was
    and changes the output at that position."""
    block = BLOCKS[name]()
    x = torch.randn(2, 7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    edited = x.clone()
    edited[:, changed] = torch.randn(2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    before, after = block(x), block(edited)
    assert torch.equal(before[:, :changed], after[:, :changed])
    assert not torch.allclose(before[:, changed], after[:, changed])


@pytest.mark.parametrize("name", list(BLOCKS))
def test_shared_prefix_pass_equals_separate_sequences(name: str) -> None:
    """A prefix of 5 positions followed by 4 continuations, read in one pass (prefix=5), gives at each
    continuation what that continuation gives as the last position of its own 6-position sequence, and at
    the prefix what the prefix gives alone."""
    block = BLOCKS[name]()
    g = torch.Generator().manual_seed(4)
    prefix, continuations = torch.randn(2, 5, 5, dtype=torch.float64, generator=g), torch.randn(2, 4, 5,
                                                                                                dtype=torch.float64,
                                                                                                generator=g)
    shared = block(torch.cat([prefix, continuations], dim=1), prefix=5)
    torch.testing.assert_close(shared[:, :5], block(prefix), rtol=1e-13, atol=1e-14)
    for j in range(4):
        alone = block(torch.cat([prefix, continuations[:, j:j + 1]], dim=1))
        torch.testing.assert_close(shared[:, 5 + j], alone[:, 5], rtol=1e-12, atol=1e-13)


# ---------------------------------------------------------------------------------------------
# 3. The algorithm: relabelling, meta-gradients, shots.
# ---------------------------------------------------------------------------------------------


def relabel_network(network: SNAILNetwork, embedding_size: int, perm: list[int]) -> None:
    """Give label channel perm[k] the input weights of channel k in every linear map, and output perm[k]
    the weights of output k. Every block's input starts with the sequence's own [embedding; labels]
    (blocks concatenate), once per position read: twice for a DenseBlock ([x[t - d]; x[t]])."""
    reads: list[tuple[nn.Linear, int]] = [(network.out, 1)]
    for module in network.modules():
        if isinstance(module, DenseBlock):
            reads.append((module.conv, 2))
        elif isinstance(module, AttentionBlock):
            reads += [(module.query, 1), (module.key, 1), (module.value, 1)]
    with torch.no_grad():
        for linear, positions in reads:
            width = linear.in_features // positions
            for r in range(positions):
                start = r * width + embedding_size
                old = linear.weight[:, start:start + len(perm)].clone()
                linear.weight[:, start + torch.tensor(perm)] = old
        network.out.weight[perm] = network.out.weight.clone()
        network.out.bias[perm] = network.out.bias.clone()


def test_relabelling_the_classes_permutes_the_logits_when_the_label_weights_follow() -> None:
    """Classes renamed k -> perm[k] in support and query labels give the same loss and accuracy and logits
    permuted accordingly, once the weights that read label channels and write logits are permuted alike.
    (Without that, SNAIL is not equivariant to relabelling: a label's meaning is learned per channel.)"""
    batch = random_batch(seed=0, tasks=2, n_way=3, shots=2, queries=2)
    algorithm = small_snail(batch)
    assert algorithm.snail is not None
    perm = [2, 0, 1]
    mapping = torch.tensor(perm)
    relabelled = TaskBatch(batch.support_x, mapping[batch.support_y], batch.query_x, mapping[batch.query_y])
    scores = algorithm.evaluate(batch)
    logits = algorithm.classify(algorithm.fit(batch.support_x, batch.support_y, 3), batch.query_x)
    relabel_network(algorithm.snail, 3, perm)
    moved = algorithm.classify(algorithm.fit(relabelled.support_x, relabelled.support_y, 3), relabelled.query_x)
    torch.testing.assert_close(moved[..., perm], logits, rtol=1e-12, atol=1e-13)
    after = algorithm.evaluate(relabelled)
    torch.testing.assert_close(after.loss, scores.loss, rtol=1e-12, atol=0)
    assert torch.equal(after.score, scores.score)


def reference_loss(algorithm: SNAIL, batch: TaskBatch) -> Tensor:
    """Mean over tasks of the mean over queries of the cross-entropy of the network's last output on the
    query's own sequence: support [embedding; one-hot label] in order, then [query embedding; zeros]."""
    network = algorithm.snail
    assert network is not None
    losses = []
    for task in batch:
        n_way = int(task.support_y.max()) + 1
        support = torch.cat([algorithm.model(task.support_x).flatten(1),
                             F.one_hot(task.support_y, n_way).double()], dim=1)
        queries = algorithm.model(task.query_x).flatten(1)
        errors = []
        for query, y in zip(queries, task.query_y):
            sequence = torch.cat([support, torch.cat([query, query.new_zeros(n_way)]).unsqueeze(0)])
            errors.append(F.cross_entropy(network(sequence.unsqueeze(0))[0, -1:], y.unsqueeze(0)))
        losses.append(torch.stack(errors).mean())
    return torch.stack(losses).mean()


@pytest.mark.parametrize("shots", [1, 3])
def test_meta_gradient_matches_one_sequence_per_query(shots: int) -> None:
    """The .grad of every meta-parameter (a conv embedding's and every block's) after meta_train_step is
    finite, non-zero, and equals autograd of the reference loss (3 tasks, 4-way), as does the meta-loss;
    the chance loss is log 4."""
    model = seeded(0, lambda: nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Flatten()))
    batch = random_batch(seed=shots, tasks=3, n_way=4, shots=shots, queries=2, shape=(1, 3, 3))
    algorithm = small_snail(batch, model)
    grads, result = meta_grads(algorithm, batch, of=algorithm)
    names = [name for name, _ in algorithm.named_parameters()]
    assert list(grads) == names and sum(name.startswith("snail.blocks.") for name in names) > 10
    loss = reference_loss(algorithm, batch)
    expected = torch.autograd.grad(loss, list(algorithm.parameters()))
    for name, reference in zip(names, expected):
        assert bool(torch.isfinite(grads[name]).all()), name
        torch.testing.assert_close(grads[name], reference, rtol=1e-10, atol=1e-13, msg=name)
        assert reference.abs().max() > 1e-6, name
    assert result.meta_loss == pytest.approx(loss.item(), rel=1e-12)
    assert result.meta_loss_pre == pytest.approx(math.log(4), rel=1e-12)


def test_evaluates_another_shot_with_the_training_depth() -> None:
    """Set up on 2-shot episodes (T = 7: three DenseBlocks per TCBlock), it evaluates 5-shot episodes
    (sequences of 16) with the same blocks, and 1-shot ones; evaluation leaves no gradients."""
    algorithm = small_snail(random_batch(seed=0, tasks=1, n_way=3, shots=2, queries=1))
    assert algorithm.snail is not None
    assert [len(b.layers) for b in algorithm.snail.blocks if isinstance(b, TCBlock)] == [3, 3]
    for shots in (5, 1):
        scores = algorithm.evaluate(random_batch(seed=shots, tasks=2, n_way=3, shots=shots, queries=2))
        assert bool(torch.isfinite(scores.loss).all()) and scores.loss.shape == (2,)
    assert all(p.grad is None for p in algorithm.parameters())


# ---------------------------------------------------------------------------------------------
# 4. Setup, the way check and argument checks.
# ---------------------------------------------------------------------------------------------


def test_another_way_at_test_is_refused_naming_dataset_n_way() -> None:
    algorithm = small_snail(random_batch(seed=0, tasks=1, n_way=5, shots=1, queries=1))
    with pytest.raises(ValueError, match=r"built for 5-way tasks .* these are 3-way: set dataset.n_way=5"):
        algorithm.evaluate(random_batch(seed=1, tasks=2, n_way=3, shots=1, queries=1))
    with pytest.raises(ValueError, match="these are 3-way"):
        algorithm.meta_train_step(random_batch(seed=1, tasks=2, n_way=3, shots=1, queries=1))


def test_setup_refuses_a_training_way_unlike_the_evaluation_way() -> None:
    """tiny_episodes train 6-way and evaluate 3-way: refused when the network is built."""
    algorithm = SNAIL(nn.Flatten(), Classification(), **SMALL)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="outputs 6 logits as trained, so it cannot evaluate 3-way episodes: set "
                                         "dataset.n_way and dataset.train_n_way to the same way"):
        algorithm.setup(tiny_episodes())


def test_setup_sizes_the_network_from_the_embedding_and_the_episodes() -> None:
    """Paper sizes on a 16-d embedding of 5-way 1-shot episodes: input 16 + 5, TCBlocks of
    ceil(log2 6) = 3 layers, the channel count of the paper's Omniglot network, 5 outputs."""
    batch = random_batch(seed=0, tasks=1, n_way=5, shots=1, queries=1, shape=(16,))
    algorithm = SNAIL(nn.Identity(), Classification())
    with pytest.raises(RuntimeError, match="creates its sequence network in setup"):
        algorithm.evaluate(batch)
    algorithm.setup(Fixed(batch))
    assert algorithm.snail is not None
    first, out = algorithm.snail.blocks[0], algorithm.snail.out
    assert isinstance(first, AttentionBlock) and first.query.in_features == 21
    assert out.in_features == 21 + 32 + 3 * 128 + 128 + 3 * 128 + 256 and out.out_features == 5


def test_regression_objective_is_refused() -> None:
    with pytest.raises(ValueError, match="SNAIL needs a classification dataset.*Regression"):
        SNAIL(nn.Identity(), Regression())


@pytest.mark.parametrize(("options", "message"), [
    ({"tc_filters": [3]}, r"tc_filters=\[3\]: one TCBlock goes between consecutive attention blocks, so 2"),
    ({"attention_sizes": [], "tc_filters": []}, r"so 0 are needed for 0 attention blocks \(at least one\)"),
    ({"attention_sizes": [[4, 3], [5]], "tc_filters": [2]}, r"attention_sizes\[1\]=\[5\]: must be a pair"),
    ({"attention_sizes": [[4, 3], [5, 0]], "tc_filters": [2]}, r"attention_sizes\[1\]\[1\]=0: must be a positive"),
    ({"tc_filters": [3, 0]}, r"tc_filters\[1\]=0: must be a positive integer"),
])
def test_bad_block_sizes_are_named(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SNAIL(nn.Identity(), Classification(), **{**SMALL, **options})  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# 5. Learning on real Omniglot.
# ---------------------------------------------------------------------------------------------


def test_learns_omniglot_5way_1shot(omniglot_root: Path, cache_dir: Path) -> None:
    """A Conv-4 with 16 filters and a small SNAIL, 600 meta-steps of 5-way 1-shot episodes (meta-batch 4,
    Adam 2e-3): the held-out test-split accuracy is far above chance (20%) and the untrained network's;
    "before adaptation" is chance (accuracy 1/5, loss log 5)."""
    episodes = Omniglot(str(omniglot_root), n_way=5, k_shot=1, k_query=5, cache_dir=str(cache_dir))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Conv4(1, None, 28, hidden=16, norm="batch_running")
        algorithm = SNAIL(model, Classification(), attention_sizes=[[8, 8], [16, 8], [16, 8]], tc_filters=[16, 16])
        algorithm.setup(episodes)
    untrained, scores, _ = learning_run(algorithm, episodes, lambda g: episodes.sample(4, "train", g),
                                        steps=600, lr=2e-3)
    accuracy = scores.score.mean().item()
    # Measured: 0.20 untrained, 0.51 after (about 28 s on one thread of a busy machine).
    assert accuracy > 0.4 and accuracy > untrained + 0.15, (untrained, accuracy)
    assert scores.score_pre.mean().item() == pytest.approx(0.2)
    assert scores.loss.mean().item() < scores.loss_pre.mean().item() == pytest.approx(math.log(5))
