"""Named settings of a run: ``fne-fast train --preset NAME`` and the compare arm ``@NAME``.

A preset fixes the sampler, the sampler options it changes and the loss settings of ``TrainConfig`` it changes
(``ARM_SETTINGS``); every other setting keeps its default, and a flag given beside ``--preset`` still wins.

* ``authors``: the paper's FNE with the authors' public settings, which are also ``fne-fast train``'s defaults.
* ``recommended``: what this project's measurements recommend, chosen on validation rsum only (docs/RESULTS.md,
  "False-negative criteria", says which runs chose it and why).
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Preset", "PRESETS", "ARM_SETTINGS", "preset"]

# The TrainConfig fields (besides the sampler and its options) that a preset or a compare arm may set: the loss's.
ARM_SETTINGS = ("inbatch_weight", "oracle", "threshold_share", "threshold_lr", "attract_weight", "attract_k")


@dataclass(frozen=True)
class Preset:
    sampler: str
    options: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)


PRESETS = {
    "authors": Preset("fne"),
    # fne with a cut-down margin of 0.3 (a wider race) and in-batch max violation beside the bank term, weight 1:
    # the higher mean validation rsum over emoji and Tux Paint of the two settings tried on both.
    "recommended": Preset("fne", {"cut_margin": 0.3}, {"inbatch_weight": 1.0}),
}


def preset(name: str) -> Preset:
    """The preset called ``name`` (ValueError naming the choices otherwise)."""
    if name not in PRESETS:
        raise ValueError(f"expected one of {tuple(PRESETS)}, got {name!r}")
    return PRESETS[name]
