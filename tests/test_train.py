"""The training loop on small synthetic features: resume exactness, atomic checkpoints, metrics, CLI, eval."""

import dataclasses
import json
import math
import os

import pytest
import torch

pytest.importorskip("tqdm", reason="tqdm (the `train` extra) is not installed: scripts/setup_data.sh installs it")

from fne_fast.errors import UsageError  # noqa: E402
from fne_fast.ops import SamplerOptions  # noqa: E402
from fne_fast.runs.artifacts import CHECKPOINT_NAME, METRICS_NAME  # noqa: E402
from fne_fast.runs.checkpoint import read_checkpoint  # noqa: E402
from fne_fast.training import TrainConfig, train  # noqa: E402
from fne_fast.training.evaluate import embed_split, retrieval_metrics  # noqa: E402
from fne_fast.training.state import RunState  # noqa: E402
from runs import synthetic_splits, write_feature_arrays  # noqa: E402

REQUIRED_KEYS = {"epoch", "loss", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum", "fn_rate",
                 "fallback_rate", "i2t_group_r1", "t2i_group_r10", "group_rsum"}


@pytest.fixture(scope="module")
def splits():
    return synthetic_splits()


def _config(out, **overrides):
    values = dict(dataset="features", out=str(out), epochs=3, batch_size=16, bank_size=50,
                  options=SamplerOptions(min_count=5),
                  joint_dim=16, hidden_dim=32, lr=1e-3, seed=3, plots=False, quiet=True)
    values.update(overrides)
    return TrainConfig(**values)


def _read(path):
    with open(path) as stream:
        return [json.loads(line) for line in stream]


@pytest.mark.parametrize("sampler", ["fne", "inbatch-hardest"])
def test_resume_reproduces_an_uninterrupted_run_exactly(tmp_path, splits, sampler):
    uninterrupted = train(_config(tmp_path / "whole", sampler=sampler), splits)
    train(_config(tmp_path / "parts", sampler=sampler, epochs=1), splits)
    train(_config(tmp_path / "parts", sampler=sampler, epochs=2, resume=True), splits)
    resumed = train(_config(tmp_path / "parts", sampler=sampler, epochs=3, resume=True), splits)
    assert resumed == uninterrupted
    assert _read(tmp_path / "parts" / METRICS_NAME) == _read(tmp_path / "whole" / METRICS_NAME)
    whole = read_checkpoint(str(tmp_path / "whole" / CHECKPOINT_NAME))
    parts = read_checkpoint(str(tmp_path / "parts" / CHECKPOINT_NAME))
    for key, value in whole["heads"].items():
        assert torch.equal(value, parts["heads"][key]), key
    assert torch.equal(whole["text_bank"]["features"], parts["text_bank"]["features"])
    assert whole["step"] == parts["step"] == 3 * 8


def test_metrics_have_the_documented_keys_and_sane_values(tmp_path, splits):
    history = train(_config(tmp_path), splits)
    rows = _read(tmp_path / METRICS_NAME)
    assert rows == history and [row["epoch"] for row in rows] == [0, 1, 2]
    for row in rows:
        assert REQUIRED_KEYS <= row.keys()
        assert 0 <= row["i2t_r1"] <= row["i2t_r5"] <= row["i2t_r10"] <= 100
        assert row["i2t_r1"] <= row["i2t_group_r1"]
        assert 0 <= row["fn_rate"] <= 1 and 0 <= row["fallback_rate"] <= 1
    assert rows[0]["warmup"] and not rows[1]["warmup"]
    assert not any(name.startswith(".tmp") for name in os.listdir(tmp_path))  # atomic writes cleaned up


def _untrained_rsum(config, splits) -> float:
    """Test rsum of the heads a run starts from (its seed's initialisation)."""
    heads = RunState(config, splits["train"]).heads
    image, text = embed_split(heads, splits["test"], torch.device("cpu"))
    return retrieval_metrics(image, text, splits["test"].caption_image)["rsum"]


