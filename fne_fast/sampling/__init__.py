"""The pieces a training loop composes around the op (open_clip's loss, Liger's modules): the memory bank
(``MemoryBank``, one process's or sharded), the running statistics (``RunningStats``), the loss (``FNELoss``),
GloFND's per-item thresholds (``ThresholdTable``), the process groups and collectives they share
(``distributed``) and W local processes for tests and benchmarks (``launch``)."""

from fne_fast.sampling.bank import BankSample, MemoryBank
from fne_fast.sampling.loss import SAMPLERS, FNELoss
from fne_fast.sampling.stats import RunningStats
from fne_fast.sampling.thresholds import ThresholdTable

__all__ = ["MemoryBank", "BankSample", "RunningStats", "FNELoss", "SAMPLERS", "ThresholdTable"]
