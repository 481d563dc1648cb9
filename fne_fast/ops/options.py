"""The sampler's options: one frozen, self-validating object and the single home of their defaults.

``fne_fast.sample_negatives`` takes these fields as keyword arguments (its defaults are read from here),
``FNELoss`` and ``TrainConfig`` hold a ``SamplerOptions``, and the command line builds one flag per field from the
metadata below (help text included). A bad value raises a ``ValueError`` naming the field as soon as the object
is built, so a bad ``--fn-margin`` stops a run before any data is read.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from fne_fast.fields import check_bool, check_choice, flag_fields, is_integer, is_number, option, validate_fields

__all__ = ["SamplerOptions", "MODES", "SCHEMA_FIELDS", "sampler_flag_fields"]

MODES = ("fne", "hardest", "uniform")
# The options in the order of the operator's schema (csrc/fne_fast.cpp), where fn_tau is already resolved.
# The operator has no hinge: its ``margin`` is the cut-down margin (``cut_margin``, resolved like fn_tau).
SCHEMA_FIELDS = ("k", "mode", "margin", "tau", "fn_tau", "prior_k", "fn_margin", "min_count", "cutdown",
                 "center_offset", "relative_cut", "guide_threshold")


def _check_k(value) -> str | None:
    return None if is_integer(value) and value >= 1 else "must be an integer >= 1"


def _check_margin(value) -> str | None:
    return None if is_number(value) and math.isfinite(value) else "must be a finite number"


def _check_tau(value) -> str | None:
    return None if is_number(value) and math.isfinite(value) and value >= 0 else "must be finite and >= 0"


def _check_fn_tau(value) -> str | None:
    ok = value is None or (is_number(value) and value >= 0)  # NaN fails >= 0; inf is allowed
    return None if ok else "must be None (= tau), a number >= 0, or inf"


def _check_prior_k(value) -> str | None:
    return None if is_number(value) and math.isfinite(value) and value > 1 else "must be finite and > 1"


def _check_fn_margin(value) -> str | None:
    return None if is_number(value) and 0 <= value <= 1 else "must be in [0, 1]"


def _check_optional_margin(value) -> str | None:
    return None if value is None or _check_margin(value) is None else "must be None (= margin) or a finite number"


def _check_relative_cut(value) -> str | None:
    ok = value is None or (is_number(value) and math.isfinite(value) and value >= 0)
    return None if ok else "must be None (off) or a finite number >= 0"


def _check_guide_threshold(value) -> str | None:
    return None if value is None or _check_margin(value) is None else "must be None (off) or a finite number"


def _check_min_count(value) -> str | None:
    ok = is_integer(value) and value >= 0
    return None if ok else "must be an integer >= 0"


@dataclass(frozen=True)
class SamplerOptions:
    """How ``sample_negatives`` weights and draws negatives (docs/DESIGN.md §1-2); defaults are the authors'."""

    mode: str = option("fne", check_choice(MODES), "fne: the paper's weighted sampler; hardest: VSE++ max "
                                                   "violation over the bank; uniform: a random non-positive, "
                                                   "non-cut-down negative")
    k: int = option(1, _check_k, "negatives sampled per anchor")
    margin: float = option(0.2, _check_margin, "triplet margin; candidates with s <= mu+ - margin are cut down")
    tau: float = option(0.5, _check_tau, "temperature of the log-weight -tau (s - s+)^2")
    fn_tau: float | None = option(None, _check_fn_tau, "log-weight -fn_tau P_fn of a likely false negative "
                                                        "(default: tau, the authors' rule; inf removes them)")
    prior_k: float = option(10000.0, _check_prior_k, "prior odds negatives:positives = K-1 in P_fn")
    fn_margin: float = option(0.999, _check_fn_margin,
                               "the Bayesian weight applies where P_fn > 1 - fn_margin")
    min_count: int = option(200, _check_min_count, "positives the running statistics need before the Bayesian "
                                                    "branch switches on")
    cutdown: bool = option(True, check_bool, "cut down easy negatives (s <= mu+ - cut_margin)")
    cut_margin: float | None = option(None, _check_optional_margin,
                                      "cut-down margin: candidates with s <= mu+ - cut_margin leave the race "
                                      "(default: margin, the hinge's)")
    center_offset: float = option(0.0, _check_margin, "centre b of the base log-weight -tau (s - s+ - b)^2 "
                                                      "(SimANS; b < 0 favours candidates below the positive)")
    relative_cut: float | None = option(None, _check_relative_cut,
                                        "exclude candidates with s > s+ - (1 - relative_cut) |s+| (relative_cut "
                                        "times s+ when s+ >= 0; NV-Retriever uses 0.95) from the race and the "
                                        "fallback; default: off")
    guide_threshold: float | None = option(None, _check_guide_threshold,
                                           "language guidance: exclude candidates whose guide similarity (the "
                                           "frozen text embeddings of the anchor's caption and the row's) is above "
                                           "this from the race and the fallback; default: off")

    def __post_init__(self):
        validate_fields(self)

    @property
    def effective_fn_tau(self) -> float:
        """fn_tau, with None resolved to tau."""
        return self.tau if self.fn_tau is None else self.fn_tau

    @property
    def effective_cut_margin(self) -> float:
        """cut_margin, with None resolved to margin."""
        return self.margin if self.cut_margin is None else self.cut_margin

    def replace(self, **changes) -> "SamplerOptions":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def as_kwargs(self) -> dict:
        """The fields as keyword arguments of ``sample_negatives``."""
        return dataclasses.asdict(self)

    def schema_values(self) -> tuple:
        """The options as the operator's positional arguments (``SCHEMA_FIELDS``), fn_tau resolved and the
        cut-down margin in ``margin``'s place."""
        values = dataclasses.asdict(self)
        values["fn_tau"] = self.effective_fn_tau
        values["margin"] = self.effective_cut_margin
        return tuple(values[name] for name in SCHEMA_FIELDS)

    @classmethod
    def from_schema(cls, *values) -> "SamplerOptions":
        """The options of the operator's positional arguments (``SCHEMA_FIELDS``), validated."""
        return cls(**dict(zip(SCHEMA_FIELDS, values, strict=True)))


def sampler_flag_fields():
    """The fields a user sets by flag or in a compare arm: all but ``mode``, which follows the sampler."""
    return tuple(item for item in flag_fields(SamplerOptions) if item.name != "mode")
