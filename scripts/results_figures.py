"""Draws the figures of docs/RESULTS.md from finished `fne-fast compare` folders.

    python scripts/results_figures.py --runs RUNS_DIR [--out docs/figures]

RUNS_DIR holds one compare folder per data set (emoji/, tuxpaint/, wordnet/, each with results.json). Writes:

* ``prior-sweep-<data>.png``: the arms ``fne:fn_tau=inf[,prior_k=K]`` against the prior K — the FN rate of the
  sampler's own draws and of all chosen negatives, the fallback share (last epoch, mean ± std over seeds) — beside
  hardest's and uniform's rates and the 25 % reduction the issue asks for;
* ``separability-<data>.png``: for the ``fne:fn_tau=inf`` arm at K = 10000, from each seed's last checkpoint: the
  FN rate of FNE's own draws and the fallback share if every race candidate above a similarity threshold were
  removed, against the threshold (removal by P_fn at any prior is such a threshold, as P_fn rises with s over the
  race), and the last epoch's P_fn distributions of same-group and other candidates over the whole bank;
* a copy of each ``compare.png`` as ``compare-<data>.png`` and, for emoji, the ``p_fn_by_epoch.png`` of the
  ``fne:fn_tau=inf`` arm (seed 0).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil

import torch

from fne_fast.io import read_jsonl
from fne_fast.matcher import heads_from_state
from fne_fast.ops import SamplerOptions
from fne_fast.ops.fne_math import log_weights
from fne_fast.runs.artifacts import METRICS_NAME
from fne_fast.runs.checkpoint import load_checkpoint
from fne_fast.training import TrainConfig
from fne_fast.training.data import load_splits
from fne_fast.training.diagnostics import LOG10_P_FN_EDGES, SIM_EDGES

THRESHOLDS = torch.linspace(0.3, 1.0, 71, dtype=torch.float64)
CURVE_ANCHORS = 1024  # training pairs per direction

REMOVING = "fne:fn_tau=inf"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def _prior_of(arm: dict) -> float | None:
    """K of an arm that removes likely false negatives and changes nothing but the prior, else None."""
    name = arm["name"]
    if name == REMOVING or (name.startswith(REMOVING + ",prior_k=") and name.count(",") == 1):
        return arm["options"]["prior_k"]
    return None


def prior_sweep(results: dict, path: str) -> bool:
    arms = {arm["name"]: arm for arm in results["arms"]}
    sweep = sorted(((_prior_of(arm), arm) for arm in results["arms"] if _prior_of(arm) is not None),
                   key=lambda pair: pair[0])
    if len(sweep) < 2:
        return False
    pyplot = _pyplot()
    figure, axis = pyplot.subplots(figsize=(7, 4.5))
    priors = [prior for prior, _ in sweep]
    for key, style, label in (("fn_rate_sampled", "o-", "FN rate of its own draws"),
                              ("fn_rate", "s--", "FN rate of all chosen (with fallbacks)"),
                              ("fallback_rate", "^:", "fallback share")):
        means = [100 * arm["summary"][key]["mean"] for _, arm in sweep]
        stds = [100 * arm["summary"][key]["std"] for _, arm in sweep]
        axis.errorbar(priors, means, yerr=stds, fmt=style, capsize=3, label=f"fne, fn_tau = inf: {label}")
    for name, colour in (("hardest", "C3"), ("uniform", "C4")):
        if name in arms:
            rate = 100 * arms[name]["summary"]["fn_rate_sampled"]["mean"]
            axis.axhline(rate, color=colour, linewidth=1, label=f"{name}: FN rate {rate:.1f} %")
    targets = [100 * arms[name]["summary"]["fn_rate_sampled"]["mean"] for name in ("hardest", "uniform")
               if name in arms]
    if targets:
        axis.axhline(0.75 * min(targets), color="k", linestyle=":", linewidth=1,
                     label="25 % below the lower of the two")
    axis.set_xscale("log")
    axis.set_xlabel("prior K (--prior-k)")
    axis.set_ylabel("% (last epoch)")
    axis.set_title(f"{results['dataset']}: removing likely false negatives (fn_tau = inf) at each prior", fontsize=10)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)
    return True


def _last_metrics(folder: str) -> dict:
    return read_jsonl(os.path.join(folder, METRICS_NAME))[-1]


@torch.no_grad()
def threshold_curve(folder: str, splits=None) -> tuple[torch.Tensor, torch.Tensor, float, object]:
    """(FN rate of FNE's own draws, fallback share) per threshold of THRESHOLDS, for a run's last checkpoint, its
    training anchors against its banks and the authors' weights, when every race candidate with s above the
    threshold is removed; and the cut-down μ⁺ - margin."""
    state, _ = load_checkpoint(folder)
    config = TrainConfig(**state["config"])
    splits = splits or load_splits(config)
    split = splits["train"]
    heads = heads_from_state(state)
    last = state["history"][-1]["stats"]
    stats = torch.tensor([last[key] for key in ("mu_pos", "var_pos", "mu_neg", "var_neg", "n_pos")])
    options = SamplerOptions(margin=config.options.margin, tau=config.options.tau)  # the weights without removal
    captions = torch.randperm(split.text_features.shape[0], generator=torch.Generator().manual_seed(7))[:CURVE_ANCHORS]
    ids = split.caption_image[captions]
    image, text, image_key, text_key = heads(split.image_features[ids], split.text_features[captions])
    same_fn = torch.zeros(len(THRESHOLDS), dtype=torch.float64)
    drawing = torch.zeros(len(THRESHOLDS), dtype=torch.float64)
    for anchors, keys, bank in ((image, text_key, state["text_bank"]), (text, image_key, state["image_bank"])):
        sim = (anchors @ bank["features"].float().T).double()
        weights = log_weights(sim, (anchors * keys).sum(dim=1).double(), stats.double(), options)
        race = ((bank["ids"][None, :] != ids[:, None]) & (torch.arange(sim.shape[1]) < bank["filled"])[None, :]
                & (sim > stats[0].item() - options.margin))
        same = split.image_group[bank["ids"].clamp(min=0)][None, :] == split.image_group[ids][:, None]
        for index, threshold in enumerate(THRESHOLDS):
            kept = race & (sim <= threshold)
            rows = kept.any(dim=1)
            probability = torch.softmax(weights.masked_fill(~kept, -math.inf)[rows], dim=1)
            same_fn[index] += (probability * same[rows]).sum()
            drawing[index] += rows.sum()
    anchors_total = 2 * len(captions)
    return same_fn / drawing.clamp(min=1), 1 - drawing / anchors_total, stats[0].item() - options.margin, splits


def _binned_auc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """P(a positive's bin > a negative's bin) + ½ P(same bin), from two histograms over the same bins."""
    below = torch.cumsum(negative, 0) - negative
    return ((positive * (below + 0.5 * negative)).sum() / (positive.sum() * negative.sum())).item()


def separability(results: dict, runs: str, path: str) -> bool:
    arms = {arm["name"]: arm for arm in results["arms"]}
    arm = arms.get(REMOVING)
    if arm is None or results["dataset"] not in ("emoji", "tuxpaint", "wordnet"):
        return False
    pyplot = _pyplot()
    figure, (left, right) = pyplot.subplots(1, 2, figsize=(11, 4.2))
    splits, cuts = None, []
    for seed_index, run in enumerate(arm["runs"]):
        rates, fallback, cut, splits = threshold_curve(os.path.join(runs, run["folder"]), splits)
        cuts.append(cut)
        left.plot(THRESHOLDS, 100 * rates, "k-", linewidth=1, label="FN rate of own draws" if not seed_index else None)
        left.plot(THRESHOLDS, 100 * fallback, "C2--", linewidth=1, label="fallback share" if not seed_index else None)
    rates = {}
    for name, colour in (("hardest", "C3"), ("uniform", "C4")):
        if name in arms:
            rates[name] = 100 * arms[name]["summary"]["fn_rate_sampled"]["mean"]
            left.axhline(rates[name], color=colour, linewidth=1, label=f"{name} (trained): {rates[name]:.1f} %")
    if rates:
        left.axhline(0.75 * min(rates.values()), color="k", linestyle=":", linewidth=1,
                     label="25 % below the lower of the two")
    left.set_xlim(min(cuts) - 0.02, 1.0)
    left.set_ylim(0, 100)
    left.set_xlabel("removal threshold: race candidates with s above it removed")
    left.set_ylabel("% (one line per seed)")
    left.set_title(f"{REMOVING}, K = {arm['options']['prior_k']:g}, last checkpoint: any removal threshold",
                   fontsize=9)
    left.legend(fontsize=7)
    rows = [_last_metrics(os.path.join(runs, run["folder"]))["diagnostics"] for run in arm["runs"]]
    same = sum(torch.tensor(row["sim_hist_same_group"], dtype=torch.float64) for row in rows)
    other = sum(torch.tensor(row["sim_hist_other"], dtype=torch.float64) for row in rows)
    race = torch.tensor(SIM_EDGES[:-1], dtype=torch.float64) >= sum(cuts) / len(cuts)
    bank_share, race_share = same.sum() / (same + other).sum(), (same * race).sum() / ((same + other) * race).sum()
    print(f"{results['dataset']}: AUC of s, same group against other candidates: whole bank "
          f"{_binned_auc(same, other):.3f}, race {_binned_auc(same * race, other * race):.3f}; same-group share of "
          f"the bank {bank_share:.4f}, of the race {race_share:.3f}")
    p_edges = torch.tensor(LOG10_P_FN_EDGES, dtype=torch.float64)
    for key, colour, label in (("p_fn_hist_same_group", "C3", "same group"), ("p_fn_hist_other", "C0", "other")):
        counts = sum(torch.tensor(row[key], dtype=torch.float64) for row in rows)
        right.stairs(counts / counts.sum(), p_edges, color=colour, label=label)
    right.axvline(math.log10(1 - arm["options"]["fn_margin"]), color="k", linestyle=":",
                  label="removal threshold 1 − fn_margin")
    right.set_yscale("log")
    right.set_xlabel(f"log10 P_fn at K = {arm['options']['prior_k']:g} (first bin: ≤ −12)")
    right.set_ylabel("share of all non-positive candidates")
    right.set_title(f"P_fn over the whole bank, last epoch, {len(rows)} seeds pooled", fontsize=9)
    right.legend(fontsize=7)
    figure.suptitle(f"{results['dataset']}: can the similarity statistics tell the false negatives apart?",
                    fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", required=True, help="folder of compare folders, one per data set")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "docs", "figures"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for data in sorted(os.listdir(args.runs)):
        folder = os.path.join(args.runs, data)
        results_path = os.path.join(folder, "results.json")
        if not os.path.isfile(results_path):
            continue
        with open(results_path, encoding="utf-8") as stream:
            results = json.load(stream)
        shutil.copyfile(os.path.join(folder, "compare.png"), os.path.join(args.out, f"compare-{data}.png"))
        written = [f"compare-{data}.png"]
        if prior_sweep(results, os.path.join(args.out, f"prior-sweep-{data}.png")):
            written.append(f"prior-sweep-{data}.png")
        if separability(results, folder, os.path.join(args.out, f"separability-{data}.png")):
            written.append(f"separability-{data}.png")
        if data == "emoji":
            arm = next(arm for arm in results["arms"] if arm["name"] == REMOVING)
            shutil.copyfile(os.path.join(folder, arm["runs"][0]["folder"], "p_fn_by_epoch.png"),
                            os.path.join(args.out, "p_fn_by_epoch-emoji.png"))
            written.append("p_fn_by_epoch-emoji.png")
        print(data, ":", ", ".join(written))


if __name__ == "__main__":
    main()
