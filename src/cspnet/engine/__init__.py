"""Training engine: the training loop, checkpoints, EMA, schedules and distributed helpers."""
from .checkpoint import CheckpointError, load_checkpoint, read_checkpoint_record, save_checkpoint
from .ema import ModelEMA

__all__ = ["CheckpointError", "ModelEMA", "load_checkpoint", "read_checkpoint_record", "save_checkpoint"]
