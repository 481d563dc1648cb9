"""The flags of ``fne-fast``, built from the fields that hold each setting's default, check and help: ``TrainConfig``
(``--bank-size`` …), ``SamplerOptions`` (``--k``, ``--fn-tau`` …), ``TagsOptions`` (``--tags-…``) and the data
sets' files (``fne_fast.data.DATA_FLAGS``); ``config_from_args`` turns parsed flags back into a ``TrainConfig``.

A training setting's bad value is a one-line usage error naming the flag, raised when the ``TrainConfig`` is built
(before any data is read); a sampler or TAGS-DC option's is argparse's error, from the option's own check.
"""

from __future__ import annotations

import argparse

from fne_fast.data import DATA_FLAGS
from fne_fast.experiments.compare import PER_RUN_FIELDS, parse_arm
from fne_fast.fields import base_type, check_count, flag_fields, flag_name, parse_option_text
from fne_fast.ops.options import sampler_flag_fields
from fne_fast.sampling.loss import SAMPLERS
from fne_fast.tags import TagsOptions
from fne_fast.training.config import TrainConfig
from fne_fast.training.presets import PRESETS, preset

__all__ = ["build_parser", "config_from_args", "preset_named_in"]

_TAGS_PREFIX = "tags_"
_DATA_PREFIX = "data_"


def _value_parser(item, *, check: bool):
    """argparse type of a record's field: the text parsed as the field's type, and with ``check`` checked by the
    field's own check, so that a bad value is a usage error naming the flag."""

    def parse(text: str):
        try:
            return parse_option_text(item, text, check=check)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parse


def _add_field_flags(parser, fields, *, prefix: str = "", check: bool = True) -> None:
    """One flag ``--<prefix><field>`` (dest ``<prefix><field>``) per field of a validated record, with the field's
    default, choices and help text."""
    for item in fields:
        flag, dest, help_text = flag_name(item.name, prefix), prefix + item.name, item.metadata["help"]
        default = item.default_factory() if callable(item.default_factory) else item.default
        if base_type(item) == "bool":
            parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=default,
                                help=help_text)
        elif item.metadata["choices"]:
            parser.add_argument(flag, dest=dest, choices=item.metadata["choices"], default=default,
                                help=f"{help_text} (default {default})")
        else:
            shown = "" if default is None else f" (default {default})"
            parser.add_argument(flag, dest=dest, type=_value_parser(item, check=check), default=default,
                                help=help_text + shown)


def add_training_flags(parser: argparse.ArgumentParser, *, single_run: bool) -> None:
    """The flags of a training run (``single_run``) or of a comparison's runs (without the fields each run of a
    comparison gets from its arm and seed)."""
    skipped = () if single_run else PER_RUN_FIELDS
    # The config checks its own values when it is built (one line naming the flag), so these only parse.
    _add_field_flags(parser, [item for item in flag_fields(TrainConfig) if item.name not in skipped], check=False)
    sampler = parser.add_argument_group("sampler options (fne_fast.SamplerOptions)")
    _add_field_flags(sampler, sampler_flag_fields())
    data = parser.add_argument_group("data files")
    for name, (flag, help_text) in DATA_FLAGS.items():
        data.add_argument(flag, dest=_DATA_PREFIX + name, default=None, help=help_text,
                          metavar=flag[2:].upper().replace("-", "_"))
    tags = parser.add_argument_group("TAGS-DC (synthetic negative sentences, word discrimination and correction)")
    if single_run:
        tags.add_argument("--tags", action="store_true", help="add TAGS-DC to the sampler")
    else:
        tags.add_argument("--tags", choices=("off", "on", "both"), default="off",
                          help="runs without TAGS-DC, with it, or both (one more arm per sampler)")
    _add_field_flags(tags, TagsOptions.fields(), prefix=_TAGS_PREFIX)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    problem = check_count(1)(value)
    if problem is not None:
        raise argparse.ArgumentTypeError(f"{problem}, got {value}")
    return value


def _arm(text: str):
    try:
        return parse_arm(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _add_checkpoint_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="a run folder (its latest verified checkpoint) or a checkpoint file")
    parser.add_argument("--split", choices=("train", "val", "test"), default="test")
    parser.add_argument("--device", default=None, help="the device to run on (default: the run's)")


