"""Checks of a run's settings made before any work: before data is read, encoders are loaded or files written.

A user's mistake raises ``fne_fast.errors.UsageError`` (a ValueError) whose message names the command-line flag;
the command line prints it as one line, ``fne-fast: error: …``, and exits with code 2. Tracebacks are left for
bugs. The settings' own values are checked when the ``TrainConfig`` is built; these checks need the machine.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from fne_fast.data import DATA_OPTIONS, data_option_flag
from fne_fast.data.features import default_cache_dir
from fne_fast.errors import UsageError
from fne_fast.ops import check_backend

__all__ = ["check_device", "check_run_settings", "check_splits"]


def check_device(name: str) -> torch.device:
    """The device ``name`` names, if this machine has it."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device: {name!r} is not a device (cpu, cuda or cuda:N)") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise UsageError(f"--device: {name!r}: training runs on cpu or cuda")
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        raise UsageError(f"--device: {name!r}, but this torch ({torch.__version__}) is a CPU-only build; use --device "
                         "cpu, or install a CUDA build of torch")
    if not torch.cuda.is_available():
        raise UsageError(f"--device: {name!r}, but no CUDA GPU is visible to this process")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device: {name!r}, but only {torch.cuda.device_count()} GPU(s) are visible")
    return device


def _check_backend(backend: str, device: torch.device) -> None:
    try:
        check_backend(backend, device)  # the op's own rule, so the two cannot disagree
    except ValueError as error:
        raise UsageError(f"--backend: {error}") from None
    if backend == "triton" and importlib.util.find_spec("triton") is None:
        raise UsageError("--backend: 'triton' needs the triton package, which is not installed")


def _check_writable_folder(option: str, path: str) -> None:
    """``path`` is a folder or can be made one, and can be written: checked without creating anything."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{option}: {path} is a file, not a folder")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f"{option}: {path} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{option}: {path} is not writable (no write permission on {existing})")


def _check_data_options(dataset: str, options: dict) -> None:
    allowed = DATA_OPTIONS[dataset]
    for name in options:
        if name not in allowed:
            raise UsageError(f"{data_option_flag(name)}: not used by --dataset {dataset}")
    required = {"albef-json": allowed, "features": allowed}.get(dataset, ())
    for name in required:
        if not options.get(name):
            raise UsageError(f"{data_option_flag(name)}: --dataset {dataset} needs it")
    for name, value in options.items():
        is_file = name.endswith("_json") or name == "font_path"
        if is_file and not os.path.isfile(value):
            raise UsageError(f"{data_option_flag(name)}: {value} is not a file")
        if not is_file and not os.path.isdir(value):
            raise UsageError(f"{data_option_flag(name)}: {value} is not a folder")


def check_run_settings(config, *, reads_data: bool = True) -> None:
    """Everything about a ``TrainConfig`` that can be known before the run starts: device, backend, output
    folder and, when the run reads its data (not given splits in memory), the cache folder and data options."""
    device = check_device(config.device)
    _check_backend(config.backend, device)
    _check_writable_folder("--out", config.out)
    if config.tags_export:
        if os.path.isdir(config.tags_export):
            raise UsageError(f"--tags-export: {config.tags_export} is a folder; name the JSONL file to write")
        _check_writable_folder("--tags-export", os.path.dirname(os.path.abspath(config.tags_export)))
    if not reads_data:
        return
    if config.dataset != "features" or config.cache_dir:
        _check_writable_folder("--cache-dir", config.cache_dir or default_cache_dir())
    _check_data_options(config.dataset, config.data_options)


def check_splits(splits: dict) -> None:
    """Every split holds images and captions (an empty one would train nothing or divide by zero)."""
    for name, split in splits.items():
        images, captions = split.image_features.shape[0], split.text_features.shape[0]
        if not images or not captions:
            raise UsageError(f"--dataset: the {name} split is empty ({images} images, {captions} captions)")
