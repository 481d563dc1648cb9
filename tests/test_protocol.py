"""The comparison protocol: model selection by validation, paired statistics, arms, and `compare` with its resume."""

import json
import math
import os
import re
import signal

import pytest
import torch

pytest.importorskip("tqdm", reason="tqdm (the `train` extra) is not installed: scripts/setup_data.sh installs it")

from fne_fast.training import loop  # noqa: E402
from fne_fast.runs.checkpoint import checkpoint_path, read_checkpoint  # noqa: E402
from fne_fast.experiments.compare import Arm, pairings, parse_arm, with_tags_arms  # noqa: E402
from fne_fast.training.evaluate import recalls_from_ranks  # noqa: E402
from fne_fast.io import read_jsonl  # noqa: E402
from fne_fast.experiments.paired import (BEYOND_NOISE, WITHIN_NOISE, paired_comparison, rsum_item_scores,  # noqa: E402
                             student_t_two_sided_p)
from fne_fast.training.model_selection import best_epoch_index, run_summary  # noqa: E402
from fne_fast.runs.artifacts import BEST_NAME, CHECKPOINT_NAME, read_best_test_ranks  # noqa: E402
from fne_fast.training import train  # noqa: E402
from runs import write_feature_arrays  # noqa: E402
from test_train import _config, splits  # noqa: E402,F401  (the synthetic data fixture)


# ---- selection ---------------------------------------------------------------------------------------------

def _rows(val_rsums, warmup_epochs=1):
    return [{"epoch": epoch, "val_rsum": value, "warmup": epoch < warmup_epochs} for epoch, value in
            enumerate(val_rsums)]


@pytest.mark.parametrize("val_rsums,warmup,best", [
    ([10, 30, 20], 1, 1),  # best before the last
    ([50, 30, 20], 1, 1),  # the shared warm-up epoch is not eligible while the sampler has epochs of its own
    ([50], 1, 0),  # ... unless there is nothing else
    ([10, 30, 30, 5], 1, 1),  # ties go to the earlier epoch
    ([40, 30, 20], 0, 0),  # no warm-up: every epoch is eligible
])
def test_best_epoch_index(val_rsums, warmup, best):
    assert best_epoch_index(_rows(val_rsums, warmup)) == best
    assert best_epoch_index([]) is None


def test_a_run_whose_best_validation_epoch_is_not_the_last(tmp_path, splits, monkeypatch):  # noqa: F811
    """The best checkpoint and the best test ranks hold epoch 1 of 3; the oracle is a 2-epoch run of the same
    seed, which resumption exactness makes bit-identical to the 3-epoch run after its second epoch."""
    scripted = iter([10.0, 30.0, 20.0])  # validation rsum of epochs 0, 1, 2
    real = loop._validation
    monkeypatch.setattr(loop, "_validation",
                        lambda run, split, swaps: {**real(run, split, swaps), "val_rsum": next(scripted)})
    history = train(_config(tmp_path / "three", epochs=3), splits)
    monkeypatch.undo()
    two_epochs = train(_config(tmp_path / "two", epochs=2), splits)

    summary = run_summary(history)
    assert summary["best_epoch"] == 1 and summary["last"]["epoch"] == 2
    best = read_checkpoint(checkpoint_path(str(tmp_path / "three"), BEST_NAME))
    oracle = read_checkpoint(str(tmp_path / "two" / CHECKPOINT_NAME))
    assert best["next_epoch"] == 2 and best["step"] == oracle["step"]
    for key, value in oracle["heads"].items():
        assert torch.equal(best["heads"][key], value), key
    epoch, ranks = read_best_test_ranks(str(tmp_path / "three"))
    assert epoch == 1
    recalls = recalls_from_ranks(ranks)
    assert recalls["rsum"] == pytest.approx(two_epochs[1]["rsum"]) == pytest.approx(history[1]["rsum"])
    assert recalls["group_rsum"] == pytest.approx(history[1]["group_rsum"])


# ---- paired statistics -------------------------------------------------------------------------------------

def _ranks(hit_rate, images=300, captions_per_image=2, seed=0):
    """Ranks where a share ``hit_rate`` of the anchors retrieve their item first and the rest rank it 20th."""
    generator = torch.Generator().manual_seed(seed)
    i2t = torch.where(torch.rand(images, generator=generator) < hit_rate, 0, 20)
    t2i = torch.where(torch.rand(images * captions_per_image, generator=generator) < hit_rate, 0, 20)
    return {"i2t": i2t, "t2i": t2i, "i2t_group": i2t, "t2i_group": t2i}


CAPTION_IMAGE = torch.arange(300).repeat_interleave(2)


