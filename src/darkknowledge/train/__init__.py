"""The training loop (``Distiller``) and its parts: tasks, checkpoints, resume, signals,
logging, the gradient meter, why a run stopped (``RunFailure`` and the full disk), and the end
of a multi-process script (``end_processes``)."""

from .._files import DiskFull
from ..processes import end_processes
from .checkpoint import CheckpointError
from .distiller import Distiller, TrainResult
from .failures import CollectiveTimeout, NonFiniteLoss, PeerLost, RunFailure
from .interrupts import Interrupted, Terminated
from .task import ClassificationTask, Task, TaskOutput

__all__ = [
    "CheckpointError",
    "ClassificationTask",
    "CollectiveTimeout",
    "DiskFull",
    "Distiller",
    "Interrupted",
    "NonFiniteLoss",
    "PeerLost",
    "RunFailure",
    "Task",
    "TaskOutput",
    "Terminated",
    "TrainResult",
    "end_processes",
]
