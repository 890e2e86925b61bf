"""Tasks by lookup table: one module per task, each a `Task` (fedcare.tasks.base) that declares its
datasets, loss, metrics, headline metric and whether higher is better.

Add a task in one place: a module beside these and one line in TASKS. A run names its task
(`task`); with input-mode = "3d" a task's 3D variant is used where one is registered as NAME-3d.
"""

from __future__ import annotations

from fedcare.config import RunConfig
from fedcare.errors import ConfigError
from fedcare.tasks.base import Task
from fedcare.tasks.classification import Classification
from fedcare.tasks.segmentation import Segmentation
from fedcare.tasks.segmentation_3d import Segmentation3D

__all__ = ["TASKS", "Task", "task_for"]

TASKS: dict[str, Task] = {task.name: task for task in (Classification(), Segmentation(), Segmentation3D())}


def task_for(config: RunConfig) -> Task:
    """The run's task: `task`, or its NAME-3d variant for 3D input where there is one."""
    variant = f"{config.task}-3d"
    if config.input_mode == "3d" and variant in TASKS:
        return TASKS[variant]
    if config.task not in TASKS or config.task.endswith("-3d"):
        names = ", ".join(name for name in TASKS if not name.endswith("-3d"))
        raise ConfigError(f"run config: 'task' = {config.task!r} must be one of {names}")
    return TASKS[config.task]
