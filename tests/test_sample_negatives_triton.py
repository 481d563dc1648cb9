"""What only the Triton kernel has: its building blocks (Philox, Gumbel) run as Triton code, tile configs and
splits, its registration for the CUDA dispatch key, and code generation for GPUs checked without one. The
behaviour tests are in test_sample_negatives.py.

Without a GPU the kernels run under TRITON_INTERPRET=1 on CPU tensors (conftest.py sets it before
fne_fast.kernels is imported); sizes stay small because the interpreter is slow. With CUDA the same tests run the
compiled kernels, and the tests marked "gpu" add large sizes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from fne_fast import ops  # noqa: E402
from fne_fast.kernels import configs, jit_helpers  # noqa: E402
from fne_fast.kernels import sample_negatives as triton_kernels  # noqa: E402
from fne_fast.kernels.configs import TritonConfig  # noqa: E402
from fne_fast.kernels.sample_negatives import sample_negatives_triton  # noqa: E402
from fne_fast.ops import dispatch, reference  # noqa: E402
from fne_fast.ops.options import MODES, SamplerOptions  # noqa: E402
from fne_fast.ops.testing import sample_inputs  # noqa: E402
from inputs import STEEP, assert_same_draws, run_oracle  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not triton_kernels.is_interpreted():
    pytest.skip("no GPU, and fne_fast.kernels was imported before TRITON_INTERPRET=1 was set",
                allow_module_level=True)
gpu = pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU")
EXACT_PRECISION = "ieee"


def inputs_on_device(*args, **kwargs):
    return sample_inputs(*args, device=DEVICE, **kwargs)


def run_triton(inputs, config, seed=0, **options):
    """The launcher with explicit tiles, on arguments the tests know to be valid."""
    return sample_negatives_triton(*inputs.values(), SamplerOptions(**options), seed=seed % (1 << 64),
                                   config=config)

# --- the building blocks ----------------------------------------------------------------------------------------

@triton.jit
def _philox_words_kernel(c0_ptr, c1_ptr, c2_ptr, out_ptr, c3, k0, k1, ROWS: tl.constexpr, COLS: tl.constexpr,
                         SCALAR_HIGH_WORD: tl.constexpr):
    cols = tl.arange(0, COLS)
    rows = tl.arange(0, ROWS)
    c0 = tl.load(c0_ptr + cols).to(tl.uint32)[None, :]
    c2 = tl.load(c2_ptr + rows).to(tl.uint32)[:, None]
    if SCALAR_HIGH_WORD:
        c1 = tl.load(c1_ptr).to(tl.uint32)
    else:
        c1 = tl.load(c1_ptr + cols).to(tl.uint32)[None, :]
    words = jit_helpers.philox_first_word(c0, c1, c2, c3.to(tl.uint32), k0.to(tl.uint32), k1.to(tl.uint32))
    tl.store(out_ptr + rows[:, None] * COLS + cols[None, :], words.to(tl.int64))


@triton.jit
def _gumbel_kernel(words_ptr, out_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(out_ptr + offs, jit_helpers.gumbel_from_bits(tl.load(words_ptr + offs).to(tl.uint32)))


def philox_first_words(c0, c1, c2, c3, key, scalar_high_word):
    out = torch.empty(len(c2), len(c0), dtype=torch.int64, device=DEVICE)
    as_tensor = lambda values: torch.tensor(values, dtype=torch.int64, device=DEVICE)  # noqa: E731
    _philox_words_kernel[(1,)](as_tensor(c0), as_tensor(c1), as_tensor(c2), out, c3, key[0], key[1],
                               ROWS=len(c2), COLS=len(c0), SCALAR_HIGH_WORD=scalar_high_word)
    return out.cpu()


def test_philox_known_answer_vectors():
    # Random123's vectors (docs/DESIGN.md §2); the kernel keeps the first output word only.
    vectors = [((0, 0), (0, 0, 0, 0), 0x6627E8D5),
               ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF,) * 4, 0x408F276D),
               ((0xA4093822, 0x299F31D0), (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), 0xD16CFE09)]
    for key, (c0, c1, c2, c3), expected in vectors:
        for scalar_high_word in (True, False):
            words = philox_first_words([c0], [c1], [c2], c3, key, scalar_high_word)
            assert words.item() == expected


@pytest.mark.parametrize("scalar_high_word", [True, False])
def test_philox_broadcast_matches_reference(scalar_high_word):
    # Rows and columns broadcast: the first rounds run on 1-D operands, which must not change the words.
    generator = torch.Generator().manual_seed(0)
    c0 = torch.randint(0, 2**32, (32,), generator=generator)
    c1 = torch.full((32,), 7) if scalar_high_word else torch.randint(0, 2**32, (32,), generator=generator)
    c2 = torch.randint(0, 2**32, (16,), generator=generator)
    key = (0x12345678, 0x9ABCDEF0)
    words = philox_first_words(c0.tolist(), c1.tolist(), c2.tolist(), 0xDEADBEEF, key, scalar_high_word)
    expected, _, _, _ = reference.philox4x32_10((c0.reshape(1, -1), c1.reshape(1, -1), c2.reshape(-1, 1),
                                                 0xDEADBEEF), key)
    assert torch.equal(words, expected.expand(16, 32))


def test_gumbel_matches_float64_including_the_far_tail():
    special = [0, 1, 2**20, 2**28 - 1, 2**28, 2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1]
    words = torch.cat([torch.tensor(special), torch.randint(0, 2**32, (128 - len(special),),
                                                             generator=torch.Generator().manual_seed(1))])
    out = torch.empty(128, dtype=torch.float32, device=DEVICE)
    _gumbel_kernel[(1,)](words.to(DEVICE), out, N=128)
    expected = reference.gumbel_from_bits(words, torch.float64)
    torch.testing.assert_close(out.cpu().double(), expected, rtol=2e-6, atol=2e-6)
    assert out[0] > 22.8  # a float32 -log(-log u) would cap near 16.6


@pytest.mark.parametrize("config", [
    TritonConfig(block_m=16, block_n=16, block_k=16, num_splits=1, input_precision=EXACT_PRECISION),
    TritonConfig(block_m=32, block_n=32, block_k=16, num_splits=7, input_precision=EXACT_PRECISION),
    TritonConfig(block_m=64, block_n=64, block_k=64, num_splits=100, input_precision=EXACT_PRECISION),
])
def test_tiles_and_splits_do_not_change_draws(config):
    inputs = inputs_on_device(29, 700, 24, kind="exact", seed=4, num_ids=40)
    for mode in MODES:
        options = dict(k=3, mode=mode, **STEEP)
        counters = dict(seed=2024, step=3)
        assert_same_draws(sample_negatives_triton(*inputs.values(), SamplerOptions(**options), config=config,
                                                  **counters), run_oracle(inputs, **options, **counters))


def test_registered_for_the_cuda_dispatch_key():
    # ops registers the Triton kernel for the CUDA key unless the compiled CUDA kernel was built.
    assert ops.TRITON_SERVES_CUDA == (not ops.COMPILED_CUDA_KERNEL)
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fne_fast::sample_negatives", "CUDA")
    # The function behind the CUDA key takes the schema's positional arguments and its signed 64-bit seed.
    inputs = inputs_on_device(10, 120, 8, kind="exact", seed=3)
    # fn_thresholds, anchor_guides, bank_guides, then the options (SCHEMA_FIELDS), then the counters.
    schema_args = (None, None, None, 2, "fne", 0.2, 4.0, 4.0, 10000.0, 0.999, 200, True, 0.0, None, None, -1, 5, 3,
                   7, 100, True, False)
    expected = run_oracle(inputs, k=2, tau=4.0, seed=(1 << 64) - 1, step=5, row_offset=3, col_offset=7, filled=100)
    assert_same_draws(dispatch._sample_negatives_triton_op(*inputs.values(), *schema_args)[:4], expected)
    # The criteria's places in the schema: thresholds and the guides after stats, the centre offset, the relative
    # cut and the guide threshold after cutdown (a mix-up of the floats would change the draws).
    device = inputs["anchors"].device
    thresholds = torch.full((10,), 0.25, device=device)
    generator = torch.Generator().manual_seed(2)
    guides = [(torch.randint(-4, 5, (rows, 6), generator=generator) / 8.0).to(device) for rows in (10, 120)]
    criteria_args = (thresholds, *guides, *schema_args[3:12], -0.125, 0.5, 0.125, *schema_args[15:])
    expected = run_oracle(inputs, k=2, tau=4.0, seed=(1 << 64) - 1, step=5, row_offset=3, col_offset=7, filled=100,
                          fn_thresholds=thresholds, center_offset=-0.125, relative_cut=0.5, guide_threshold=0.125,
                          anchor_guides=guides[0], bank_guides=guides[1])
    assert_same_draws(dispatch._sample_negatives_triton_op(*inputs.values(), *criteria_args)[:4], expected)
    with pytest.raises(ValueError, match="filled"):  # and checks its arguments, as the C++ kernels do
        dispatch._sample_negatives_triton_op(*inputs.values(), *schema_args[:-3], 121, True, False)


def test_default_precision_follows_torch_tf32_setting():
    config = TritonConfig()
    before = torch.backends.cuda.matmul.allow_tf32  # a torch setting, not an attribute monkeypatch can restore
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert configs.input_precision(config) == "ieee"
        torch.backends.cuda.matmul.allow_tf32 = True
        assert configs.input_precision(config) == "tf32"
        assert configs.input_precision(TritonConfig(input_precision="ieee")) == "ieee"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


# --- compiled code generation, checked without a GPU ------------------------------------------------------------

# scripts/triton_resources.py compiles the shipped configurations (default_config, merge_config) for Hopper and
# Ampere with Triton's bundled ptxas, in a subprocess because this process runs the interpreter, and reads each
# cubin's registers, stack frame (spills) and shared memory. The interpreter executes Python, so code that only the
# compiler rejects (a loop-carried variable changing type, a branch yielding different shapes) would otherwise
# reach the GPU untested; and a configuration that spills would run from local memory.
RESOURCES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts",
                         "triton_resources.py")


# The GPU image has another Triton (3.6) than this one, and its register use differs (6-65 more registers per
# thread on the same configuration): FNE_FAST_SIDE_TRITON names a directory holding that version (`pip install
# --no-deps --target DIR triton==3.6.0`; .ci/run makes one), whose compiler the no-spill check then runs too.
SIDE_TRITON = os.environ.get("FNE_FAST_SIDE_TRITON")


def run_resources(tmp_path, *args, triton_dir=None):
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    if triton_dir is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [triton_dir, env.get("PYTHONPATH")]))
    report = tmp_path / "resources.json"
    result = subprocess.run([sys.executable, RESOURCES, "--json", str(report), *args], capture_output=True,
                            text=True, env=env, timeout=1200)
    return result, (json.loads(report.read_text()) if report.exists() else {"rows": []})


@pytest.mark.parametrize("triton_dir", [None, pytest.param(SIDE_TRITON, marks=pytest.mark.skipif(
    SIDE_TRITON is None, reason="FNE_FAST_SIDE_TRITON (a second Triton version) is not set"))],
    ids=["installed", "side"])
def test_shipped_configs_compile_for_hopper_without_spills(tmp_path, triton_dir):
    # The bound: no stack frame (ptxas spills nothing) and shared memory within a block's 227 KiB.
    result, report = run_resources(tmp_path, "--arch", "90", "--max-stack-bytes", "0", triton_dir=triton_dir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    if triton_dir is not None:  # the side version was the one that compiled
        assert report["triton"] != triton.__version__, report["triton"]
    rows = report["rows"]
    assert len(rows) >= 20 and all(row["stack_bytes"] == 0 and 0 < row["registers"] <= 255 for row in rows)
    # The row-block table is what keeps them there: the configuration the old rule gave (64 rows at k = 64, four
    # warps) spilled.
    assert {row["config"] for row in rows if "k=64 bf16" in row["case"]} == {"32x64x128 w8 s3", "32x64x256 w8 s3",
                                                                            "32x64x64 w8 s3"}


def test_kernels_compile_for_ampere(tmp_path):
    result, report = run_resources(tmp_path, "--arch", "80", "--subset")
    assert result.returncode == 0 and len(report["rows"]) == 8, result.stderr[-3000:]


def test_default_configs_respect_the_register_table():
    # default_config follows ROW_BLOCK_LIMITS for every list length, and keeps the tile at 4096 elements; 64 float32
    # rows take 32 columns, and a bank converted in the kernel 32 x 32 tiles.
    for low_precision in (True, False):
        for k in (1, 2, 3, 8, 9, 16, 17, 33, 64):
            config = configs.default_config(4096, 256, k, low_precision, torch.device("cuda"))
            limit = next(rows for longest, rows in configs.ROW_BLOCK_LIMITS[low_precision]
                         if triton.next_power_of_2(k) <= longest)
            assert config.block_m == limit and config.block_m * config.block_n <= configs.TILE_ELEMENTS
            widest = 32 if limit == 64 and not low_precision else 64
            assert config.block_n == min(widest, configs.TILE_ELEMENTS // limit)
            assert config.num_warps == 8
            converted = configs.default_config(4096, 256, k, False, torch.device("cuda"), converted_bank=True)
            assert (converted.block_m, converted.block_n) == (32, 32)
    assert configs.default_config(5, 256, 1, True, torch.device("cuda")).block_m == 32


# --- large sizes on a GPU -----------------------------------------------------------------------------------------

@gpu
@pytest.mark.parametrize("bank_dtype", [torch.float32, torch.bfloat16])
def test_gpu_large_exact_inputs(bank_dtype):
    from inputs import Backend, assert_matches_oracle

    inputs = inputs_on_device(300, 70000, 128, kind="exact", bank_dtype=bank_dtype, seed=21, num_ids=5000)
    options = dict(k=4, seed=77, step=2, col_offset=2**32 - 30000, **STEEP)
    backend = Backend("triton", DEVICE)
    assert_matches_oracle(backend, backend.run(inputs, **options), inputs, **options)


@gpu
@pytest.mark.parametrize("precision,max_differ", [("ieee", 1e-3), ("tf32", 0.05)])
def test_gpu_float32_precision(precision, max_differ):
    # tf32 rounds the inputs to 10-bit mantissas, which moves similarities by ~1e-3: near-ties flip more often.
    inputs = inputs_on_device(1024, 50000, 256, seed=22)
    config = TritonConfig(block_m=64, block_n=64, block_k=32, input_precision=precision)
    index = run_triton(inputs, config, seed=1, k=2, **STEEP)[0].cpu()
    ref_index = run_oracle(inputs, k=2, seed=1, **STEEP)[0]
    assert (index != ref_index).any(dim=1).float().mean() <= max_differ


@gpu
def test_gpu_extra_memory_does_not_grow_with_the_bank():
    inputs = inputs_on_device(128, 2**22, 64, bank_dtype=torch.bfloat16, seed=23)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    sample_negatives_triton(*inputs.values(), check_finite=False)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before < 16 * 2**20
