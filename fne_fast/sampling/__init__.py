"""The pieces a training loop composes around the op (open_clip's loss, Liger's modules): the memory bank
(``MemoryBank``, one process's or sharded), the running statistics (``RunningStats``), the loss (``FNELoss``),
the process groups and collectives they share (``distributed``) and W local processes for tests and benchmarks
(``launch``)."""

from fne_fast.sampling.bank import BankSample, MemoryBank
from fne_fast.sampling.loss import SAMPLERS, FNELoss
from fne_fast.sampling.stats import RunningStats

__all__ = ["MemoryBank", "BankSample", "RunningStats", "FNELoss", "SAMPLERS"]
