"""MemoryBank: a ring buffer of momentum features with identity ids (DESIGN.md §3).

The write pointer lives on the device, so an enqueue never waits for the host. The fill count is kept on the
device too, and mirrored on the host as a plain int: it is deterministic (min(N, rows enqueued so far)), so the
host copy costs no synchronisation and can be passed to the op's ``filled`` argument directly.
"""

from __future__ import annotations

import torch

__all__ = ["MemoryBank"]


class MemoryBank:
    """``size`` rows of ``dim`` features in ``dtype`` with an int64 id per row (-1 where never written).

    Rows are written in ring order starting at row 0, so rows ``[0, filled)`` are the written ones until the
    first wrap-around, and all rows after it.
    """

    def __init__(self, size: int, dim: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        if size < 1 or dim < 1:
            raise ValueError(f"size and dim must be >= 1, got size={size}, dim={dim}")
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        self.size, self.dim, self.dtype = size, dim, dtype
        self.device = torch.device(device)
        self.features = torch.zeros(size, dim, dtype=dtype, device=self.device)
        self.ids = torch.full((size,), -1, dtype=torch.int64, device=self.device)
        self.pointer = torch.zeros((), dtype=torch.int64, device=self.device)
        self.fill_count = torch.zeros((), dtype=torch.int64, device=self.device)
        self.filled = 0  # host mirror of fill_count

    @torch.no_grad()
    def enqueue(self, features: torch.Tensor, ids: torch.Tensor) -> None:
        """Writes the rows at the pointer, wrapping around; a batch larger than the bank keeps its last rows."""
        if features.dim() != 2 or features.shape[1] != self.dim:
            raise ValueError(f"features must be [B, {self.dim}], got shape {tuple(features.shape)}")
        if ids.shape != (features.shape[0],):
            raise ValueError(f"ids must be [B] = [{features.shape[0]}], got shape {tuple(ids.shape)}")
        rows = features.shape[0]
        if rows > self.size:
            # Only the last `size` rows survive a write longer than the ring; dropping the others first keeps
            # every destination row unique (index_copy_ with duplicates is not deterministic).
            skipped = rows - self.size
            self.pointer = (self.pointer + skipped) % self.size
            features, ids, rows = features[skipped:], ids[skipped:], self.size
        positions = (self.pointer + torch.arange(rows, device=self.device)) % self.size
        self.features.index_copy_(0, positions, features.detach().to(device=self.device, dtype=self.dtype))
        self.ids.index_copy_(0, positions, ids.to(device=self.device, dtype=torch.int64))
        self.pointer = (self.pointer + rows) % self.size
        self.fill_count = torch.clamp(self.fill_count + rows, max=self.size)
        self.filled = min(self.size, self.filled + rows)

    def state_dict(self) -> dict:
        return {"features": self.features.clone(), "ids": self.ids.clone(), "pointer": self.pointer.clone(),
                "fill_count": self.fill_count.clone(), "filled": self.filled}

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["features"].shape) != (self.size, self.dim):
            raise ValueError(f"bank state has shape {tuple(state['features'].shape)}, this bank is "
                             f"({self.size}, {self.dim})")
        self.features = state["features"].to(device=self.device, dtype=self.dtype).clone()
        self.ids = state["ids"].to(self.device).clone()
        self.pointer = state["pointer"].to(self.device).clone()
        self.fill_count = state["fill_count"].to(self.device).clone()
        self.filled = int(state["filled"])
