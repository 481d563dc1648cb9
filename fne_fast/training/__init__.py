"""The training system around the op (open_clip_train's role): the run's settings (``config``), its data
(``data``), its evolving state (``state``), one epoch's step loop (``epoch``) and the run from start to files
(``loop``), with evaluation, model selection by validation, the epoch's bank diagnostics, the checks made before
any work, and the run's plots."""

from fne_fast.training.config import TrainConfig
from fne_fast.training.loop import train

__all__ = ["TrainConfig", "train"]
