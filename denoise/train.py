"""Training the U-Net on simulated low-dose/reference pairs, with checkpoints, resume and curves.

One epoch is ``steps_per_epoch`` Adam steps on random patches
(``denoise.dataset.PatchSampler``); the learning rate follows a cosine from
``lr`` to ``lr_min`` over all steps.  The loss is the L1 distance in scaled
HU (``HU / 1000``) plus ``window_loss_weight`` times the L1 distance on the
W400/L40 window mapped to [0, 1], which weights soft-tissue errors as the
metric does without letting the network ignore air and bone.  ``loss="mse"``
squares both distances instead: where the input leaves the truth uncertain
(the exact course of a partial-volume edge), L1 is minimised by the
conditional median, which sharpens such edges, and the squared error by the
conditional mean, which is what PSNR scores.

After each epoch the model is validated on whole held-out slices (PSNR and
SSIM per task, on the soft-tissue window) and the output folder gets:

* ``unet-<version>-eNNN.pt`` + ``.json``: that epoch's weights and metrics;
* ``unet-<version>.pt`` + ``.json``: the best epoch so far (mean validation PSNR);
* ``state.pt``: model, optimiser, history and configuration, for ``resume``;
* ``history.json`` and ``curves.png`` (loss and validation PSNR per epoch).

Patch draws come from a generator seeded by ``(seed, epoch)``, so a run that
is resumed after an interruption sees the same data as one that was not.

**Data-parallel training.**  When ``torch.distributed`` is initialised (the
Spark launcher of ``denoise.distributed`` does it; any ``torchrun``-style
launcher will), ``train`` runs one replica per process: the model is wrapped
in ``DistributedDataParallel``, each rank draws its own ``batch_size``
patches per step from the stream of :func:`epoch_rng` ``(seed, epoch, rank)``
and DDP averages the gradients, so one step learns from
``world_size * batch_size`` patches at the same learning rate.  Rank 0 alone
simulates the pairs (the others then load them from the cache), validates and
writes every file above; the others wait for it at a barrier after each
epoch.  Every rank loads ``state.pt`` on ``resume`` (optimiser state included),
and writes ``replicas/rank-R.json`` with a SHA-256 of its parameters at the
end, so that anyone can check the replicas stayed identical.  Without a
process group nothing of this happens: one process, no DDP, the same
patches as rank 0.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoints import save_checkpoint
from .dataset import PairSet, PatchSampler, SimulationConfig, build_pair_set
from .metrics import SOFT_TISSUE, apply_window, psnr, ssim
from .infer import synchronise
from .model import UNet, UNetConfig

__all__ = ["TrainConfig", "EpochRecord", "train", "plot_history", "epoch_rng", "load_resume_state",
           "parameters_sha256"]


LOSSES = {"l1": F.l1_loss, "mse": F.mse_loss}
TRAINING_PRECISIONS = ("float32", "bfloat16")


@dataclass
class TrainConfig:
    out_dir: Path
    cache_dir: Path
    version: str = "1.0"
    model: UNetConfig = field(default_factory=UNetConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    epochs: int = 20
    steps_per_epoch: int = 200
    batch_size: int = 8
    patch_px: int = 96
    lr: float = 1e-3
    lr_min: float = 1e-5
    window_loss_weight: float = 1.0
    # "l1" or "mse": the distance of both loss terms (see the module's docstring).
    loss: str = "l1"
    # "float32", or "bfloat16": the network's forward and backward passes under autocast (weights, optimiser and
    # loss stay float32; no loss scaling is needed with bfloat16's range). Validation always runs in float32.
    precision: str = "float32"
    train_slices: int = 64
    val_slices: int = 3
    train_seed: int = 1000
    val_seed: int = 2000
    task_weights: dict[str, float] = field(default_factory=lambda: {"quarter": 0.65, "sparse": 0.35})
    seed: int = 0
    threads: int | None = None
    device: str = "cpu"
    # Start from this checkpoint's weights (fine-tuning) instead of a random init; its network must be ``model``.
    init_from: Path | None = None
    # Processes that simulate the missing slices in parallel (the data, not the training, uses them).
    simulation_workers: int = 1
    # Wall-clock seconds for all epochs (simulation excluded): steps_per_epoch is then measured to fit (train()).
    time_budget_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["out_dir"], d["cache_dir"] = str(self.out_dir), str(self.cache_dir)
        d["init_from"] = None if self.init_from is None else str(self.init_from)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        d = dict(d)
        d["out_dir"], d["cache_dir"] = Path(d["out_dir"]), Path(d["cache_dir"])
        d["init_from"] = Path(d["init_from"]) if d.get("init_from") else None
        d["model"] = UNetConfig.from_dict(d["model"])
        d["simulation"] = SimulationConfig(**d["simulation"])
        return cls(**d)

    def check(self) -> None:
        m = self.model.multiple_px
        if self.patch_px % m:
            raise ValueError(f"patch_px: expected a multiple of {m} (2**depth), got {self.patch_px}")
        for name in ("epochs", "steps_per_epoch", "batch_size", "train_slices", "val_slices"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected at least 1, got {getattr(self, name)}")
        if self.precision not in TRAINING_PRECISIONS:
            raise ValueError(f"precision: expected one of {', '.join(TRAINING_PRECISIONS)}, got {self.precision!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss: expected one of {', '.join(LOSSES)}, got {self.loss!r}")
        if not 0 < self.lr_min <= self.lr:
            raise ValueError(f"lr_min: expected 0 < lr_min <= lr ({self.lr}), got {self.lr_min}")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ValueError(f"time_budget_s: expected a positive number of seconds, got {self.time_budget_s}")


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    val: dict[str, dict[str, float]]  # task -> {"psnr_db", "ssim", "input_psnr_db"}
    lr: float
    seconds: float
    # Processes whose gradients were averaged in each step (patches per step = world_size * batch_size).
    world_size: int = 1

    @property
    def val_psnr_db(self) -> float:
        return float(np.mean([v["psnr_db"] for v in self.val.values()]))


def _loss(output: torch.Tensor, target: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    distance = LOSSES[config.loss]
    loss = distance(output, target)
    if config.window_loss_weight:
        s = config.model.hu_scale
        loss = loss + config.window_loss_weight * distance(apply_window(output * s, SOFT_TISSUE),
                                                           apply_window(target * s, SOFT_TISSUE))
    return loss


def epoch_rng(seed: int, epoch: int, rank: int = 0) -> np.random.Generator:
    """The patch generator of one rank for one epoch.

    Rank 0 uses ``(seed, epoch)``, the stream of a single-process run, so one
    process with or without a process group trains on the same patches; rank
    ``r > 0`` uses ``(seed, epoch, r)``, an independent stream.  Depending only
    on these numbers keeps resumed runs identical to uninterrupted ones.
    """
    return np.random.default_rng([seed, epoch] if rank == 0 else [seed, epoch, rank])


def _torch_seed(seed: int, epoch: int, rank: int) -> int:
    if rank == 0:
        return seed * 100_003 + epoch
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def parameters_sha256(model: torch.nn.Module) -> str:
    """SHA-256 over the model's state (names, dtypes, shapes and bytes, in order), as hex."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)};".encode())
        digest.update(value.numpy().tobytes())
    return digest.hexdigest()


