"""Draws docs/figures/weights.png: what --prior-k, --fn-margin and --fn-tau do to FNE's sampling weight.

    python scripts/weight_figure.py [--out docs/figures/weights.png]

The weight exp(ℓ(s)) of a bank candidate of similarity s to an anchor whose positive scores s⁺, under running
statistics measured on emoji (the hardest sampler's epoch 4, seed 0: μ⁺ 0.69, σ⁺² 0.0068, μ⁻ 0.47, σ⁻² 0.0148),
with the cut-down region (s ≤ μ⁺ − margin, weight 0) shaded. Computed by fne_fast.ops.fne_math, the functions
the diagnostics use and the kernels mirror.
"""

from __future__ import annotations

import argparse
import math
import os

import torch

from fne_fast.ops.fne_math import false_negative_probability, log_weights
from fne_fast.ops import SamplerOptions

STATS = torch.tensor([0.69, 0.0068, 0.466, 0.0148, 5000.0], dtype=torch.float64)
POSITIVE_SIM = 0.69


def _weights(grid: torch.Tensor, options: SamplerOptions) -> torch.Tensor:
    weight = torch.exp(log_weights(grid.reshape(1, -1), torch.tensor([POSITIVE_SIM], dtype=torch.float64), STATS,
                                   options)).squeeze(0)
    return torch.where(grid > STATS[0] - options.margin, weight, torch.zeros_like(weight))


def draw(path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    grid = torch.linspace(0.2, 1.0, 801, dtype=torch.float64)
    panels = [
        ("--prior-k (fn_tau = tau, the authors' rule)", "prior_k", [10000.0, 1000.0, 100.0, 10.0], {}),
        ("--prior-k with --fn-tau inf (removal)", "prior_k", [10000.0, 1000.0, 100.0, 10.0],
         {"fn_tau": math.inf}),
        ("--fn-margin with --fn-tau inf, K = 10000", "fn_margin", [0.999, 0.99999, 0.9], {"fn_tau": math.inf}),
        ("--fn-tau at K = 100", "fn_tau", [0.5, 2.0, 10.0, math.inf], {"prior_k": 100.0}),
    ]
    figure, grid_of_axes = pyplot.subplots(2, 3, figsize=(13, 7.6))
    p_fn_axis, *axes = grid_of_axes.flatten()[:len(panels) + 1]
    grid_of_axes.flatten()[-1].axis("off")
    for axis, (title, name, values, fixed) in zip(axes, panels):
        for value in values:
            options = SamplerOptions(**{**fixed, name: value})
            axis.plot(grid, _weights(grid, options), label=f"{name} = {value:g}")
        axis.axvspan(grid[0].item(), STATS[0].item() - 0.2, color="0.85", label="cut down (weight 0)")
        axis.axvline(POSITIVE_SIM, color="k", linestyle=":", linewidth=1, label="s⁺")
        axis.set_ylim(-0.03, 1.05)
        axis.set_title(title, fontsize=9)
        axis.set_xlabel("similarity s of the candidate")
        axis.legend(fontsize=7, loc="lower right")
    for axis in axes:
        axis.set_ylabel("sampling weight exp(ℓ)")
    for prior_k in (10000.0, 1000.0, 100.0, 10.0):
        p_fn_axis.semilogy(grid, false_negative_probability(grid, STATS, prior_k), label=f"K = {prior_k:g}")
    for fn_margin, style in ((0.999, "--"), (0.99999, ":")):
        p_fn_axis.axhline(1 - fn_margin, color="k", linestyle=style, linewidth=1,
                          label=f"1 − fn_margin, fn_margin = {fn_margin:g}")
    p_fn_axis.set_ylim(1e-8, 2)
    p_fn_axis.set_title("P_fn(s): the Bayesian weight applies above the line", fontsize=9)
    p_fn_axis.set_xlabel("similarity s of the candidate")
    p_fn_axis.legend(fontsize=7, loc="lower right")
    figure.suptitle("FNE's weight of a candidate (τ = 0.5, margin 0.2; emoji statistics μ⁺ 0.69, σ⁺ 0.082, μ⁻ 0.47,\n"
                    "σ⁻ 0.12; an anchor whose positive scores s⁺ = 0.69)", fontsize=10)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=90)
    pyplot.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "docs", "figures",
                                                      "weights.png"))
    draw(parser.parse_args().out)


if __name__ == "__main__":
    main()
