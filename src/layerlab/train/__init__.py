"""Training: the loop, telemetry and checkpoints."""

from .loop import TrainingDiverged, TrainResult, train

__all__ = ["TrainResult", "TrainingDiverged", "train"]
