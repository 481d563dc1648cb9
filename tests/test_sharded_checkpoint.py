"""Checkpoints of runs over several processes (gloo, CPU): each rank's bank rows in its own file, a resumption
with another number of processes of the same global batch, and damaged or foreign files."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip("tqdm", reason="tqdm (the `train` extra) is not installed: scripts/setup_data.sh installs it")

from fne_fast.cli import main  # noqa: E402
from fne_fast.runs.artifacts import CHECKPOINT_NAME, METRICS_NAME  # noqa: E402
from fne_fast.runs.checkpoint import read_checkpoint  # noqa: E402
from fne_fast.runs.shards import SHARDS_DIRECTORY  # noqa: E402
from runs import synthetic_splits, write_feature_arrays  # noqa: E402

BANK_SIZE, JOINT_DIM = 6144, 16
COMPARED = ("loss", "fallback_rate", "fn_rate", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted 1 × 48 run of 3 epochs, and 2 epochs of 2 processes × 24."""
    root = tmp_path_factory.mktemp("sharded")
    write_feature_arrays(root / "features", synthetic_splits())
    common = ["train", "--dataset", "features", "--features-dir", str(root / "features"), "--bank-size",
              str(BANK_SIZE), "--joint-dim", str(JOINT_DIM), "--hidden-dim", "32", "--min-count", "5", "--seed", "3",
              "--quiet", "--no-plots"]
    assert main([*common, "--batch-size", "48", "--epochs", "3", "--out", str(root / "one")]) == 0
    _torchrun(2, [*common, "--batch-size", "24", "--epochs", "2", "--out", str(root / "two")])
    return root, common


def _torchrun(processes, arguments):
    launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                               str(processes), "-m", "fne_fast.cli", *arguments], capture_output=True, text=True,
                              timeout=300)
    assert launched.returncode == 0, launched.stderr[-3000:]
    return launched


def _metrics(folder):
    with open(folder / METRICS_NAME) as stream:
        return [json.loads(line) for line in stream]


def _assert_same_run(folder, reference):
    resumed, uninterrupted = _metrics(folder), _metrics(reference)
    assert len(resumed) == len(uninterrupted) == 3
    for got, wanted in zip(resumed, uninterrupted):
        for key in COMPARED:
            assert got[key] == pytest.approx(wanted[key], rel=1e-6, abs=1e-12), (got["epoch"], key)


def test_each_rank_writes_its_own_rows_and_the_checkpoint_names_them(runs):
    root, _ = runs
    state = read_checkpoint(str(root / "two" / CHECKPOINT_NAME))
    for name in ("image_bank", "text_bank"):
        shards = state[name]["shards"]
        assert [shard["rows"] for shard in shards] == [[0, BANK_SIZE // 2], [BANK_SIZE // 2, BANK_SIZE]]
        for rank, shard in enumerate(shards):
            rows = read_checkpoint(str(root / "two" / shard["file"]), shard["sha256"])["banks"]
            assert set(rows) == {"image_bank", "text_bank"}  # the file holds this rank's rows of both banks only
            assert rows[name]["features"].shape == (BANK_SIZE // 2, JOINT_DIM)
            assert rows[name]["rows"] == shard["rows"]
    assert not any(isinstance(value, torch.Tensor) and value.shape[0] >= BANK_SIZE // 2
                   for bank in (state["image_bank"], state["text_bank"]) for value in bank.values())
    # The previous checkpoint's files are kept beside the latest's, no others.
    files = sorted(path.name for path in (root / "two" / SHARDS_DIRECTORY).iterdir())
    assert len(files) == 4 and all("of2" in name for name in files)


@pytest.mark.parametrize("processes,batch", [(3, 16), (1, 48)])
def test_a_run_of_two_processes_resumes_with_another_number_of_processes(runs, processes, batch):
    root, common = runs
    folder = root / f"resumed-{processes}"
    shutil.copytree(root / "two", folder)
    arguments = [*common, "--batch-size", str(batch), "--epochs", "3", "--out", str(folder), "--resume"]
    if processes == 1:
        assert main(arguments) == 0
    else:
        _torchrun(processes, arguments)
    _assert_same_run(folder, root / "one")
    files = {path.name for path in (folder / SHARDS_DIRECTORY).iterdir()}
    if processes > 1:  # the new checkpoint's files are the new processes' own
        named = read_checkpoint(str(folder / CHECKPOINT_NAME))["image_bank"]["shards"]
        assert {shard["file"].split("/")[-1] for shard in named} <= files
        assert all(shard["file"].endswith(f"of{processes}.safetensors") for shard in named)


def _latest_shard(folder, rank):
    state = read_checkpoint(str(folder / CHECKPOINT_NAME))
    return folder / state["image_bank"]["shards"][rank]["file"]


def test_a_damaged_shard_file_falls_back_to_the_previous_checkpoint_on_every_rank(runs):
    root, common = runs
    folder = root / "damaged"
    shutil.copytree(root / "two", folder)
    damaged = _latest_shard(folder, 1)
    data = bytearray(damaged.read_bytes())
    data[-5] ^= 0xFF  # a byte of the rows
    damaged.write_bytes(bytes(data))
    launched = _torchrun(2, [*common, "--batch-size", "24", "--epochs", "3", "--out", str(folder), "--resume"])
    assert "does not match its SHA-256" in launched.stderr and "using the previous checkpoint" in launched.stderr
    _assert_same_run(folder, root / "one")  # the second epoch was trained again from the first's checkpoint


def test_a_foreign_shard_file_is_refused(runs, capsys):
    root, common = runs
    folder = root / "foreign"
    shutil.copytree(root / "two", folder)
    latest = _latest_shard(folder, 0)
    previous = read_checkpoint(str(folder / "checkpoint.previous.safetensors"))["image_bank"]["shards"][0]["file"]
    shutil.copyfile(folder / previous, latest)  # a complete, verified file, but not the one the checkpoint names
    assert main([*common, "--batch-size", "48", "--epochs", "3", "--out", str(folder), "--resume"]) == 0
    warning = capsys.readouterr().err
    assert "not the file the checkpoint names" in warning and "using the previous checkpoint" in warning
    _assert_same_run(folder, root / "one")


def test_a_run_killed_while_publishing_a_sharded_checkpoint_resumes_from_the_last_one(runs):
    """Rank 0 is SIGKILLed after every rank wrote its file of the second checkpoint and rank 0 wrote the new
    checkpoint's temporary file, before it replaced the first: the first checkpoint and its files are intact, and
    the resumed run ends as the uninterrupted one."""
    import os

    root, common = runs
    folder = root / "killed"
    arguments = [*common, "--batch-size", "24", "--epochs", "3", "--out", str(folder)]
    environment = dict(os.environ, FNE_FAST_TEST_HOOK="checkpoint-temp-written:2:SIGKILL")
    killed = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "fne_fast.cli", *arguments], capture_output=True, text=True, timeout=300,
                            env=environment)
    assert killed.returncode != 0
    state = read_checkpoint(str(folder / CHECKPOINT_NAME))
    assert state["next_epoch"] == 1
    for shard in state["image_bank"]["shards"]:  # the files the surviving checkpoint names are still there
        read_checkpoint(str(folder / shard["file"]), shard["sha256"])
    _torchrun(2, [*arguments, "--resume"])
    _assert_same_run(folder, root / "one")
