"""Training: TrainConfig, optimizer + schedule, the loop (Trainer), metrics, dense twins, upcycling."""

from moesaic.train.config import TrainConfig
from moesaic.train.loop import Trainer, TrainingStopped
from moesaic.train.step import forward_backward, split_batch

__all__ = ["TrainConfig", "Trainer", "TrainingStopped", "forward_backward", "split_batch"]