def preset_named_in(argv: list[str]) -> str | None:
    """The preset a ``train`` command line asks for (``--preset NAME``), read before the whole parse because a
    preset sets the defaults of the other flags; None when there is none or it is not a preset's name (the parse
    then reports it)."""
    if not argv or argv[0] != "train":
        return None
    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument("--preset")
    name = peek.parse_known_args(argv[1:])[0].preset
    return name if name in PRESETS else None


def _preset_defaults(name: str) -> dict:
    """The flag defaults of a preset: its sampler, sampler options and loss settings."""
    chosen = preset(name)
    return {"sampler": chosen.sampler, **chosen.options, **chosen.settings}


def build_parser(preset_name: str | None = None) -> argparse.ArgumentParser:
    """The command line; ``preset_name`` (``preset_named_in``) makes that preset's settings the defaults of
    ``train``'s flags, so that a flag given beside ``--preset`` still wins."""
    parser = argparse.ArgumentParser(prog="fne-fast", description="FNE negative sampling for image-text matching")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train (or resume) one run")
    add_training_flags(train, single_run=True)
    train.add_argument("--preset", choices=tuple(PRESETS), default=None,
                       help="named settings (fne_fast/training/presets.py): authors (the paper's FNE, the "
                            "defaults) or recommended (this project's choice, docs/RESULTS.md); other flags "
                            "still apply")
    if preset_name is not None:
        train.set_defaults(**_preset_defaults(preset_name))
    _add_checkpoint_flags(commands.add_parser("eval", help="evaluate a checkpoint"))
    compare = commands.add_parser("compare", help="samplers x seeds, selected by validation, paired against a "
                                                  "baseline -> results.md, results.json, compare.png")
    compare.add_argument("--out", required=True, help="the comparison's folder: a run folder per arm and seed, "
                                                      "results.md, results.json and compare.png")
    add_training_flags(compare, single_run=False)
    compare.add_argument("--samplers", nargs="+", type=_arm, default=[_arm(name) for name in SAMPLERS],
                         metavar="SAMPLER[:FIELD=VALUE,...]",
                         help=f"the arms: a sampler ({', '.join(SAMPLERS)}) or a preset (@{', @'.join(PRESETS)}), "
                              "optionally with sampler options or loss settings of its own, e.g. fne:fn_tau=inf or "
                              "fne:relative_cut=0.95,inbatch_weight=1, and +tags for TAGS-DC beside it, itself "
                              "optionally with TAGS-DC options of its own, e.g. fne+tags:refill=random "
                              "(default: every sampler)")
    compare.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    compare.add_argument("--baseline", nargs="+", default=None, metavar="ARM",
                         help="the arm every other is paired with (default inbatch-hardest when it is compared, "
                              "else the first arm); further arms add further paired tables")
    compare.add_argument("--bootstrap", type=_positive_int, default=2000,
                         help="bootstrap resamples of the test items for the paired intervals (default 2000)")
    search = commands.add_parser("search", help="query a trained matcher over a split: the top images of a text, "
                                                "or the top captions of an image")
    _add_checkpoint_flags(search)
    query = search.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", help="find the images of the split that match this text")
    query.add_argument("--image", help="find the captions of the split that match this image file")
    search.add_argument("--top", type=_positive_int, default=5, help="how many results")
    search.add_argument("--cache-dir", default=None, help="feature cache (default: the run's)")
    return parser


def config_from_args(args, **overrides) -> TrainConfig:
    """The run's TrainConfig from parsed training flags; ``overrides`` set fields directly, and may set ``tags`` to
    a bool (TAGS-DC with the --tags-* options, or not)."""
    values = {item.name: getattr(args, item.name) for item in flag_fields(TrainConfig) if hasattr(args, item.name)}
    values["options"] = {item.name: getattr(args, item.name) for item in sampler_flag_fields()}
    values["data_options"] = {name: getattr(args, _DATA_PREFIX + name) for name in DATA_FLAGS
                              if getattr(args, _DATA_PREFIX + name) is not None}
    values.update(overrides)
    tags = {item.name: getattr(args, _TAGS_PREFIX + item.name) for item in TagsOptions.fields()}
    values["tags"] = TagsOptions(**tags) if values.get("tags") else None
    return TrainConfig(**values)