def test_item_scores_give_the_recalls_rsum():
    ranks = {"i2t": torch.tensor([0, 3, 7, 12]), "t2i": torch.tensor([0, 0, 6, 2, 11, 4, 0, 30])}
    caption_image = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    image_hits, caption_hits, captions = rsum_item_scores(ranks, caption_image)
    rsum = 100 * (image_hits.sum() / 4 + caption_hits.sum() / captions.sum())
    assert rsum.item() == pytest.approx(recalls_from_ranks(ranks)["rsum"])


def test_a_known_difference_is_detected():
    better = [_ranks(0.6, seed=seed) for seed in range(3)]
    worse = [_ranks(0.3, seed=10 + seed) for seed in range(3)]
    result = paired_comparison(better, worse, CAPTION_IMAGE, replicates=500)
    exact = [recalls_from_ranks(b)["rsum"] - recalls_from_ranks(w)["rsum"] for b, w in zip(better, worse)]
    assert result["per_seed"] == pytest.approx(exact)
    assert result["mean"] == pytest.approx(sum(exact) / 3)
    assert result["t_test_p"] < 0.05 and result["bootstrap_interval"][0] > 0
    assert result["verdict"] == BEYOND_NOISE


def test_identical_runs_are_within_noise():
    runs = [_ranks(0.5, seed=seed) for seed in range(3)]
    result = paired_comparison(runs, [dict(ranks) for ranks in runs], CAPTION_IMAGE, replicates=200)
    assert result["per_seed"] == [0.0, 0.0, 0.0] and result["t_test_p"] == 1.0
    assert result["bootstrap_interval"] == [0.0, 0.0]
    assert result["verdict"] == WITHIN_NOISE


def test_differences_of_changing_sign_are_within_noise():
    """Seed 0 favours one side, seed 1 the other: each seed's difference is clear on the test set, the mean is not."""
    arm = [_ranks(0.6, seed=0), _ranks(0.3, seed=1), _ranks(0.5, seed=2)]
    base = [_ranks(0.3, seed=3), _ranks(0.6, seed=4), _ranks(0.5, seed=5)]
    result = paired_comparison(arm, base, CAPTION_IMAGE, replicates=300)
    assert max(result["per_seed"]) > 50 and min(result["per_seed"]) < -50
    assert result["t_test_p"] > 0.5 and result["verdict"] == WITHIN_NOISE


def test_one_seed_says_which_noise_it_assessed():
    result = paired_comparison([_ranks(0.7)], [_ranks(0.2, seed=1)], CAPTION_IMAGE, replicates=200)
    assert result["t_test_p"] is None and "one seed" in result["verdict"]


@pytest.mark.parametrize("df", [1, 2, 3, 4, 7, 12])
def test_student_t_against_scipy(df):
    stats = pytest.importorskip("scipy.stats")
    for t in (0.0, 0.5, 1.7, 4.3, 25.0, -3.0):
        assert student_t_two_sided_p(t, df) == pytest.approx(2 * stats.t.sf(abs(t), df), abs=1e-12)
    assert student_t_two_sided_p(math.inf, df) == 0.0
    with pytest.raises(ValueError, match="df"):
        student_t_two_sided_p(1.0, 0)


# ---- arms and compare --------------------------------------------------------------------------------------

def test_arms_parse_and_name_themselves():
    assert parse_arm("fne") == Arm("fne")
    arm = parse_arm("fne:fn-tau=inf,prior_k=100")
    assert arm.options == {"fn_tau": math.inf, "prior_k": 100.0}
    assert arm.name == "fne:fn_tau=inf,prior_k=100" and "," not in arm.folder and ":" not in arm.folder
    assert parse_arm("uniform:cutdown=false").options == {"cutdown": False}
    tagged = parse_arm("fne:fn_tau=inf+tags")
    assert tagged == Arm("fne", {"fn_tau": math.inf}, tags=True) and parse_arm(tagged.name) == tagged
    assert tagged.folder == "fne_fn_tau-inf+tags"
    # Loss settings and presets: the preset's own settings are not repeated in the name, the arm's changes are.
    mixed = parse_arm("hardest:relative_cut=0.95,inbatch_weight=1")
    assert mixed.options == {"relative_cut": 0.95} and mixed.settings == {"inbatch_weight": 1.0}
    assert parse_arm(mixed.name) == mixed
    from fne_fast.training.presets import PRESETS

    recommended = parse_arm("@recommended:k=2")
    assert recommended.name == "@recommended:k=2" and recommended.folder == "preset-recommended_k-2"
    assert recommended.sampler == PRESETS["recommended"].sampler
    assert recommended.options == {**PRESETS["recommended"].options, "k": 2}
    assert recommended.settings == PRESETS["recommended"].settings and parse_arm(recommended.name) == recommended
    with pytest.raises(ValueError, match="the preset expected one of"):
        parse_arm("@best")


