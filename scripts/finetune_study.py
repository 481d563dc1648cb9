"""The tables of docs/RESULTS.md's "Training the encoders" section, from the folders of one `fne-fast compare` per
data set and --finetune level (each with the same arms and seeds):

    python scripts/finetune_study.py --dataset emoji runs/emoji-ft0 runs/emoji-ft1 runs/emoji-ft2

Per level and arm: the best-validation epoch's strict and group rsum (mean ± std over the seeds, from the
comparison's results.json), the last epoch's FN rate of the sampler's own draws, fallback share and race size,
the bank staleness at the end (the image bank's, from each run's last checkpoint at every level: its stored keys
against the keys its momentum copies give the same images; the text bank's from metrics.jsonl, measured only when
the tops train) and the training time per step (the step's sections in timing.jsonl, epochs after the warm-up,
mean over seeds); then each arm at N > 0 against the same arm at N = 0, paired seed by seed (same initialisation of
the heads and same batches), with the comparison's t-test and bootstrap over test items.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch

from fne_fast.data import load_raw_split
from fne_fast.experiments.paired import paired_comparison
from fne_fast.io import read_jsonl
from fne_fast.matcher import heads_from_state
from fne_fast.runs.artifacts import METRICS_NAME, TIMING_NAME, read_best_test_ranks
from fne_fast.runs.checkpoint import load_checkpoint
from fne_fast.training import TrainConfig
from fne_fast.training.data import load_splits
from fne_fast.training.epoch import TIMING_SECTIONS
from fne_fast.training.staleness import STALENESS_SAMPLE

_splits: dict = {}


def _mean_std(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    values = [scale * value for value in values if value is not None]
    if not values:
        return "n/a"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}"


def _cell(summary: dict, key: str, scale: float = 1.0, digits: int = 1) -> str:
    entry = summary.get(key)
    return "n/a" if entry is None else f"{scale * entry['mean']:.{digits}f} ± {scale * entry['std']:.{digits}f}"


def _ms_per_step(folder: str) -> float:
    rows = [row for row in read_jsonl(os.path.join(folder, TIMING_NAME)) if row["epoch"] >= 1]
    return 1e3 * sum(sum(row[key] for key in TIMING_SECTIONS) for row in rows) / sum(row["steps"] for row in rows)


@torch.no_grad()
def _image_bank_cosine(folder: str) -> float:
    """The mean cosine between the image bank's stored keys (rows spread over the bank) and the keys the run's
    momentum copy gives the same images, at its last checkpoint."""
    state, _ = load_checkpoint(folder)
    config = TrainConfig(**state["config"])
    if config.finetune not in _splits:
        _splits[config.finetune] = load_splits(config)["train"]
    split, bank = _splits[config.finetune], state["image_bank"]
    rows = torch.linspace(0, bank["filled"] - 1, min(STALENESS_SAMPLE, bank["filled"])).long()
    keys = heads_from_state(state).image_head_momentum(split.image_features[bank["ids"][rows]])
    stored = torch.nn.functional.normalize(bank["features"][rows].float(), dim=1)
    return float((stored * torch.nn.functional.normalize(keys, dim=1)).sum(dim=1).mean())


def _level(folder: str) -> tuple[int, dict]:
    with open(os.path.join(folder, "results.json")) as stream:
        results = json.load(stream)
    finetune = int(results["command"].split("--finetune ")[1].split()[0]) if "--finetune " in results["command"] else 0
    return finetune, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("folders", nargs="+", help="one comparison's --out per --finetune level")
    parser.add_argument("--bootstrap", type=int, default=2000)
    args = parser.parse_args()
    levels = {}
    for folder in args.folders:
        finetune, results = _level(folder)
        levels[finetune] = (folder, results)

    lines = ["| --finetune | arm | seeds | rsum | group rsum | FN rate of own draws % | fallback % | "
             "race per anchor | image bank cosine | text bank cosine | ms per step |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for finetune, (folder, results) in sorted(levels.items()):
        for arm in results["arms"]:
            summary, runs = arm["summary"], arm["runs"]
            lasts = [read_jsonl(os.path.join(folder, run["folder"], METRICS_NAME))[-1] for run in runs]
            staleness = [last.get("staleness") for last in lasts]
            image_cosine = _mean_std([_image_bank_cosine(os.path.join(folder, run["folder"])) for run in runs],
                                     digits=3)
            text_cosine = "n/a" if None in staleness else _mean_std([s["text_cosine"] for s in staleness], digits=3)
            step = statistics.mean(_ms_per_step(os.path.join(folder, run["folder"])) for run in runs)
            lines.append(f"| {finetune} | {arm['name']} | {len(runs)} | {_cell(summary, 'rsum')} | "
                         f"{_cell(summary, 'group_rsum')} | {_cell(summary, 'fn_rate_sampled', 100)} | "
                         f"{_cell(summary, 'fallback_rate', 100)} | {_cell(summary, 'race_per_anchor')} | "
                         f"{image_cosine} | {text_cosine} | {step:.0f} |")

    caption_image = torch.tensor(load_raw_split(args.dataset, "test").caption_image)
    lines += ["", "| arm | --finetune N − 0 | metric | per seed (seeds) | mean | t-test p | bootstrap 95 % | "
              "verdict |",
              "|---|---|---|---|---|---|---|---|"]
    frozen_folder, frozen = levels[0]
    for finetune, (folder, results) in sorted(levels.items()):
        if finetune == 0:
            continue
        for arm in results["arms"]:
            # Paired on the seeds this level ran (a level may have run fewer than the frozen one).
            base_runs = {run["seed"]: run for run in next(item for item in frozen["arms"]
                                                          if item["name"] == arm["name"])["runs"]}
            missing = [run["seed"] for run in arm["runs"] if run["seed"] not in base_runs]
            if missing:
                raise SystemExit(f"{frozen_folder}: {arm['name']} has no run of seeds {missing}")
            ranks = [read_best_test_ranks(os.path.join(folder, run["folder"]))[1] for run in arm["runs"]]
            base_ranks = [read_best_test_ranks(os.path.join(frozen_folder, base_runs[run["seed"]]["folder"]))[1]
                          for run in arm["runs"]]
            for metric in ("rsum", "group_rsum"):
                test = paired_comparison(ranks, base_ranks, caption_image, group=metric == "group_rsum",
                                         replicates=args.bootstrap)
                low, high = test["bootstrap_interval"]
                p_value = "n/a" if test["t_test_p"] is None else f"{test['t_test_p']:.3f}"
                seeds = ", ".join(str(run["seed"]) for run in arm["runs"])
                lines.append(f"| {arm['name']} | {finetune} − 0 | {metric.replace('_', ' ')} | "
                             f"{', '.join(f'{value:+.1f}' for value in test['per_seed'])} ({seeds}) | "
                             f"{test['mean']:+.1f} | "
                             f"{p_value} | [{low:+.1f}, {high:+.1f}] | {test['verdict']} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
