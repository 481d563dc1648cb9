"""Registers, spills and shared memory of the shipped Triton configurations, compiled for a GPU without one.

    python scripts/triton_resources.py                        # sm_90 table (markdown) of every shipped config
    python scripts/triton_resources.py --max-stack-bytes 0    # ... and exit 1 if any spills (the CI check)
    python scripts/triton_resources.py --arch 80 --subset     # a few kernels for another GPU, compile only

Triton compiles each kernel with its bundled ptxas (no driver, no GPU: TRITON_INTERPRET must be unset), and the
bundled cuobjdump reads the cubin's resource usage: REG (registers per thread), STACK (stack frame bytes per thread:
where ptxas puts spilled registers, so 0 means no spill) and the shared memory Triton reserves. The configurations are
the launcher's own (fne_fast/kernels/configs.py default_config, merge_config) for a cover of the inputs that select
them: each block_k class (one k-step at D = 128 and 256, k-loops at D = 768), each row block at the longest list it
takes (ROW_BLOCK_LIMITS), the dtypes and the modes, and the merge kernel at row widths the launcher makes. The numbers
belong to the Triton installed (3.9 in CI; scripts/gpu_check.sh runs this under the GPU image's).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SHARED_MEMORY_LIMIT = 227 * 1024  # bytes per block on sm_80 / sm_90 (the opt-in maximum)


def _main_case(num_rows, dim, k, bank, anchors=None, mode="fne", fn_excludes=False, ceiling=False, guides=None,
               guide_dim=384):
    return dict(kernel="main", num_rows=num_rows, dim=dim, k=k, bank=bank, anchors=anchors or bank, mode=mode,
                fn_excludes=fn_excludes, ceiling=ceiling, guides=guides, guide_dim=guide_dim)


def cases(subset: bool) -> list[dict]:
    """The inputs whose configurations are compiled (see the module's doc)."""
    # Per dtype path, each row block at the longest list it takes (ROW_BLOCK_LIMITS) and each block_k class.
    main = [_main_case(128, d, k, "bf16") for d in (128, 256, 768) for k in (8, 16, 64)]
    main += [_main_case(128, 256, 1, "bf16")]
    main += [_main_case(128, 768, k, "fp32") for k in (1, 2, 64)] + [_main_case(128, 128, 1, "fp32")]
    main += [_main_case(128, 768, 1, "bf16", anchors="fp32", mode="uniform"),
             _main_case(128, 256, 3, "fp16", mode="hardest"),
             _main_case(128, 768, 6, "fp32", fn_excludes=True),
             _main_case(128, 256, 16, "bf16", ceiling=True), _main_case(128, 768, 64, "fp32", ceiling=True)]
    # The edges of the float32 classes: one k-step at k = 1, and a bank converted in the kernel; the shortest list
    # of the 32-row bf16 class.
    main += [_main_case(128, 256, 1, "fp32"), _main_case(128, 768, 1, "bf16", anchors="fp32"),
             _main_case(128, 128, 1, "bf16", anchors="fp32"), _main_case(128, 256, 9, "bf16")]
    # Language guidance (MiniLM guides, Dg = 384) beside every case: guides of the bank's dtype (anchor and bank
    # guides), and float32 anchor guides with bf16 bank guides.
    guided = [dict(case, guides=(case["bank"], case["bank"])) for case in main]
    guided += [_main_case(128, 256, 16, "bf16", guides=("fp32", "bf16"))]
    merge = [dict(kernel="merge", width=w, k=k, has_race=r) for w, k, r in ((64, 1, True), (528, 1, True),
                                                                           (2048, 64, True), (1584, 3, False))]
    if subset:
        return [main[4], main[9], main[10], main[14], main[15], main[17], merge[1], merge[3]]
    return main + guided + merge


def _source(case):
    """(ASTSource, options, config description) of one case, from the launcher's own configuration functions."""
    import torch
    import triton
    from triton.compiler import ASTSource

    import fne_fast.kernels.configs as configs
    import fne_fast.kernels.sample_negatives as kernels

    def signature(fn, pointers, floats, ints64, constants):
        names = fn.arg_names
        types = {}
        for name in names:
            if name in constants:
                types[name] = "constexpr"
            elif name in pointers:
                types[name] = "*" + pointers[name]
            else:
                types[name] = "fp32" if name in floats else "i64" if name in ints64 else "i32"
        aligned = [name for name in names if types[name].startswith("*")
                   or name in ("stride_am", "stride_bn", "dim", "stride_agm", "stride_bgn")]
        attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in aligned}
        return ASTSource(fn, types, constexprs=constants, attrs=attrs)

    if case["kernel"] == "merge":
        config = configs.merge_config(case["width"])
        pointers = dict(race_key_ptr="i32", race_idx_ptr="i64", race_sim_ptr="fp32", hard_key_ptr="i32",
                        hard_idx_ptr="i64", hard_sim_ptr="fp32", index_ptr="i64", sim_ptr="fp32", valid_ptr="i1",
                        key_ptr="fp32")
        constants = dict(K=case["k"], BLOCK_R=config.block_r, BLOCK_W=config.block_w, HAS_RACE=case["has_race"])
        described = f"merge {config.block_r}x{config.block_w} w{config.num_warps}"
        return (signature(kernels._merge_kernel, pointers, (), (), constants), {"num_warps": config.num_warps},
                described)
    low = case["anchors"] == case["bank"] and case["bank"] != "fp32"
    guides = case["guides"]
    guide_low = None if guides is None else guides[0] == guides[1] != "fp32"
    converted = case["anchors"] == "fp32" and case["bank"] != "fp32"
    config = configs.default_config(case["num_rows"], case["dim"], case["k"], low, torch.device("cuda"), guide_low,
                                    converted)
    # The launcher's rule (sample_negatives_triton): beside a float32 similarity product the guides take it too.
    guide_tensor_cores = guides is not None and low and guide_low
    pointers = dict(anchors_ptr=case["anchors"], bank_ptr=case["bank"], centre_ptr="fp32", ceiling_ptr="fp32",
                    anchor_guides_ptr=guides[0] if guides else case["anchors"],
                    bank_guides_ptr=guides[1] if guides else case["bank"],
                    count_threshold_ptr="fp32", anchor_ids_ptr="i64", bank_ids_ptr="i64", stats_ptr="fp32",
                    race_key_ptr="i32", race_idx_ptr="i64", race_sim_ptr="fp32", hard_key_ptr="i32",
                    hard_idx_ptr="i64", hard_sim_ptr="fp32", flag_ptr="i32", above_ptr="i32")
    has_race = case["mode"] != "hardest"
    constants = dict(K=case["k"], KP=triton.next_power_of_2(case["k"]), BLOCK_M=config.block_m,
                     BLOCK_N=config.block_n, BLOCK_K=config.block_k, HAS_RACE=has_race,
                     HAS_WEIGHTS=case["mode"] == "fne", HAS_CUTDOWN=has_race, HAS_CEILING=case["ceiling"],
                     HAS_COUNT=case["ceiling"],
                     CHECK_FINITE=True, FN_EXCLUDES=case["fn_excludes"], DOT_FP32=not low, INPUT_PRECISION="ieee",
                     ONE_K_STEP=config.block_k >= case["dim"], stride_ad=1, stride_bd=1,
                     HAS_GUIDES=guides is not None, GUIDE_DOT_FP32=not guide_tensor_cores,
                     BLOCK_G=configs.guide_block_k(case["guide_dim"] if guides else 0, guide_tensor_cores,
                                                   torch.device("cuda")))
    if guides is not None:
        constants.update(stride_agd=1, stride_bgd=1)
    floats = ("margin", "tau", "fn_tau", "min_count", "log_prior", "z_threshold", "guide_threshold")
    source = signature(kernels._sample_negatives_kernel, pointers, floats, ("col_offset",), constants)
    described = (f"{config.block_m}x{config.block_n}x{config.block_k} w{config.num_warps} s{config.num_stages}")
    return source, {"num_warps": config.num_warps, "num_stages": config.num_stages}, described


