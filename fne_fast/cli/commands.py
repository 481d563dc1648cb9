"""The four commands of ``fne-fast``, each from its parsed flags to what it prints: train, eval, compare and search."""

from __future__ import annotations

import json

import torch

from fne_fast.cli.parser import config_from_args
from fne_fast.data import load_raw_split
from fne_fast.errors import UsageError
from fne_fast.experiments.compare import check_arms, compare, results_markdown, with_tags_arms
from fne_fast.matcher import heads_from_state, matcher_from_state, search
from fne_fast.runs.checkpoint import open_checkpoint
from fne_fast.sampling import distributed
from fne_fast.tags.run import run_texts
from fne_fast.training.config import TrainConfig
from fne_fast.training.data import load_splits
from fne_fast.training.evaluate import (embed_split, final_table, group_precision_from_ranks, recalls_from_ranks,
                                       retrieval_ranks)
from fne_fast.training.loop import train
from fne_fast.training.preflight import check_device, check_run_settings

__all__ = ["run_train", "run_eval", "run_compare", "run_search", "check_compare_args"]


def run_train(args, group) -> int:
    config = config_from_args(args, tags=args.tags)
    history = train(config, group=group)
    if distributed.rank(group) == 0:
        arm = f"{config.sampler}{'+tags' if config.tags else ''}"
        print(final_table(history, title=f"{config.dataset}, sampler {arm}, seed {config.seed}"))
    return 0


def _checkpoint_config(args, **overrides):
    """(state, path, TrainConfig) of ``--checkpoint``: its run's settings with ``--device`` (else its own) and
    ``overrides``, the device checked."""
    state, path = open_checkpoint(args.checkpoint)
    config = TrainConfig(**{**state["config"], "device": args.device or state["config"]["device"], **overrides})
    check_device(config.device)
    return state, path, config


def run_eval(args) -> int:
    state, path, config = _checkpoint_config(args)
    split = load_splits(config)[args.split]
    heads = heads_from_state(state, config.device)
    image, text = embed_split(heads, split, torch.device(config.device))
    ranks = retrieval_ranks(image, text, split.caption_image, split.image_group)
    metrics = {**recalls_from_ranks(ranks), **group_precision_from_ranks(ranks)}
    if args.split in ("val", "test"):  # the swap tests exist for the validation and test splits
        _, swap_test = run_texts(config, progress=False)
        metrics.update(swap_test.metrics(heads, args.split, image, text, split.caption_image)[0])
    print(json.dumps({"checkpoint": path, "split": args.split, **metrics}))
    return 0


def check_compare_args(parser, args) -> None:
    """What argparse cannot check alone (a baseline among the arms, no repeats), as a usage error before any data
    is read."""
    args.samplers = with_tags_arms(args.samplers, args.tags)
    if args.baseline is None:
        names = [arm.name for arm in args.samplers]
        args.baseline = ["inbatch-hardest" if "inbatch-hardest" in names else names[0]]
    try:
        check_arms(args.samplers, args.seeds, args.baseline)
    except ValueError as error:
        parser.error(f"argument {error}")


def run_compare(args, group) -> int:
    base = config_from_args(args, sampler=args.samplers[0].sampler, seed=args.seeds[0], out=args.out,
                            tags=any(arm.tags for arm in args.samplers))
    check_run_settings(base)
    results = compare(base, args.samplers, args.seeds, args.out, baselines=args.baseline,
                      command=" ".join(["fne-fast", *args.argv]), replicates=args.bootstrap, group=group)
    if results is not None:  # rank 0: the text it wrote to results.md
        print(results_markdown(results))
    return 0


def run_search(args) -> int:
    overrides = {"cache_dir": args.cache_dir} if args.cache_dir else {}
    state, _, config = _checkpoint_config(args, quiet=True, **overrides)
    matcher = matcher_from_state(state, config.device)
    split = load_splits(config)[args.split]
    raw = None if config.dataset == "features" else load_raw_split(config.dataset, args.split, **config.data_options)
    try:
        hits = search(matcher, split, raw, text=args.text, image=args.image, top=args.top, limit=config.limit)
    except (FileNotFoundError, ValueError, TypeError) as error:
        raise UsageError(f"--{'text' if args.text is not None else 'image'}: {error}") from None
    target = "images" if args.text is not None else "captions"
    print(f"top {target} of the {config.dataset} {args.split} split for {args.text or args.image!r}:")
    for rank, (score, label) in enumerate(hits, start=1):
        print(f"{rank:3d}. {score:.3f}  {label}")
    return 0
