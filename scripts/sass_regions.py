"""SASS instruction counts per kernel region, for the static performance model in bench/RESULTS_gpu_model.md.

    python scripts/sass_regions.py triton B D K [MODE]   # shipped config of main B=.. D=.. k=K bf16 MODE (fne), sm_90
    python scripts/sass_regions.py cubin FILE.cubin NAME # a kernel (substring of its symbol) of an nvcc cubin
    python scripts/sass_regions.py resources VARIANT     # registers/spills of the 64-row configs and the acceptance
                                                         # shapes; VARIANT: base, rows32, n32 or s2 (see variant())

Disassembles with nvdisasm -c -gi (Triton's bundled one) and cuts the kernel's main loop (the largest backward
branch) into segments at labels and branches. Each segment is printed with its address range, instruction count,
the source lines it carries (ptxas line info: -lineinfo for nvcc, on by default in Triton) and a breakdown by
opcode class, so the per-iteration path of each case can be summed from segments. Instructions are attributed to
the last line annotation above them. For Triton it then sums the paths of the tile loop (always run, hardest-list
insert, race branch; the K-loop body times D / BLOCK_K) by region (triton_region). Line 0 is counted as Philox:
Triton 3.9 drops the line info of the inlined philox_first_word (IMAD.HI / IMAD / LOP3 only), 3.6 keeps it.
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
LINE = re.compile(r'//## File "([^"]+)", line (\d+)(?: inlined at "([^"]+)", line (\d+))?')
LABEL = re.compile(r"^(\.L_x_\d+):")
CLASSES = (("HGMMA", "GEMM-mma"), ("WARPGROUP", "GEMM-mma"), ("LDGSTS", "GEMM-load"), ("LDGDEPBAR", "GEMM-load"),
           ("DEPBAR", "GEMM-load"), ("LDSM", "GEMM-load"), ("IMAD.HI", "IMAD.HI"), ("IMAD.WIDE", "IMAD.WIDE"),
           ("IMAD", "IMAD"), ("LOP3", "LOP3"), ("FFMA", "FFMA"), ("FMUL", "FMUL/FADD"), ("FADD", "FMUL/FADD"),
           ("MUFU", "MUFU"), ("BAR", "BAR"), ("SHFL", "SHFL/REDUX"), ("REDUX", "SHFL/REDUX"), ("VOTE", "VOTE"),
           ("LDG", "LDG"), ("LDS", "LDS/STS"), ("STS", "LDS/STS"), ("ISETP", "ISETP/FSETP"),
           ("FSETP", "ISETP/FSETP"), ("SEL", "SEL/FSEL"), ("FSEL", "SEL/FSEL"), ("BRA", "BRA"))


def opclass(op: str) -> str:
    for prefix, name in CLASSES:
        if op.startswith(prefix):
            return name
    return "other"


def disassemble(cubin: str) -> str:
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    return subprocess.run([tool, "-c", "-gi", cubin], capture_output=True, text=True, check=True).stdout


def parse(sass: str, function: str):
    """Instructions of one function: (address, opcode, guarded, target label or None, source tag); labels."""
    rows, labels, inside, tag = [], {}, False, "line0"
    for raw in sass.splitlines():
        if raw.startswith("//---") and ".text." in raw:
            inside = function in raw
            continue
        if not inside:
            continue
        found = LINE.search(raw)
        if found:
            file, line, outer_file, outer_line = found.groups()
            base = os.path.basename(file)
            tag = f"{base}:{line}" + (f"@{os.path.basename(outer_file)}:{outer_line}" if outer_file else "")
            if line == "0":
                tag = "line0"
            continue
        label = LABEL.match(raw.strip())
        if label:
            labels[label.group(1)] = len(rows)
            continue
        ins = INSTRUCTION.search(raw)
        if ins:
            target = re.search(r"`\((\.L_x_\d+)\)", ins.group(4))
            rows.append((int(ins.group(1), 16), ins.group(3), bool(ins.group(2)),
                         target.group(1) if target and ins.group(3).startswith("BRA") else None, tag))
    return rows, labels


def segments(rows, labels):
    """The main loop (largest backward branch) cut into segments at labels and after branches."""
    back = [(i - labels[t], labels[t], i) for i, (_, op, _, t, _) in enumerate(rows) if t and labels[t] <= i]
    _, start, end = max(back)
    cuts = sorted({start, end + 1} | {v for v in labels.values() if start < v <= end}
                  | {i + 1 for i in range(start, end) if rows[i][3]})
    return [(a, b) for a, b in zip(cuts, cuts[1:])], start, end


def report(rows, labels, title):
    print(f"## {title}\n\nkernel: {len(rows)} instructions")
    pieces, start, end = segments(rows, labels)
    names = {v: k for k, v in labels.items()}
    print(f"main loop: {end - start + 1} instructions, 0x{rows[start][0]:x}..0x{rows[end][0]:x}\n")
    for a, b in pieces:
        lines = collections.Counter(tag for *_, tag in rows[a:b])
        ops = collections.Counter(opclass(op) for _, op, *_ in rows[a:b])
        branch = rows[b - 1]
        tail = f" -> {branch[3]}{' (cond)' if branch[2] else ''}" if branch[3] else ""
        print(f"[{names.get(a, '')}] 0x{rows[a][0]:x}..0x{rows[b - 1][0]:x} n={b - a}{tail}")
        print("   lines: " + ", ".join(f"{t}={n}" for t, n in lines.most_common(8)))
        print("   ops:   " + ", ".join(f"{t}={n}" for t, n in ops.most_common()))
    print()


def _outer_line(tag):
    """The kernel-source line of a tag: the line itself, or where its helper was inlined."""
    for part in reversed(tag.split("@")):
        if part.startswith("sample_negatives.py:"):
            return int(part.split(":")[1])
    return None


def _helper_lines(tag):
    return {int(part.split(":")[1]) for part in tag.split("@") if part.startswith("jit_helpers.py:")}


GEMM_CLASSES = ("GEMM-mma", "GEMM-load")


def _source_lines():
    """Line numbers of the kernel's landmarks, read from the sources, so that the regions follow the code."""
    import inspect

    import fne_fast.kernels.jit_helpers as helpers
    import fne_fast.kernels.sample_negatives as kernels
    with open(kernels.__file__) as handle:
        text = handle.read().splitlines()

    def first(pattern, after=0):
        return next(n for n, line in enumerate(text, 1) if n > after and pattern in line)

    def helper_range(function):
        lines, begin = inspect.getsourcelines(function.fn)
        return set(range(begin, begin + len(lines)))

    tile_loop = first("for tile_start in range(col_begin, col_end, BLOCK_N)")
    masks = first("bank_id = tl.load(bank_ids_ptr", tile_loop)
    race = first("survives = non_positive", masks)
    philox = first("words = philox_first_word(", race)
    wide = first("words = philox_first_word(", philox)
    limit_test = first("candidates = survives & (words <= limit", wide)
    logs = first("key = gumbel_from_bits(words)", wide)
    end = first("race_sim, global_base, K, BLOCK_N, False)", logs)
    return dict(gemm=range(tile_loop, masks), epilogue=range(masks, race), gate=range(race, logs),
                philox_call=set(range(philox, wide - 1)), wide_call=set(range(wide, limit_test)),
                race=range(logs, end + 1),
                philox_helper=helper_range(helpers.philox_first_word),
                gumbel_helper=helper_range(helpers.gumbel_from_bits))


