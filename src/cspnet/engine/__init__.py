"""Training engine: the training loop, checkpoints, EMA, schedules and distributed helpers."""
from .checkpoint import CheckpointError, load_checkpoint, read_checkpoint_record, save_checkpoint
from .ema import ModelEMA
from .train import FitResult, Task, TrainConfig, TrainingDiverged, fit

__all__ = [
    "CheckpointError", "FitResult", "ModelEMA", "Task", "TrainConfig", "TrainingDiverged", "fit", "load_checkpoint",
    "read_checkpoint_record", "save_checkpoint",
]
