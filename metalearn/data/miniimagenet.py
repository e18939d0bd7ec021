"""mini-ImageNet (Vinyals et al., 2016) episodes in the split of Ravi & Larochelle (2017).

100 ImageNet classes of 600 photos each: 64 train, 16 validation and 20 test classes. The split files
(`filename,label` CSVs) ship with metalearn in `metalearn/data/splits/miniimagenet_ravi/`; the images do
not, because the ImageNet terms forbid redistributing them. Put them, flat, at `<root>/images/<filename>`
under the names the CSVs give (e.g. `n0153282900000005.jpg`).

References:
    Vinyals et al., "Matching networks for one shot learning", NeurIPS 2016.
    Ravi & Larochelle, "Optimization as a model for few-shot learning", ICLR 2017.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from metalearn.checks import positive_int
from metalearn.data.augment import Augment
from metalearn.data.download import miniimagenet_layout
from metalearn.data.episodes import EpisodeSampler
from metalearn.data.folder import Rows, check_channels, check_disjoint, load_split, read_csv_rows
from metalearn.data.images import ClassImages
from metalearn.tasks import SPLITS, Split

RAVI_SPLIT = ("splits", "miniimagenet_ravi")


def split_csv(split: Split, split_dir: Path | None = None) -> tuple[str, str]:
    """The text of a split's `filename,label` CSV and a name for it.

    Args:
        split: train, val or test.
        split_dir: a folder holding `<split>.csv` (None: the Ravi & Larochelle split shipped with metalearn).

    Returns:
        (CSV text, where it came from).
    """
    if split_dir is None:
        resource = resources.files("metalearn.data").joinpath(*RAVI_SPLIT, f"{split}.csv")
        return resource.read_text(), f"{'/'.join(RAVI_SPLIT)}/{split}.csv (shipped with metalearn)"
    path = split_dir / f"{split}.csv"
    if not path.is_file():
        raise FileNotFoundError(f"split_dir={str(split_dir)!r}: no {split}.csv there (header `filename,label`)")
    return path.read_text(), str(path)


class MiniImageNet(EpisodeSampler):
    """mini-ImageNet N-way K-shot episodes (Ravi & Larochelle split: 64 / 16 / 20 classes of 600 images).

    Args:
        root: the mini-ImageNet folder, holding `images/<filename>` as named in the split CSVs.
        n_way, k_shot, k_query: episode shape at evaluation (and at training unless overridden).
        image_size: side of the square RGB images (84 in the standard benchmark).
        cache_dir: where decoded images are cached (None: no cache). Decoding 60,000 photos takes
            minutes; loading the cache takes seconds.
        train_n_way, train_k_shot, train_k_query: training episode shape, when it differs.
        split_dir: a folder of `train.csv`, `val.csv` and `test.csv` to use instead of the shipped split
            (no class may be in two of them).
        channels: 3 (RGB, standard) or 1 (converted to grayscale).
        augment: random augmentation of training episodes (`conf/dataset/augment/`); None: none.
    """

    def __init__(
        self, root: str, n_way: int = 5, k_shot: int = 1, k_query: int = 15, image_size: int = 84,
        cache_dir: str | None = None, train_n_way: int | None = None, train_k_shot: int | None = None,
        train_k_query: int | None = None, split_dir: str | None = None, channels: int = 3,
        augment: Augment | None = None,
    ) -> None:
        positive_int("image_size", image_size)
        check_channels(channels)
        base = Path(root).expanduser()
        csvs = Path(split_dir).expanduser() if split_dir else None
        if not (base / "images").is_dir():
            where = f" (here the CSVs in split_dir={str(csvs)!r})" if csvs else ""
            raise FileNotFoundError(f"root={str(base)!r}: no images/ folder there. {miniimagenet_layout(base)}{where}")
        cache = Path(cache_dir).expanduser() if cache_dir else None
        sources: dict[Split, tuple[Rows, str]] = {}
        for split in SPLITS:
            text, origin = split_csv(split, csvs)
            sources[split] = (read_csv_rows(text, origin), origin)
        check_disjoint({origin: rows for rows, origin in sources.values()},
                       f"split_dir={str(csvs)!r}" if csvs else "split_dir=None")
        splits: dict[Split, ClassImages] = {
            split: load_split(base, rows, origin, image_size=image_size, channels=channels, cache_dir=cache,
                              name=f"miniimagenet-{split}") for split, (rows, origin) in sources.items()}
        super().__init__(splits, n_way, k_shot, k_query, train_n_way, train_k_shot, train_k_query,
                         channels=channels, augment=augment)
