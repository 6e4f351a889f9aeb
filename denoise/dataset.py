"""Training and validation pairs: simulated once, cached as ``.npz``, cut into patches on the fly.

Each slice of a set (``denoise.phantoms.random_slices``-style, one seed per
set, so training, validation and test never share a slice) is stored as
``<cache>/<set key>/slice-NNNN.npz`` with float32 HU arrays:

* ``reference`` - the noiseless FBP (384 views, Hamming ramp),
* ``quarter``   - the quarter-dose FBP (projection-domain Poisson, binomial thinning of I0 = 5e5),
* ``sparse``    - a sparse-view FBP (``sparse_views`` views, full-dose noise), and ``sparse_views``.

Five options widen the training distribution beyond one dose of textureless
phantoms (all off by default, so the benchmark's test set stays what it
was):

* ``dose_range = (lo, hi)``: each slice's incident count is ``i0`` times a
  factor drawn log-uniformly in ``[lo, hi]`` (stored as ``i0``), so the
  network sees noise from several times the nominal quarter dose down to
  almost none, and learns to leave a nearly clean image alone;
* ``grain_fraction``: that fraction of the slices get, as their ground
  truth, a full-dose scan of the phantom (I0 log-uniform in 1e5 to 2e6, a
  ramp window drawn among ``GRAIN_WINDOWS``) instead of the phantom itself.
  A real CT image carries the grain of the scan that made it; re-simulating
  a low dose from it (what the benchmark does with real slices) then asks the
  denoiser to remove the new noise and keep the old grain.  A network trained
  on textureless phantoms alone takes that grain for noise and wipes it out;
* ``extras_fraction``: that fraction of the phantoms are drawn with
  ``random_slice(extras=True)``: anatomy crossing the edge of the field of
  view, a head holder, denser bone with sharper edges, fine texture;
* ``variety_fraction``: that fraction of the phantoms are drawn with
  ``random_slice(variety=True)``: a power-law texture through all tissue
  and edges from sharp to 2 pixels of blur;
* ``dead_leaves_fraction``: that fraction of the slices are
  ``phantoms.dead_leaves_slice`` images (random occluding shapes of every
  size in CT values) instead of anatomy-like phantoms;
  ``dead_leaves_edge_px`` > 0 gives each leaf an edge ramp up to that wide
  (the partial volume of thick slices); ``dead_leaves_rim_fraction`` gives
  that fraction of the leaves a thin layer of another value inside their
  outline (skin over fat, fluid between skull and brain);
* ``head_layers_fraction``: that fraction of the anatomy phantoms have, if
  they are heads, fluid and grey matter under the skull
  (``random_slice(head_layers=True)``);
* ``sharp_kernel_fraction``: that fraction of the ground truths (anatomy
  and dead leaves alike) ring along every edge as a scanner's sharp
  reconstruction kernel leaves them (``phantoms.sharp_kernel``): real
  slices used as references carry that ringing, bright and dark bands a
  pixel or two wide along each bone;
* ``phantom_edge_blur_px`` > 0: the phantoms' edge blur is drawn from 0.3 to
  that many pixels instead of 0.3-0.7 (0.0-0.7 with extras, 0-2 with variety).

The FBP is the expensive part (~4 s a slice on one core), so a slice is
simulated once and every epoch re-uses it.  A set is built incrementally: an
interrupted build continues where it stopped.  The image-domain Gaussian
task needs no cache (noise is added to ``reference`` per patch).
"""

from __future__ import annotations

import hashlib
import json
import math
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import numpy as np

from . import phantoms, simulate

__all__ = ["TASKS", "SimulationConfig", "PairSet", "simulate_pair_set", "build_pair_set", "PatchSampler"]

TASKS = ("quarter", "sparse", "gaussian")
GRAIN_WINDOWS = ("ram-lak", "shepp-logan", "cosine", "hamming", "hann")
GRAIN_I0 = (1e5, 2e6)
# Options added after sets were cached: left out of the cache key at their defaults, so old caches stay valid.
_KEYED_ONLY_WHEN_SET = ("dose_range", "grain_fraction", "extras_fraction", "variety_fraction",
                        "dead_leaves_fraction", "dead_leaves_edge_px", "phantom_edge_blur_px",
                        "dead_leaves_rim_fraction", "head_layers_fraction", "sharp_kernel_fraction")


