"""Data-parallel meta-gradients: 2 CPU processes over Gloo against one process on the same meta-batch."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from metalearn.algorithms.maml import MAML
from metalearn.data.sinusoid import SinusoidTasks
from metalearn.distributed import average_gradients, mean_of, shard
from metalearn.models.conv import Conv4
from metalearn.models.mlp import MLP
from metalearn.objectives import Classification
from metalearn.tasks import TaskBatch

META_BATCH = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build(kind: str) -> tuple[MAML, TaskBatch]:
    """The same algorithm and meta-batch in every process (seeded alike)."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    if kind == "sinusoid":
        tasks = SinusoidTasks()
        return MAML(MLP(1, 1, hidden_sizes=[16, 16]), tasks.objective, inner_lr=0.05, inner_steps=2), \
            tasks.sample(META_BATCH, "train", generator)
    # Conv-4 with BatchNorm running statistics: buffers must be averaged too.
    model = Conv4(1, 3, 12, hidden=4, norm="batch_running", downsample="stride")
    x = torch.randn(META_BATCH, 3, 1, 12, 12, generator=generator)
    y = torch.arange(3).repeat(META_BATCH, 1)
    q = torch.randn(META_BATCH, 6, 1, 12, 12, generator=generator)
    return MAML(model, Classification(), inner_lr=0.1), TaskBatch(x, y, q, torch.arange(3).repeat(META_BATCH, 2))


def meta_step(algorithm: MAML, batch: TaskBatch) -> dict[str, float]:
    algorithm.zero_grad(set_to_none=True)
    result = algorithm.meta_train_step(batch)
    return {"meta_loss": result.meta_loss}


