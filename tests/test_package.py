"""The package's structure: its wings in order (no import runs back to a later wing), no import cycles, small
files, the Triton kernels import nothing private, the oracle is not a run-time dependency, ``import fne_fast`` does
not import Triton, and the wheel check catches a missing module."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _module_files() -> dict[str, str]:
    """Module name -> file, for fne_fast/ (the Triton kernels included, as fne_fast.kernels)."""
    modules = {}
    for directory, subdirectories, files in os.walk(os.path.join(ROOT, "fne_fast")):
        subdirectories[:] = [name for name in subdirectories if name != "__pycache__"]
        prefix = os.path.relpath(directory, ROOT).replace(os.sep, ".")
        for name in files:
            if name.endswith(".py"):
                modules[prefix if name == "__init__.py" else f"{prefix}.{name[:-3]}"] = os.path.join(directory, name)
    return modules


def _imports(name: str, path: str, modules: dict) -> list[tuple[str, bool, list[str]]]:
    """(imported module, at module level, imported names) for every fne_fast import in a file."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fne_fast"):
            names = [alias.name for alias in node.names]
            for alias in names:  # `from fne_fast import ops` imports the module fne_fast.ops
                target = f"{node.module}.{alias}"
                found.append((target if target in modules else node.module, id(node) in top_level, [alias]))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("fne_fast"):
                    found.append((alias.name, id(node) in top_level, []))
    return found


def _import_graph() -> dict[str, set[str]]:
    modules = _module_files()
    return {name: {target for target, _, _ in _imports(name, path, modules) if target in modules and target != name}
            for name, path in modules.items()}


# The wings of the package, lowest first (docs/ARCHITECTURE.md): a module imports only from its own wing or an
# earlier one. A wing is named by its modules' prefixes; the package's face is fne_fast/__init__.py and demo.py.
WINGS = (("ground", ("fne_fast.errors", "fne_fast.fields", "fne_fast.io")),
         ("ops", ("fne_fast.ops", "fne_fast.kernels")),
         ("sampling", ("fne_fast.sampling",)),
         ("runs", ("fne_fast.runs",)),
         ("data", ("fne_fast.data",)),
         ("models", ("fne_fast.models",)),
         ("tags", ("fne_fast.tags",)),
         ("training", ("fne_fast.training",)),
         ("experiments", ("fne_fast.experiments",)),
         ("matcher", ("fne_fast.matcher",)),
         ("cli", ("fne_fast.cli",)),
         ("face", ("fne_fast", "fne_fast.demo")))


def _wing(module: str) -> int | None:
    for level, (_, prefixes) in enumerate(WINGS):
        if any(module == prefix or (prefix != "fne_fast" and module.startswith(prefix + ".")) for prefix in prefixes):
            return level
    return None


def _wing_violations(graph: dict[str, set[str]]) -> list[str]:
    """Every module outside the wings, and every import from a module to a later wing."""
    problems = [f"{name} belongs to no wing" for name in sorted(graph) if _wing(name) is None]
    for name in sorted(graph):
        for target in sorted(graph[name]):
            if None not in (_wing(name), _wing(target)) and _wing(target) > _wing(name):
                problems.append(f"{name} ({WINGS[_wing(name)][0]}) imports {target} ({WINGS[_wing(target)][0]})")
    return problems


def test_every_module_imports_only_from_its_own_or_an_earlier_wing():
    graph = _import_graph()
    assert _wing_violations(graph) == []
    # The check sees an import that runs back up, and a module outside the picture.
    wrong = {**graph, "fne_fast.ops.options": graph["fne_fast.ops.options"] | {"fne_fast.training.config"},
             "fne_fast.stray": set()}
    assert _wing_violations(wrong) == ["fne_fast.stray belongs to no wing",
                                       "fne_fast.ops.options (ops) imports fne_fast.training.config (training)"]


def test_the_package_stays_small_in_its_parts():
    top = [name for name in os.listdir(os.path.join(ROOT, "fne_fast")) if name.endswith(".py")]
    assert len(top) <= 12, sorted(top)
    long_files = {name: lines for name, path in _module_files().items() if name.startswith("fne_fast.")
                  and not name.startswith("fne_fast.kernels")
                  and (lines := len(open(path, encoding="utf-8").read().splitlines())) > 400}
    assert long_files == {}


def test_no_import_cycles():
    graph = _import_graph()
    # A submodule importing its own package's __init__ (`import fne_fast`) is how packages work, not a cycle
    # through the code, unless __init__ imports it back: keep those edges.
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(target):] + [target]))
            if target not in state:
                visit(target, trail + [target])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_kernels_import_nothing_private_and_not_the_wrapper():
    modules = _module_files()
    for name, path in modules.items():
        if not name.startswith("fne_fast.kernels"):
            continue
        for target, _, names in _imports(name, path, modules):
            assert not any(part.startswith("_") for part in target.split(".")), f"{name} imports {target}"
            assert not any(alias.startswith("_") for alias in names), f"{name} imports {names} from {target}"
            assert target not in ("fne_fast", "fne_fast.ops", "fne_fast.ops.dispatch"), \
                f"{name} imports {target}: a cycle through the wrapper"


def test_the_oracle_is_not_a_run_time_dependency():
    modules = _module_files()
    for name, path in modules.items():
        for target, top_level, _ in _imports(name, path, modules):
            if target == "fne_fast.ops.reference" and name != "fne_fast.ops.reference":
                # Only the wrapper's backend="reference" branch may load it, inside the function.
                assert name == "fne_fast.ops.dispatch" and not top_level, f"{name} imports the oracle"


def test_import_loads_neither_triton_nor_the_oracle():
    script = ("import sys, time; start = time.perf_counter(); import torch; after_torch = time.perf_counter(); "
              "import fne_fast, fne_fast.training, fne_fast.cli, fne_fast.experiments.compare, fne_fast.demo; "
              "print(time.perf_counter() - after_torch); "
              "assert 'triton' not in sys.modules, 'triton imported'; "
              "assert 'fne_fast.ops.reference' not in sys.modules, 'the oracle imported'")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_wheel_check_reports_a_missing_module(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        import wheel_modules
    finally:
        sys.path.pop(0)
    complete = sorted(wheel_modules.source_modules())
    for name, listed in (("complete.whl", complete), ("partial.whl", [n for n in complete if "/data/" not in n])):
        with zipfile.ZipFile(tmp_path / name, "w") as wheel:
            for module in listed:
                wheel.writestr(module, "")
    check = [sys.executable, os.path.join(ROOT, "scripts", "wheel_modules.py")]
    assert subprocess.run(check + [str(tmp_path / "complete.whl")], capture_output=True).returncode == 0
    missing = subprocess.run(check + [str(tmp_path / "partial.whl")], capture_output=True, text=True)
    assert missing.returncode == 1 and "missing from the wheel: fne_fast/data/__init__.py" in missing.stdout


def test_the_checkout_root_holds_no_package_but_fne_fast():
    # Python run from the checkout's root (`python -m pytest`, `python -m fne_fast.cli`) finds the root's packages
    # before the installed ones: a top-level kernels/ once hid Hugging Face's `kernels`, which transformers 5
    # imports, and every backbone failed to load.
    packages = sorted(name for name in os.listdir(ROOT) if os.path.isfile(os.path.join(ROOT, name, "__init__.py")))
    assert packages == ["fne_fast"]


def test_transformers_imports_from_the_checkout_root():
    pytest.importorskip("transformers")
    script = "import transformers.modeling_utils"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
