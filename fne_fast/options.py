"""The sampler's options: one frozen, self-validating object and the single home of their defaults.

``fne_fast.sample_negatives`` takes these fields as keyword arguments (its defaults are read from here),
``FNELoss`` and ``TrainConfig`` hold a ``SamplerOptions``, and the command line builds one flag per field from the
metadata below (help text included). A bad value raises a ``ValueError`` naming the field as soon as the object
is built, so a bad ``--fn-margin`` stops a run before any data is read.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

__all__ = ["SamplerOptions", "MODES", "option_fields", "sampler_flag_fields", "option", "check_bool", "validate_fields",
           "parse_option_text"]

MODES = ("fne", "hardest", "uniform")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_mode(value) -> str | None:
    return None if value in MODES else f"must be one of {MODES}"


def _check_k(value) -> str | None:
    return None if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else "must be an integer >= 1"


def _check_margin(value) -> str | None:
    return None if _is_number(value) and math.isfinite(value) else "must be a finite number"


def _check_tau(value) -> str | None:
    return None if _is_number(value) and math.isfinite(value) and value >= 0 else "must be finite and >= 0"


def _check_fn_tau(value) -> str | None:
    ok = value is None or (_is_number(value) and value >= 0)  # NaN fails >= 0; inf is allowed
    return None if ok else "must be None (= tau), a number >= 0, or inf"


def _check_prior_k(value) -> str | None:
    return None if _is_number(value) and math.isfinite(value) and value > 1 else "must be finite and > 1"


def _check_fn_margin(value) -> str | None:
    return None if _is_number(value) and 0 <= value <= 1 else "must be in [0, 1]"


def _check_min_count(value) -> str | None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    return None if ok else "must be an integer >= 0"


def check_bool(value) -> str | None:
    return None if isinstance(value, bool) else "must be True or False"


def option(default, check, help_text: str):
    """A field of a validated options record: its default, its check (value -> problem or None) and its help text,
    from which the command line builds its flag."""
    return field(default=default, metadata={"check": check, "help": help_text})


def validate_fields(record, label: str = "") -> None:
    """Applies each field's check to a frozen options record (ValueError naming ``label`` + the field) and stores
    float fields as floats (ints are welcome)."""
    for item in dataclasses.fields(record):
        value = getattr(record, item.name)
        problem = item.metadata["check"](value)
        if problem is not None:
            raise ValueError(f"{label}{item.name} {problem}, got {value!r}")
        if item.type.startswith("float") and value is not None:
            object.__setattr__(record, item.name, float(value))


@dataclass(frozen=True)
class SamplerOptions:
    """How ``sample_negatives`` weights and draws negatives (DESIGN.md §1-2); defaults are the authors'."""

    mode: str = option("fne", _check_mode, "fne: the paper's weighted sampler; hardest: VSE++ max violation over "
                                            "the bank; uniform: a random non-positive, non-cut-down negative")
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
    cutdown: bool = option(True, check_bool, "cut down easy negatives (s <= mu+ - margin)")

    def __post_init__(self):
        validate_fields(self)

    @property
    def effective_fn_tau(self) -> float:
        """fn_tau, with None resolved to tau."""
        return self.tau if self.fn_tau is None else self.fn_tau

    def replace(self, **changes) -> "SamplerOptions":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def as_kwargs(self) -> dict:
        """The fields as keyword arguments of ``sample_negatives``."""
        return dataclasses.asdict(self)


def option_fields():
    """The fields with their default, validator and help text (for building command-line flags)."""
    return dataclasses.fields(SamplerOptions)


def sampler_flag_fields():
    """The fields a user sets by flag or in a compare arm: all but ``mode``, which follows the sampler."""
    return tuple(item for item in option_fields() if item.name != "mode")


def parse_option_text(item, text: str):
    """The value of an options field (SamplerOptions, TagsOptions) written as text, checked by the field's own
    check; raises ValueError ("expects float, got 'x'" or "<problem>, got <text>") for the caller to prefix."""
    try:
        if item.type == "bool":
            value = {"true": True, "false": False}[text.lower()]
        else:
            value = (int if item.type == "int" else float)(text)  # float("inf") reads "inf"
    except (KeyError, ValueError):
        raise ValueError(f"expects {item.type}, got {text!r}") from None
    problem = item.metadata["check"](value)
    if problem is not None:
        raise ValueError(f"{problem}, got {text}")
    return value