def _best_chance_rsum(split, dim: int, draws: int = 20) -> float:
    """The best test rsum of ``draws`` random unit embeddings (a model that learned nothing scores near these)."""
    generator = torch.Generator().manual_seed(0)

    def unit(rows):
        return torch.nn.functional.normalize(torch.randn(rows, dim, generator=generator), dim=1)

    return max(retrieval_metrics(unit(split.image_features.shape[0]), unit(split.text_features.shape[0]),
                                 split.caption_image)["rsum"] for _ in range(draws))


def test_training_beats_the_untrained_heads_and_chance(tmp_path, splits):
    config = _config(tmp_path / "run")
    floor = max(_untrained_rsum(config, splits), _best_chance_rsum(splits["test"], config.joint_dim))

    def learned(history):
        return history[-1]["rsum"] > floor + 20 and history[-1]["rsum"] > history[0]["rsum"]

    assert learned(train(config, splits))
    # The same check fails a run that cannot learn (a learning rate of 1e-9 leaves the heads where they started).
    assert not learned(train(_config(tmp_path / "frozen", lr=1e-9), splits))


def test_existing_run_needs_resume_and_matching_settings(tmp_path, splits):
    train(_config(tmp_path, epochs=1), splits)
    with pytest.raises(UsageError, match="already holds a run.*--resume"):
        train(_config(tmp_path, epochs=2), splits)
    with pytest.raises(ValueError, match="different settings: lr"):
        train(_config(tmp_path, epochs=2, lr=0.5, resume=True), splits)


def test_retrieval_metrics_against_hand_computed_ranks():
    image = torch.eye(3)
    # Caption 0 -> image 0 ranks image 0 first; caption 1 -> image 1 ranks image 2 first; caption 2 -> image 2.
    text = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.9], [0.0, 0.0, 1.0]])
    caption_image = torch.tensor([0, 1, 2])
    metrics = retrieval_metrics(image, text, caption_image, torch.tensor([0, 1, 1]))
    assert metrics["t2i_r1"] == pytest.approx(200 / 3)
    assert metrics["t2i_group_r1"] == pytest.approx(100.0)  # image 2 shares caption 1's group
    # Image 1 scores its own caption 0.5 and the others 0; image 2 scores its own 1.0 above caption 1's 0.9.
    assert metrics["i2t_r1"] == pytest.approx(100.0)
    assert metrics["i2t_r5"] == 100.0


def test_group_r_precision_and_map_at_r_against_hand_computed_values():
    from fne_fast.training.evaluate import _precision_at_group_size, group_precision_from_ranks, retrieval_ranks

    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5], [float("nan"), 0.2, 0.1, -1.0, -2.0],
                           [0.5, 0.5, 0.1, 0.0, 0.0]])
    positive = torch.tensor([[1, 0, 1, 0, 1], [1, 1, 0, 0, 0], [0, 1, 0, 0, 0]], dtype=torch.bool)
    r_precision, map_at_r = _precision_at_group_size(scores, positive)
    # Row 0: R = 3, top 3 = hit, miss, hit. Row 1: R = 2, NaN ranks last: hit, miss. Row 2: R = 1, the tie at 0.5
    # goes to the lower index, a miss.
    torch.testing.assert_close(r_precision, torch.tensor([2 / 3, 1 / 2, 0.0], dtype=torch.float64))
    torch.testing.assert_close(map_at_r, torch.tensor([(1 + 2 / 3) / 3, 1 / 2, 0.0], dtype=torch.float64))
    assert not torch.allclose(map_at_r, r_precision)  # mAP@R weighs where the hits fall, R-Precision does not
    # Through retrieval_ranks: every item of a group of one image is its own group's only image.
    image = torch.eye(3)
    text = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.9], [0.0, 0.0, 1.0]])
    ranks = retrieval_ranks(image, text, torch.tensor([0, 1, 2]), torch.tensor([0, 1, 1]))
    metrics = group_precision_from_ranks(ranks)
    # t2i: caption 0 -> {image 0}: hit; caption 1 -> {images 1, 2}: top 2 = images 2, 1, both hits; caption 2 ->
    # {images 1, 2}: image 2, then the tie at 0 goes to image 0: 1/2.
    assert metrics["t2i_group_rprec"] == pytest.approx(100 * (1 + 1 + 0.5) / 3)
    # i2t: image 0 -> {caption 0}: hit; image 1 -> {1, 2}: scores 0.5, 0 -> caption 1 then 0 or 2 (tie at 0: the
    # lower index, caption 0): 1/2; image 2 -> {1, 2}: 0.9, 1.0 -> both.
    assert metrics["i2t_group_rprec"] == pytest.approx(100 * (1 + 0.5 + 1) / 3)
    assert group_precision_from_ranks(retrieval_ranks(image, text, torch.tensor([0, 1, 2]))) == {}


