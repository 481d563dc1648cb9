"""What only the C++ CPU kernel has: its tiles and threads (FNE_FAST_CPU_TILE_*, intra-op threads) and its two
Philox loops (AVX-512 in 32-bit lanes, and the portable loop). The behaviour tests are in
test_sample_negatives.py."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import fne_fast
from fne_fast.testing import sample_inputs
from inputs import STEEP, assert_same_draws, run_oracle


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
    monkeypatch.setenv("FNE_FAST_CPU_TILE_ROWS", str(tile_rows))
    monkeypatch.setenv("FNE_FAST_CPU_TILE_COLS", str(tile_cols))
    torch.set_num_threads(threads)
    assert_same_draws(run_op(exact, k=3, **STEEP), expected_exact)
    assert_same_draws(run_op(stream_only, k=3, mode="uniform", cutdown=False), expected_stream)


@pytest.mark.parametrize("value", ["0", "-3", "many"])
def test_tile_sizes_from_the_environment_are_checked(monkeypatch, value):
    monkeypatch.setenv("FNE_FAST_CPU_TILE_COLS", value)
    with pytest.raises(ValueError, match="FNE_FAST_CPU_TILE_COLS must be a positive integer"):
        run_op(sample_inputs(4, 50, 8))


def test_portable_philox_path_gives_the_same_draws(tmp_path):
    # The kernel picks its AVX-512 Philox loop once per process; a fresh process with FNE_FAST_CPU_PORTABLE=1
    # runs the portable loop on the same inputs, including columns whose global index crosses 2³².
    inputs = sample_inputs(9, 700, 8, kind="exact", seed=21)
    options = dict(k=3, col_offset=2**32 - 350, **STEEP)
    torch.save(inputs, tmp_path / "inputs.pt")
    script = ("import sys, torch, fne_fast; inputs = torch.load(sys.argv[1]); "
              f"torch.save(fne_fast.sample_negatives(*inputs.values(), **{options!r}), sys.argv[2])")
    env = dict(os.environ, FNE_FAST_CPU_PORTABLE="1")
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
                   env=env, check=True)
    assert_same_draws(torch.load(tmp_path / "out.pt"), run_op(inputs, **options))
    assert_same_draws(run_op(inputs, **options), run_oracle(inputs, **options))
