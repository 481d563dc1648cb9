"""``fne-fast compare``: arms × seeds, each run selected by validation, paired against a baseline.

An *arm* is a sampler with optional changes to the sampler's options and to the loss settings
(``fne_fast.training.presets.ARM_SETTINGS``), written ``SAMPLER[:FIELD=VALUE,...]`` (``fne``, ``fne:fn_tau=inf``,
``fne:relative_cut=0.95,inbatch_weight=1``), or a preset ``@NAME[:FIELD=VALUE,...]`` (``@recommended``), and
``+tags`` at the end for TAGS-DC beside the sampler (``fne+tags``; ``--tags on|both`` adds it to every arm), itself
with changes to the TAGS-DC options (``fne+tags:refill=random``, ``fne+tags:share_text_head=false``: the ablations
paired against full TAGS-DC in one comparison).
Every arm is trained with every seed into ``OUT/<arm>-seed<seed>``; a run that is finished is not trained again
and an interrupted one resumes from its last checkpoint, so an interrupted comparison redoes only what is missing. Then:

* each run is reported at its best-validation epoch (``fne_fast.training.model_selection``), beside its last
  epoch;
* each arm is paired with the baseline (and any further baselines) seed by seed (``fne_fast.experiments.paired``)
  on rsum and group rsum;
* ``results.json`` holds every number, ``results.md`` the tables, ``compare.png`` the bars.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field

from fne_fast.errors import UsageError
from fne_fast.experiments.paired import paired_accuracy, paired_comparison
from fne_fast.experiments.plots import comparison_bars
from fne_fast.fields import parse_option_text
from fne_fast.io import atomic_write_text
from fne_fast.ops.options import sampler_flag_fields
from fne_fast.runs.artifacts import read_best_test_ranks
from fne_fast.runs.folder import RunFolder, RunInterrupted
from fne_fast.sampling import distributed
from fne_fast.sampling.loss import SAMPLERS
from fne_fast.tags.options import TagsOptions
from fne_fast.tags.swap import SWAP_FAMILIES, SWAP_KEYS, family_suffix
from fne_fast.training.data import load_splits
from fne_fast.training.evaluate import group_precision_from_ranks
from fne_fast.training.loop import train
from fne_fast.training.config import TrainConfig
from fne_fast.training.model_selection import run_summary
from fne_fast.training.presets import ARM_SETTINGS, PRESETS, preset

__all__ = ["Arm", "parse_arm", "with_tags_arms", "check_arms", "pairings", "compare", "results_markdown",
           "PER_RUN_FIELDS", "RESULTS_JSON", "RESULTS_MD", "COMPARE_PNG"]

RESULTS_JSON, RESULTS_MD, COMPARE_PNG = "results.json", "results.md", "compare.png"
# The TrainConfig fields a comparison sets for each of its runs (the arm's sampler, the seed, the run's folder
# inside the comparison's, always resumable), and one it leaves unset (a single file that every run would write):
# they are not settings of the comparison itself.
PER_RUN_FIELDS = ("sampler", "seed", "out", "resume", "tags_export")
_TAGS_SUFFIX = "+tags"
# The best-validation epoch's test recalls, and what the sampler did in the last epoch (training-time rates and
# the bank diagnostics of fne_fast.training.diagnostics).
_BEST_KEYS = ("rsum", "group_rsum", "i2t_r1", "t2i_r1", "val_rsum", *SWAP_KEYS)
_LAST_KEYS = ("fn_rate", "fn_rate_sampled", "fallback_rate", "mean_p_fn", "tags_positive_share",
              "tags_positive_share_kept")
_BANK_DIAGNOSTIC_KEYS = ("top1pct_fn_rate", "race_per_anchor", "bayes_share_race", "entropy", "expected_fn_rate")


@dataclass(frozen=True)
class Arm:
    """One compared setting: a sampler, the sampler options and loss settings it changes (``changes``: those the
    arm's text wrote, for its name), whether TAGS-DC trains beside it and which of its options it changes, and the
    preset it started from."""

    sampler: str
    options: dict = field(default_factory=dict)
    tags: bool = False
    settings: dict = field(default_factory=dict)
    preset: str | None = None
    changes: tuple = ()
    tags_options: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.tags_options and not self.tags:
            raise ValueError(f"{self.sampler}: TAGS-DC options {self.tags_options} need TAGS-DC on (+tags)")

    @property
    def name(self) -> str:
        written = self.changes if self.preset else (*self.options.items(), *self.settings.items())
        head = f"@{self.preset}" if self.preset else self.sampler
        name = f"{head}:{_joined(written)}" if written else head
        if not self.tags:
            return name
        return name + _TAGS_SUFFIX + (f":{_joined(self.tags_options.items())}" if self.tags_options else "")

    @property
    def folder(self) -> str:
        """The name as a portable folder name (no ':' or ',')."""
        return self.name.replace(":", "_").replace(",", "_").replace("=", "-").replace("@", "preset-")


def _format_value(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _joined(changes) -> str:
    return ",".join(f"{key}={_format_value(value)}" for key, value in changes)


def _parse_changes(text: str, changes: str, fields: dict) -> list[tuple[str, object]]:
    """``FIELD=VALUE,...`` -> [(field, value)] over ``fields`` ({name: dataclass field}); ValueError naming the
    arm's text otherwise."""
    written = []
    for change in filter(None, changes.split(",")):
        name, equals, value = change.partition("=")
        name = name.strip().replace("-", "_")
        item = fields.get(name)
        if not equals or item is None:
            raise ValueError(f"{text!r}: expected FIELD=VALUE with FIELD one of {tuple(fields)}, got {change!r}")
        try:
            written.append((name, parse_option_text(item, value.strip())))
        except ValueError as error:
            raise ValueError(f"{text!r}: {name} {error}") from None
    return written


def parse_arm(text: str) -> Arm:
    """``SAMPLER[:FIELD=VALUE,...][+tags[:FIELD=VALUE,...]]`` or ``@PRESET[:FIELD=VALUE,...][+tags...]`` -> Arm;
    FIELD is a ``SamplerOptions`` field (``fn_tau`` or ``fn-tau``) other than ``mode``, or a loss setting
    (``ARM_SETTINGS``); after ``+tags``, a ``TagsOptions`` field. Raises ValueError naming what is wrong."""
    text_before_tags, tags_marker, tags_text = text.partition(_TAGS_SUFFIX)
    tags = bool(tags_marker)
    if tags and tags_text and not tags_text.startswith(":"):
        raise ValueError(f"{text!r}: expected +tags or +tags:FIELD=VALUE,... at the end, got +tags{tags_text}")
    head, _, changes = text_before_tags.partition(":")
    if head.startswith("@"):
        try:
            chosen = preset(head[1:])
        except ValueError as error:
            raise ValueError(f"{text!r}: the preset {error}") from None
        sampler, options, settings = chosen.sampler, dict(chosen.options), dict(chosen.settings)
    elif head in SAMPLERS:
        sampler, options, settings = head, {}, {}
    else:
        raise ValueError(f"{text!r}: the sampler must be one of {SAMPLERS} (or @PRESET, PRESET one of "
                         f"{tuple(PRESETS)}), got {head!r}")
    option_fields = {option.name: option for option in sampler_flag_fields()}
    setting_fields = {item.name: item for item in dataclasses.fields(TrainConfig) if item.name in ARM_SETTINGS}
    written = _parse_changes(text, changes, {**option_fields, **setting_fields})
    for name, value in written:
        (options if name in option_fields else settings)[name] = value
    tags_options = dict(_parse_changes(text, tags_text[1:], {item.name: item for item in TagsOptions.fields()}))
    if head.startswith("@"):
        return Arm(sampler, options, tags, settings, head[1:], tuple(written), tags_options)
    return Arm(sampler, options, tags, settings, tags_options=tags_options)


def with_tags_arms(arms: list[Arm], tags: str) -> list[Arm]:
    """The arms of ``--tags``: ``off`` as given, ``on`` each with TAGS-DC, ``both`` each without and with it."""
    if tags not in ("off", "on", "both"):
        raise ValueError(f"--tags: expected off, on or both, got {tags!r}")
    variants = {"off": (), "on": (True,), "both": (False, True)}[tags]
    # An arm written with +tags (perhaps with its own TAGS-DC options) is kept as written, as is every arm under off.
    return [variant for arm in arms
            for variant in ([arm] if arm.tags or not variants else
                            [dataclasses.replace(arm, tags=tagged) for tagged in variants])]


def _run_config(base, arm: Arm, seed: int, out: str):
    """The TrainConfig of one run: ``base`` with the ``PER_RUN_FIELDS`` of the arm and seed, and its options."""
    if arm.tags and base.tags is None:
        raise ValueError(f"{arm.name}: the base configuration has no TAGS-DC options (build it with tags=True)")
    return dataclasses.replace(base, sampler=arm.sampler, seed=seed, out=os.path.join(out, f"{arm.folder}-seed{seed}"),
                               resume=True, options=base.options.replace(**arm.options),
                               tags=base.tags.replace(**arm.tags_options) if arm.tags else None, **arm.settings)


def _run_record(history: list[dict], seed: int, folder: str) -> dict:
    summary = run_summary(history)
    best, last = summary["best"], summary["last"]
    record = {"seed": seed, "folder": folder, "best_epoch": summary["best_epoch"], "epochs": summary["epochs"]}
    record.update({key: best.get(key) for key in _BEST_KEYS})
    record.update({f"last_{key}": last.get(key) for key in ("rsum", "group_rsum")})
    record.update({key: last.get(key) for key in _LAST_KEYS})
    diagnostics = last.get("diagnostics") or {}
    record.update({key: diagnostics.get(key) for key in _BANK_DIAGNOSTIC_KEYS})
    return record


def _mean_std(values: list) -> dict | None:
    values = [value for value in values if value is not None]
    if not values:
        return None
    mean = sum(values) / len(values)
    std = math.sqrt(sum((value - mean) ** 2 for value in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "n": len(values)}


def check_arms(arms: list[Arm], seeds: list[int], baselines: list[str]) -> None:
    """Raises ValueError (starting with the flag's name) unless the arms, seeds and baselines are distinct and each
    baseline is one of the arms."""
    names = [arm.name for arm in arms]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"--samplers: need distinct arms, got {' '.join(names) or 'none'}")
    if not baselines or len(set(baselines)) != len(baselines):
        raise ValueError(f"--baseline: need distinct baselines, got {baselines}")
    for baseline in baselines:
        if baseline not in names:
            raise ValueError(f"--baseline: {baseline!r} is not one of the compared arms ({' '.join(names)}); add it "
                             "to --samplers or choose another --baseline")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds: need distinct seeds, got {seeds}")


def pairings(names: list[str], baselines: list[str]) -> list[tuple[str, str]]:
    """(arm, baseline) pairs to test: every arm against each baseline in turn, leaving out an arm against itself
    and the mirror of a pair already listed (an earlier baseline against a later one)."""
    return [(name, baseline) for index, baseline in enumerate(baselines) for name in names
            if name != baseline and name not in baselines[:index]]


def compare(base, arms: list[Arm], seeds: list[int], out: str, *, baselines: tuple = ("inbatch-hardest",),
            command: str = "", splits=None, replicates: int = 2000, group=None) -> dict | None:
    """Trains (or resumes) every arm × seed from the ``base`` TrainConfig into ``out`` (with the run plots when
    ``base.plots``) and writes the results files; returns the results (what results.json holds). Under a process
    group every rank trains and rank 0 holds the folder and writes; the other ranks return None."""
    baselines = list(baselines)
    check_arms(arms, seeds, baselines)
    first = distributed.rank(group) == 0
    # One comparison per folder (rank 0 holds it for all ranks); each run below also locks its own.
    advice = "run the same compare command again: it trains only what is missing"
    with RunFolder(out, advice) if first else contextlib.nullcontext():
        if splits is None:
            with distributed.first_rank_first(distributed.patient_group(group)):  # rank 0 fills the feature cache
                splits = load_splits(base)
        histories = {}
        for seed in seeds:  # seeds outermost: after each seed, every arm has a paired run
            for arm in arms:
                config = _run_config(base, arm, seed, out)
                if first:
                    print(f"== {arm.name}, seed {seed} -> {config.out}", flush=True)
                try:
                    histories[arm.name, seed] = train(config, splits, group=group)
                except RunInterrupted as interrupted:  # compare has no --resume: the same command continues
                    where = f"{arm.name} seed {seed}" + (f", {interrupted.position}" if interrupted.position else "")
                    raise RunInterrupted(interrupted.signal_number, where, advice) from None
        if not first:
            return None
        results = _results(base, arms, seeds, out, baselines, histories, splits["test"], command, replicates)
        atomic_write_text(os.path.join(out, RESULTS_JSON), json.dumps(results, indent=1) + "\n")
        atomic_write_text(os.path.join(out, RESULTS_MD), results_markdown(results))
        comparison_bars(os.path.join(out, COMPARE_PNG), results)
    return results


def _results(base, arms, seeds, out, baselines, histories, test_split, command, replicates) -> dict:
    """Every run's record, each arm's mean ± std, and the paired tests (what results.json holds)."""
    results = {"dataset": base.dataset, "command": command, "seeds": list(seeds), "baseline": baselines[0],
               "baselines": baselines,
               "selection": "test recalls of the best-validation epoch (val rsum; epochs after the warm-up)",
               "arms": [], "paired": []}
    ranks = {}
    for arm in arms:
        runs = []
        for seed in seeds:
            folder = f"{arm.folder}-seed{seed}"
            record = _run_record(histories[arm.name, seed], seed, folder)
            epoch, ranks[arm.name, seed] = read_best_test_ranks(os.path.join(out, folder))
            if epoch != record["best_epoch"]:
                raise UsageError(f"--out: {folder}: its best test ranks are of epoch {epoch}, its metrics select "
                                 f"epoch {record['best_epoch']}; train it again in a new folder")
            precision = group_precision_from_ranks(ranks[arm.name, seed])  # empty for runs saved before them
            record.update({key: precision.get(key) for key in ("group_rprec", "group_map_r")})
            runs.append(record)
        summary = {key: _mean_std([run[key] for run in runs]) for key in runs[0] if key not in ("seed", "folder")}
        results["arms"].append({"name": arm.name, "sampler": arm.sampler, "tags": arm.tags,
                                "tags_options": arm.tags_options,
                                "options": _run_config(base, arm, seeds[0], out).options.as_kwargs(),
                                "settings": {name: getattr(_run_config(base, arm, seeds[0], out), name)
                                             for name in ARM_SETTINGS},
                                "runs": runs, "summary": summary})
    for name, baseline in pairings([arm.name for arm in arms], baselines):
        pairs = {"arm": name, "baseline": baseline}
        for by_group in (False, True) if test_split.image_group is not None else (False,):
            pairs["group_rsum" if by_group else "rsum"] = paired_comparison(
                [ranks[name, seed] for seed in seeds], [ranks[baseline, seed] for seed in seeds],
                test_split.caption_image, group=by_group, replicates=replicates)
        for family in SWAP_FAMILIES:  # runs saved before the swap outcomes were kept have none
            won, metric = f"swap_won{family_suffix(family)}", f"swap_acc{family_suffix(family)}"
            if all(won in ranks[arm, seed] for arm in (name, baseline) for seed in seeds):
                pairs[metric] = paired_accuracy([ranks[name, seed][won] for seed in seeds],
                                                [ranks[baseline, seed][won] for seed in seeds], metric,
                                                replicates=replicates)
        results["paired"].append(pairs)
    return results


def _cell(summary: dict | None, key: str, scale: float = 1.0, digits: int = 1) -> str:
    entry = (summary or {}).get(key)
    if entry is None:
        return "n/a"
    return f"{scale * entry['mean']:.{digits}f} ± {scale * entry['std']:.{digits}f}"


def _signed(value: float) -> str:
    return f"{value:+.1f}"


def _column(key: str, scale: float = 1.0, digits: int = 1):
    """A table column showing the arm's mean ± std of ``key``."""
    return lambda arm: _cell(arm["summary"], key, scale, digits)


def _arm_table(results: dict, columns: list) -> list[str]:
    """A Markdown table with one row per arm; ``columns``: (header, arm -> cell text)."""
    lines = ["| arm | " + " | ".join(header for header, _ in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for arm in results["arms"]:
        lines.append(f"| {arm['name']} | " + " | ".join(cell(arm) for _, cell in columns) + " |")
    return lines


def results_markdown(results: dict) -> str:
    """The tables of ``results.md``."""
    lines = [f"#### {results['dataset']}", "", f"`{results['command']}`", "",
             f"Recalls: {results['selection']}, mean ± std over seeds {results['seeds']}; \"last\": the last "
             "epoch's. Sampler behaviour: the last epoch (FN rate = share of chosen negatives in the anchor's "
             "semantic group; own draws = without the hardest-negative fallbacks; the bank diagnostics are over a "
             "fixed sample of up to 256 training anchors per direction).", ""]
    lines += _arm_table(results, [("seeds", lambda arm: str(len(arm["runs"]))), ("best epoch", _column("best_epoch")),
                                  ("R@1 i2t", _column("i2t_r1")), ("R@1 t2i", _column("t2i_r1")),
                                  ("rsum", _column("rsum")), ("group rsum", _column("group_rsum")),
                                  ("rsum (last)", _column("last_rsum")),
                                  ("group rsum (last)", _column("last_group_rsum"))])
    if any(arm["summary"].get("group_rprec") for arm in results["arms"]):
        lines += ["", "Over the semantic group as the set of positives (ECCV Caption's metrics, best-validation "
                      "epoch, test split, the mean of both directions): R-Precision and mAP@R, in percent.", ""]
        lines += _arm_table(results, [("group R-Precision", _column("group_rprec")),
                                      ("group mAP@R", _column("group_map_r"))])
    lines += [""] + _arm_table(results, [
        ("FN rate %", _column("fn_rate", 100)), ("FN rate own draws %", _column("fn_rate_sampled", 100)),
        ("fallback %", _column("fallback_rate", 100)), ("mean P_fn of chosen", _column("mean_p_fn", 1, 4)),
        ("FN rate in top 1 %", _column("top1pct_fn_rate", 100)), ("race per anchor", _column("race_per_anchor")),
        ("Bayesian share of race %", _column("bayes_share_race", 100)), ("entropy (nats)", _column("entropy", 1, 2))])
    if any(arm["summary"].get("swap_acc") or arm["summary"].get("tags_positive_share") for arm in results["arms"]):
        lines += ["", "One-word swaps (test split, best-validation epoch: percent of swapped captions scored below "
                      "the true one) and TAGS-DC's synthetic negatives that may be positives (last epoch, upper "
                      "bound: of those the steps used / of every kept one).", ""]
        lines += _arm_table(results, [
            ("swap acc %", _column("swap_acc")), ("object %", _column("swap_acc_object")),
            ("attribute %", _column("swap_acc_attribute")), ("relation %", _column("swap_acc_relation")),
            ("possible positives used %", _column("tags_positive_share", 1, 2)),
            ("possible positives kept %", _column("tags_positive_share_kept", 1, 2))])
        lines += ["", "Swap families (percent won, best-validation epoch): `vocab` is the one-word swap above, drawn "
                      "from the training captions' words like TAGS-DC's refills; `unseen` replaces a word by a "
                      "WordNet word no training caption holds; `exchange` makes two words trade places. Held out: "
                      "`unseen` and `exchange` follow rules no training component uses. Blind: the matcher with "
                      "every image replaced by the mean test image; prior: a bigram model of the training captions "
                      "(no image). Validation: where settings are chosen.", ""]
        columns = []
        for family in SWAP_FAMILIES:
            suffix = family_suffix(family)
            columns += [(f"{family} val %", _column(f"val_swap_acc{suffix}")),
                        (f"{family} test %", _column(f"swap_acc{suffix}")),
                        (f"{family} blind %", _column(f"swap_blind_acc{suffix}")),
                        (f"{family} prior %", _column(f"swap_prior_acc{suffix}"))]
        lines += _arm_table(results, columns)
    if results["paired"]:
        baselines = ", ".join(f"`{name}`" for name in results["baselines"])
        lines += ["", f"Paired differences against {baselines} (same seed = same initialisation and "
                      "batches): per seed, mean, paired t-test over seeds, 95 % bootstrap interval over test items; "
                      "\"beyond noise\" only when both exclude 0.", "",
                  "| arm − baseline | metric | per seed | mean | t-test p | bootstrap 95 % | verdict |",
                  "|---|---|---|---|---|---|---|"]
        for pair in results["paired"]:
            for metric in ("rsum", "group_rsum", *(f"swap_acc{family_suffix(family)}" for family in SWAP_FAMILIES)):
                if metric not in pair:
                    continue
                test = pair[metric]
                p_value = "n/a" if test["t_test_p"] is None else f"{test['t_test_p']:.3f}"
                low, high = test["bootstrap_interval"]
                lines.append(f"| {pair['arm']} − {pair['baseline']} | {metric.replace('_', ' ')} | "
                             f"{', '.join(map(_signed, test['per_seed']))} | {_signed(test['mean'])} | {p_value} | "
                             f"[{low:+.1f}, {high:+.1f}] | {test['verdict']} |")
    return "\n".join(lines) + "\n"
