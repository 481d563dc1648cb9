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


# Register budget of the main kernel's defaults, from ptxas for sm_90 under Triton 3.6 (the GPU image's) and 3.9
# (scripts/triton_resources.py reports every shipped configuration; a stack frame means spilled registers or local
# arrays, i.e. local memory). Each of the program's threads holds its share of the [BLOCK_M, BLOCK_N] tiles of the
# epilogue (similarities, Philox state, keys) and of the two [BLOCK_M, KP] lists (int32 key, int64 index, float32
# similarity). ptxas's choices are not monotonic in the tile size, so every class below was compiled under both
# versions, and the neighbours that did not qualify are named. All take 8 warps.
#   bf16 / fp16: 128 x 32 tiles up to KP = 8, else 32 x 64 (64 x 64 at KP = 9..16 spilled 24-112 bytes under
#                3.6), 3 stages; one k-step where a bank row is at most 512 bytes (D <= 256), except with guidance
#                at 128 rows (128 x 32 x 256 spilled 16 bytes under 3.6), which steps 64 at a time.
#   float32 products (float32 anchors, any bank): 2 stages and steps of 32 over D (one k-step at D = 128 and 3
#                stages spilled 8-40 bytes at some list lengths under both versions); 64 x 32 tiles at KP = 1,
#                else 32 x 64 (64 rows at KP = 4 spilled 24 bytes); 32 x 32 with a bf16 / fp16 bank converted in the
#                kernel (32 x 64 spilled 8-56 bytes under 3.6); steps of 16 with language guidance, whose float32
#                guide tile is a second accumulator (steps of 32 spilled 8-32 bytes under 3.6 at KP >= 2).
# The previous defaults (4 warps at 64 x 64; 128 x 64 one-step tiles at D = 256; 64 rows at k = 64) used all 255
# registers and spilled 32 to 1656 bytes.
ROW_BLOCK_LIMITS = {True: ((8, 128), (64, 32)), False: ((1, 64), (64, 32))}
TILE_ELEMENTS = 4096


def default_config(num_rows: int, dim: int, k: int, low_precision: bool, device: torch.device,
                   guide_low_precision: bool | None = None, converted_bank: bool = False) -> TritonConfig:
    """The shipped tiles (bench/bench_sample_negatives_gpu.py sweeps alternatives). Under the interpreter: large
    tiles, since its cost is per operation, not per element, and exact "ieee" products.

    ``low_precision``: bf16 / fp16 anchors and bank of one dtype (tensor-core products); ``converted_bank``: float32
    anchors with a bf16 / fp16 bank, converted to float32 in the kernel; ``guide_low_precision`` is None without
    language guidance, else whether both guide tensors are bf16 / fp16 of one dtype. The guide tile is a second
    float32 accumulator: where either product is float32 (similarities or guides), 64 rows spilled on sm_90, so such
    kernels take at most 32 rows; with both products on the tensor cores the table's rows did not spill."""
    kp = triton.next_power_of_2(k)
    whole_dim = max(16, triton.next_power_of_2(dim))
    if device.type != "cuda":
        return TritonConfig(block_m=64, block_n=128, block_k=min(whole_dim, 64), input_precision="ieee")
    guided = guide_low_precision is not None
    largest = next(rows for longest, rows in ROW_BLOCK_LIMITS[low_precision] if kp <= longest)
    if converted_bank or (guided and not (low_precision and guide_low_precision)):
        largest = min(largest, 32)
    block_m = min(largest, max(32, triton.next_power_of_2(num_rows)))
    if low_precision:
        block_n = max(32, min(64, TILE_ELEMENTS // block_m))
        # One k-step: the anchor tile then stays on chip for the whole split.
        one_step = whole_dim * 2 <= 512 and not (guided and block_m == 128)
        block_k = whole_dim if one_step else 64
        return TritonConfig(block_m=block_m, block_n=block_n, block_k=block_k, num_warps=8, num_stages=3)
    block_n = 32 if block_m == 64 or converted_bank else 64
    block_k = min(whole_dim, 16 if guided else 32)
    return TritonConfig(block_m=block_m, block_n=block_n, block_k=block_k, num_warps=8, num_stages=2)


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