def test_cli_train_and_eval_on_feature_arrays(tmp_path, splits, capsys):
    pytest.importorskip("matplotlib", reason="matplotlib (the `train` extra) draws the run's plots")
    from fne_fast.cli import main

    features = tmp_path / "features"
    write_feature_arrays(features, splits)
    out = tmp_path / "run"
    assert main(["train", "--dataset", "features", "--features-dir", str(features), "--epochs", "2",
                 "--batch-size", "16", "--bank-size", "64", "--min-count", "5", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "i2t R@1" in printed and "rsum" in printed
    assert (out / "similarity_histogram.png").stat().st_size > 0 and (out / "recall.png").stat().st_size > 0
    assert main(["eval", "--checkpoint", str(out / CHECKPOINT_NAME)]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["rsum"] == pytest.approx(_read(out / METRICS_NAME)[-1]["rsum"])


def test_steps_per_epoch_caps_each_epoch(tmp_path, splits):
    train(_config(tmp_path, epochs=2, steps_per_epoch=3), splits)
    assert read_checkpoint(str(tmp_path / CHECKPOINT_NAME))["step"] == 2 * 3
    timing = _read(tmp_path / "timing.jsonl")
    assert [row["steps"] for row in timing] == [3, 3]
    assert {"heads", "sampling_and_loss", "bank_update", "statistics", "epoch_seconds"} <= timing[0].keys()


def test_first_images_keeps_the_images_captions_in_order(splits):
    subset = splits["test"].first_images(3)
    assert subset.image_features.shape[0] == 3 and subset.caption_image.tolist() == [0, 0, 1, 1, 2, 2]
    assert torch.equal(subset.text_features, splits["test"].text_features[:6])
    assert torch.equal(subset.image_group, splits["test"].image_group[:3])


def test_cli_compare_writes_a_table_and_resumes_finished_runs(tmp_path, splits, capsys):
    from fne_fast.cli import main

    features = tmp_path / "features"
    write_feature_arrays(features, splits)
    arguments = ["compare", "--dataset", "features", "--features-dir", str(features), "--samplers", "fne",
                 "inbatch-hardest", "--seeds", "0", "1", "--epochs", "2", "--batch-size", "16", "--bank-size", "64",
                 "--min-count", "5", "--out", str(tmp_path / "cmp"), "--quiet", "--no-plots"]
    assert main(arguments) == 0
    table = (tmp_path / "cmp" / "results.md").read_text()
    assert "| fne | 2 |" in table and "| inbatch-hardest | 2 |" in table and "--samplers fne inbatch-hardest" in table
    first = _read(tmp_path / "cmp" / "fne-seed1" / METRICS_NAME)
    assert main(arguments) == 0  # every run is finished: resumed with nothing left to train
    assert _read(tmp_path / "cmp" / "fne-seed1" / METRICS_NAME) == first
    assert (tmp_path / "cmp" / "results.md").read_text() == table


@pytest.mark.parametrize("flag,value", [("--fn-margin", "2"), ("--tau", "-1"), ("--k", "0"), ("--prior-k", "x")])
def test_bad_sampler_option_fails_before_any_data_is_read(monkeypatch, capsys, flag, value):
    from fne_fast.cli import main
    from fne_fast.training import loop

    def must_not_load(config):
        raise AssertionError("data was read")

    monkeypatch.setattr(loop, "load_splits", must_not_load)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", flag, value])
    assert exit_info.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err


def test_the_training_flags_are_the_configs_fields_with_their_defaults(capsys):
    import dataclasses

    from fne_fast.cli import build_parser, config_from_args
    from fne_fast.fields import flag_fields

    # No flag at all is the config's defaults: the flags restate none of them.
    args = build_parser().parse_args(["train"])
    assert dataclasses.asdict(config_from_args(args)) == dataclasses.asdict(TrainConfig())
    # Every setting of the config is a flag of `fne-fast train --help`, with the field's help text and default.
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for item in flag_fields(TrainConfig):
        assert f"--{item.name.replace('_', '-')}" in text, item.name
        assert " ".join(item.metadata["help"].split()) in text, item.name
    assert "the run's folder (checkpoints, metrics.jsonl, plots) (default runs/emoji-fne)" in text
    # A changed default reaches the flag: the parser is built from the field, not from a copy of it.
    bank_size = next(item for item in dataclasses.fields(TrainConfig) if item.name == "bank_size")
    original = bank_size.default
    try:
        bank_size.default = 4096
        assert build_parser().parse_args(["train"]).bank_size == 4096
    finally:
        bank_size.default = original


def test_sampler_options_build_the_flags_and_reach_the_loss(tmp_path, splits):
    from fne_fast.cli import build_parser, config_from_args

    args = build_parser().parse_args(["train", "--tau", "2", "--no-cutdown", "--k", "3", "--sampler", "uniform"])
    config = config_from_args(args, sampler=args.sampler)
    assert config.options == SamplerOptions(mode="uniform", tau=2.0, cutdown=False, k=3)
    with pytest.raises(ValueError, match="fn_margin"):
        TrainConfig(options=dict(fn_margin=2.0))


@pytest.mark.parametrize("sampler", ["hardest", "fne"])
def test_oracle_excludes_the_anchors_group_in_the_bank_and_the_batch(tmp_path, splits, sampler):
    # Six images per group in the synthetic training split: the hardest bank negative is a same-group variant
    # often, and never under the oracle, in the bank's draws and in the epoch's bank diagnostics alike.
    plain = train(_config(tmp_path / "plain", sampler=sampler), splits)
    oracle = train(_config(tmp_path / "oracle", sampler=sampler, oracle=True), splits)
    assert all(row["fn_rate"] == 0 for row in oracle[1:]) and any(row["fn_rate"] > 0 for row in plain[1:])
    assert all(row["diagnostics"]["top1pct_fn_rate"] == 0 for row in oracle)
    assert any(row["diagnostics"]["top1pct_fn_rate"] > 0 for row in plain)
    no_groups = dict(splits, train=dataclasses.replace(splits["train"], image_group=None))
    with pytest.raises(UsageError, match="--oracle"):
        train(_config(tmp_path / "none", oracle=True), no_groups)


def test_presets_set_the_sampler_and_loss_and_flags_still_win():
    from fne_fast.cli.parser import build_parser, config_from_args, preset_named_in
    from fne_fast.training.presets import PRESETS

    def config_of(*flags):
        argv = ["train", *flags]
        return config_from_args(build_parser(preset_named_in(argv)).parse_args(argv))

    assert config_of("--preset", "authors") == config_of() == TrainConfig()
    recommended = PRESETS["recommended"]
    chosen = config_of("--preset", "recommended")
    assert chosen.sampler == recommended.sampler
    assert chosen.options == SamplerOptions(**recommended.options).replace(mode=chosen.options.mode)
    assert all(getattr(chosen, name) == value for name, value in recommended.settings.items())
    assert chosen != TrainConfig()
    assert config_of("--preset", "recommended", "--inbatch-weight", "0.25").inbatch_weight == 0.25
    with pytest.raises(SystemExit):
        config_of("--preset", "best")


def test_false_negative_criteria_reach_the_bank_and_leave_the_defaults_alone(tmp_path, splits):
    from fne_fast.cli import build_parser, config_from_args

    flags = ["--relative-cut", "0.9", "--center-offset", "-0.1", "--cut-margin", "0.5"]
    config = config_from_args(build_parser().parse_args(["train", *flags]))
    assert config.options == SamplerOptions(relative_cut=0.9, center_offset=-0.1, cut_margin=0.5)
    criteria = SamplerOptions(min_count=5, relative_cut=0.9, center_offset=-0.1, cut_margin=0.5)
    plain = train(_config(tmp_path / "plain", epochs=1), splits)
    with_criteria = train(_config(tmp_path / "criteria", epochs=1, options=criteria), splits)
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in with_criteria)
    assert with_criteria != plain  # the draws changed, so the heads and the metrics did
    # The hinge keeps its own margin: a cut-down margin equal to it is the authors' run, bit for bit.
    same = train(_config(tmp_path / "same", epochs=1, options=SamplerOptions(min_count=5, cut_margin=0.2)), splits)
    assert _read(tmp_path / "same" / METRICS_NAME) == _read(tmp_path / "plain" / METRICS_NAME)
    assert same == plain


def test_per_item_thresholds_are_learned_checkpointed_and_resume_exactly(tmp_path, splits):
    settings = dict(threshold_share=0.1, threshold_lr=0.05)
    uninterrupted = train(_config(tmp_path / "whole", **settings), splits)
    train(_config(tmp_path / "parts", epochs=2, **settings), splits)
    resumed = train(_config(tmp_path / "parts", resume=True, **settings), splits)
    assert resumed == uninterrupted
    rows = _read(tmp_path / "whole" / METRICS_NAME)
    assert _read(tmp_path / "parts" / METRICS_NAME) == rows
    assert rows[0]["threshold_mean"] is None  # the warm-up epoch draws nothing from the bank
    assert all(0.0 <= row["threshold_share_above"] <= 1.0 and math.isfinite(row["threshold_mean"])
               for row in rows[1:])
    whole = read_checkpoint(str(tmp_path / "whole" / CHECKPOINT_NAME))["thresholds"]
    parts = read_checkpoint(str(tmp_path / "parts" / CHECKPOINT_NAME))["thresholds"]
    assert len(whole) == 2 and all(torch.equal(a["values"].nan_to_num(9.0), b["values"].nan_to_num(9.0))
                                   for a, b in zip(whole, parts))
    assert all(torch.isfinite(table["values"]).any() for table in whole)
    train(_config(tmp_path / "plain", epochs=2), splits)
    assert not any("threshold_mean" in row for row in _read(tmp_path / "plain" / METRICS_NAME))
    assert read_checkpoint(str(tmp_path / "plain" / CHECKPOINT_NAME))["thresholds"] is None
    with pytest.raises(UsageError, match="--threshold-share: must be in \\(0, 1\\)"):
        _config(tmp_path / "bad", threshold_share=1.5)


def test_language_guidance_reaches_the_banks_is_checkpointed_and_resumes_exactly(tmp_path, splits):
    guided = SamplerOptions(min_count=5, guide_threshold=0.9)  # fallbacks 44-53 % of slots, against 12-23 % unguided
    uninterrupted = train(_config(tmp_path / "whole", options=guided), splits)
    train(_config(tmp_path / "parts", epochs=2, options=guided), splits)
    resumed = train(_config(tmp_path / "parts", resume=True, options=guided), splits)
    assert resumed == uninterrupted
    assert _read(tmp_path / "parts" / METRICS_NAME) == _read(tmp_path / "whole" / METRICS_NAME)
    banks = read_checkpoint(str(tmp_path / "whole" / CHECKPOINT_NAME))["text_bank"]
    # Each row's guide is its pair's text feature, normalised: the same rows in both banks.
    text = torch.nn.functional.normalize(splits["train"].text_features, dim=1)
    filled = banks["ids"] >= 0
    assert filled.any() and torch.allclose(banks["guides"][filled].norm(dim=1), torch.ones(int(filled.sum())))
    assert all(any(torch.equal(row, candidate) for candidate in text) for row in banks["guides"][filled][:5])
    plain = train(_config(tmp_path / "plain", options=SamplerOptions(min_count=5)), splits)
    assert plain != uninterrupted  # the guides excluded candidates, so the draws and the heads changed
    assert "guides" not in read_checkpoint(str(tmp_path / "plain" / CHECKPOINT_NAME))["text_bank"]
    with pytest.raises(UsageError, match="^--guide-threshold: .*--finetune 0"):
        _config(tmp_path / "bad", options=guided, finetune=1, dataset="emoji")
    with pytest.raises(UsageError, match="^--guide-threshold: .*inbatch-hardest"):
        _config(tmp_path / "bad", options=guided, sampler="inbatch-hardest")


def test_attraction_needs_a_criterion_and_reports_what_it_attracted(tmp_path, splits):
    with pytest.raises(UsageError, match="--attract-weight: attraction needs a false-negative criterion"):
        _config(tmp_path / "bad", attract_weight=1.0)
    criterion = SamplerOptions(min_count=5, relative_cut=0.5)
    removed = train(_config(tmp_path / "removed", epochs=2, options=criterion), splits)
    attracted = train(_config(tmp_path / "attracted", epochs=2, options=criterion, attract_weight=1.0,
                              attract_k=2), splits)
    assert attracted != removed
    rows = _read(tmp_path / "attracted" / METRICS_NAME)
    assert rows[0]["attracted_per_anchor"] is None and 0 < rows[1]["attracted_per_anchor"] <= 2
    assert "attracted_per_anchor" not in _read(tmp_path / "removed" / METRICS_NAME)[1]


@pytest.mark.parametrize("extra", [[], ["--guide-threshold", "0.9"]], ids=["plain", "language guidance"])
def test_torchrun_two_processes_follow_one_process_with_the_global_batch(tmp_path, splits, capsys, extra):
    """`torchrun --nproc_per_node 2 -m fne_fast.cli train --batch-size 8` takes the steps of one process with
    batch 16: the same per-epoch losses, sampler diagnostics and recalls (to float rounding); its checkpoint
    resumes in one process of batch 16 and continues that run. With language guidance the banks' guides are
    sharded and gathered with their rows."""
    import subprocess
    import sys

    from fne_fast.cli import main

    features = tmp_path / "features"
    write_feature_arrays(features, splits)
    common = ["train", "--dataset", "features", "--features-dir", str(features), "--bank-size", "64",
              "--min-count", "5", "--seed", "3", "--quiet", "--no-plots", *extra]
    assert main([*common, "--batch-size", "16", "--epochs", "3", "--out", str(tmp_path / "one")]) == 0
    launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                               "2", "-m", "fne_fast.cli", *common, "--batch-size", "8", "--epochs", "2", "--out",
                               str(tmp_path / "two")], capture_output=True, text=True, timeout=300)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert launched.stdout.count("### features") == 1  # rank 0 alone prints the table
    capsys.readouterr()
    assert main([*common, "--batch-size", "8", "--epochs", "3", "--out", str(tmp_path / "two"), "--resume"]) == 2
    assert "global batch = batch_size × processes = 8 × 2 (now 8 × 1)" in capsys.readouterr().err
    assert main([*common, "--batch-size", "16", "--epochs", "3", "--out", str(tmp_path / "two"), "--resume"]) == 0

    one, two = _read(tmp_path / "one" / METRICS_NAME), _read(tmp_path / "two" / METRICS_NAME)
    assert len(one) == len(two) == 3 and not one[1]["warmup"]
    for single, sharded in zip(one, two):
        for key in ("loss", "fallback_rate", "fn_rate", "fn_rate_sampled"):
            assert sharded[key] == pytest.approx(single[key], rel=1e-5), key
        assert sharded["stats"]["n_pos"] == single["stats"]["n_pos"]
        assert sharded["rsum"] == pytest.approx(single["rsum"], abs=2.0)


