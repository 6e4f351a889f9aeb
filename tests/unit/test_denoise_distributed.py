"""Data-parallel U-Net training on Spark ``local[2]``: two ranks, averaged gradients, rank 0's files, resume.

Each TorchDistributor run costs ~15 s on 2 cores (Python workers, torchrun and
torch imports per rank), so one test trains an epoch and resumes it to a
second, and checks the second against an in-process emulation of two ranks.
"""

from __future__ import annotations

import copy
import json
import socket

import numpy as np
import pytest
from typer.testing import CliRunner

torch = pytest.importorskip("torch")
pytest.importorskip("pyspark")

from denoise.dataset import PatchSampler, SimulationConfig, build_pair_set  # noqa: E402
from denoise.distributed import rank_errors, train_on_spark, train_rank  # noqa: E402
from denoise.model import UNet, UNetConfig  # noqa: E402
from denoise.train import TrainConfig, _learning_rate, _loss, epoch_rng, parameters_sha256, train  # noqa: E402
from pacs.cli.main import app  # noqa: E402
from pacs.errors import SparkUnavailable  # noqa: E402

MASTER = "local[2]"
runner = CliRunner()


def _config(tmp_path, epochs: int) -> TrainConfig:
    return TrainConfig(out_dir=tmp_path / "run", cache_dir=tmp_path / "cache", version="d",
                       model=UNetConfig(width=4, depth=2),
                       simulation=SimulationConfig(size_px=64, pixel_mm=5.6, n_views=64),
                       epochs=epochs, steps_per_epoch=3, batch_size=2, patch_px=48, train_slices=2, val_slices=1)


def _emulate_epoch(state: dict, epochs: int, epoch: int, ranks: list[int]) -> tuple[dict, float]:
    """One epoch from ``state`` in this process, each step on the patches of ``ranks`` in one batch.

    The loss is a mean over patches, so the gradient of the joined batch is the
    mean of the ranks' gradients: what DDP computes with one batch per rank.
    Returns the weights and the mean loss.
    """
    config = TrainConfig.from_dict({**state["config"], "epochs": epochs})
    pairs = build_pair_set(config.cache_dir, config.train_seed, config.train_slices, config.simulation)
    sampler = PatchSampler(pairs, config.patch_px, config.task_weights,
                           gaussian_sigma_hu=config.simulation.gaussian_sigma_8bit / 255.0 * 400.0)
    model = UNet(config.model)
    model.load_state_dict(state["model"])
    optimiser = torch.optim.Adam(model.parameters(), lr=config.lr)
    optimiser.load_state_dict(copy.deepcopy(state["optimiser"]))  # Adam would update the caller's tensors in place
    rngs = [epoch_rng(config.seed, epoch, rank) for rank in ranks]
    scale = config.model.hu_scale
    losses = []
    for i in range(config.steps_per_epoch):
        for group in optimiser.param_groups:
            group["lr"] = _learning_rate(config, (epoch - 1) * config.steps_per_epoch + i)
        batches = [sampler.batch(config.batch_size, rng) for rng in rngs]
        x = torch.from_numpy(np.concatenate([b[0] for b in batches]) / scale)
        y = torch.from_numpy(np.concatenate([b[1] for b in batches]) / scale)
        loss = _loss(model(x), y, config)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    return model.state_dict(), float(np.mean(losses))


def _replicas(out) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "replicas").glob("rank-*.json"))]


@pytest.mark.spark
def test_two_ranks_average_gradients_write_once_and_resume(spark, tmp_path):
    out = tmp_path / "run"
    reported: list[int] = []
    history = train_on_spark(_config(tmp_path, epochs=1), 2, master=MASTER,
                             on_epoch=lambda record: reported.append(record.epoch))
    assert [(r.epoch, r.world_size) for r in history] == [(1, 2)] and "quarter" in history[0].val
    assert reported == [1]  # the driver's progress, polled from history.json
    first = _replicas(out)
    assert [(r["rank"], r["world_size"], r["epoch"]) for r in first] == [(0, 2, 1), (1, 2, 1)]
    assert first[0]["parameters_sha256"] == first[1]["parameters_sha256"]
    after_one = torch.load(out / "state.pt", weights_only=False)  # the second run replaces the file

    history = train_on_spark(_config(tmp_path, epochs=2), 2, master=MASTER, resume=True,
                             on_epoch=lambda record: reported.append(record.epoch))
    assert [(r.epoch, r.world_size) for r in history] == [(1, 2), (2, 2)] and reported == [1, 2]
    assert {"unet-d.pt", "unet-d-e001.pt", "unet-d-e002.pt", "unet-d-e002.json", "state.pt", "history.json",
            "curves.png"} <= {p.name for p in out.iterdir()}
    assert [r["world_size"] for r in json.loads((out / "history.json").read_text())] == [2, 2]
    training = json.loads((out / "unet-d-e002.json").read_text())["training"]
    assert (training["world_size"], training["patches_per_step"], training["epoch"]) == (2, 4, 2)

    final = torch.load(out / "state.pt", weights_only=False)
    model = UNet(UNetConfig(width=4, depth=2))
    model.load_state_dict(final["model"])
    replicas = _replicas(out)
    assert [(r["rank"], r["world_size"], r["epoch"]) for r in replicas] == [(0, 2, 2), (1, 2, 2)]
    assert replicas[0]["parameters_sha256"] == replicas[1]["parameters_sha256"] == parameters_sha256(model)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the tasks (spark.task.cpus = 1)
    try:
        both, both_loss = _emulate_epoch(after_one, 2, 2, [0, 1])
        rank0_only, _ = _emulate_epoch(after_one, 2, 2, [0])
    finally:
        torch.set_num_threads(threads)
    moved = max((final["model"][k] - after_one["model"][k]).abs().max().item() for k in both)
    assert moved > 1e-4  # the resumed epoch trained
    for name, weights in both.items():
        torch.testing.assert_close(final["model"][name], weights, rtol=0, atol=1e-6)
    assert max((final["model"][k] - rank0_only[k]).abs().max().item() for k in both) > 1e-5  # rank 1's patches counted
    assert history[1].train_loss == pytest.approx(both_loss, rel=1e-5)  # the mean over both ranks' patches


