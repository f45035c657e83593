"""The training loop (``Distiller``) and its parts: tasks, checkpoints, logging, signal meter."""

from .distiller import Distiller, TrainResult
from .task import ClassificationTask, Task, TaskOutput

__all__ = ["ClassificationTask", "Distiller", "Task", "TaskOutput", "TrainResult"]
