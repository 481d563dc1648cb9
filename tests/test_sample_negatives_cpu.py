"""What only the C++ CPU kernel has: its tiles and threads (FNE_FAST_CPU_TILE_*, intra-op threads), its two
epilogues (AVX-512, and the portable loops) and its two GEMM paths for bf16 (oneDNN's bf16 brgemm, and float32
tiles when oneDNN is off). The behaviour tests are in test_sample_negatives.py."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import warnings

import pytest
import torch

import fne_fast
from fne_fast.ops.testing import sample_inputs
from inputs import MODES, STEEP, Backend, assert_matches_oracle, assert_same_draws, keeping, run_oracle


def run_op(inputs, **options):
    return fne_fast.sample_negatives(*inputs.values(), backend="cpu", **options)


@pytest.mark.parametrize("tile_rows,tile_cols", [(1, 1), (7, 33), (128, 512), (1000, 5000)])
@pytest.mark.parametrize("threads", [1, 2])
def test_tiling_and_threads_do_not_change_draws(monkeypatch, tile_rows, tile_cols, threads):
    exact = sample_inputs(29, 1300, 24, kind="exact", seed=4)
    # In mode "uniform" without cut-down the draws depend on the random stream only, so even similarities that
    # round differently under another blocking cannot change them.
    stream_only = sample_inputs(29, 1300, 24, seed=5)
    expected_exact = run_op(exact, k=3, **STEEP)
    expected_stream = run_op(stream_only, k=3, mode="uniform", cutdown=False)
    # Language guidance's tiles follow the same tiling (bf16 guides: the brgemm path where the CPU has it).
    guides = {name: tensor.to(torch.bfloat16) for name, tensor in
              zip(("anchor_guides", "bank_guides"), sample_inputs(29, 1300, 10, kind="exact", seed=6).values())}
    guided = dict(k=3, guide_threshold=0.0, **guides, **STEEP)
    expected_guided = run_op(exact, **guided)
    monkeypatch.setenv("FNE_FAST_CPU_TILE_ROWS", str(tile_rows))
    monkeypatch.setenv("FNE_FAST_CPU_TILE_COLS", str(tile_cols))
    torch.set_num_threads(threads)
    assert_same_draws(run_op(exact, k=3, **STEEP), expected_exact)
    assert_same_draws(run_op(stream_only, k=3, mode="uniform", cutdown=False), expected_stream)
    assert_same_draws(run_op(exact, **guided), expected_guided)
    assert_same_draws(expected_guided, run_oracle(exact, **guided))


@pytest.mark.parametrize("value", ["0", "-3", "many"])
def test_tile_sizes_from_the_environment_are_checked(monkeypatch, value):
    monkeypatch.setenv("FNE_FAST_CPU_TILE_COLS", value)
    with pytest.raises(ValueError, match="FNE_FAST_CPU_TILE_COLS must be a positive integer"):
        run_op(sample_inputs(4, 50, 8))


@pytest.mark.parametrize("share,guided", [(None, False), (0.02, False), (0.02, True)])
def test_portable_philox_path_gives_the_same_draws(tmp_path, share, guided):
    # The kernel picks its AVX-512 Philox loop once per process; a fresh process with FNE_FAST_CPU_PORTABLE=1
    # runs the portable loop on the same inputs, including columns whose global index crosses 2³², with the
    # cut-down of the exact inputs and with one that keeps 2 % (both loops then draw per candidate), and with
    # language guidance. The child checks that it runs the portable loop, so a variable the kernel does not read
    # fails here.
    if torch.ops.fne_fast.cpu_epilogue() == "portable":
        pytest.skip("this process runs the portable epilogue already (no AVX-512F, or FNE_FAST_CPU_PORTABLE set): "
                    "the comparison would be portable against portable")
    inputs = sample_inputs(9, 700, 8, kind="exact", seed=21)
    inputs = inputs if share is None else keeping(inputs, share)
    options = dict(k=3, col_offset=2**32 - 350, **STEEP)
    guides = {}
    if guided:
        generator = torch.Generator().manual_seed(5)
        guides = {name: torch.randint(-4, 5, (rows, 6), generator=generator) / 8.0
                  for name, rows in (("anchor_guides", 9), ("bank_guides", 700))}
        options["guide_threshold"] = 0.125
    torch.save((inputs, guides), tmp_path / "inputs.pt")
    script = ("import sys, torch, fne_fast; inputs, guides = torch.load(sys.argv[1]); "
              "assert torch.ops.fne_fast.cpu_epilogue() == 'portable', torch.ops.fne_fast.cpu_epilogue(); "
              f"torch.save(fne_fast.sample_negatives(*inputs.values(), **guides, **{options!r}), sys.argv[2])")
    env = dict(os.environ, FNE_FAST_CPU_PORTABLE="1")
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
                   env=env, check=True)
    assert_same_draws(torch.load(tmp_path / "out.pt"), run_op(inputs, **guides, **options))
    assert_same_draws(run_op(inputs, **guides, **options), run_oracle(inputs, **guides, **options))


def cpu_has(flag: str) -> bool:
    """Whether /proc/cpuinfo lists the CPU feature `flag` (False where there is no such file)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return any(line.startswith("flags") and flag in line.split() for line in cpuinfo)
    except OSError:
        return False