@pytest.mark.spark
def test_too_many_processes_and_nothing_to_resume_fail_before_training(spark, tmp_path):
    with pytest.raises(ValueError, match=r"expected at most 2 \(the task slots of local\[2\]"):
        train_on_spark(_config(tmp_path, epochs=1), 3, master=MASTER)
    with pytest.raises(FileNotFoundError, match="state.pt"):
        train_on_spark(_config(tmp_path, epochs=1), 2, master=MASTER, resume=True)
    assert not (tmp_path / "run" / "history.json").exists()


def test_cli_spark_options_fail_clearly(tmp_path):
    common = ["denoise", "train", "--out-dir", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache")]
    for args, code, message in [
        (["--spark-processes", "2", "--master", "sparky://h:1"], 1, "Spark master: expected"),
        (["--spark-processes", "2", "--master", "spark://127.0.0.1:9"], 1, "no Spark master answers"),
        (["--master", "local[2]"], 2, "expected --master only with --spark-processes"),
        (["--spark-processes", "2", "--threads", "2"], 2, "expected --threads only without --spark-processes"),
        (["--spark-processes", "0"], 2, "--spark-processes"),
    ]:
        result = runner.invoke(app, [*common, *args])
        text = " ".join(result.output.replace("│", " ").split())  # rich wraps lines, usage errors in a box
        assert result.exit_code == code and message in text, (args, result.output)
        if code == 1:
            assert "error:" in text
    assert not (tmp_path / "cache").exists()  # nothing simulated before the master was checked
    help_text = " ".join(runner.invoke(app, ["denoise", "train", "--help"]).output.split())
    assert "--spark-processes" in help_text and "--master" in help_text


def test_bad_master_is_rejected_by_the_library(tmp_path):
    with pytest.raises(ValueError, match="Spark master: expected"):
        train_on_spark(_config(tmp_path, epochs=1), 2, master="sparky://h:1")
    with pytest.raises(SparkUnavailable):
        train_on_spark(_config(tmp_path, epochs=1), 2, master="spark://127.0.0.1:9")
    with pytest.raises(ValueError, match="processes: expected a positive"):
        train_on_spark(_config(tmp_path, epochs=1), 0, master=MASTER)


@pytest.fixture
def one_rank_group(monkeypatch):
    """The environment torchrun gives a world of one process, on a free port of this machine."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for name, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
                        "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value)


def test_one_rank_under_a_process_group_trains_like_a_plain_run(tmp_path, one_rank_group):
    """Rank 0 draws a single process's patches; DDP over one rank changes nothing else."""
    plain_config = _config(tmp_path / "plain", epochs=1)
    plain_config.cache_dir = tmp_path / "cache"
    torch.manual_seed(7)
    train(plain_config)
    config = _config(tmp_path / "ranked", epochs=1)
    config.cache_dir = tmp_path / "cache"
    torch.manual_seed(7)  # the same initial weights
    history = train_rank(config.to_dict(), False)
    assert not torch.distributed.is_initialized()
    assert [(r["epoch"], r["world_size"]) for r in history] == [(1, 1)]
    plain = torch.load(plain_config.out_dir / "state.pt", weights_only=False)["model"]
    ranked = torch.load(config.out_dir / "state.pt", weights_only=False)["model"]
    assert all(torch.equal(plain[name], ranked[name]) for name in plain)
    assert [r["world_size"] for r in _replicas(config.out_dir)] == [1]
    assert not (plain_config.out_dir / "replicas").exists()  # nothing of the distributed path without a group


def test_a_failing_rank_leaves_its_error_for_the_driver(tmp_path, one_rank_group):
    config = _config(tmp_path, epochs=1)
    config.patch_px = 96  # larger than the 64-pixel slices: found only when the rank builds its sampler
    with pytest.raises(ValueError, match="patch_px"):
        train_rank(config.to_dict(), False)
    assert not torch.distributed.is_initialized()
    assert rank_errors(config.out_dir) == ["rank 0: ValueError: patch_px: expected 8 to 64, got 96"]
