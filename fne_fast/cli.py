"""The ``fne-fast`` command: train, eval and compare.

    fne-fast train --dataset emoji --sampler fne --epochs 5 --out runs/emoji-fne --seed 0 [--resume]
    fne-fast eval --checkpoint runs/emoji-fne [--split test]      (a run folder, or a checkpoint file in one)
    fne-fast compare --dataset emoji --samplers inbatch-hardest hardest uniform fne fne:fn_tau=inf --seeds 0 1 2 \
        --out runs/cmp [--baseline inbatch-hardest [uniform ...]]
    torchrun --nproc_per_node 2 -m fne_fast.cli train ...   (W processes; --batch-size is per process)
    fne-fast train --tags                     (TAGS-DC synthetic negatives beside the sampler)
    fne-fast search --checkpoint runs/emoji-fne --text "a red heart"   (or --image PATH)

A user's mistake (a setting, a data file, a checkpoint that does not verify, a folder in use) is one line on
stderr, ``fne-fast: error: …``, and exit code 2; a diverged run (NaN) or a system error (disk full) exit code 1;
SIGINT / SIGTERM exit codes 130 / 143 with where to resume. A traceback means a bug in fne_fast.

Under torchrun, train and compare run over the process group torchrun describes in the environment
(fne_fast/distributed.py); rank 0 prints and writes. A rank that fails makes the others stop with a
``PeerFailure`` (exit code 1).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

import torch  # noqa: F401  (loaded before fne_fast, whose compiled library links against it)

from fne_fast import distributed
from fne_fast.checkpoint import CheckpointError
from fne_fast.data import DATASETS, DatasetFormatError
from fne_fast.evaluate import NonFiniteError
from fne_fast.loss import SAMPLERS
from fne_fast.models import MissingEncoderError
from fne_fast.ops import BACKENDS
from fne_fast.options import SamplerOptions, parse_option_text, sampler_flag_fields
from fne_fast.preflight import UsageError
from fne_fast.rundir import RunInterrupted, RunLockedError

__all__ = ["main", "build_parser"]

# Errors that are the user's to fix (exit code 2), and those of the run or the system (exit code 1).
_USER_ERRORS = (UsageError, DatasetFormatError, CheckpointError, RunLockedError, MissingEncoderError)
_RUN_ERRORS = (NonFiniteError, OSError, distributed.PeerFailure)


def _option_value(option):
    """argparse type of an options field (SamplerOptions, TagsOptions): the field's parse and check, so a bad
    value is a one-line usage error naming the flag, before any data is read."""

    def parse(text: str):
        try:
            return parse_option_text(option, text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parse


def _add_option_flags(parser, fields, prefix: str = "") -> None:
    """One flag ``--<prefix><field>`` (dest ``<prefix><field>``, dashes for underscores) per field of a validated
    options record (fne_fast.options.option), its default, help text and check taken from the field."""
    for item in fields:
        flag, dest, help_text = "--" + (prefix + item.name).replace("_", "-"), prefix + item.name, item.metadata["help"]
        if item.type == "bool":
            parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=item.default,
                                help=help_text)
        else:
            default = "" if item.default is None else f" (default {item.default})"
            parser.add_argument(flag, dest=dest, type=_option_value(item), default=item.default,
                                help=help_text + default)


def _add_training_options(parser: argparse.ArgumentParser, *, single_run: bool) -> None:
    parser.add_argument("--dataset", choices=DATASETS, default="emoji")
    if single_run:
        parser.add_argument("--sampler", choices=SAMPLERS, default="fne")
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--resume", action="store_true",
                            help="continue the run in --out from its last checkpoint (same numbers as one run)")
    parser.add_argument("--bank-size", type=int, default=8224)
    _add_option_flags(parser, sampler_flag_fields())
    parser.add_argument("--epochs", type=int, default=5, help="including the warm-up epoch(s)")
    parser.add_argument("--warmup-epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", required=not single_run, default="runs/emoji-fne" if single_run else None)
    parser.add_argument("--stats-momentum", type=float, default=None,
                        help="EMA momentum of the running statistics (default: the authors' running mean)")
    parser.add_argument("--momentum", type=float, default=0.995, help="momentum of the key heads")
    parser.add_argument("--joint-dim", type=int, default=256, help="width of the joint embedding space")
    parser.add_argument("--hidden-dim", type=int, default=1024, help="hidden width of the projection heads")
    parser.add_argument("--bank-dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--backend", choices=BACKENDS, default="auto", help="the op's backend")
    parser.add_argument("--image-size", type=int, default=128, help="pixels fed to EfficientNet-Lite0")
    parser.add_argument("--limit", type=int, default=None, help="use at most this many items per split")
    parser.add_argument("--eval-limit", type=int, default=None,
                        help="use at most this many items of the validation and test splits (the training split "
                             "stays whole)")
    parser.add_argument("--steps-per-epoch", type=int, default=None,
                        help="cap on the batches of each epoch (default: one pass over the training pairs)")
    parser.add_argument("--cache-dir", default=None, help="feature cache (default: $FNE_FAST_CACHE or "
                                                          "~/.cache/fne_fast)")
    parser.add_argument("--data-root", default=None, help="tuxpaint: stamps directory; wordnet: dict directory")
    parser.add_argument("--train-json", default=None, help="albef-json: training file")
    parser.add_argument("--val-json", default=None, help="albef-json: validation file")
    parser.add_argument("--test-json", default=None, help="albef-json: test file")
    parser.add_argument("--image-root", default=None, help="albef-json: directory the image paths are under")
    parser.add_argument("--features-dir", default=None, help="features: directory of {split}_*.npy arrays")
    parser.add_argument("--no-plots", action="store_true", help="no plots of each run (compare still draws "
                                                                "compare.png)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_tags_options(parser, single_run=single_run)


def _add_tags_options(parser: argparse.ArgumentParser, *, single_run: bool) -> None:
    """``--tags`` and one ``--tags-<field>`` flag per TagsOptions field."""
    from fne_fast.tags import TagsOptions

    group = parser.add_argument_group("TAGS-DC (synthetic negative sentences, word discrimination and correction)")
    if single_run:
        group.add_argument("--tags", action="store_true", help="add TAGS-DC to the sampler")
    else:
        group.add_argument("--tags", choices=("off", "on", "both"), default="off",
                           help="runs without TAGS-DC, with it, or both (one more arm per sampler)")
    _add_option_flags(group, TagsOptions.fields(), prefix="tags_")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fne-fast", description="FNE negative sampling for image-text matching")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_training_options(commands.add_parser("train", help="train (or resume) one run"), single_run=True)
    evaluate = commands.add_parser("eval", help="evaluate a checkpoint")
    evaluate.add_argument("--checkpoint", required=True,
                          help="a run folder (its latest verified checkpoint) or a checkpoint file")
    evaluate.add_argument("--split", choices=("train", "val", "test"), default="test")
    evaluate.add_argument("--device", default=None)
    compare = commands.add_parser("compare", help="samplers x seeds, selected by validation, paired against a "
                                                  "baseline -> results.md, results.json, compare.png")
    _add_training_options(compare, single_run=False)
    compare.add_argument("--samplers", nargs="+", type=_arm, default=[_arm(name) for name in SAMPLERS],
                         metavar="SAMPLER[:FIELD=VALUE,...]",
                         help=f"the arms: a sampler ({', '.join(SAMPLERS)}), optionally with sampler options of its "
                              "own, e.g. fne:fn_tau=inf or fne:fn_tau=inf,prior_k=100 (default: every sampler)")
    compare.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    compare.add_argument("--baseline", nargs="+", default=None, metavar="ARM",
                         help="the arm every other is paired with (default inbatch-hardest when it is compared, "
                              "else the first arm); further arms add further paired tables")
    compare.add_argument("--bootstrap", type=_positive_int, default=2000,
                         help="bootstrap resamples of the test items for the paired intervals (default 2000)")
    search = commands.add_parser("search", help="query a trained matcher over a split: the top images of a text, "
                                                "or the top captions of an image")
    search.add_argument("--checkpoint", required=True,
                        help="a run folder (its latest verified checkpoint) or a checkpoint file")
    query = search.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", help="find the images of the split that match this text")
    query.add_argument("--image", help="find the captions of the split that match this image file")
    search.add_argument("--split", choices=("train", "val", "test"), default="test")
    search.add_argument("--top", type=_positive_int, default=5, help="how many results")
    search.add_argument("--device", default=None)
    search.add_argument("--cache-dir", default=None, help="feature cache (default: the run's)")
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _check_compare_args(parser: argparse.ArgumentParser, args) -> None:
    """What argparse cannot check alone (a baseline among the arms, no repeats), as a usage error before any data
    is read."""
    from fne_fast.compare import check_arms, with_tags_arms

    args.samplers = with_tags_arms(args.samplers, args.tags)
    if args.baseline is None:
        names = [arm.name for arm in args.samplers]
        args.baseline = ["inbatch-hardest" if "inbatch-hardest" in names else names[0]]
    try:
        check_arms(args.samplers, args.seeds, args.baseline)
    except ValueError as error:
        parser.error(f"argument {error}")


def _arm(text: str):
    from fne_fast.compare import parse_arm

    try:
        return parse_arm(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _data_options(args) -> dict:
    names = {"data_root": "root", "train_json": "train_json", "val_json": "val_json", "test_json": "test_json",
             "image_root": "image_root", "features_dir": "features_dir"}
    return {option: getattr(args, name) for name, option in names.items() if getattr(args, name) is not None}


def _tags_options(args):
    from fne_fast.tags import TagsOptions

    return TagsOptions(**{option.name: getattr(args, f"tags_{option.name}") for option in TagsOptions.fields()})


def config_from_args(args, **overrides):
    """The run's TrainConfig; ``overrides`` may set ``tags`` to a bool (TAGS-DC with the --tags-* options, or
    not)."""
    from fne_fast.train import TrainConfig

    options = SamplerOptions(**{option.name: getattr(args, option.name) for option in sampler_flag_fields()})
    values = dict(dataset=args.dataset, options=options, bank_size=args.bank_size, epochs=args.epochs,
                  warmup_epochs=args.warmup_epochs, batch_size=args.batch_size, lr=args.lr, device=args.device,
                  out=args.out, stats_momentum=args.stats_momentum, momentum=args.momentum,
                  joint_dim=args.joint_dim, hidden_dim=args.hidden_dim,
                  bank_dtype=args.bank_dtype, backend=args.backend, image_size=args.image_size, limit=args.limit,
                  eval_limit=args.eval_limit,
                  steps_per_epoch=args.steps_per_epoch,
                  data_options=_data_options(args), cache_dir=args.cache_dir, plots=not args.no_plots,
                  quiet=args.quiet)
    values.update(overrides)
    values["tags"] = _tags_options(args) if values.get("tags") else None
    return TrainConfig(**values)


def _train(args, group) -> int:
    from fne_fast.evaluate import final_table
    from fne_fast.train import train

    config = config_from_args(args, sampler=args.sampler, seed=args.seed, resume=args.resume, tags=args.tags)
    history = train(config, group=group)
    if distributed.rank(group) == 0:
        arm = f"{config.sampler}{'+tags' if config.tags else ''}"
        print(final_table(history, title=f"{config.dataset}, sampler {arm}, seed {config.seed}"))
    return 0


def _checkpoint_config(args, **overrides):
    """(state, path, TrainConfig) of ``--checkpoint``: its run's settings with ``--device`` (else its own) and
    ``overrides``, the device checked."""
    from fne_fast.checkpoint import open_checkpoint
    from fne_fast.preflight import check_device
    from fne_fast.train import TrainConfig

    state, path = open_checkpoint(args.checkpoint)
    config = TrainConfig(**{**state["config"], "device": args.device or state["config"]["device"], **overrides})
    check_device(config.device)
    return state, path, config


def _evaluate(args) -> int:
    from fne_fast.evaluate import embed_split, retrieval_metrics
    from fne_fast.models import MatchingHeads
    from fne_fast.train import load_splits

    state, path, config = _checkpoint_config(args)
    split = load_splits(config)[args.split]
    heads = MatchingHeads(split.image_features.shape[1], split.text_features.shape[1], config.joint_dim,
                          config.hidden_dim, config.momentum).to(config.device)
    heads.load_state_dict(state["heads"])
    image, text = embed_split(heads, split, torch.device(config.device))
    metrics = retrieval_metrics(image, text, split.caption_image, split.image_group)
    if args.split == "test":  # the one-word-swap test exists for the test split
        from fne_fast.tags.run import run_texts

        _, swap_test = run_texts(config, progress=False)
        metrics.update(swap_test.metrics(heads, image, text, split.caption_image))
    print(json.dumps({"checkpoint": path, "split": args.split, **metrics}))
    return 0


def _compare(args, group) -> int:
    from fne_fast.compare import compare, results_markdown
    from fne_fast.preflight import check_run_settings

    base = config_from_args(args, sampler=args.samplers[0].sampler, seed=args.seeds[0],
                            tags=any(arm.tags for arm in args.samplers))
    check_run_settings(base)
    results = compare(base, args.samplers, args.seeds, args.out, baselines=args.baseline,
                      command=" ".join(["fne-fast", *args.argv]), replicates=args.bootstrap, group=group)
    if results is not None:  # rank 0: the text it wrote to results.md
        print(results_markdown(results))
    return 0


def _search(args) -> int:
    from fne_fast.data import load_raw_split
    from fne_fast.matcher import matcher_from_state, top_matches
    from fne_fast.train import load_splits

    state, _, config = _checkpoint_config(args, quiet=True, **({"cache_dir": args.cache_dir} if args.cache_dir else {}))
    matcher = matcher_from_state(state, config.device)
    split = load_splits(config)[args.split]
    try:
        if args.text is not None:
            query, candidates = matcher.encode_texts([args.text])[0], matcher.embed_image_features(split.image_features)
        else:
            query, candidates = matcher.encode_images([args.image])[0], matcher.embed_text_features(split.text_features)
    except (FileNotFoundError, ValueError, TypeError) as error:
        raise UsageError(f"--{'text' if args.text is not None else 'image'}: {error}") from None
    names = captions = None
    if config.dataset != "features":
        raw = load_raw_split(config.dataset, args.split, **config.data_options)
        # The split's rows: a --limit run keeps the first images and their captions (FeatureSplit.first_images).
        names = raw.image_names
        captions = [text for text, image in zip(raw.captions, raw.caption_image)
                    if config.limit is None or image < config.limit]
    caption_image = split.caption_image.tolist()
    first_caption = {}
    for row, image in enumerate(caption_image):
        first_caption.setdefault(image, row)

    def image_label(image: int) -> str:
        if names is None:
            return f"image {image}"
        caption = captions[first_caption[image]] if image in first_caption else ""
        return f"{names[image]}  ({caption})"

    target = "images" if args.text is not None else "captions"
    print(f"top {target} of the {config.dataset} {args.split} split for {args.text or args.image!r}:")
    for rank, (index, score) in enumerate(top_matches(query, candidates, args.top), start=1):
        if args.text is not None:
            label = image_label(index)
        else:
            text = captions[index] if captions is not None else f"caption {index}"
            label = f"{text}  [{image_label(caption_image[index])}]"
        print(f"{rank:3d}. {score:.3f}  {label}")
    return 0


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"fne-fast: warning: {message}", file=sys.stderr if file is None else file, flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "compare":
        _check_compare_args(parser, args)
    args.argv = argv  # the results table quotes the command that produced it
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warning
        try:
            if args.command in ("eval", "search"):  # one process's work
                return {"eval": _evaluate, "search": _search}[args.command](args)
            with distributed.process_group_from_environment(args.device) as group:
                return {"train": _train, "compare": _compare}[args.command](args, group)
        except RunInterrupted as interrupted:
            print(f"fne-fast: {interrupted}", file=sys.stderr, flush=True)
            return interrupted.exit_code
        except KeyboardInterrupt:  # Ctrl-C outside a run folder (eval)
            print("fne-fast: interrupted", file=sys.stderr, flush=True)
            return 130
        except _USER_ERRORS as error:
            print(f"fne-fast: error: {error}", file=sys.stderr, flush=True)
            return 2
        except _RUN_ERRORS as error:
            print(f"fne-fast: error: {error}", file=sys.stderr, flush=True)
            return 1


if __name__ == "__main__":
    sys.exit(main())