def triton_region(op, tag, where):
    """Region of one Triton instruction: GEMM, epilogue (masks, hardest list), Philox, race gate, race branch."""
    line, helpers = _outer_line(tag), _helper_lines(tag)
    if opclass(op) in GEMM_CLASSES or line in where["gemm"]:
        return "GEMM (tile loop, loads, dot)"
    if tag == "line0" or helpers & where["philox_helper"] or line in where["philox_call"] | where["wide_call"]:
        return "Philox (rounds)"
    if line in where["epilogue"]:
        return "epilogue (masks, hardest list)"
    if line in where["gate"]:
        return "race gate (cut, bound, test)"
    if line in where["race"]:
        return "race branch (logs, weight, insert)"
    return "reductions and helpers (nested inline)"


PATHS = ("unconditional", "hardest-list insert", "Philox branch (a pair survives the cut)", "race branch",
         "wide-column Philox (tile straddles 2^32 columns: not counted)")


def triton_paths(rows, labels, dim, block_k, pairs_per_thread):
    """Per-tile instruction counts (per warp) of each path of the tile loop, by region. Forward branches inside
    the tile loop delimit conditional ranges; an instruction belongs to the innermost range that has a role."""
    where = _source_lines()
    _, start, end = segments(rows, labels)
    inner = [(labels[t], i) for i, (_, _, _, t, _) in enumerate(rows)
             if t and start < labels[t] <= i < end]  # K-loop (backward branch inside the tile loop)
    weight = [1.0] * len(rows)
    for a, b in inner:
        for i in range(a, b + 1):
            weight[i] = dim / block_k
    ranges = [(i + 1, labels[rows[i][3]]) for i in range(start, end)
              if rows[i][3] and i + 1 < labels[rows[i][3]] <= end + 1]
    roles = {}
    for a, b in sorted(ranges, key=lambda r: r[0] - r[1]):  # widest first, so inner ranges overwrite
        tags = [rows[i][4] for i in range(a, b)]
        helpers = set().union(*(_helper_lines(t) for t in tags))
        lines = {_outer_line(t) for t in tags}
        if any(a <= i < b for i, _ in inner):
            continue  # the guard of the K-loop (skipped only when dim fits one step)
        # Triton 3.6 tags an inlined helper's instructions with the helper's lines only, 3.9 with the call's.
        if where["philox_call"] & lines or helpers & where["philox_helper"]:
            role = PATHS[2]
        elif helpers & where["gumbel_helper"] or lines & set(where["race"]):
            role = PATHS[3]
        elif where["wide_call"] & lines:
            role = PATHS[4]
        elif a in roles:
            continue  # a branch of a shared helper (the lists' insert) inside a range that has its role
        else:
            role = PATHS[1]
        roles.update({i: role for i in range(a, b)})
    table = collections.defaultdict(collections.Counter)
    for i in range(start, end + 1):
        op, tag = rows[i][1], rows[i][4]
        table[roles.get(i, "unconditional")][triton_region(op, tag, where)] += weight[i]
    print(f"per tile, per warp (pairs per thread: {pairs_per_thread}; K-loop body x {dim / block_k:g}):\n")
    print("| path | region | warp-instructions per tile | per pair (thread-instructions) |\n|---|---|---:|---:|")
    for path in PATHS:
        for region, count in sorted(table[path].items()):
            print(f"| {path} | {region} | {count:.0f} | {count / pairs_per_thread:.1f} |")
        total = sum(table[path].values())
        print(f"| {path} | **total** | **{total:.0f}** | **{total / pairs_per_thread:.1f}** |")
    print()


