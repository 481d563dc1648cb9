"""PNG plots of a run: similarity histograms with the fitted Gaussians and P_fn(s), and recall per epoch."""

from __future__ import annotations

import math
import os

import torch

from fne_fast.data import FeatureSplit
from fne_fast.evaluate import embed_split
from fne_fast.fne_math import false_negative_probability
from fne_fast.io import atomic_output

__all__ = ["write_run_plots"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as pyplot

    return pyplot


def _save(figure, path: str) -> None:
    """The figure as a PNG, written atomically like every file of a run."""
    with atomic_output(path, "wb", suffix=".png") as stream:
        figure.savefig(stream, dpi=120, format="png")
    _pyplot().close(figure)


def _gaussian(x: torch.Tensor, mean: float, variance: float) -> torch.Tensor:
    return torch.exp(-(x - mean) ** 2 / (2 * variance)) / math.sqrt(2 * math.pi * variance)


def similarity_histogram(path: str, heads, split: FeatureSplit, stats: dict, prior_k: float, device,
                         max_negatives: int = 200_000, seed: int = 0) -> None:
    """Test-split similarities of true pairs and of other pairs, the training statistics' Gaussians (fitted to
    in-batch right pairs and their hardest in-batch negatives) and the resulting P_fn(s)."""
    image, text = embed_split(heads, split, device)
    caption_image = split.caption_image.to(image.device)
    positive = (image[caption_image] * text).sum(dim=1).cpu()
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(image.shape[0], (max_negatives,), generator=generator).to(image.device)
    columns = torch.randint(text.shape[0], (max_negatives,), generator=generator).to(image.device)
    keep = caption_image[columns] != rows
    negative = (image[rows[keep]] * text[columns[keep]]).sum(dim=1).cpu()

    pyplot = _pyplot()
    figure, axis = pyplot.subplots(figsize=(8, 4.5))
    bins = torch.linspace(-1, 1, 121)
    axis.hist(negative.numpy(), bins=bins.numpy(), density=True, alpha=0.5, label="other pairs (test)")
    axis.hist(positive.numpy(), bins=bins.numpy(), density=True, alpha=0.5, label="true pairs (test)")
    grid = torch.linspace(-1, 1, 401, dtype=torch.float64)
    if stats["var_pos"] > 0 and stats["var_neg"] > 0:
        axis.plot(grid, _gaussian(grid, stats["mu_pos"], stats["var_pos"]), "C1-",
                  label=f"N(μ⁺={stats['mu_pos']:.2f}, σ⁺={math.sqrt(stats['var_pos']):.2f}) (training)")
        axis.plot(grid, _gaussian(grid, stats["mu_neg"], stats["var_neg"]), "C0-",
                  label=f"N(μ⁻={stats['mu_neg']:.2f}, σ⁻={math.sqrt(stats['var_neg']):.2f}) (training)")
        stats_tensor = torch.tensor([stats[key] for key in ("mu_pos", "var_pos", "mu_neg", "var_neg")] + [0.0],
                                    dtype=torch.float64)
        p_fn_axis = axis.twinx()
        p_fn_axis.plot(grid, false_negative_probability(grid, stats_tensor, prior_k), "k--", label="P_fn(s)")
        p_fn_axis.set_ylim(0, 1.05)
        p_fn_axis.set_ylabel("P_fn(s)")
        p_fn_axis.legend(loc="upper center")
    axis.set_xlabel("similarity s")
    axis.set_ylabel("density")
    axis.legend(loc="upper left", fontsize=8)
    axis.set_title("Similarities after training, with the running statistics' Gaussians")
    figure.tight_layout()
    _save(figure, path)


def recall_curves(path: str, history: list[dict]) -> None:
    pyplot = _pyplot()
    figure, axis = pyplot.subplots(figsize=(7, 4.5))
    epochs = [row["epoch"] for row in history]
    for key, style in (("i2t_r1", "C0-"), ("i2t_r10", "C0:"), ("t2i_r1", "C1-"), ("t2i_r10", "C1:"),
                       ("i2t_group_r1", "C2-"), ("t2i_group_r1", "C3-")):
        if all(key in row for row in history):
            axis.plot(epochs, [row[key] for row in history], style, marker="o", label=key)
    from matplotlib.ticker import MaxNLocator

    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_xlabel("epoch")
    axis.set_ylabel("recall (%)")
    axis.set_title("Test recall per epoch")
    axis.legend(fontsize=8)
    figure.tight_layout()
    _save(figure, path)


def write_run_plots(out: str, heads, test_split: FeatureSplit, history: list[dict], prior_k: float,
                    device) -> list[str]:
    """Writes similarity_histogram.png and recall.png into ``out``; returns their paths."""
    histogram_path = os.path.join(out, "similarity_histogram.png")
    recall_path = os.path.join(out, "recall.png")
    similarity_histogram(histogram_path, heads, test_split, history[-1]["stats"], prior_k, device)
    recall_curves(recall_path, history)
    return [histogram_path, recall_path]