def test_tags_arms_follow_the_tags_flag():
    arms = [parse_arm("hardest"), parse_arm("fne:fn_tau=inf")]
    assert with_tags_arms(arms, "off") == arms
    assert [arm.name for arm in with_tags_arms(arms, "on")] == ["hardest+tags", "fne:fn_tau=inf+tags"]
    assert [arm.name for arm in with_tags_arms(arms, "both")] == ["hardest", "hardest+tags", "fne:fn_tau=inf",
                                                                  "fne:fn_tau=inf+tags"]
    with pytest.raises(ValueError, match="--tags"):
        with_tags_arms(arms, "yes")


def test_tags_arms_carry_their_own_tags_options():
    from fne_fast.experiments.compare import _run_config
    from fne_fast.tags.options import TagsOptions
    from fne_fast.training.config import TrainConfig

    ablation = parse_arm("fne:fn_tau=inf+tags:refill=random,share-text-head=false")
    assert ablation.options == {"fn_tau": math.inf} and ablation.tags
    assert ablation.tags_options == {"refill": "random", "share_text_head": False}
    assert ablation.name == "fne:fn_tau=inf+tags:refill=random,share_text_head=False"
    assert parse_arm(ablation.name) == ablation
    assert ablation.folder == "fne_fn_tau-inf+tags_refill-random_share_text_head-False"
    base = TrainConfig(tags=TagsOptions(margin=0.3))
    config = _run_config(base, ablation, 2, "out")
    assert config.tags == TagsOptions(margin=0.3, refill="random", share_text_head=False) and config.seed == 2
    assert _run_config(base, parse_arm("fne+tags"), 2, "out").tags == base.tags
    assert _run_config(base, parse_arm("fne"), 2, "out").tags is None
    # --tags both adds the arm without and with TAGS-DC; an arm written with +tags stays as written, once.
    arms = with_tags_arms([parse_arm("fne"), ablation], "both")
    assert [arm.name for arm in arms] == ["fne", "fne+tags", ablation.name]
    with pytest.raises(ValueError, match="need TAGS-DC on"):
        Arm("fne", tags_options={"refill": "random"})


@pytest.mark.parametrize("text,message", [("fne+tags:nope=1", "FIELD one of"), ("fne+tagsy", "expected \\+tags"),
                                          ("fne+tags:refill=sometimes", "refill"),
                                          ("fne+tags:margin=-1", "margin")])
def test_bad_tags_arms_name_the_problem(text, message):
    with pytest.raises(ValueError, match=message):
        parse_arm(text)


@pytest.mark.parametrize("text,message", [("bogus", "sampler must be one of"), ("fne:tau", "FIELD=VALUE"),
                                          ("fne:mode=hardest", "FIELD one of"), ("fne:fn_margin=2", "fn_margin"),
                                          ("fne:prior_k=x", "prior_k expects float")])
def test_bad_arms_name_the_problem(text, message):
    with pytest.raises(ValueError, match=message):
        parse_arm(text)


def test_each_baseline_is_paired_with_every_other_arm_once():
    assert pairings(["a", "b", "c"], ["a"]) == [("b", "a"), ("c", "a")]
    assert pairings(["a", "b", "c"], ["a", "c"]) == [("b", "a"), ("c", "a"), ("b", "c")]


@pytest.mark.parametrize("extra,message", [(["--baseline", "hardest"], "argument --baseline"),
                                           (["--baseline", "fne", "fne"], "argument --baseline"),
                                           (["--samplers", "fne", "fne"], "argument --samplers"),
                                           (["--samplers", "fne:nope=1"], "argument --samplers")])
def test_compare_usage_errors_come_before_any_data(monkeypatch, capsys, extra, message):
    from fne_fast.cli import main

    from fne_fast.experiments import compare

    monkeypatch.setattr(compare, "load_splits", lambda config: pytest.fail("data was read"))
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--out", "unused", "--samplers", "fne", "inbatch-hardest", *extra])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("arms,tags,baseline", [(["fne", "inbatch-hardest"], "off", ["inbatch-hardest"]),
                                                (["fne"], "both", ["fne"]),
                                                (["uniform", "fne"], "on", ["uniform+tags"])])
