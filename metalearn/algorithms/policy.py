"""The paradigm of meta-reinforcement learning: learners of policies over a family of environments.

A task is an environment of the family (metalearn.rl.tasks.EnvTasks: its parameters and a seed); a
learner adapts by acting in it, from the trajectories it collects (MAML-RL's policy-gradient steps) or
in a recurrent policy's state (RL²), and is scored by the returns it then earns.
"""

from __future__ import annotations

from typing import ClassVar

from metalearn.algorithms.base import MetaLearner
from metalearn.rl.envs import BatchEnv
from metalearn.rl.tasks import EnvTaskBatch
from metalearn.tasks import TaskSampler


class PolicyLearner(MetaLearner[EnvTaskBatch]):
    """Base class of learners of policies over environments: binds the task family's environment in
    `setup` (`self.env`), refusing a task family that has none."""

    learns_from: ClassVar[type] = EnvTaskBatch
    env: BatchEnv | None = None

    def setup(self, tasks: TaskSampler) -> None:
        env = getattr(tasks, "env", None)
        if not isinstance(env, BatchEnv):
            raise ValueError(f"trains policies on environments; the dataset ({type(tasks).__name__}) is not one "
                             "(use dataset=navigation2d, bandit, halfcheetah_vel or halfcheetah_dir)")
        self.env = env

    def _env(self) -> BatchEnv:
        if self.env is None:
            raise RuntimeError(f"{type(self).__name__}.setup(tasks) was not called")
        return self.env
