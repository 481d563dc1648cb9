"""What a run guarantees (docs/TRAINING.md), checked as a user would: through the command line, with real
subprocesses killed or interrupted at the checkpoint writer's test hook (FNE_FAST_TEST_HOOK), on the small
synthetic `features` data set."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

pytest.importorskip("tqdm", reason="tqdm (the `train` extra) is not installed: scripts/setup_data.sh installs it")
pytest.importorskip("safetensors", reason="safetensors (the `train` extra) is not installed")

from fne_fast.runs.artifacts import CHECKPOINT_NAME, METRICS_NAME, TIMING_NAME  # noqa: E402
from fne_fast.runs.checkpoint import (CheckpointError, CheckpointWarning, checkpoint_path,  # noqa: E402
                                      load_checkpoint, read_checkpoint, save_checkpoint)
from fne_fast.cli import main  # noqa: E402
from fne_fast.errors import NonFiniteError  # noqa: E402
from fne_fast.training.evaluate import _ranks_of_best_positive, retrieval_metrics  # noqa: E402
from fne_fast.io import remove_stale_temporaries, temporary_prefix  # noqa: E402
from fne_fast.ops import SamplerOptions  # noqa: E402
from fne_fast.runs.folder import RunFolder, RunInterrupted  # noqa: E402
from fne_fast.training import TrainConfig, train  # noqa: E402
from runs import features_run_arguments, synthetic_splits, write_feature_arrays  # noqa: E402

PREVIOUS_NAME = os.path.basename(checkpoint_path("", previous=True))


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    directory = tmp_path_factory.mktemp("arrays") / "features"
    write_feature_arrays(directory, synthetic_splits())
    return directory


@pytest.fixture(scope="module")
def uninterrupted(features, tmp_path_factory):
    """The metrics of an uninterrupted 3-epoch run: what every interrupted and resumed one must end with."""
    out = tmp_path_factory.mktemp("whole") / "run"
    assert main(features_run_arguments(features, out, epochs=3)) == 0
    return _rows(out / METRICS_NAME)


def _rows(path):
    with open(path) as stream:
        return [json.loads(line) for line in stream]


def _cli(arguments, capsys):
    """(exit code, stdout, stderr) of ``fne-fast`` run in this process."""
    code = main(arguments)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _start(arguments, hook=None):
    """``fne-fast`` in a subprocess, with the same thread count as this process (so its numbers are bit-equal
    to this process's) and the writer's test hook."""
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    if hook:
        env["FNE_FAST_TEST_HOOK"] = hook
    return subprocess.Popen([sys.executable, "-m", "fne_fast.cli", *arguments], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


# ---- checkpoints ----------------------------------------------------------------------------------------------

def test_checkpoint_round_trip_keeps_modules_optimiser_and_json_and_saves_named_extras(tmp_path):
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)
    module(torch.randn(5, 3)).sum().backward()
    optimizer.step()
    state = {"module": module, "optimizer": optimizer, "step": 7, "history": [{"rsum": 1.5, "fn": None}],
             "odd": {0: (torch.arange(3), "x"), "$tensor": float("inf")}, "bf16": torch.ones(2, dtype=torch.bfloat16),
             "flags": torch.tensor([True, False]), "scalar": torch.tensor(2.5, dtype=torch.float64)}
    save_checkpoint(str(tmp_path), state)
    save_checkpoint(str(tmp_path), {"module": module}, name="best", keep_previous=False)
    loaded, path = load_checkpoint(str(tmp_path))
    assert path == checkpoint_path(str(tmp_path)) and loaded["step"] == 7 and loaded["history"] == state["history"]
    assert torch.equal(loaded["odd"][0][0], torch.arange(3)) and loaded["odd"][0][1] == "x"
    assert loaded["odd"]["$tensor"] == float("inf") and loaded["bf16"].dtype == torch.bfloat16
    assert loaded["flags"].tolist() == [True, False] and loaded["scalar"].item() == 2.5
    for key, value in module.state_dict().items():
        assert torch.equal(loaded["module"][key], value), key
    restored = torch.optim.Adam(module.parameters(), lr=1e-3)
    restored.load_state_dict(loaded["optimizer"])
    assert restored.state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]
    assert torch.equal(restored.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    assert read_checkpoint(checkpoint_path(str(tmp_path), "best"))["module"].keys() == module.state_dict().keys()
    assert sorted(os.listdir(tmp_path)) == ["best.safetensors", "checkpoint.safetensors"]
    with pytest.raises(TypeError, match="cannot store object at extra"):
        save_checkpoint(str(tmp_path), {"extra": object()})


class _Planted:
    """Unpickling this writes a file: the proof that a loader ran the pickle's code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_planted_pickle_is_refused_without_running_its_code(tmp_path, capsys):
    marker = tmp_path / "code-ran"
    planted = tmp_path / "foreign.pt"
    torch.save({"config": _Planted(str(marker))}, planted)  # torch.save's zip archive
    run = tmp_path / "run"
    run.mkdir()
    with open(run / CHECKPOINT_NAME, "wb") as stream:  # a bare pickle where the checkpoint should be
        pickle.dump(_Planted(str(marker)), stream)
    code, out, err = _cli(["eval", "--checkpoint", str(planted)], capsys)
    assert code == 2 and f"{planted}: a torch.save/pickle file" in err and "arbitrary code" in err
    code, _, err = _cli(["eval", "--checkpoint", str(run)], capsys)
    assert code == 2 and f"{run / CHECKPOINT_NAME}: a torch.save/pickle file" in err
    assert not marker.exists() and out == ""


def test_bit_flips_in_the_latest_checkpoint_fall_back_to_the_previous_one(features, uninterrupted, tmp_path,
                                                                          capsys):
    out = tmp_path / "run"
    assert main(features_run_arguments(features, out, epochs=2)) == 0
    latest = out / CHECKPOINT_NAME
    damaged = bytearray(latest.read_bytes())
    # Flips in the tensors' bytes, past the header (its length: safetensors' first 8 bytes, little-endian).
    data_begin = 8 + int.from_bytes(damaged[:8], "little")
    for offset in (data_begin + (len(damaged) - data_begin) // 3, (data_begin + len(damaged)) // 2, len(damaged) - 7):
        damaged[offset] ^= 0x10
    latest.write_bytes(bytes(damaged))
    with pytest.raises(CheckpointError, match="does not match its SHA-256"):
        read_checkpoint(str(latest))
    with pytest.warns(CheckpointWarning, match="does not match its SHA-256: the file is damaged; using the previous"):
        state, used = load_checkpoint(str(out))
    assert used == str(out / PREVIOUS_NAME) and state["next_epoch"] == 1
    capsys.readouterr()
    code, _, err = _cli(features_run_arguments(features, out, epochs=3) + ["--resume"], capsys)
    assert code == 0
    assert f"warning: {latest}: its content does not match its SHA-256" in err and PREVIOUS_NAME in err
    assert _rows(out / METRICS_NAME) == uninterrupted  # epoch 1 trained again from epoch 0's checkpoint
    assert [row["epoch"] for row in _rows(out / TIMING_NAME)] == [0, 1, 2]
    code, printed, _ = _cli(["eval", "--checkpoint", str(out)], capsys)  # a run folder: its latest checkpoint
    evaluated = json.loads(printed)
    assert code == 0 and evaluated["checkpoint"] == str(latest) and evaluated["rsum"] == uninterrupted[-1]["rsum"]


def test_a_truncated_checkpoint_is_named_in_the_error(features, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(features_run_arguments(features, out, epochs=1)) == 0  # one epoch: no previous checkpoint
    latest = out / CHECKPOINT_NAME
    size = latest.stat().st_size
    latest.write_bytes(latest.read_bytes()[:size // 2])
    capsys.readouterr()
    code, _, err = _cli(features_run_arguments(features, out, epochs=2) + ["--resume"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert f"{latest}: truncated: {size // 2} bytes of {size}" in err and "start the run afresh" in err
    code, _, err = _cli(["eval", "--checkpoint", str(latest)], capsys)
    assert code == 2 and f"{latest}: truncated" in err


# ---- kills and interruptions at the checkpoint writer ----------------------------------------------------------

@pytest.mark.parametrize("point", ["checkpoint-temp-written", "checkpoint-rotated"])
def test_sigkill_during_a_checkpoint_write_leaves_a_resumable_folder(features, uninterrupted, tmp_path, capsys,
                                                                     point):
    out = tmp_path / "run"
    process = _start(features_run_arguments(features, out, epochs=3), hook=f"{point}:2:SIGKILL")
    assert process.wait(timeout=120) == -signal.SIGKILL, process.stderr.read()
    left = os.listdir(out)
    assert any(name.startswith(".tmp-") for name in left)  # the killed write's temporary file
    assert (CHECKPOINT_NAME in left) == (point == "checkpoint-temp-written")  # rotated: only the previous one
    code, _, err = _cli(features_run_arguments(features, out, epochs=3) + ["--resume"], capsys)
    assert code == 0, err  # the dead process's lock did not outlive it
    assert ("is missing; using the previous checkpoint" in err) == (point == "checkpoint-rotated")
    assert not any(name.startswith(".tmp-") for name in os.listdir(out))
    assert _rows(out / METRICS_NAME) == uninterrupted
    assert [row["epoch"] for row in _rows(out / TIMING_NAME)] == [0, 1, 2]


def test_sigint_during_a_checkpoint_write_finishes_it_and_exits_with_130(features, uninterrupted, tmp_path,
                                                                         capsys):
    out = tmp_path / "run"
    process = _start(features_run_arguments(features, out, epochs=3), hook="checkpoint-temp-written:2:SIGINT")
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    # Two epochs of 8 steps were written before the signal took effect; the next one starts at step 16.
    assert err.strip().splitlines()[-1] == "fne-fast: interrupted (SIGINT) at epoch 2 step 16; continue with --resume"
    assert "Traceback" not in err and read_checkpoint(str(out / CHECKPOINT_NAME))["next_epoch"] == 2
    assert [row["epoch"] for row in _rows(out / TIMING_NAME)] == [0, 1]
    assert _cli(features_run_arguments(features, out, epochs=3) + ["--resume"], capsys)[0] == 0
    assert _rows(out / METRICS_NAME) == uninterrupted


def test_a_run_folder_defers_a_signal_until_a_write_ends_and_a_second_signal_stops_it(tmp_path):
    handlers = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    steps = []
    with RunFolder(str(tmp_path)) as folder:
        folder.position = lambda: "epoch 4 step 9"
        with pytest.raises(RunInterrupted) as caught:
            with folder.critical():
                os.kill(os.getpid(), signal.SIGTERM)
                steps.append("write finished")
        assert steps == ["write finished"] and caught.value.exit_code == 143
        assert str(caught.value) == "interrupted (SIGTERM) at epoch 4 step 9; continue with --resume"
    with RunFolder(str(tmp_path)) as folder:
        with pytest.raises(RunInterrupted) as caught:
            with folder.critical():
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)  # a second signal does not wait
                steps.append("not reached")
        assert caught.value.exit_code == 130 and steps == ["write finished"]
    with RunFolder(str(tmp_path)):
        with pytest.raises(RunInterrupted, match="before the first epoch"):
            os.kill(os.getpid(), signal.SIGINT)  # outside a write: at once
            steps.append("not reached")
    assert steps == ["write finished"]
    assert {number: signal.getsignal(number) for number in handlers} == handlers


def test_stale_temporary_files_are_removed_only_where_no_live_writer_owns_them(tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
    dead = tmp_path / f"{temporary_prefix(int(finished.stdout))}abc.safetensors"
    alive = tmp_path / f"{temporary_prefix()}def.pt"
    unknown = tmp_path / ".tmp-xyz.pt"  # an older writer's name, without an owner
    for path in (dead, alive, unknown):
        path.write_bytes(b"partial")
    assert remove_stale_temporaries(str(tmp_path), exclusive=False) == [dead.name]
    assert sorted(remove_stale_temporaries(str(tmp_path), exclusive=True)) == sorted([alive.name, unknown.name])
    assert os.listdir(tmp_path) == []


def test_two_runs_on_one_folder_exactly_one_runs(features, tmp_path, capsys):
    out = tmp_path / "run"
    first = _start(features_run_arguments(features, out, epochs=2), hook="checkpoint-saved:1:sleep=3")
    deadline = time.monotonic() + 60
    while not (out / CHECKPOINT_NAME).exists():  # the first run holds the folder, asleep after its first save
        assert first.poll() is None and time.monotonic() < deadline, first.stderr.read() if first.poll() else ""
        time.sleep(0.1)
    code, _, err = _cli(features_run_arguments(features, out, epochs=2) + ["--resume"], capsys)
    assert code == 2 and f"in use by another run (PID {first.pid} on" in err
    assert first.wait(timeout=60) == 0  # the first run was not disturbed
    assert [row["epoch"] for row in _rows(out / METRICS_NAME)] == [0, 1]


# ---- inputs ------------------------------------------------------------------------------------------------

def test_changed_inputs_make_resume_refuse_with_the_differences(features, tmp_path, capsys):
    copied = tmp_path / "features"
    copied.mkdir()
    for name in os.listdir(features):
        (copied / name).write_bytes((features / name).read_bytes())
    out = tmp_path / "run"
    assert main(features_run_arguments(copied, out, epochs=1)) == 0
    text = np.load(copied / "test_text_features.npy")
    np.save(copied / "test_text_features.npy", text + 1.0)  # same path and size, new content
    capsys.readouterr()
    code, _, err = _cli(features_run_arguments(copied, out, epochs=2) + ["--resume"], capsys)
    assert code == 2 and "the data changed since the checkpoint was written" in err
    assert "written: test text_features: content changed (" in err and err.count("content changed") == 1


def test_file_digests_are_remembered_until_a_file_changes_even_with_its_old_size_and_times(tmp_path, monkeypatch):
    from fne_fast.runs import fingerprint

    monkeypatch.setattr(fingerprint, "_SETTLED_NS", -1)  # remember files however recently they changed
    source = tmp_path / "data.bin"
    source.write_bytes(b"0123456789")
    reads = []
    monkeypatch.setattr(fingerprint, "file_digest", lambda path: reads.append(path) or f"digest{len(reads)}")
    first = fingerprint.describe_sources({"data": [str(source)]}, str(tmp_path))
    assert fingerprint.describe_sources({"data": [str(source)]}, str(tmp_path)) == first and len(reads) == 1
    status = source.stat()
    source.write_bytes(b"9876543210")
    os.utime(source, ns=(status.st_atime_ns, status.st_mtime_ns))  # same size and modification time
    changed = fingerprint.describe_sources({"data": [str(source)]}, str(tmp_path))
    assert len(reads) == 2 and changed["data"]["sha256"] != first["data"]["sha256"]
    assert fingerprint.differences({"train": {"sources": first}}, {"train": {"sources": changed}}) == [
        f"train data: content changed (1 file, 10 bytes in {tmp_path} -> 1 file, 10 bytes in {tmp_path})"]


# ---- settings -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arguments,message", [
    (["--dataset", "albef-json"], "--train-json: --dataset albef-json needs it"),
    (["--dataset", "features", "--features-dir", "{file}"], "--features-dir: {file} is not a folder"),
    (["--data-root", "{tmp}"], "--data-root: not used by --dataset emoji"),
    (["--cache-dir", "{file}"], "--cache-dir: {file} is a file, not a folder"),
    (["--out", "{file}"], "--out: {file} is a file, not a folder"),
    (["--backend", "cuda"], "--backend: backend='cuda' needs tensors on cuda, got cpu"),
    (["--device", "gpu"], "--device: 'gpu' is not a device (cpu, cuda or cuda:N)"),
    (["--device", "mps"], "--device: 'mps': training runs on cpu or cuda"),
    (["--lr", "inf"], "--lr: must be finite and > 0, got inf"),
    (["--momentum", "1"], "--momentum: must be in [0, 1), got 1.0"),
    (["--limit", "0"], "--limit: must be >= 1, got 0"),
])
def test_a_user_mistake_is_one_line_and_exit_code_2_before_any_work(tmp_path, capsys, monkeypatch, arguments,
                                                                     message):
    from fne_fast.training import loop

    monkeypatch.setattr(loop, "load_splits", lambda config: pytest.fail("data was read"))
    file = tmp_path / "a-file"
    file.write_text("")
    arguments = [argument.format(file=file, tmp=tmp_path) for argument in arguments]
    out = [] if "--out" in arguments else ["--out", str(tmp_path / "run")]
    code, _, err = _cli(["train", *arguments, *out], capsys)
    assert (code, err) == (2, f"fne-fast: error: {message.format(file=file, tmp=tmp_path)}\n")
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_device_cuda_without_a_gpu_is_refused_before_any_work(tmp_path, capsys):
    code, _, err = _cli(["train", "--device", "cuda", "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and err.startswith("fne-fast: error: --device: 'cuda', but ") and err.count("\n") == 1


def test_an_empty_split_is_a_clear_error(tmp_path, capsys):
    features = tmp_path / "features"
    splits = synthetic_splits()
    empty = splits["test"].first_images(0)
    write_feature_arrays(features, {**splits, "test": empty})
    code, _, err = _cli(features_run_arguments(features, tmp_path / "run", epochs=1), capsys)
    assert (code, err) == (2, "fne-fast: error: --dataset: the test split is empty (0 images, 0 captions)\n")


# ---- non-finite numbers ----------------------------------------------------------------------------------------

def test_nan_is_never_counted_as_a_hit():
    scores = torch.tensor([[float("nan"), 0.1, 0.2],   # its positive (column 0) scores NaN: ranked last
                           [0.5, float("nan"), 0.1],   # a NaN candidate does not outrank the positive (column 0)
                           [0.0, 0.3, 0.9]])
    positive = torch.tensor([[True, False, False], [True, False, False], [False, False, True]])
    assert _ranks_of_best_positive(scores, positive).tolist() == [3, 0, 0]
    image, text = torch.eye(3), torch.eye(3)
    text[1, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="1 of 3 text rows"):
        retrieval_metrics(image, text, torch.arange(3))


def test_a_diverging_run_stops_at_the_first_non_finite_step_and_keeps_the_last_good_checkpoint(tmp_path,
                                                                                                monkeypatch):
    from fne_fast.sampling.loss import FNELoss

    splits = synthetic_splits()
    config = dict(dataset="features", out=str(tmp_path), batch_size=16, bank_size=50,
                  options=SamplerOptions(min_count=5), joint_dim=16, hidden_dim=32, seed=3, plots=False, quiet=True)
    train(TrainConfig(epochs=1, **config), splits)
    forward = FNELoss.forward

    def loss_turning_nan_at_step_11(self, *args, step, **kwargs):
        loss, diagnostics = forward(self, *args, step=step, **kwargs)
        return (loss * float("nan") if step >= 11 else loss), diagnostics

    monkeypatch.setattr(FNELoss, "forward", loss_turning_nan_at_step_11)
    with pytest.raises(NonFiniteError, match="diverged at epoch 1 step 11: the loss is not finite"):
        train(TrainConfig(epochs=2, resume=True, **config), splits)
    assert read_checkpoint(str(tmp_path / CHECKPOINT_NAME))["next_epoch"] == 1
    assert [row["epoch"] for row in _rows(tmp_path / METRICS_NAME)] == [0]


def test_eval_refuses_to_report_a_model_with_non_finite_weights(features, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(features_run_arguments(features, out, epochs=1)) == 0
    state = read_checkpoint(str(out / CHECKPOINT_NAME))
    state["heads"]["text_head.layers.3.weight"][0, 0] = float("nan")
    save_checkpoint(str(out), state, name="broken", keep_previous=False)
    capsys.readouterr()
    code, printed, err = _cli(["eval", "--checkpoint", str(out / "broken.safetensors")], capsys)
    assert code == 1 and printed == "" and "embeddings are not finite" in err and "no recall is reported" in err


def test_a_learning_rate_that_blows_up_fails_without_a_checkpoint(features, tmp_path, capsys):
    out = tmp_path / "run"
    code, printed, err = _cli(features_run_arguments(features, out, epochs=1) + ["--lr", "1e30"], capsys)
    assert code == 1 and "training diverged at epoch 0 step" in err and "rsum" not in printed
    assert not (out / CHECKPOINT_NAME).exists() and _rows(out / METRICS_NAME) == []
