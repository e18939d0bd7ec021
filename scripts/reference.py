"""Independent implementations for equal-budget checks: plain PyTorch, written from the papers and their
published code, sharing nothing with metalearn but the episodes.

Each method has its own model (a Conv-4 built here from nn.Conv2d, nn.BatchNorm2d, nn.ReLU, with PyTorch's
default initialisation), optimizer loop, loss and evaluation. Shared with metalearn: the experiment's
config (hyperparameters), the training episodes (metalearn's sampler and the trainer's seed) and the test
tasks (the trainer's fixed test set, the 600 episodes a metalearn run is scored on), so that the two
accuracies at the same meta-step compare implementations and nothing else.

    python scripts/reference.py train reptile --out docs/results/runs/reptile_omniglot_5w1s_quick/reference
    python scripts/reference.py train matching --out docs/results/runs/matching_omniglot_5w1s_quick/reference
    python scripts/reference.py compare --run <metalearn run of the same settings> \\
        --reference docs/results/runs/matching_omniglot_5w1s_quick/reference

Methods:
    reptile   Nichol et al. (2018), `reptile_omniglot_5w1s_quick` by default. Four 3x3 convolutions of
              64 filters with stride 2, BatchNorm on batch statistics, ReLU, a linear layer. Per task,
              Adam (the config's inner lr and betas) steps the model's own weights on minibatches of the
              support set; the weights are restored after each task and the initialisation moves the
              annealed step size towards their mean. One Adam serves the whole run, so its moments carry
              from task to task, as in the published code (`--inner-state task`: a fresh Adam per task).
              Test: 50 Adam steps from the current moments (restored afterwards), then all queries in one
              batch (transductive BatchNorm, as the published code).
    matching  Vinyals et al. (2016), `matching_omniglot_5w1s_quick` by default. Four blocks of 3x3
              convolution (64 filters, padding 1), BatchNorm, ReLU and 2x2 max-pooling give the embedding;
              a query attends over the support embeddings by softmax of cosine similarity, a class's
              probability is its examples' summed attention, the loss is -log of the true class's; Adam
              on the mean loss of the meta-batch. BatchNorm uses batch statistics in training and running
              statistics at test.

`train` writes `curve.json` in `--out`: accuracy (mean and 95% interval over tasks) on the trainer's fixed
validation tasks every `trainer.eval_every` meta-steps, and at the last step on its test tasks too.
`compare` puts a metalearn run of the same settings beside it: test accuracy on the same tasks at the
same meta-step, whether the intervals overlap, and both validation curves in one figure (`curves.png`
beside curve.json unless `--figure` says otherwise). Archived below docs/results/runs, the reference is
what a results row's status compares with (metalearn.reproduction).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from time_to_accuracy import compose_experiment, line_figure
from torch import Tensor, nn

from metalearn.metrics import mean_ci95
from metalearn.reproduction import overlap
from metalearn.tasks import TaskBatch, fixed_batches


def conv4(channels: int, image_size: int, *, pool: bool, running_stats: bool, n_way: int | None) -> nn.Sequential:
    """Four conv blocks (stride 2, or 2x2 max-pooling when `pool`), then a linear layer to `n_way` or none."""
    layers: list[nn.Module] = []
    size = image_size
    for i in range(4):
        layers += [nn.Conv2d(channels if i == 0 else 64, 64, 3, stride=1 if pool else 2, padding=1),
                   nn.BatchNorm2d(64, track_running_stats=running_stats), nn.ReLU()]
        if pool:
            layers.append(nn.MaxPool2d(2))
        size = size // 2 if pool else (size + 1) // 2
    layers.append(nn.Flatten())
    if n_way is not None:
        layers.append(nn.Linear(64 * size * size, n_way))
    return nn.Sequential(*layers)


def minibatches(n: int, size: int, steps: int, generator: torch.Generator) -> list[Tensor]:
    """`steps` minibatches of `size` indices, consecutive chunks of fresh permutations of range(n)."""
    stream = torch.cat([torch.randperm(n, generator=generator) for _ in range(-(-steps * size // n))])
    return list(stream[: steps * size].view(steps, size))


def train_on(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor, batches: list[Tensor]) -> None:
    for index in batches:
        optimizer.zero_grad()
        F.cross_entropy(model(x[index]), y[index]).backward()
        optimizer.step()


class Reptile:
    def __init__(self, cfg: Any, shape: torch.Size, inner_state: str) -> None:
        self.model = conv4(shape[0], shape[-1], pool=False, running_stats=False, n_way=int(cfg.dataset.n_way))
        a = cfg.algorithm
        betas = a.inner_optimizer.betas
        self.lr, self.betas = float(a.inner_lr), (float(betas[0]), float(betas[1]))
        self.steps, self.eval_steps = int(a.inner_steps), int(a.eval_inner_steps)
        self.batch, self.eval_batch = int(a.inner_batch_size), int(a.eval_inner_batch_size)
        self.inner_state, self.outer_lr = inner_state, float(cfg.optimizer.lr)
        self.optimizer = self.new_adam()
        self.generator = torch.Generator().manual_seed(int(cfg.seed) + 1)

    def new_adam(self) -> torch.optim.Adam:
        return torch.optim.Adam(self.model.parameters(), lr=self.lr, betas=self.betas, eps=1e-8)

    def meta_step(self, batch: TaskBatch, progress: float) -> None:
        theta, ends = copy.deepcopy(self.model.state_dict()), []
        for t in range(len(batch)):
            if self.inner_state == "task":
                self.optimizer = self.new_adam()
            x, y = batch.support_x[t], batch.support_y[t]
            train_on(self.model, self.optimizer, x, y, minibatches(len(x), self.batch, self.steps, self.generator))
            ends.append(copy.deepcopy(self.model.state_dict()))
            self.model.load_state_dict(theta)
        step_size = self.outer_lr * (1 - progress)  # annealed linearly to 0
        mean = {name: torch.stack([end[name] for end in ends]).mean(0) for name in theta}
        self.model.load_state_dict({name: theta[name] + step_size * (mean[name] - theta[name]) for name in theta})

    def accuracy(self, batch: TaskBatch) -> list[float]:
        scores = []
        for t in range(len(batch)):
            weights, moments = copy.deepcopy(self.model.state_dict()), copy.deepcopy(self.optimizer.state_dict())
            optimizer = self.new_adam() if self.inner_state == "task" else self.optimizer
            x, y = batch.support_x[t], batch.support_y[t]
            order = minibatches(len(x), self.eval_batch, self.eval_steps, torch.Generator().manual_seed(t))
            train_on(self.model, optimizer, x, y, order)
            with torch.no_grad():
                scores.append((self.model(batch.query_x[t]).argmax(-1) == batch.query_y[t]).float().mean().item())
            self.model.load_state_dict(weights)
            self.optimizer.load_state_dict(moments)
        return scores


class Matching:
    def __init__(self, cfg: Any, shape: torch.Size, inner_state: str) -> None:
        self.model = conv4(shape[0], shape[-1], pool=True, running_stats=True, n_way=None)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=float(cfg.optimizer.lr))

    def log_probabilities(self, batch: TaskBatch, t: int) -> Tensor:
        """log P(class | query) [Q, N]: summed softmax attention of cosine similarities."""
        support, query = self.model(batch.support_x[t]), self.model(batch.query_x[t])
        attention = (F.normalize(query, dim=1) @ F.normalize(support, dim=1).T).softmax(1)
        one_hot = F.one_hot(batch.support_y[t], int(batch.support_y[t].max()) + 1).to(attention.dtype)
        return (attention @ one_hot).clamp_min(1e-8).log()

    def meta_step(self, batch: TaskBatch, progress: float) -> None:
        self.model.train()
        self.optimizer.zero_grad()
        losses = [F.nll_loss(self.log_probabilities(batch, t), batch.query_y[t]) for t in range(len(batch))]
        torch.stack(losses).mean().backward()
        self.optimizer.step()

    def accuracy(self, batch: TaskBatch) -> list[float]:
        self.model.eval()
        with torch.no_grad():
            return [(self.log_probabilities(batch, t).argmax(1) == batch.query_y[t]).float().mean().item()
                    for t in range(len(batch))]


METHODS: dict[str, tuple[Callable[..., Any], str]] = {
    "reptile": (Reptile, "reptile_omniglot_5w1s_quick"),
    "matching": (Matching, "matching_omniglot_5w1s_quick"),
}


def scores_on(method: Any, batches: list[TaskBatch]) -> list[float]:
    """Per-task accuracies on a fixed task set."""
    return [score for batch in batches for score in method.accuracy(batch)]


def train(args: argparse.Namespace) -> None:
    make, default_experiment = METHODS[args.method]
    experiment = args.experiment or default_experiment
    cfg = compose_experiment(experiment, args.overrides)
    from hydra.utils import instantiate

    tasks, trainer = instantiate(cfg.dataset), cfg.trainer
    torch.manual_seed(int(cfg.seed))
    method = make(cfg, tasks.sample(1, "test", torch.Generator().manual_seed(0)).support_x.shape[2:], args.inner_state)
    sets = {split: list(fixed_batches(tasks, split, int(trainer[f"{split}_tasks"]), int(trainer[f"{split}_seed"]), 50))
            for split in ("val", "test")}
    generator = torch.Generator().manual_seed(int(cfg.seed))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    curve: list[dict[str, float]] = []
    max_steps, every = int(trainer.max_steps), int(trainer.eval_every)
    start = time.perf_counter()
    for step in range(1, max_steps + 1):
        method.meta_step(tasks.sample(int(trainer.meta_batch_size), "train", generator), (step - 1) / max_steps)
        if step % every == 0 or step == max_steps:
            point: dict[str, float] = {"step": step}
            for split in ("val", "test") if step == max_steps else ("val",):
                mean, half = mean_ci95(torch.tensor(scores_on(method, sets[split])))
                point |= {f"{split}_acc": mean, f"{split}_ci95": half}
            point["seconds"] = round(time.perf_counter() - start, 1)
            curve.append(point)
            print(json.dumps(point), flush=True)
            (out / "curve.json").write_text(json.dumps({
                "implementation": f"scripts/reference.py {args.method}", "experiment": experiment,
                "overrides": args.overrides, "inner_state": args.inner_state if args.method == "reptile" else None,
                "torch": torch.__version__, "threads": torch.get_num_threads(), "curve": curve}, indent=1) + "\n")


def compare(args: argparse.Namespace) -> None:
    """metalearn's run against the reference at the same meta-step: test accuracy on the same 600 tasks,
    intervals, and both validation curves (the same fixed validation tasks) in one figure."""
    from metalearn.report.curves import read_curve

    run, reference = Path(args.run), json.loads((Path(args.reference) / "curve.json").read_text())
    results = json.loads((run / "results.json").read_text())
    last = reference["curve"][-1]
    ours, ours_ci = results["test"]["query_acc"], results["test"]["query_acc_ci95"]
    theirs, theirs_ci = last["test_acc"], last["test_ci95"]
    overlaps = overlap(ours, ours_ci, theirs, theirs_ci)
    tasks = int(results["test"]["tasks"])
    print(f"| implementation | meta-steps | test accuracy ({tasks} tasks) |\n| --- | --- | --- |\n"
          f"| metalearn ({run}) | {results['step']:,} (best {results['best_step']:,}) | "
          f"{100 * ours:.2f}% ± {100 * ours_ci:.2f}% |\n"
          f"| {reference['implementation']} | {last['step']:,} | {100 * theirs:.2f}% ± {100 * theirs_ci:.2f}% |")
    print(f"intervals {'overlap: budget-matched' if overlaps else 'apart'} "
          f"(difference {100 * (ours - theirs):+.2f} points)")
    steps, values = read_curve(run, "val/query_acc")
    line_figure({"metalearn": ([float(s) for s in steps], [100 * v for v in values]),
                 reference["implementation"]: ([p["step"] for p in reference["curve"]],
                                               [100 * p["val_acc"] for p in reference["curve"]])},
                "meta-step", "validation accuracy (%, the same fixed tasks)",
                str(args.figure or Path(args.reference) / "curves.png"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("train", help="train a reference implementation on an experiment's episodes")
    run.add_argument("method", choices=sorted(METHODS))
    run.add_argument("--experiment", default=None, help="default: the method's quick Omniglot experiment")
    run.add_argument("--inner-state", choices=["carried", "task"], default="carried", help="reptile only")
    run.add_argument("--out", required=True, help="directory for curve.json")
    cmp = sub.add_parser("compare", help="a metalearn run against a reference curve at the same step")
    cmp.add_argument("--run", required=True, help="a metalearn run directory")
    cmp.add_argument("--reference", required=True, help="a directory holding curve.json")
    cmp.add_argument("--figure", default=None,
                     help="where to write the PNG of both validation curves (default: REFERENCE/curves.png)")
    args, overrides = parser.parse_known_args()  # config overrides, as on metalearn's command line
    if args.command == "compare" or any(o.startswith("-") for o in overrides):
        parser.parse_args()  # the usual error for what is not a config override
    args.overrides = overrides
    (train if args.command == "train" else compare)(args)


if __name__ == "__main__":
    main()
