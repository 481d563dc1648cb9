"""The PNG plots of a run: similarity histograms with the fitted Gaussians and P_fn(s), recall per epoch, and P_fn
over the bank per epoch; and the two helpers every plot of the package uses (matplotlib without a display, atomic
PNG files)."""

from __future__ import annotations

import math
import os

import torch

from fne_fast.data import FeatureSplit
from fne_fast.training.diagnostics import LOG10_P_FN_EDGES, SIM_EDGES
from fne_fast.training.evaluate import embed_split
from fne_fast.ops.fne_math import false_negative_probability
from fne_fast.io import atomic_output
from fne_fast.ops.options import SamplerOptions

__all__ = ["write_run_plots", "p_fn_by_epoch", "bank_staleness_plot", "pyplot", "save_figure", "RUN_PLOTS",
           "STALENESS_PLOT"]

RUN_PLOTS = ("similarity_histogram.png", "recall.png", "p_fn_by_epoch.png")
STALENESS_PLOT = "bank_staleness.png"  # runs whose backbone tops train
_STATS_KEYS = ("mu_pos", "var_pos", "mu_neg", "var_neg")


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only: no display on a server), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot

    return matplotlib.pyplot


def save_figure(figure, path: str, dpi: int = 120) -> None:
    """The figure as a PNG, written atomically like every file of a run."""
    with atomic_output(path, "wb", suffix=".png") as stream:
        figure.savefig(stream, dpi=dpi, format="png")
    pyplot().close(figure)


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

    plt = pyplot()
    figure, axis = plt.subplots(figsize=(8, 4.5))
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
    save_figure(figure, path)


def recall_curves(path: str, history: list[dict]) -> None:
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(7, 4.5))
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
    save_figure(figure, path)


def _spread(items: list, count: int) -> list:
    """At most ``count`` items, evenly spread, always with the last."""
    if len(items) <= count:
        return items
    step = (len(items) - 1) / (count - 1)
    return [items[round(i * step)] for i in range(count)]


def p_fn_by_epoch(path: str, history: list[dict], options: SamplerOptions, max_panels: int = 5) -> bool:
    """Per epoch (up to ``max_panels``, spread over the run): top, the similarities of the diagnostic anchors to
    every bank candidate, in their semantic group or not, with the running statistics' two Gaussians, the cut-down
    and P_fn(s) at the run's prior (log scale, with the threshold above which the Bayesian weight applies);
    bottom, the distribution of log10 P_fn for the two kinds of candidates. Returns False (and writes nothing)
    when no epoch has diagnostics."""
    rows = [row for row in history if row.get("diagnostics") and row.get("stats")]
    if not rows:
        return False
    rows = _spread(rows, max_panels)
    extra_handles, extra_labels = [], []
    plt = pyplot()
    figure, axes = plt.subplots(2, len(rows), figsize=(3.6 * len(rows), 6.4), squeeze=False)
    sim_edges = torch.tensor(SIM_EDGES, dtype=torch.float64)
    sim_centres, sim_width = (sim_edges[1:] + sim_edges[:-1]) / 2, sim_edges[1] - sim_edges[0]
    p_edges = torch.tensor(LOG10_P_FN_EDGES, dtype=torch.float64)
    grid = torch.linspace(-1, 1, 401, dtype=torch.float64)
    for column, row in enumerate(rows):
        diagnostics, stats = row["diagnostics"], row["stats"]
        top, bottom = axes[0][column], axes[1][column]
        for key, colour, label in (("sim_hist_other", "C0", "other candidates"),
                                   ("sim_hist_same_group", "C3", "same group (false negatives)")):
            counts = diagnostics.get(key)
            if counts and sum(counts):
                density = torch.tensor(counts, dtype=torch.float64) / (sum(counts) * sim_width)
                top.step(sim_centres, density, where="mid", color=colour, label=label)
        if stats["var_pos"] > 0 and stats["var_neg"] > 0:
            top.plot(grid, _gaussian(grid, stats["mu_pos"], stats["var_pos"]), "C1--", label="N(μ⁺, σ⁺²)")
            top.plot(grid, _gaussian(grid, stats["mu_neg"], stats["var_neg"]), "C2--", label="N(μ⁻, σ⁻²)")
            stats_tensor = torch.tensor([stats[key] for key in _STATS_KEYS] + [0.0], dtype=torch.float64)
            p_fn_axis = top.twinx()
            p_fn_axis.semilogy(grid, false_negative_probability(grid, stats_tensor, options.prior_k).clamp(min=1e-12),
                               "k-", linewidth=1, label=f"P_fn(s), K = {options.prior_k:g}")
            p_fn_axis.axhline(1 - options.fn_margin, color="k", linestyle=":", linewidth=1,
                              label=f"1 − fn_margin = {1 - options.fn_margin:g}")
            p_fn_axis.set_ylim(1e-12, 2)
            if column == len(rows) - 1:
                p_fn_axis.set_ylabel("P_fn(s)")
            if column == 0:
                extra_handles, extra_labels = p_fn_axis.get_legend_handles_labels()
        if options.cutdown:
            top.axvline(stats["mu_pos"] - options.margin, color="gray", linewidth=1, label="cut-down μ⁺ − margin")
        top.set_title(f"epoch {row['epoch']}{' (warm-up)' if row.get('warmup') else ''}", fontsize=9)
        top.set_xlabel("similarity to the anchor", fontsize=8)
        for key, colour, label in (("p_fn_hist_other", "C0", "other"), ("p_fn_hist_same_group", "C3", "same group")):
            counts = diagnostics.get(key)
            if counts and sum(counts):
                share = torch.tensor(counts, dtype=torch.float64) / sum(counts)
                bottom.stairs(share, p_edges, color=colour, label=label)
        bottom.axvline(math.log10(max(1 - options.fn_margin, 1e-12)), color="k", linestyle=":", linewidth=1)
        bottom.set_yscale("log")
        bottom.set_xlabel("log10 P_fn (first bin: ≤ −12)", fontsize=8)
        if column == 0:
            top.set_ylabel("density")
            bottom.set_ylabel("share of candidates")
            handles, labels = top.get_legend_handles_labels()
    figure.legend(handles + extra_handles, labels + extra_labels, loc="lower center", ncol=4, fontsize=7)
    figure.suptitle("Every bank candidate of the diagnostic anchors: similarity, P_fn, and who is a false negative",
                    fontsize=10)
    figure.tight_layout(rect=(0, 0.08, 1, 1))
    save_figure(figure, path, dpi=100)
    return True