@dataclass(frozen=True)
class SimulationConfig:
    """How a set of pairs is simulated (part of the cache key)."""

    size_px: int = 512
    pixel_mm: float = 0.7
    i0: float = simulate.DEFAULT_I0
    dose_fraction: float = 0.25
    n_views: int = simulate.DEFAULT_VIEWS
    filter: str = simulate.DEFAULT_FILTER
    sparse_views_min: int = 50
    sparse_views_max: int = 150
    gaussian_sigma_8bit: float = 30.0
    dose_range: tuple[float, float] = (1.0, 1.0)
    grain_fraction: float = 0.0
    extras_fraction: float = 0.0
    variety_fraction: float = 0.0
    dead_leaves_fraction: float = 0.0
    dead_leaves_edge_px: float = 0.0
    phantom_edge_blur_px: float = 0.0  # 0: the phantoms' own edge blur (0.3-0.7 px)
    dead_leaves_rim_fraction: float = 0.0
    head_layers_fraction: float = 0.0
    sharp_kernel_fraction: float = 0.0

    def __post_init__(self) -> None:
        lo, hi = (float(v) for v in self.dose_range)
        if not (0 < lo <= hi and math.isfinite(hi)):
            raise ValueError(f"dose_range: expected factors 0 < lo <= hi, got {self.dose_range}")
        object.__setattr__(self, "dose_range", (lo, hi))  # a list, when read back from JSON
        for name in ("grain_fraction", "extras_fraction", "variety_fraction", "dead_leaves_fraction",
                     "dead_leaves_rim_fraction", "head_layers_fraction", "sharp_kernel_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}: expected a fraction in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.dead_leaves_edge_px <= self.size_px / 8:
            raise ValueError(f"dead_leaves_edge_px: expected 0 to {self.size_px / 8:g} pixels, "
                             f"got {self.dead_leaves_edge_px}")
        if self.phantom_edge_blur_px and not 0.3 <= self.phantom_edge_blur_px <= self.size_px / 16:
            raise ValueError(f"phantom_edge_blur_px: expected 0 (the phantoms' own) or 0.3 to "
                             f"{self.size_px / 16:g} pixels, got {self.phantom_edge_blur_px}")

    def key(self, seed: int) -> str:
        defaults = {f.name: f.default for f in fields(self)}
        values = {k: v for k, v in asdict(self).items() if k not in _KEYED_ONLY_WHEN_SET or v != defaults[k]}
        text = json.dumps({**values, "seed": seed}, sort_keys=True)
        return f"seed{seed}-{self.size_px}px-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


@dataclass
class PairSet:
    """Stacked arrays ``[N, H, W]`` float32 HU."""

    reference: np.ndarray
    quarter: np.ndarray
    sparse: np.ndarray
    sparse_views: np.ndarray

    def __len__(self) -> int:
        return len(self.reference)

    def inputs(self, task: str) -> np.ndarray:
        if task not in ("quarter", "sparse"):
            raise ValueError(f"task: expected 'quarter' or 'sparse' (cached tasks), got {task!r}")
        return getattr(self, task)


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return lo if lo == hi else float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def simulate_slice(hu: np.ndarray, config: SimulationConfig, rng: np.random.Generator,
                   device: str = "cpu") -> dict[str, np.ndarray]:
    """The cached arrays of one ground-truth slice (see the module docstring).

    With the default options the generator is drawn from exactly as before
    the options existed, so cached sets and the benchmark's test set stay valid.
    Projections and FBPs run on ``device`` (the noise is drawn on the CPU either way).
    """
    i0 = config.i0
    if config.dose_range != (1.0, 1.0):
        i0 *= _log_uniform(rng, *config.dose_range)
    if config.grain_fraction and rng.random() < config.grain_fraction:
        window = GRAIN_WINDOWS[int(rng.integers(len(GRAIN_WINDOWS)))]
        hu = simulate.sparse_view(hu, config.n_views, pixel_mm=config.pixel_mm, i0=_log_uniform(rng, *GRAIN_I0),
                                  filter=window, rng=rng, device=device)
    pair = simulate.low_dose_pair(hu, pixel_mm=config.pixel_mm, i0=i0, dose_fractions=(config.dose_fraction,),
                                  n_views=config.n_views, filter=config.filter, rng=rng, device=device)
    views = int(rng.integers(config.sparse_views_min, config.sparse_views_max + 1))
    sparse = simulate.sparse_view(hu, views, pixel_mm=config.pixel_mm, i0=i0, filter=config.filter, rng=rng,
                                  device=device)
    return {"reference": pair["clean"], "quarter": pair[f"dose-{config.dose_fraction:g}"], "sparse": sparse,
            "sparse_views": np.array(views), "truth": hu, "i0": np.array(i0)}


def _simulate_to(path: Path, seed: int, index: int, config: SimulationConfig, shepp_logan: bool,
                 device: str = "cpu") -> None:
    """Simulate slice ``index`` of the set ``seed`` into ``path`` (whole or not at all)."""
    rng = np.random.default_rng([seed, index])
    extras = bool(config.extras_fraction) and rng.random() < config.extras_fraction
    variety = bool(config.variety_fraction) and rng.random() < config.variety_fraction
    leaves = bool(config.dead_leaves_fraction) and rng.random() < config.dead_leaves_fraction
    layers = bool(config.head_layers_fraction) and rng.random() < config.head_layers_fraction
    sharp = bool(config.sharp_kernel_fraction) and rng.random() < config.sharp_kernel_fraction
    if shepp_logan:
        hu = phantoms.shepp_logan_hu(config.size_px)
    elif leaves:
        hu = phantoms.dead_leaves_slice(rng, config.size_px, edge_px=config.dead_leaves_edge_px,
                                         rim_fraction=config.dead_leaves_rim_fraction)
    else:
        hu = phantoms.random_slice(rng, config.size_px, extras=extras, variety=variety,
                                   edge_blur_px=config.phantom_edge_blur_px or None, head_layers=layers)
    if sharp and not shepp_logan:
        hu = phantoms.sharp_kernel(hu, rng)
    data = simulate_slice(hu, config, rng, device)
    partial = path.with_suffix(".tmp.npz")
    np.savez(partial, **data)
    partial.replace(path)  # a slice is either wholly there or absent


def _simulate_in_worker(path: Path, seed: int, index: int, config: SimulationConfig, shepp_logan: bool,
                        device: str = "cpu") -> int:
    import torch

    torch.set_num_threads(1)  # one worker per core: the workers are the parallelism
    _simulate_to(path, seed, index, config, shepp_logan, device)
    return index


def simulate_pair_set(cache_dir: Path, seed: int, count: int, config: SimulationConfig = SimulationConfig(), *,
                      include_shepp_logan: bool = False, workers: int = 1, device: str = "cpu",
                      progress: Callable[[int, int], None] | None = None) -> list[Path]:
    """Simulate the slices of the set ``seed`` missing from the cache; returns the ``count`` slice files.

    Slice ``i`` is drawn from its own generator seeded ``(seed, i)``, so a
    larger set extends a smaller one and the slices do not depend on
    ``workers`` (processes simulating missing slices in parallel, one torch
    thread each).  ``include_shepp_logan`` makes slice 0 the Shepp-Logan head
    (for test sets).  ``device`` runs the projections and FBPs (``"cuda"``:
    then the phantoms, drawn on the CPU, are what takes the time, and
    ``workers`` processes share the GPU).
    """
    if count < 1:
        raise ValueError(f"count: expected at least 1 slice, got {count}")
    if workers < 1:
        raise ValueError(f"workers: expected at least 1 process, got {workers}")
    folder = Path(cache_dir) / (config.key(seed) + ("-sl" if include_shepp_logan else ""))
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"slice-{i:04d}.npz" for i in range(count)]
    missing = [i for i, path in enumerate(paths) if not path.exists()]
    done = count - len(missing)
    if missing and workers > 1:
        import multiprocessing

        # spawn, not fork: a forked child of a process whose torch thread pool is running can deadlock
        with ProcessPoolExecutor(min(workers, len(missing)), mp_context=multiprocessing.get_context("spawn")) as pool:
            jobs = [pool.submit(_simulate_in_worker, paths[i], seed, i, config, include_shepp_logan and i == 0,
                                device) for i in missing]
            for job in as_completed(jobs):
                job.result()
                done += 1
                if progress is not None:
                    progress(done, count)
    else:
        for i in missing:
            _simulate_to(paths[i], seed, i, config, include_shepp_logan and i == 0, device)
            done += 1
            if progress is not None:
                progress(done, count)
    return paths


