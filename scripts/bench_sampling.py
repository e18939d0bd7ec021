"""Benchmark: Omniglot 5-way 1-shot 15-query episodes per second.

Measures metalearn's EpisodeSampler (one vectorised draw per meta-batch from the uint8 cache) and, in
the same run, a plain per-episode Python sampler over the same tensor (random.sample of classes and
images, indexing image by image), the way many few-shot loaders work. Target: at least 1,000 episodes
per second for metalearn. Also reports the rate with the `affine` augmentation (Koch et al.'s
distortions, `conf/dataset/augment/affine.yaml`) switched on, which is off by default.

    python scripts/bench_sampling.py [--data-dir ../shared/data] [--cache-dir ~/.cache/metalearn]
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch

from metalearn.data.augment import Augment
from metalearn.data.episodes import EpisodeSampler
from metalearn.data.omniglot import Omniglot


def rate(fn: Callable[[], int], seconds: float) -> float:
    """Episodes per second of `fn` (which returns how many episodes it drew) over `seconds`."""
    fn()
    start, episodes = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        episodes += fn()
    return episodes / (time.perf_counter() - start)


def drawing(sampler: EpisodeSampler, batch: int, generator: torch.Generator) -> Callable[[], int]:
    """A function that draws one meta-batch of training episodes and returns its size."""
    return lambda: len(sampler.sample(batch, "train", generator))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "metalearn")
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    torch.set_num_threads(1)  # sampling runs beside training; it must not need the cores
    start = time.perf_counter()
    data = Omniglot(str(args.data_dir / "omniglot"), n_way=5, k_shot=1, k_query=15, cache_dir=str(args.cache_dir))
    print(f"Omniglot vinyals loaded in {time.perf_counter() - start:.1f} s (cache: {args.cache_dir})")
    generator = torch.Generator().manual_seed(0)
    train = data.splits["train"]
    rng = random.Random(0)

    def plain() -> int:
        classes = rng.sample(range(train.num_classes), 5)
        support, query = [], []
        for c in classes:
            picks = rng.sample(range(int(train.counts[c])), 16)
            images = [train.images[int(train.offsets[c]) + i].float() / 255 for i in picks]
            support.append(torch.stack(images[:1]))
            query.append(torch.stack(images[1:]))
        torch.cat(support), torch.cat(query)
        return 1

    rows = [("plain per-episode loop", rate(plain, args.seconds))]
    for batch in (1, 32):
        rows.append((f"metalearn, meta-batch {batch}",
                     rate(drawing(data, batch, generator), args.seconds)))
    # The settings of conf/dataset/augment/affine.yaml.
    affine = Augment(degrees=10.0, shear=0.3, scale=(0.8, 1.2), translate=2.0, p=0.5, padding_mode="border")
    augmented = EpisodeSampler(data.splits, 5, 1, 15, augment=affine)
    for batch in (1, 32):
        rows.append((f"  + affine augmentation, batch {batch}",
                     rate(drawing(augmented, batch, generator), args.seconds)))
    print(f"\n{'sampler':32s}{'episodes/s':>12s}{'vs plain':>10s}")
    for name, value in rows:
        print(f"{name:32s}{value:12.0f}{value / rows[0][1]:9.1f}x")
    slowest = min(value for name, value in rows[1:3])
    print(f"\nmetalearn episodes/s without augmentation (slowest setting): {slowest:.0f} (target >= 1000): "
          f"{'PASS' if slowest >= 1000 else 'FAIL'}")


if __name__ == "__main__":
    main()