def test_the_default_baseline_is_inbatch_hardest_or_the_first_arm(monkeypatch, arms, tags, baseline):
    from fne_fast import cli

    seen = {}
    monkeypatch.setattr(cli, "run_compare", lambda args, group: seen.setdefault("baseline", args.baseline) and 0)
    assert cli.main(["compare", "--out", "unused", "--samplers", *arms, "--tags", tags]) == 0
    assert seen["baseline"] == baseline


def _compare_arguments(features, out):
    return ["compare", "--dataset", "features", "--features-dir", str(features), "--samplers", "inbatch-hardest",
            "fne:fn_tau=inf,min_count=5", "--seeds", "0", "1", "--epochs", "3", "--batch-size", "16",
            "--bank-size", "64", "--min-count", "5", "--out", str(out), "--quiet", "--no-plots", "--bootstrap", "100"]


def test_an_interrupted_compare_redoes_only_what_is_missing(tmp_path, splits, monkeypatch, capsys):  # noqa: F811
    pytest.importorskip("matplotlib", reason="matplotlib (the `train` extra) draws compare.png")
    from fne_fast.cli import main

    features = tmp_path / "features"
    write_feature_arrays(features, splits)
    assert main(_compare_arguments(features, tmp_path / "whole")) == 0

    epochs_trained = []
    interrupt_at = [5]  # seed 0 of both arms is 6 epochs: stop in the fne arm's second epoch
    train_epoch = loop.train_one_epoch

    def counting(run, split, epoch, timing):
        epochs_trained.append((run.config.out.rsplit("/", 1)[-1], epoch))
        if len(epochs_trained) == interrupt_at[0]:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: the run folder turns it into RunInterrupted
        return train_epoch(run, split, epoch, timing)

    monkeypatch.setattr(loop, "train_one_epoch", counting)
    capsys.readouterr()
    assert main(_compare_arguments(features, tmp_path / "parts")) == 130  # Ctrl-C: a one-line interruption
    assert re.fullmatch(r"fne-fast: interrupted \(SIGINT\) at fne:fn_tau=inf,min_count=5 seed 0, epoch 1 step \d+; "
                        r"run the same compare command again: it trains only what is missing\n",
                        capsys.readouterr().err)
    assert not (tmp_path / "parts" / "results.json").exists()
    epochs_trained.clear()
    interrupt_at[0] = None
    assert main(_compare_arguments(features, tmp_path / "parts")) == 0
    fne = "fne_fn_tau-inf_min_count-5"
    assert epochs_trained == [(f"{fne}-seed0", 1), (f"{fne}-seed0", 2),
                              ("inbatch-hardest-seed1", 0), ("inbatch-hardest-seed1", 1), ("inbatch-hardest-seed1", 2),
                              (f"{fne}-seed1", 0), (f"{fne}-seed1", 1), (f"{fne}-seed1", 2)]

    whole = json.loads((tmp_path / "whole" / "results.json").read_text())
    parts = json.loads((tmp_path / "parts" / "results.json").read_text())
    assert {**whole, "command": ""} == {**parts, "command": ""}  # the interruption changed no number
    for name in ("results.md", "compare.png"):
        assert (tmp_path / "parts" / name).stat().st_size > 0
    table = (tmp_path / "parts" / "results.md").read_text()
    assert "| fne:fn_tau=inf,min_count=5 | 2 |" in table and "− inbatch-hardest | rsum |" in table
    arm = parts["arms"][1]
    assert arm["options"]["fn_tau"] == math.inf and arm["options"]["mode"] == "fne"
    assert [run["best_epoch"] for run in arm["runs"]] == [
        run_summary(read_jsonl(str(tmp_path / "parts" / run["folder"] / "metrics.jsonl")))["best_epoch"]
        for run in arm["runs"]]
    assert {"rsum", "group_rsum"} <= parts["paired"][0].keys()

    epochs_trained.clear()
    assert main(_compare_arguments(features, tmp_path / "parts")) == 0  # all done: nothing trained again
    assert epochs_trained == []


def test_eval_limit_caps_validation_and_test_but_not_training(tmp_path, splits):  # noqa: F811
    from fne_fast.training.data import load_splits

    features = tmp_path / "features"
    write_feature_arrays(features, splits)
    loaded = load_splits(_config(tmp_path / "run", eval_limit=7, data_options={"features_dir": str(features)},
                                 cache_dir=str(tmp_path / "cache")))
    assert loaded["train"].image_features.shape[0] == splits["train"].image_features.shape[0] == 60
    for name in ("val", "test"):
        assert loaded[name].image_features.shape[0] == 7
        assert torch.equal(loaded[name].text_features, splits[name].first_images(7).text_features)
    with pytest.raises(ValueError, match="--eval-limit"):
        _config(tmp_path, eval_limit=0)
