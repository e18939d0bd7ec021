"""trainer.allocator: what each setting resolves to, and that `retain` really stops the page faults of
memory freed and reallocated every step (each case in a fresh process, as the setting lasts for one)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from metalearn.runtime import glibc_mallopt, resolve_allocator

GLIBC = glibc_mallopt() is not None

# A training step's pattern: a 48 MiB activation allocated, written and freed, again and again. Prints
# the minor page faults of nine steps after twenty of warm-up (while the heap grows to its working size).
FAULTS = textwrap.dedent("""
    import resource, sys, torch
    from metalearn.runtime import resolve_allocator
    print(resolve_allocator(sys.argv[1], torch.device("cpu")))
    def step():
        torch.ones(12 * 2**20).sum()
    for _ in range(20):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(9):
        step()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def faults(allocator: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", FAULTS, allocator], capture_output=True, text=True, check=True)
    resolved, count = out.stdout.split()
    return resolved, int(count)


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt is what `retain` sets")
def test_retain_reuses_freed_memory_where_the_system_default_faults_it_in_again() -> None:
    pages = 48 * 2**20 // 4096  # one step's fresh pages: 12,288
    resolved, system = faults("system")
    assert resolved == "system" and system > 9 * pages * 0.9, system
    resolved, retained = faults("retain")
    assert resolved == "retain" and retained < pages // 10, retained
    assert faults("auto") == ("retain", pytest.approx(retained, abs=pages // 10))


def test_auto_leaves_other_devices_and_other_c_libraries_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_allocator("auto", torch.device("cuda")) == "system"
    assert resolve_allocator("system", torch.device("cpu")) == "system"
    monkeypatch.setattr("metalearn.runtime.glibc_mallopt", lambda: None)
    assert resolve_allocator("auto", torch.device("cpu")) == "system"
    with pytest.raises(ValueError, match="allocator='retain': needs glibc's mallopt"):
        resolve_allocator("retain", torch.device("cpu"))


def test_unknown_allocator_is_named() -> None:
    with pytest.raises(ValueError, match="allocator='jemalloc': must be one of auto, retain, system"):
        resolve_allocator("jemalloc", torch.device("cpu"))
