"""Tile sizes and launch parameters of the sampler's Triton kernels (sample_negatives.py), with the register
budgets behind the shipped defaults; scripts/triton_resources.py compiles every shipped configuration for sm_90
without a GPU, and the GPU benchmark sweeps alternatives to them.
"""

from __future__ import annotations

import dataclasses

import torch
import triton

__all__ = ["TritonConfig", "MergeConfig", "ROW_BLOCK_LIMITS", "TILE_ELEMENTS", "MAX_MERGE_WIDTH", "default_config",
           "guide_block_k", "merge_config", "input_precision", "num_splits"]

MAX_MERGE_WIDTH = 2048  # partial entries per row that the merge kernel holds at once


@dataclasses.dataclass(frozen=True)
class TritonConfig:
    """Tile sizes and launch parameters; ``num_splits=None`` picks enough splits to fill the device."""
    block_m: int = 64
    block_n: int = 64
    block_k: int = 32
    num_warps: int = 4  # default_config takes 8 (see ROW_BLOCK_LIMITS); 4 suits the small tiles tests build
    num_stages: int = 3
    num_splits: int | None = None
    input_precision: str | None = None  # None: "tf32" where torch.backends.cuda.matmul.allow_tf32, else "ieee"


@dataclasses.dataclass(frozen=True)
class MergeConfig:
    """Launch parameters of the merge kernel for rows of ``width`` partial entries."""
    block_r: int
    block_w: int
    num_warps: int


# Register budget of the main kernel's defaults, from ptxas for sm_90 (scripts/triton_resources.py reports every
# shipped configuration; a spill goes to the stack frame, i.e. local memory). Each of the program's threads holds
# its share of the [BLOCK_M, BLOCK_N] tiles of the epilogue (similarities, Philox state, keys) and of the two
# [BLOCK_M, KP] lists (int32 key, int64 index, float32 similarity). With 8 warps and BLOCK_M x BLOCK_N = 4096, the
# largest row block that did not spill, per list length KP (the float32 product needs more registers):
#   bf16 / fp16: 128 rows up to KP = 8 (216 registers at D = 256), 64 up to KP = 16 (249), else 32 (<= 191);
#   float32:     64 rows at KP = 1 (176-194), else 32 (<= 175; 64 rows at KP = 4 spilled 24 bytes).
# The previous defaults (4 warps at 64 x 64; 128 x 64 one-step tiles at D = 256; 64 rows at k = 64) used all 255
# registers and spilled 32 to 1656 bytes.
ROW_BLOCK_LIMITS = {True: ((8, 128), (16, 64), (64, 32)), False: ((1, 64), (64, 32))}
TILE_ELEMENTS = 4096


def default_config(num_rows: int, dim: int, k: int, low_precision: bool, device: torch.device,
                   guide_low_precision: bool | None = None) -> TritonConfig:
    """The shipped tiles (bench/bench_sample_negatives_gpu.py sweeps alternatives). Under the interpreter: large
    tiles, since its cost is per operation, not per element, and exact "ieee" products.

    ``guide_low_precision`` is None without language guidance, else whether both guide tensors are bf16 / fp16 of
    one dtype. The guide tile is a second float32 accumulator: where either product is float32 (similarities or
    guides), 64 rows spilled on sm_90, so such kernels take at most 32 rows; with both products on the tensor cores
    the table's rows did not spill."""
    kp = triton.next_power_of_2(k)
    whole_dim = max(16, triton.next_power_of_2(dim))
    if device.type != "cuda":
        return TritonConfig(block_m=64, block_n=128, block_k=min(whole_dim, 64), input_precision="ieee")
    largest = next(rows for longest, rows in ROW_BLOCK_LIMITS[low_precision] if kp <= longest)
    if guide_low_precision is not None and not (low_precision and guide_low_precision):
        largest = min(largest, 32)
    block_m = min(largest, max(32, triton.next_power_of_2(num_rows)))
    block_n = max(32, min(64, TILE_ELEMENTS // block_m))
    # One k-step when the bank tile's rows are at most 512 bytes (bf16 D <= 256, float32 D <= 128): the anchor tile
    # then stays on chip for the whole split.
    one_step = whole_dim * (2 if low_precision else 4) <= 512
    block_k = whole_dim if one_step else (64 if low_precision else 32)
    return TritonConfig(block_m=block_m, block_n=block_n, block_k=block_k, num_warps=8, num_stages=3)


def guide_block_k(guide_dim: int, low_precision: bool, device: torch.device) -> int:
    """The k-step of the guide product (language guidance), a loop of its own after the tile's similarity:
    ``low_precision`` when it runs on the tensor cores (bf16 / fp16 guides beside a bf16 / fp16 similarity product),
    64 entries, else 16 (the float32 product holds its operands in registers: with 32, one of the shipped cases
    spilled on sm_90); no wider than the guide dimension needs (tl.dot takes at least 16). Under the interpreter up
    to 64, as its k-steps."""
    whole_dim = max(16, triton.next_power_of_2(guide_dim))
    return min(whole_dim, 64 if low_precision or device.type != "cuda" else 16)


def merge_config(width: int) -> MergeConfig:
    """Rows of the merge kernel per program: six [BLOCK_R, BLOCK_W] arrays (two of int64) stay in registers up to
    1024 entries per program with 4 warps (4096 spilled 96-168 bytes, sm_90), and a 2048-wide row takes 8 warps."""
    block_w = triton.next_power_of_2(width)
    block_r = max(1, min(16, 1024 // block_w))
    return MergeConfig(block_r=block_r, block_w=block_w, num_warps=8 if block_r * block_w > 1024 else 4)


def input_precision(config: TritonConfig) -> str:
    if config.input_precision is not None:
        return config.input_precision
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def num_splits(config: TritonConfig, row_blocks: int, tiles: int, k: int, multiprocessors: int | None) -> int:
    """Enough programs to fill a device of ``multiprocessors`` SMs (None: the interpreter, a few), at most one per
    tile, and few enough that the merge kernel's row of splits · k partial entries stays a register-sized block."""
    if config.num_splits is not None:
        wanted = config.num_splits
    elif multiprocessors is not None:
        wanted = -(-4 * multiprocessors // row_blocks)
    else:
        wanted = 3
    return max(1, min(wanted, tiles, MAX_MERGE_WIDTH // triton.next_power_of_2(k)))