def _start_from(rank, world_size):
    """Each rank's RunState over the same data; rank 1 then claims one step more, another checkpoint file,
    another ring position, other data."""
    import torch.distributed as dist

    from fne_fast.training.loop import _agree_on_start

    config = TrainConfig(dataset="features", bank_size=64, joint_dim=8, hidden_dim=16, out="unused")
    run = RunState(config, synthetic_splits()["train"], group=dist.group.WORLD)
    run.inputs = {"train": {"digest": "same"}}
    _agree_on_start(run, dist.group.WORLD)  # the same state: nothing to say
    run.step += rank
    with pytest.raises(UsageError, match=r"start from different states: the ranks disagree on checkpoint's CRC-32, "
                                         r"epoch, step, .*rank 0 has .*epoch=0, step=0, .*rank 1 has .*epoch=0, "
                                         r"step=1"):
        _agree_on_start(run, dist.group.WORLD)
    run.step -= rank
    with pytest.raises(UsageError, match=r"rank 0 has checkpoint's CRC-32=\d+, .*rank 1 has checkpoint's CRC-32="):
        _agree_on_start(run, dist.group.WORLD, checkpoint_digest="ab" if rank else "cd")  # another file each
    run.image_bank.pointer += rank
    with pytest.raises(UsageError, match="image ring pointer"):
        _agree_on_start(run, dist.group.WORLD)
    run.image_bank.pointer -= rank
    run.inputs = {"train": {"digest": f"rank {rank}"}}
    with pytest.raises(UsageError, match="data fingerprint"):
        _agree_on_start(run, dist.group.WORLD)
    return True