def initial_weights(config: TrainConfig) -> UNet:
    """The network of ``config.init_from``, checked to be the network ``config`` trains."""
    from .checkpoints import CheckpointError, load_checkpoint

    net, meta = load_checkpoint(config.init_from)
    if not net.config.noise_level_input and config.model.noise_level_input:
        net = with_noise_level_input(net)
    if net.config.width < config.model.width:
        net = widened(net, config.model.width)
    if net.config == config.model:
        return net
    raise CheckpointError(f"init_from {Path(config.init_from).name}: expected a U-Net {config.model}, "
                          f"got {net.config}")


def with_noise_level_input(net: UNet) -> UNet:
    """The same network taking a noise-level plane, whose weights on that plane start at zero.

    It computes exactly what ``net`` computes until training gives the new
    plane weight: fine-tuning a blind checkpoint into a noise-level-aware one.
    """
    grown = UNet(dataclasses.replace(net.config, noise_level_input=True))
    state = net.state_dict()
    for name, target in grown.state_dict().items():
        if state[name].shape != target.shape:  # the first convolution: one input channel more
            state[name] = torch.cat((state[name], torch.zeros_like(target[:, state[name].shape[1]:])), dim=1)
    grown.load_state_dict(state)
    return grown


def widened(net: UNet, width: int) -> UNet:
    """The same network with ``width`` channels at its first level (and twice as many at each next one).

    Each layer keeps its channels first and gets new ones after them; a new
    channel's incoming weights are freshly initialised and every weight
    reading it starts at zero, so the wider network computes exactly what
    ``net`` computes until training puts the new channels to use (Chen et
    al.'s Net2Net, with zero-initialised outgoing weights instead of split
    copies).  Fine-tuning a trained network into a wider one costs far less
    than training the wider one from scratch.
    """
    if width < net.config.width:
        raise ValueError(f"width: expected at least the network's {net.config.width}, got {width}")
    wide = UNet(dataclasses.replace(net.config, width=width))
    old, state = net.state_dict(), wide.state_dict()
    for name, target in state.items():
        source = old[name]
        if source.shape == target.shape:
            state[name] = source
            continue
        if source.ndim == 4:
            c_in, t_in = source.shape[1], target.shape[1]
            if ".fuse.0." in name:  # reads concat(skip, reduced): each half widens on its own
                kept = [*range(c_in // 2), *range(t_in // 2, t_in // 2 + c_in // 2)]
            else:
                kept = list(range(c_in))
            reading_new = torch.ones(t_in, dtype=torch.bool)
            reading_new[kept] = False
            target[:, reading_new] = 0.0
            block = target[: source.shape[0]]
            block[:, kept] = source
        else:  # biases and normalisation parameters of the kept channels
            target[: source.shape[0]] = source
        state[name] = target
    wide.load_state_dict(state)
    return wide


def load_resume_state(config: TrainConfig, device: torch.device | str = "cpu") -> tuple[TrainConfig, dict[str, Any]]:
    """The configuration to continue with and the contents of ``out_dir/state.pt``.

    The saved configuration wins, except ``epochs`` (another total re-times
    the cosine from the saved epoch on) and the folders: the run continues in
    the ``out_dir`` its state was found in, with the ``cache_dir`` given now
    (slices are cached by simulation and seed, which the saved configuration
    fixes; a relative folder saved by another process may name another place).
    Raises ``FileNotFoundError`` without ``state.pt`` and ``ValueError`` for
    another model or too few epochs.
    """
    state_path = Path(config.out_dir) / "state.pt"
    if not state_path.is_file():
        raise FileNotFoundError(f"resume: expected {state_path} from an earlier run, got no such file")
    state = torch.load(state_path, map_location=device, weights_only=False)
    saved = TrainConfig.from_dict(state["config"])
    if saved.model != config.model:
        raise ValueError(f"resume: expected the model of the saved run {saved.model}, got {config.model}")
    if config.epochs != saved.epochs and config.epochs <= state["epoch"]:
        raise ValueError(f"resume: expected --epochs above the {state['epoch']} epochs already done, "
                         f"got {config.epochs}")
    d = saved.to_dict()
    d.update(epochs=config.epochs, out_dir=str(config.out_dir), cache_dir=str(config.cache_dir))
    return TrainConfig.from_dict(d), state


def _write_atomically(path: Path, text: str) -> None:
    """Readers (the Spark driver polls ``history.json``) see the old or the new file, never half of one."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    partial.replace(path)


def _learning_rate(config: TrainConfig, step: int) -> float:
    total = config.epochs * config.steps_per_epoch
    return config.lr_min + 0.5 * (config.lr - config.lr_min) * (1 + math.cos(math.pi * min(step, total) / total))


@torch.no_grad()
def validate(model: UNet, pairs: PairSet, device: torch.device, tasks: list[str]) -> dict[str, dict[str, float]]:
    """PSNR/SSIM (W400/L40) of the model's output and of its input, per task, over whole slices."""
    model.eval()
    out: dict[str, dict[str, float]] = {}
    s = model.config.hu_scale
    for task in tasks:
        noisy = pairs.inputs(task)
        denoised = np.stack([
            (model(torch.from_numpy(image[None, None] / s).to(device)) * s).cpu().numpy()[0, 0] for image in noisy])
        out[task] = {"psnr_db": psnr(denoised, pairs.reference), "ssim": ssim(denoised, pairs.reference),
                     "input_psnr_db": psnr(noisy, pairs.reference), "input_ssim": ssim(noisy, pairs.reference)}
    model.train()
    return out


def plot_history(history: list[EpochRecord], path: Path) -> None:
    """``curves.png``: training loss (log scale) and validation PSNR per task, per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r.epoch for r in history]
    fig, (ax_loss, ax_psnr) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r.train_loss for r in history], marker="o")
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss (L1)")
    for task in history[0].val:
        line = ax_psnr.plot(epochs, [r.val[task]["psnr_db"] for r in history], marker="o", label=f"U-Net, {task}")
        ax_psnr.axhline(history[0].val[task]["input_psnr_db"], linestyle="--", color=line[0].get_color(),
                        label=f"FBP, {task}")
    ax_psnr.set_xlabel("epoch")
    ax_psnr.set_ylabel("validation PSNR (dB, W400/L40)")
    ax_psnr.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _step(network: torch.nn.Module, optimiser: torch.optim.Optimizer, sampler: PatchSampler,
          rng: np.random.Generator, config: TrainConfig, device: torch.device) -> torch.Tensor:
    """One optimiser step on a fresh batch; returns the loss (not synchronised with the device)."""
    noise = None
    if config.model.noise_level_input:
        inputs, targets, levels = sampler.batch(config.batch_size, rng, with_noise_levels=True)
        noise = torch.from_numpy(levels).to(device)
    else:
        inputs, targets = sampler.batch(config.batch_size, rng)
    x = torch.from_numpy(inputs / config.model.hu_scale).to(device)
    y = torch.from_numpy(targets / config.model.hu_scale).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bfloat16"):
        output = network(x, noise)
    loss = _loss(output.float(), y, config)
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    optimiser.step()
    return loss


def steps_within_budget(config: TrainConfig, model: UNet, sampler: PatchSampler, val_pairs: PairSet,
                        val_tasks: list[str], device: torch.device, *, probe_steps: int = 20) -> int:
    """Steps per epoch that fit ``config.epochs`` epochs into ``config.time_budget_s`` seconds.

    Times ``probe_steps`` steps (after 3 untimed ones) on a copy of the model
    with its own optimiser and patches, and one validation; the model itself is
    left untouched, so the run that follows is the one its saved
    configuration describes.  A tenth of the budget is kept back for
    checkpoints, curves and a machine that slows down.
    """
    import copy

    probe = copy.deepcopy(model)
    optimiser = torch.optim.Adam(probe.parameters(), lr=config.lr_min)
    rng = np.random.default_rng([config.seed, 0, 1_000_003])
    for _ in range(3):
        _step(probe, optimiser, sampler, rng, config, device)
    synchronise(device)
    started = time.perf_counter()
    for _ in range(probe_steps):
        _step(probe, optimiser, sampler, rng, config, device)
    synchronise(device)
    step_s = (time.perf_counter() - started) / probe_steps
    started = time.perf_counter()
    validate(probe, val_pairs, device, val_tasks)
    val_s = time.perf_counter() - started
    per_epoch = 0.9 * config.time_budget_s / config.epochs - val_s
    return max(1, int(per_epoch / step_s))


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    on_step: Callable[[int, int, float], None] | None = None,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    on_data: Callable[[str, int, int], None] | None = None,
) -> list[EpochRecord]:
    """Train (or, with ``resume``, continue from ``out_dir/state.pt``); returns the history.

    Callbacks: ``on_step(step, total_steps, loss)``, ``on_epoch(record)``,
    ``on_data(set_name, done, total)`` while simulating the pairs.  Under an
    initialised ``torch.distributed`` process group this is one rank of a
    data-parallel run (module docstring); ``out_dir`` and ``cache_dir`` must
    then be the same folders for every rank (one machine or a shared file
    system).  Only rank 0 validates, so only its history has ``val`` results
    and only it calls ``on_epoch``.
    """
    config.check()
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if distributed else 0
    world_size = torch.distributed.get_world_size() if distributed else 1
    if distributed and config.time_budget_s is not None:
        raise ValueError("time_budget_s: expected a single-process run (ranks would measure different speeds "
                         "and disagree on the steps), got a process group")
    if config.threads:
        torch.set_num_threads(config.threads)
    device = torch.device(config.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed patch and slice shapes: pick the fastest kernels once
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "state.pt"
    history: list[EpochRecord] = []
    model = UNet(config.model).to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.lr)
    start_epoch = 1
    if resume:
        # every rank loads the file: the optimiser's moments must match on all of them, not only the weights
        config, state = load_resume_state(config, device)
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        history = [EpochRecord(**r) for r in state["history"]]
        start_epoch = state["epoch"] + 1
        del state
    elif config.init_from is not None:
        model.load_state_dict(initial_weights(config).state_dict())
    if rank == 0:
        for stale in (out / "replicas").glob("rank-*.json"):  # an earlier run's, maybe with more ranks
            stale.unlink()
        (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n", encoding="utf-8")
    # DDP broadcasts rank 0's parameters here, so replicas start equal even from different random inits
    network: torch.nn.Module = torch.nn.parallel.DistributedDataParallel(model) if distributed else model

    def progress_of(name: str) -> Callable[[int, int], None] | None:
        return (lambda done, total: on_data(name, done, total)) if on_data else None

    if rank != 0:
        torch.distributed.barrier()  # rank 0 simulates missing slices; two writers of one cache file would race
    train_pairs = build_pair_set(config.cache_dir, config.train_seed, config.train_slices, config.simulation,
                                 workers=config.simulation_workers, device=config.device,
                                 progress=progress_of("training slices"))
    if rank == 0:
        val_pairs = build_pair_set(config.cache_dir, config.val_seed, config.val_slices, config.simulation,
                                   workers=config.simulation_workers, device=config.device,
                                   progress=progress_of("validation slices"))
        if distributed:
            torch.distributed.barrier()
    sampler = PatchSampler(train_pairs, config.patch_px, config.task_weights,
                           gaussian_sigma_hu=config.simulation.gaussian_sigma_8bit / 255.0 * 400.0)
    val_tasks = [t for t in ("quarter", "sparse") if config.task_weights.get(t, 0) > 0] or ["quarter"]
    if config.time_budget_s is not None and not resume:
        config = dataclasses.replace(config, steps_per_epoch=steps_within_budget(
            config, model, sampler, val_pairs, val_tasks, device))
        (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n", encoding="utf-8")
    total_steps = config.epochs * config.steps_per_epoch
    best = max((r.val_psnr_db for r in history), default=-math.inf)
    model.train()
    for epoch in range(start_epoch, config.epochs + 1):
        started = time.perf_counter()
        rng = epoch_rng(config.seed, epoch, rank)
        torch.manual_seed(_torch_seed(config.seed, epoch, rank))
        losses = []
        for i in range(config.steps_per_epoch):
            step = (epoch - 1) * config.steps_per_epoch + i
            lr = _learning_rate(config, step)
            for group in optimiser.param_groups:
                group["lr"] = lr
            losses.append(_step(network, optimiser, sampler, rng, config, device).item())
            if on_step:
                on_step(step + 1, total_steps, losses[-1])
        train_loss = float(np.mean(losses))
        if distributed:  # the mean over every rank's patches, not rank 0's alone
            total = torch.tensor([train_loss], dtype=torch.float64, device=device)
            torch.distributed.all_reduce(total)
            train_loss = float(total.item()) / world_size
        if rank != 0:
            # rank 0 validates and writes; waiting here keeps every rank on the same epoch
            history.append(EpochRecord(epoch, train_loss, {}, lr, time.perf_counter() - started, world_size))
            torch.distributed.barrier()
            continue
        record = EpochRecord(epoch, train_loss, validate(model, val_pairs, device, val_tasks), lr,
                             time.perf_counter() - started, world_size)
        history.append(record)
        metrics = {"epoch": epoch, "val": record.val, "val_psnr_db": record.val_psnr_db, "train_loss": record.train_loss}
        training = {"config": config.to_dict(), "epoch": epoch, "steps": epoch * config.steps_per_epoch,
                    "world_size": world_size, "patches_per_step": world_size * config.batch_size}
        save_checkpoint(out / f"unet-{config.version}-e{epoch:03d}.pt", model, version=config.version,
                        metrics=metrics, training=training)
        if record.val_psnr_db > best:
            best = record.val_psnr_db
            save_checkpoint(out / f"unet-{config.version}.pt", model, version=config.version, metrics=metrics,
                            training=training)
        torch.save({"config": config.to_dict(), "model": model.state_dict(), "optimiser": optimiser.state_dict(),
                    "history": [asdict(r) for r in history], "epoch": epoch}, state_path.with_suffix(".partial"))
        state_path.with_suffix(".partial").replace(state_path)
        _write_atomically(out / "history.json", json.dumps([asdict(r) for r in history], indent=2) + "\n")
        plot_history(history, out / "curves.png")
        if on_epoch:
            on_epoch(record)
        if distributed:
            torch.distributed.barrier()
    if distributed:
        replicas = out / "replicas"
        replicas.mkdir(exist_ok=True)
        _write_atomically(replicas / f"rank-{rank}.json", json.dumps(
            {"rank": rank, "world_size": world_size, "epoch": config.epochs,
             "parameters_sha256": parameters_sha256(model)}) + "\n")
    return history