def bank_staleness_plot(path: str, history: list[dict]) -> bool:
    """Per epoch, the mean cosine between the banks' stored keys and the momentum encoder's keys of the same pairs
    now, and the rows' age in steps (``fne_fast.training.staleness``). Returns False (and writes nothing) when no
    epoch measured it (the backbones' tops did not train)."""
    rows = [row for row in history if row.get("staleness")]
    if not rows:
        return False
    plt = pyplot()
    figure, cosine_axis = plt.subplots(figsize=(7, 4.5))
    epochs = [row["epoch"] for row in rows]
    for key, style, label in (("image_cosine", "C0-", "image bank"), ("text_cosine", "C1-", "text bank")):
        cosine_axis.plot(epochs, [row["staleness"][key] for row in rows], style, marker="o", label=label)
    cosine_axis.set_xlabel("epoch")
    cosine_axis.set_ylabel("cosine(stored key, current momentum key)")
    age_axis = cosine_axis.twinx()
    for key, style, label in (("mean_age_steps", "k--", "mean age"), ("max_age_steps", "k:", "max age")):
        age_axis.plot(epochs, [row["staleness"][key] for row in rows], style, label=label)
    age_axis.set_ylabel("age of the rows (steps)")
    handles, labels = cosine_axis.get_legend_handles_labels()
    more_handles, more_labels = age_axis.get_legend_handles_labels()
    cosine_axis.legend(handles + more_handles, labels + more_labels, fontsize=8, loc="lower left")
    cosine_axis.set_title("Bank staleness: stored keys against the momentum encoder's keys now")
    figure.tight_layout()
    save_figure(figure, path)
    return True


def write_run_plots(out: str, heads, test_split: FeatureSplit, history: list[dict], options: SamplerOptions,
                    device) -> list[str]:
    """Writes the run's plots (``RUN_PLOTS``, and ``bank_staleness.png`` when the tops trained) into ``out``;
    returns their paths."""
    histogram_path, recall_path, p_fn_path = (os.path.join(out, name) for name in RUN_PLOTS)
    similarity_histogram(histogram_path, heads, test_split, history[-1]["stats"], options.prior_k, device)
    recall_curves(recall_path, history)
    written = [histogram_path, recall_path]
    if p_fn_by_epoch(p_fn_path, history, options):
        written.append(p_fn_path)
    staleness_path = os.path.join(out, STALENESS_PLOT)
    if bank_staleness_plot(staleness_path, history):
        written.append(staleness_path)
    return written