def test_ranks_that_start_from_different_states_stop_with_one_error():
    from fne_fast.sampling.launch import results_of, run_in_processes

    assert results_of(run_in_processes(_start_from, 2)) == [True, True]


def test_a_rank_that_starts_later_than_the_collective_timeout_is_waited_for(tmp_path, splits):
    """Rank 0 starts 90 s late, beyond the 60 s collective timeout: the first contact waits for it (the default
    group's long timeout), and the run then trains as usual."""
    import subprocess
    import sys

    features = tmp_path / "features"
    write_feature_arrays(features, splits)
    environment = dict(os.environ, FNE_FAST_TEST_HOOK="first-contact:0:sleep=90")
    environment.pop("FNE_FAST_COLLECTIVE_TIMEOUT", None)
    launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               "-m", "fne_fast.cli", "train", "--dataset", "features", "--features-dir", str(features),
                               "--bank-size", "64", "--batch-size", "8", "--epochs", "1", "--quiet", "--no-plots",
                               "--out", str(tmp_path / "late")], capture_output=True, text=True, timeout=300,
                              env=environment)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert len(_read(tmp_path / "late" / METRICS_NAME)) == 1


def _one_step_traffic(rank, world_size):
    """The bytes of agreement rows and row counts one training step of W processes sends."""
    import torch.distributed as dist

    from fne_fast.sampling.distributed import count_traffic
    from fne_fast.training.epoch import TIMING_SECTIONS, train_one_epoch

    config = TrainConfig(dataset="features", bank_size=64, joint_dim=8, hidden_dim=16, batch_size=8, out="unused",
                         warmup_epochs=0, steps_per_epoch=3, options=SamplerOptions(min_count=5))
    split = synthetic_splits()["train"]
    run = RunState(config, split, group=dist.group.WORLD)
    with count_traffic() as sent:
        train_one_epoch(run, split, 0, dict.fromkeys(TIMING_SECTIONS, 0.0))
    return sent["control"]


def test_a_training_step_agrees_on_nothing_but_the_row_counts():
    """Under W processes a step's collectives take every rank's share of the global batch from the loop (each rank
    knows them) instead of agreeing on it: the only control traffic is the two samples' row counts, 8 bytes to each
    other rank per sample (one host synchronisation each)."""
    from fne_fast.sampling.launch import results_of, run_in_processes

    assert results_of(run_in_processes(_one_step_traffic, 2)) == [3 * 2 * 8] * 2


def test_a_checkpoint_from_before_a_new_sampler_option_resumes(tmp_path):
    # A checkpoint's stored settings lack the options added after it was written; those had their defaults then.
    from fne_fast.training.state import _check_same_settings

    config = _config(tmp_path / "run")
    stored = dataclasses.asdict(config)
    del stored["options"]["guide_threshold"]
    _check_same_settings({"config": stored}, config, 1)  # no error: the missing option was off
    changed = dataclasses.replace(config, options=config.options.replace(guide_threshold=0.5))
    with pytest.raises(UsageError, match="different settings: options="):
        _check_same_settings({"config": stored}, changed, 1)
