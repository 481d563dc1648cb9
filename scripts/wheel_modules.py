"""Compares the Python modules of a built wheel with those of the source tree (fne_fast/, the Triton
kernels in fne_fast/kernels/ included); exits 1, listing the differences, when they disagree."""

import os
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def source_modules() -> set[str]:
    found = set()
    for directory, subdirectories, files in os.walk(os.path.join(ROOT, "fne_fast")):
        subdirectories[:] = [name for name in subdirectories if name != "__pycache__"]
        relative = os.path.relpath(directory, ROOT)
        for name in files:
            if name.endswith(".py"):
                found.add(os.path.normpath(os.path.join(relative, name)).replace(os.sep, "/"))
    return found


def wheel_modules(path: str) -> set[str]:
    return {name for name in zipfile.ZipFile(path).namelist() if name.endswith(".py")}


def main() -> int:
    source, wheel = source_modules(), wheel_modules(sys.argv[1])
    missing, extra = sorted(source - wheel), sorted(wheel - source)
    for name in missing:
        print(f"missing from the wheel: {name}")
    for name in extra:
        print(f"in the wheel but not in the source tree: {name}")
    print(f"wheel modules: {len(wheel)}, source modules: {len(source)}")
    return 1 if missing or extra else 0


if __name__ == "__main__":
    sys.exit(main())