def test_diagnostic_ops_say_which_paths_this_process_takes():
    # Both ops have no tensor arguments (csrc/cpu/diagnostic_ops.cpp); the epilogue follows the CPU and the variable.
    portable = not cpu_has("avx512f") or "FNE_FAST_CPU_PORTABLE" in os.environ
    assert torch.ops.fne_fast.cpu_epilogue() == ("portable" if portable else "avx512")
    assert isinstance(torch.ops.fne_fast.cpu_bf16_brgemm(), bool)


# --- the bf16 brgemm tiles (csrc/cpu/similarity_tiles.cpp) ---------------------------------------------------------

BRGEMM = cpu_has("avx512_bf16") and torch.backends.mkldnn.is_available()
needs_brgemm = pytest.mark.skipif(not BRGEMM, reason="needs a CPU with avx512_bf16 and torch with oneDNN")
FLOAT32_BRGEMM = all(cpu_has(flag) for flag in ("avx512f", "avx512bw", "avx512vl", "avx512dq")) and \
    torch.backends.mkldnn.is_available()
needs_float32_brgemm = pytest.mark.skipif(not FLOAT32_BRGEMM, reason="needs a CPU with AVX-512 and torch with oneDNN")


@contextlib.contextmanager
def mkldnn_off():
    """torch.backends.mkldnn off for the block (its flags() also warns about an Intel-GPU TF32 setting)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")
        with torch.backends.mkldnn.flags(enabled=False):
            yield


def bf16_inputs(*args, **kwargs):
    return sample_inputs(*args, bank_dtype=torch.bfloat16, anchor_dtype=torch.bfloat16, **kwargs)


def test_brgemm_path_follows_the_cpu_and_the_mkldnn_switch():
    # The kernel takes oneDNN's bf16 kernel exactly where the CPU has avx512_bf16 and oneDNN is enabled, and asks
    # again on every call (torch.backends.mkldnn may be switched off between calls).
    assert torch.ops.fne_fast.cpu_bf16_brgemm() == BRGEMM
    assert torch.ops.fne_fast.cpu_float32_brgemm() == FLOAT32_BRGEMM
    with mkldnn_off():
        assert not torch.ops.fne_fast.cpu_bf16_brgemm() and not torch.ops.fne_fast.cpu_float32_brgemm()
    assert torch.ops.fne_fast.cpu_bf16_brgemm() == BRGEMM
    assert torch.ops.fne_fast.cpu_float32_brgemm() == FLOAT32_BRGEMM


@needs_brgemm
@pytest.mark.parametrize("dim", [2, 33, 64, 129])
@pytest.mark.parametrize("num_rows,num_cols,tile_cols", [(37, 1100, None), (70, 700, "33"), (5, 20, None),
                                                         (129, 1500, "256")])
def test_brgemm_tiles_match_the_oracle_exactly(monkeypatch, dim, num_rows, num_cols, tile_cols):
    # Exact inputs: bf16 products and their float32 sums are exact, so the draws equal the float64 oracle's bit for
    # bit. The sizes cross every edge of the tiling: odd D (the last column added apart), anchor blocks that are
    # not a multiple of 32 (zero-padded), full tiles and shorter ones cut into 32-row blocks with a staged
    # remainder (1100 = 2 x 512 + 2 x 32 + 12; 20 < 32; 33-column tiles).
    if tile_cols is not None:
        monkeypatch.setenv("FNE_FAST_CPU_TILE_COLS", tile_cols)
    inputs = bf16_inputs(num_rows, num_cols, dim, kind="exact", seed=dim, num_ids=max(num_cols // 5, 1))
    for mode in MODES:
        options = dict(k=4, mode=mode, seed=5, step=2, col_offset=2**32 - 500, **STEEP)
        assert_same_draws(run_op(inputs, return_keys=True, **options), run_oracle(inputs, **options))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, marks=needs_brgemm),
                                   pytest.param(torch.float32, marks=needs_float32_brgemm)], ids=str)
def test_brgemm_and_matmul_tiles_pick_the_same_negatives_up_to_near_ties(threads, dtype):
    # Random unit vectors: oneDNN's kernel (bf16 or float32) and the float32 at::mm_out tiles of oneDNN off sum the
    # same exact products in different orders, so their similarities differ by float32 rounding and a few rows may
    # swap near-tied candidates. Both must match the float64 oracle up to near-ties (the float32 path's own
    # tolerance), and each other wherever keys are apart.
    torch.set_num_threads(threads)
    inputs = sample_inputs(300, 5000, 256, seed=9, bank_dtype=dtype, anchor_dtype=dtype)
    options = dict(k=3, seed=4, **STEEP)
    brgemm = run_op(inputs, return_keys=True, **options)
    with mkldnn_off():
        assert not torch.ops.fne_fast.cpu_float32_brgemm()
        matmul = run_op(inputs, return_keys=True, **options)
    backend = Backend("cpu", "cpu")
    for result in (brgemm, matmul):
        assert_matches_oracle(backend, result, inputs, max_differ=1e-2, **options)
    differ = (brgemm[0] != matmul[0]).any(dim=1)
    assert differ.float().mean() <= 1e-2
    # Not the same computation: the similarities themselves differ in their last bits somewhere.
    assert not torch.equal(brgemm[1], matmul[1])
    torch.testing.assert_close(brgemm[1][~differ], matmul[1][~differ], rtol=0, atol=1e-5)


FLOAT32_KERNEL_DTYPES = [(torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.float16, torch.float16)]


@needs_float32_brgemm
@pytest.mark.parametrize("anchor_dtype,bank_dtype", FLOAT32_KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("dim", [1, 33, 129])
@pytest.mark.parametrize("num_rows,num_cols,tile_cols", [(37, 1100, None), (70, 700, "33"), (5, 20, None),
                                                         (129, 1500, "256")])
def test_float32_brgemm_tiles_match_the_oracle_exactly(monkeypatch, anchor_dtype, bank_dtype, dim, num_rows,
                                                       num_cols, tile_cols):
    # oneDNN's float32 kernel, for every input that is not bf16 on both sides (a low-precision bank tile converted
    # first): exact inputs give the oracle's draws bit for bit across the tiling's edges, as on the bf16 path.
    if tile_cols is not None:
        monkeypatch.setenv("FNE_FAST_CPU_TILE_COLS", tile_cols)
    inputs = sample_inputs(num_rows, num_cols, dim, kind="exact", seed=dim, num_ids=max(num_cols // 5, 1),
                           bank_dtype=bank_dtype, anchor_dtype=anchor_dtype)
    for mode in MODES:
        options = dict(k=4, mode=mode, seed=5, step=2, col_offset=2**32 - 500, **STEEP)
        assert_same_draws(run_op(inputs, return_keys=True, **options), run_oracle(inputs, **options))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_fallback_tiles_match_the_oracle(dtype):
    # oneDNN off (and fp16 always, there being no fp16 brgemm path): the bank tile and the anchors are converted
    # to float32, and exact inputs still give the oracle's draws.
    inputs = sample_inputs(37, 1100, 33, kind="exact", bank_dtype=dtype, anchor_dtype=dtype, seed=3)
    options = dict(k=4, seed=8, **STEEP)
    with mkldnn_off():
        assert not torch.ops.fne_fast.cpu_bf16_brgemm()
        assert_same_draws(run_op(inputs, return_keys=True, **options), run_oracle(inputs, **options))