def worker(rank: int, port: int, kind: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    algorithm, batch = build(kind)
    scalars = meta_step(algorithm, shard(batch, rank, 2))
    average_gradients(algorithm)
    scalars = mean_of(scalars)
    if rank == 0:
        torch.save({"grads": {n: p.grad for n, p in algorithm.named_parameters()},
                    "buffers": dict(algorithm.named_buffers()), "scalars": scalars}, out)
    dist.barrier()  # both ranks are done with Gloo before either leaves
    # Leave without the interpreter's teardown: in a spawned worker it can destroy Gloo's still-joinable
    # threads ("terminate called without an active exception", SIGABRT) after all the work is done.
    os._exit(0)


@pytest.mark.parametrize("kind", ["sinusoid", "conv_batchnorm"])
def test_two_processes_give_the_single_process_meta_gradient(tmp_path: Path, kind: str) -> None:
    out = tmp_path / "rank0.pt"
    mp.spawn(worker, args=(free_port(), kind, str(out)), nprocs=2, join=True)
    distributed = torch.load(out, weights_only=True)

    algorithm, batch = build(kind)
    expected = meta_step(algorithm, batch)
    for name, p in algorithm.named_parameters():
        torch.testing.assert_close(distributed["grads"][name], p.grad, rtol=1e-5, atol=1e-7, msg=name)
    assert distributed["scalars"]["meta_loss"] == pytest.approx(expected["meta_loss"], rel=1e-5)
    if kind == "conv_batchnorm":  # running statistics: the average of the shares' updates
        single_shares = []
        for part in range(2):
            alg, b = build(kind)
            meta_step(alg, shard(b, part, 2))
            single_shares.append(dict(alg.named_buffers()))
        for name, value in distributed["buffers"].items():
            if value.is_floating_point():
                torch.testing.assert_close(value, (single_shares[0][name] + single_shares[1][name]) / 2, msg=name)


def test_shard_needs_equal_shares() -> None:
    _, batch = build("sinusoid")
    assert [len(shard(batch, i, 4)) for i in range(4)] == [2, 2, 2, 2]
    torch.testing.assert_close(shard(batch, 1, 2).query_x, batch.query_x[4:])
    with pytest.raises(ValueError, match=r"meta_batch_size=8: must be divisible by the number of processes \(3\)"):
        shard(batch, 0, 3)


LEAVE_SCRIPT = """
import json, os, sys, torch
from metalearn import distributed
distributed.init_process_group()
import torch._dynamo  # as compiling does, after joining
distributed.average_([torch.ones(2)])
distributed.leave()
names = sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
with open(os.path.join(sys.argv[1], f"threads-{os.environ['RANK']}.json"), "w") as f:  # stdout interleaves
    json.dump(names, f)
"""


def test_leaving_the_job_stops_gloo_threads(tmp_path: Path) -> None:
    """Every process leaves the job before it exits, and leaving frees the group whatever was imported
    after joining: no Gloo thread is left for the interpreter's teardown to kill (which aborted a
    torchrun process now and then with "terminate called without an active exception")."""
    import json
    import subprocess
    import sys

    script = tmp_path / "leave.py"
    script.write_text(LEAVE_SCRIPT)
    proc = subprocess.run([str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node=2",
                           str(script), str(tmp_path)], env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    threads = {rank: json.loads((tmp_path / f"threads-{rank}.json").read_text()) for rank in (0, 1)}
    assert threads[0] and threads[1], threads
    assert not [name for names in threads.values() for name in names if "gloo" in name.lower()], threads


def test_torchrun_two_processes_train_like_one(tmp_path: Path, cache_dir: Path) -> None:
    """`torchrun --nproc_per_node=2 metalearn ...`: one run directory written by rank 0, and after training
    the same weights (up to summation order) as one process on the whole meta-batch."""
    import json
    import os
    import subprocess
    import sys

    from metalearn.checkpoint import load_checkpoint
    from tests.conftest import DATA_DIR, TINY

    env = {**os.environ, "OMP_NUM_THREADS": "1", "METALEARN_DATA_DIR": str(DATA_DIR),
           "METALEARN_CACHE_DIR": str(cache_dir), "HYDRA_FULL_ERROR": ""}
    metalearn = str(Path(sys.executable).with_name("metalearn"))
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    settings = [*TINY, "trainer.meta_batch_size=4"]
    runs = {}
    for name, command in (("one", [metalearn, *settings]),
                          ("two", [torchrun, "--standalone", "--nproc_per_node=2", metalearn, *settings])):
        cwd = tmp_path / name
        cwd.mkdir()
        proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        (run,) = (cwd / "outputs" / "runs" / "maml_sinusoid").iterdir()
        assert (run / "results.json").is_file()
        assert proc.stdout.count("Run directory:") == 1  # rank 0 reports; rank 1 is silent
        runs[name] = run
    one = load_checkpoint(runs["one"] / "checkpoints" / "last.pt")["algorithm"]
    two = load_checkpoint(runs["two"] / "checkpoints" / "last.pt")["algorithm"]
    for key, value in one.items():
        torch.testing.assert_close(two[key], value, rtol=1e-4, atol=1e-6, msg=key)
    log = (runs["two"] / "train.log").read_text()
    assert log.count("step 4: val/query_mse") == 1  # logged once, by rank 0
    results = json.loads((runs["two"] / "results.json").read_text())
    assert results["step"] == 4


def test_torchrun_stopped_by_a_signal_resumes_exactly(tmp_path: Path, cache_dir: Path) -> None:
    """SIGTERM to torchrun: the processes agree to stop after the same step, rank 0 saves last.pt and the
    run exits non-zero; `torchrun ... trainer.resume=true` continues it in place to the weights of a
    2-process run that was never stopped."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from metalearn.checkpoint import load_checkpoint
    from tests.conftest import DATA_DIR, TINY

    env = {**os.environ, "OMP_NUM_THREADS": "1", "METALEARN_DATA_DIR": str(DATA_DIR),
           "METALEARN_CACHE_DIR": str(cache_dir), "HYDRA_FULL_ERROR": ""}
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node=2",
                str(Path(sys.executable).with_name("metalearn"))]
    settings = [*TINY, "trainer.meta_batch_size=4", "trainer.max_steps=1500", "trainer.checkpoint_every=20",
                "trainer.eval_every=500"]

    def finished(cwd: Path, *extra: str) -> Path:
        proc = subprocess.run([*torchrun, *settings, *extra], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        (run,) = (cwd / "outputs" / "runs" / "maml_sinusoid").iterdir()
        return run

    straight = tmp_path / "straight"
    straight.mkdir()
    reference = load_checkpoint(finished(straight) / "checkpoints" / "last.pt")

    cut = tmp_path / "cut"
    cut.mkdir()
    proc = subprocess.Popen([*torchrun, *settings], cwd=cut, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    while not list(cut.glob("outputs/runs/maml_sinusoid/*/checkpoints/last.pt")) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0, stderr[-2000:]
    (run,) = (cut / "outputs" / "runs" / "maml_sinusoid").iterdir()
    stopped_at = load_checkpoint(run / "checkpoints" / "last.pt")["step"]
    assert 0 < stopped_at < 1500, "the run finished before the signal arrived; nothing was tested"

    assert finished(cut, "trainer.resume=true") == run  # continued in place
    final = load_checkpoint(run / "checkpoints" / "last.pt")
    assert final["step"] == 1500
    for name, tensor in reference["algorithm"].items():
        assert torch.equal(tensor, final["algorithm"][name]), name
    for state, expected in zip(final["optimizer"]["state"].values(), reference["optimizer"]["state"].values(),
                               strict=True):
        assert torch.equal(state["exp_avg_sq"], expected["exp_avg_sq"])  # Adam's moments resumed too
