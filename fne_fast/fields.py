"""Validated settings records: a dataclass field carries its default, its check and its help text, so the record,
its command-line flag and its documentation are written once.

    @dataclass(frozen=True)
    class Options:
        k: int = option(1, check_count(1), "negatives sampled per anchor")

        def __post_init__(self):
            validate_fields(self)

``SamplerOptions`` (the op), ``TagsOptions`` (TAGS-DC) and ``TrainConfig`` (a training run) are such records; the
command line builds one flag per field (``flag_name``) and parses its text with ``parse_option_text``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import MISSING, field

__all__ = ["option", "flag_fields", "field_problems", "validate_fields", "store_floats", "parse_option_text",
           "flag_name", "base_type", "is_number", "is_integer", "check_bool", "check_count", "check_choice",
           "check_text"]


def option(default=MISSING, check=None, help_text: str = "", *, default_factory=MISSING, choices: tuple = ()):
    """A field of a validated record: its default (or ``default_factory``), its check (value -> problem text or
    None), its help text, and for a field with a fixed set of values the ``choices`` its flag offers."""
    return field(default=default, default_factory=default_factory,
                 metadata={"check": check, "help": help_text, "choices": tuple(choices)})


def flag_fields(record_type) -> tuple[dataclasses.Field, ...]:
    """The fields of a record (class or instance) that are settings with a flag: those made by ``option``."""
    return tuple(item for item in dataclasses.fields(record_type) if "help" in item.metadata)


def field_problems(record):
    """(field, value, problem) for each field of ``record`` whose check fails."""
    for item in flag_fields(record):
        value = getattr(record, item.name)
        problem = item.metadata["check"](value)
        if problem is not None:
            yield item, value, problem


def validate_fields(record, label: str = "") -> None:
    """Applies each field's check to an options record (ValueError naming ``label`` + the field) and stores float
    fields as floats."""
    for item, value, problem in field_problems(record):
        raise ValueError(f"{label}{item.name} {problem}, got {value!r}")
    store_floats(record)


def store_floats(record) -> None:
    """Stores the float fields of a checked record as floats (ints are welcome), frozen records included."""
    for item in flag_fields(record):
        value = getattr(record, item.name)
        if base_type(item) == "float" and value is not None:
            object.__setattr__(record, item.name, float(value))


def base_type(item) -> str:
    """A field's type without its ``| None`` ("int", "float", "bool", "str"); the annotations are strings."""
    return str(item.type).replace(" | None", "")


def parse_option_text(item, text: str, *, check: bool = True):
    """The value of a record's field written as text (a flag's argument, a compare arm's ``field=value``), checked
    by the field's own check unless ``check`` is False; raises ValueError ("expects float, got 'x'" or
    "<problem>, got <text>") for the caller to prefix with the flag."""
    kind = base_type(item)
    try:
        if kind == "bool":
            value = {"true": True, "false": False}[text.lower()]
        elif kind == "str":
            value = text
        else:
            value = (int if kind == "int" else float)(text)  # float("inf") reads "inf"
    except (KeyError, ValueError):
        raise ValueError(f"expects {kind}, got {text!r}") from None
    problem = item.metadata["check"](value) if check else None
    if problem is not None:
        raise ValueError(f"{problem}, got {text}")
    return value


def flag_name(name: str, prefix: str = "") -> str:
    """The command-line flag of a field: ``--`` and the name with dashes for underscores."""
    return "--" + (prefix + name).replace("_", "-")


# --- checks shared by the records --------------------------------------------------------------------------------

def is_number(value) -> bool:
    """An int or float, not a bool (which Python counts as an int)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_bool(value) -> str | None:
    return None if isinstance(value, bool) else "must be True or False"


def check_count(minimum: int, *, optional: bool = False):
    """An integer >= ``minimum`` (or None, when ``optional``)."""

    def check(value) -> str | None:
        if optional and value is None:
            return None
        if not is_integer(value):
            return f"must be an integer >= {minimum}"
        return None if value >= minimum else f"must be >= {minimum}"

    return check


def check_choice(choices: tuple):
    def check(value) -> str | None:
        return None if value in choices else f"must be one of {tuple(choices)}"

    return check


def check_text(*, optional: bool = False):
    def check(value) -> str | None:
        if optional and value is None:
            return None
        return None if isinstance(value, str) and value else "must be a non-empty string"

    return check
