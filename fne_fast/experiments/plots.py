"""The PNG plot of a comparison: compare.png, the arms' bars with error bars over seeds."""

from __future__ import annotations

from fne_fast.training.plots import pyplot, save_figure

__all__ = ["comparison_bars"]


def comparison_bars(path: str, results: dict) -> None:
    """compare.png: per arm, the test rsum and group rsum of the best-validation epoch and the FN rate of the
    sampler's own draws (last epoch), mean ± standard deviation over seeds, each seed a dot."""
    panels = [("rsum", "rsum (best val epoch)", 1.0), ("group_rsum", "group rsum (best val epoch)", 1.0),
              ("fn_rate_sampled", "FN rate of own draws % (last epoch)", 100.0)]
    arms = results["arms"]
    plt = pyplot()
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2))
    for axis, (key, title, scale) in zip(axes, panels):
        for position, arm in enumerate(arms):
            entry = arm["summary"].get(key)  # mean and std over the seeds, as results.md reports them
            if entry is None:
                continue
            values = [scale * run[key] for run in arm["runs"] if run.get(key) is not None]
            highlight = "C1" if arm["name"] == results["baseline"] else "C0"
            axis.bar(position, scale * entry["mean"], yerr=scale * entry["std"], color=highlight, alpha=0.6,
                     capsize=4)
            axis.plot([position] * len(values), values, "k.", markersize=4)
        axis.set_xticks(range(len(arms)))
        axis.set_xticklabels([arm["name"] for arm in arms], rotation=30, ha="right", fontsize=8)
        axis.set_title(title, fontsize=9)
    figure.suptitle(f"{results['dataset']}: mean ± std over seeds (dots: seeds; orange: the baseline)", fontsize=10)
    figure.tight_layout()
    save_figure(figure, path, dpi=100)
