"""examples/own_encoders.py, the training loop of one's own around MemoryBank and FNELoss: its encoders learn, the
loss falls, FNE draws no positive and fewer negatives of the anchor's group than the hardest negative does, and its
checkpoint restores the banks."""

import importlib.util
import os

import pytest
import torch

import fne_fast

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "own_encoders.py")


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("own_encoders", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trained(example, tmp_path_factory):
    checkpoint = tmp_path_factory.mktemp("own") / "own.pt"
    settings = dict(epochs=3, items=320, groups=32, bank_size=256, seed=0)
    torch.manual_seed(settings["seed"])  # the encoders as the loop starts them (it seeds, then builds these two)
    initial = (example.ImageEncoder(48, 32).state_dict(), example.TextEncoder(500, 32).state_dict())
    return example.train(**settings, checkpoint=str(checkpoint)), initial, checkpoint


def test_both_encoders_learn_and_the_loss_falls(trained):
    result, initial, _ = trained
    for encoder, start in zip(result["encoders"], initial):
        for name, value in encoder.state_dict().items():
            if value.is_floating_point():
                assert not torch.equal(value, start[name]), f"{type(encoder).__name__}.{name} did not move"
    losses = [row["loss"] for row in result["history"]]
    assert losses[2] < losses[1]  # epochs 1 and 2 both draw from the banks (epoch 0 is the warm-up)


def test_fne_draws_no_positive_and_fewer_false_negatives_than_the_hardest(trained):
    result, _, _ = trained
    image_encoder, text_encoder = result["encoders"]
    images, captions, group_of_id = result["data"]
    _, text_bank = result["banks"]
    criterion = result["criterion"]
    image_encoder.eval()
    text_encoder.eval()
    with torch.no_grad():
        image, text = image_encoder(images), text_encoder(captions)
    ids = torch.arange(images.shape[0])
    stats = criterion.stats.as_tensor()

    def in_group_share(mode):
        draw = text_bank.sample(image, (image * text).sum(dim=1), ids, stats, criterion.options.replace(mode=mode))
        assert draw.valid.any(dim=1).all()
        assert not (draw.ids == ids[:, None])[draw.valid].any()  # the anchor's own caption is a positive
        same = group_of_id[draw.ids.clamp(min=0)] == group_of_id[ids][:, None]
        return float(same[draw.valid].double().mean())

    # The hardest caption of another item is often a caption of the same group (a false negative); FNE's draw is
    # one of the race's candidates, weighted, so it is a false negative less often.
    assert in_group_share("fne") < in_group_share("hardest") - 0.1


def test_the_checkpoint_restores_the_banks(trained):
    result, _, checkpoint = trained
    state = torch.load(checkpoint, weights_only=True)
    image_bank, _ = result["banks"]
    restored = fne_fast.MemoryBank(image_bank.size, image_bank.dim)
    restored.load_state_dict(state["image_bank"])
    assert torch.equal(restored.features, image_bank.features) and torch.equal(restored.ids, image_bank.ids)
    assert (restored.pointer, restored.filled) == (image_bank.pointer, image_bank.filled)
