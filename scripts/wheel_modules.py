"""Compares the Python modules of a built wheel with those of the source tree (fne_fast/ and kernels/, which
installs as fne_fast.kernels); exits 1, listing the differences, when they disagree."""

import os
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def source_modules() -> set[str]:
    found = set()
    for folder, package in (("fne_fast", "fne_fast"), ("kernels", "fne_fast/kernels")):
        for directory, subdirectories, files in os.walk(os.path.join(ROOT, folder)):
            subdirectories[:] = [name for name in subdirectories if name != "__pycache__"]
            relative = os.path.relpath(directory, os.path.join(ROOT, folder))
            for name in files:
                if name.endswith(".py"):
                    found.add(os.path.normpath(os.path.join(package, relative, name)).replace(os.sep, "/"))
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
