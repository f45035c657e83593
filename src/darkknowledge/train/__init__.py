"""The training loop (``Distiller``) and its parts: tasks, checkpoints, resume, signals,
logging, the gradient meter."""

from .checkpoint import CheckpointError
from .distiller import Distiller, TrainResult
from .distributed import CollectiveTimeout
from .interrupts import Interrupted, Terminated
from .task import ClassificationTask, Task, TaskOutput

__all__ = [
    "CheckpointError",
    "ClassificationTask",
    "CollectiveTimeout",
    "Distiller",
    "Interrupted",
    "Task",
    "TaskOutput",
    "Terminated",
    "TrainResult",
]
