"""The decoded-dataset cache: an unreadable cache file is decoded anew, with a warning naming it."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from metalearn.data.cache import cached


def value() -> dict[str, object]:
    return {"images": torch.arange(2000, dtype=torch.int64), "names": ["a", "b"]}


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "not a dict"])
def test_an_unreadable_cache_file_is_rebuilt_with_a_warning_naming_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str) -> None:
    path = tmp_path / "cache" / "x-v1-0123456789ab.pt"
    cached(path, value)
    good = path.read_bytes()
    if damage == "not a dict":
        torch.save(torch.zeros(3), path)
    else:
        path.write_bytes({"truncated": good[: len(good) // 2], "garbage": b"\x00\xffnot a torch file" * 40,
                          "empty": b""}[damage])
    builds: list[int] = []

    def build() -> dict[str, object]:
        builds.append(1)
        return value()

    with caplog.at_level(logging.WARNING, logger="metalearn.data.cache"):
        again = cached(path, build)
    assert builds == [1] and torch.equal(again["images"], value()["images"])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(path) in warnings[0] and "\n" not in warnings[0]
    assert torch.load(path, weights_only=True)["names"] == ["a", "b"], "the rebuilt data replaces the bad file"
    assert cached(path, lambda: pytest.fail("rebuilt although the cache is good now"))["names"] == ["a", "b"]