def triton_cubin(num_rows, dim, k, path, mode="fne"):
    import triton
    from triton.backends.compiler import GPUTarget

    import triton_resources
    case = triton_resources._main_case(num_rows, dim, k, "bf16", mode=mode)
    source, options, described = triton_resources._source(case)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    with open(path, "wb") as handle:
        handle.write(compiled.asm["cubin"])
    block_k = int(described.split()[0].split("x")[2])
    block_m, block_n = (int(v) for v in described.split()[0].split("x")[:2])
    pairs = block_m * block_n // (32 * options["num_warps"])
    return f"Triton {triton.__version__}, main B={num_rows} D={dim} k={k} bf16 {mode}, {described}", block_k, pairs


def variant(name):
    """Patches the launcher's configuration: base (shipped); rows32: ROW_BLOCK_LIMITS without the 64-row classes;
    n32: 64-row tiles with BLOCK_N = 32; s2: 64-row tiles with 2 stages."""
    import dataclasses

    import fne_fast.kernels.configs as configs
    shipped = configs.default_config
    if name == "rows32":
        configs.ROW_BLOCK_LIMITS = {True: ((8, 128), (64, 32)), False: ((64, 32),)}
    elif name in ("n32", "s2"):
        change = dict(block_n=32) if name == "n32" else dict(num_stages=2)

        def patched(*args, **kwargs):
            config = shipped(*args, **kwargs)
            return dataclasses.replace(config, **change) if config.block_m == 64 else config
        configs.default_config = patched
    elif name != "base":
        raise SystemExit(f"unknown variant {name}")


def resources(name):
    import triton

    import triton_resources
    variant(name)
    case = triton_resources._main_case
    todo = [case(128, d, 16, "bf16") for d in (128, 256, 768)] + [case(128, 256, 9, "bf16")]
    todo += [case(128, 128, 1, "fp32"), case(128, 256, 1, "fp32"), case(128, 768, 1, "fp32"),
             case(128, 768, 1, "bf16", anchors="fp32", mode="uniform"), case(128, 768, 1, "bf16", anchors="fp32"),
             case(128, 256, 1, "bf16"), case(1024, 768, 1, "bf16")]
    print(f"Triton {triton.__version__}, variant {name}\n")
    print("| kernel and inputs | tiles | registers | stack (spill) bytes | shared KiB |\n|---|---|---:|---:|---:|")
    for one in todo:
        row = triton_resources.measure(90, one)
        print(f"| {row['case']} | {row['config']} | {row['registers']} | {row['stack_bytes']} | "
              f"{row['shared_bytes'] / 1024:.0f} |")


def main(argv):
    if argv[0] == "resources":
        resources(argv[1])
        return
    if argv[0] == "triton":
        with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
            title, block_k, pairs = triton_cubin(int(argv[1]), int(argv[2]), int(argv[3]), handle.name, *argv[4:5])
            sass = disassemble(handle.name)
        rows, labels = parse(sass, "_sample_negatives_kernel")
        report(rows, labels, title)
        triton_paths(rows, labels, int(argv[2]), block_k, pairs)
        return
    else:
        sass = disassemble(argv[1])
        rows, labels = parse(sass, argv[2])
        title = f"{os.path.basename(argv[1])} {argv[2]}"
    report(rows, labels, title)


if __name__ == "__main__":
    main(sys.argv[1:])