def _label(case) -> str:
    if case["kernel"] == "merge":
        return f"merge width={case['width']} k={case['k']}{'' if case['has_race'] else ' hardest'}"
    dtypes = case["bank"] if case["anchors"] == case["bank"] else f"{case['anchors']}/{case['bank']}"
    extra = (" fn_tau=inf" if case["fn_excludes"] else "") + (" ceilings+counts" if case["ceiling"] else "")
    if case["guides"] is not None:
        extra += f" guides {case['guides'][0]}/{case['guides'][1]} Dg={case['guide_dim']}"
    return f"main B={case['num_rows']} D={case['dim']} k={case['k']} {dtypes} {case['mode']}{extra}"


def measure(arch: int, case: dict) -> dict:
    """Compiles one case for sm_<arch>; returns its label, configuration, registers, stack and shared bytes."""
    import triton
    from triton.backends.compiler import GPUTarget

    source, options, described = _source(case)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([os.path.join(tools, "cuobjdump"), "--dump-resource-usage", cubin.name],
                               capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    if found is None:
        raise RuntimeError(f"no resource usage in cuobjdump's output: {usage!r}")
    return dict(case=_label(case), config=described, registers=int(found.group(1)), stack_bytes=int(found.group(2)),
                shared_bytes=int(compiled.metadata.shared))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--subset", action="store_true", help="a few kernels only (compile check)")
    parser.add_argument("--max-stack-bytes", type=int, default=None, help="exit 1 if a kernel's stack frame (spills) "
                        "exceeds this, or its shared memory the 227 KiB a block may have")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("TRITON_INTERPRET is set: Triton would not compile for a GPU")
    todo = cases(args.subset)
    with concurrent.futures.ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        rows = list(pool.map(measure, [args.arch] * len(todo), todo))
    print(f"sm_{args.arch}, Triton {__import__('triton').__version__}\n")
    print("| kernel and inputs | tiles | registers | stack (spill) bytes | shared KiB |\n|---|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['case']} | {row['config']} | {row['registers']} | {row['stack_bytes']} | "
              f"{row['shared_bytes'] / 1024:.0f} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(dict(arch=args.arch, triton=__import__("triton").__version__, rows=rows), handle, indent=1)
    if args.max_stack_bytes is None:
        return 0
    bad = [row for row in rows
           if row["stack_bytes"] > args.max_stack_bytes or row["shared_bytes"] > SHARED_MEMORY_LIMIT]
    for row in bad:
        print(f"OVER BOUND: {row['case']} ({row['config']}): {row['stack_bytes']} stack bytes, "
              f"{row['shared_bytes']} shared bytes", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