def build_pair_set(cache_dir: Path, seed: int, count: int, config: SimulationConfig = SimulationConfig(), *,
                   include_shepp_logan: bool = False, workers: int = 1, device: str = "cpu",
                   progress: Callable[[int, int], None] | None = None) -> PairSet:
    """The ``count`` slices of the set ``seed``, simulated where missing (``simulate_pair_set``), in memory."""
    paths = simulate_pair_set(cache_dir, seed, count, config, include_shepp_logan=include_shepp_logan,
                              workers=workers, device=device, progress=progress)
    arrays: dict[str, list[np.ndarray]] = {"reference": [], "quarter": [], "sparse": [], "sparse_views": []}
    for path in paths:
        with np.load(path) as data:
            for name in arrays:
                arrays[name].append(data[name])
    return PairSet(**{name: np.stack(values) for name, values in arrays.items()})


class PatchSampler:
    """Random training patches ``(inputs, targets)``, each ``[B, 1, P, P]`` float32 HU.

    A patch's task is drawn with ``task_weights``; its slice and position
    uniformly, re-drawn (up to 8 times) while more than 70 % of the reference
    patch is air, so batches are mostly anatomy; then a random flip and
    90-degree rotation (FBP noise and streaks have no preferred direction).
    """

    def __init__(self, pairs: PairSet, patch_px: int, task_weights: dict[str, float],
                 gaussian_sigma_hu: float = 30.0 / 255.0 * 400.0) -> None:
        size = pairs.reference.shape[-1]
        if not 8 <= patch_px <= size:
            raise ValueError(f"patch_px: expected 8 to {size}, got {patch_px}")
        unknown = set(task_weights) - set(TASKS)
        if unknown:
            raise ValueError(f"task_weights: expected tasks among {', '.join(TASKS)}, got {sorted(unknown)}")
        total = sum(task_weights.values())
        if not total > 0:
            raise ValueError(f"task_weights: expected a positive total weight, got {task_weights}")
        self.pairs = pairs
        self.patch_px = patch_px
        self.tasks = [t for t in TASKS if task_weights.get(t, 0) > 0]
        self.probabilities = np.array([task_weights[t] for t in self.tasks]) / total
        self.gaussian_sigma_hu = gaussian_sigma_hu
        self._levels: dict[str, np.ndarray] = {}

    def noise_levels(self, task: str) -> np.ndarray:
        """``[N]``: each slice's noise level in HU for ``task`` (``denoise.model.estimate_noise_hu``), once."""
        if task not in self._levels:
            if task == "gaussian":  # white noise of a known sigma, added per patch
                self._levels[task] = np.full(len(self.pairs), self.gaussian_sigma_hu, np.float32)
            else:
                import torch

                from .model import estimate_noise_hu

                slices = torch.from_numpy(self.pairs.inputs(task))[:, None]
                self._levels[task] = estimate_noise_hu(slices).numpy().astype(np.float32)
        return self._levels[task]

    def batch(self, batch_size: int, rng: np.random.Generator, *,
              with_noise_levels: bool = False) -> tuple[np.ndarray, ...]:
        """``(inputs, targets)``, and with ``with_noise_levels`` each patch's slice noise level ``[B]`` (HU)."""
        p = self.patch_px
        size = self.pairs.reference.shape[-1]
        inputs = np.empty((batch_size, 1, p, p), np.float32)
        targets = np.empty_like(inputs)
        levels = np.empty(batch_size, np.float32)
        for b in range(batch_size):
            task = self.tasks[int(rng.choice(len(self.tasks), p=self.probabilities))]
            for _attempt in range(8):
                i = int(rng.integers(len(self.pairs)))
                r, c = (int(v) for v in rng.integers(0, size - p + 1, size=2))
                target = self.pairs.reference[i, r : r + p, c : c + p]
                if (target < -900).mean() <= 0.7:
                    break
            if task == "gaussian":
                source = target + rng.normal(0.0, self.gaussian_sigma_hu, target.shape).astype(np.float32)
            else:
                source = self.pairs.inputs(task)[i, r : r + p, c : c + p]
            if with_noise_levels:
                levels[b] = self.noise_levels(task)[i]
            k, flip = int(rng.integers(4)), bool(rng.integers(2))
            for out, image in ((inputs, source), (targets, target)):
                image = np.rot90(image, k)
                out[b, 0] = image[:, ::-1] if flip else image
        return (inputs, targets, levels) if with_noise_levels else (inputs, targets)
