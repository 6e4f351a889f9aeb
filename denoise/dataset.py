"""Training and validation pairs: simulated once, cached as ``.npz``, cut into patches on the fly.

Each slice of a set (``denoise.phantoms.random_slices``-style, one seed per
set, so training, validation and test never share a slice) is stored as
``<cache>/<set key>/slice-NNNN.npz`` with float32 HU arrays:

* ``reference`` - the noiseless FBP (384 views, Hamming ramp),
* ``quarter``   - the quarter-dose FBP (projection-domain Poisson, binomial thinning of I0 = 5e5),
* ``sparse``    - a sparse-view FBP (``sparse_views`` views, full-dose noise), and ``sparse_views``.

The FBP is the expensive part (~4 s a slice on one core), so a slice is
simulated once and every epoch re-uses it.  A set is built incrementally: an
interrupted build continues where it stopped.  The image-domain Gaussian
task needs no cache (noise is added to ``reference`` per patch).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from . import phantoms, simulate

__all__ = ["TASKS", "SimulationConfig", "PairSet", "build_pair_set", "PatchSampler"]

TASKS = ("quarter", "sparse", "gaussian")


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

    def key(self, seed: int) -> str:
        text = json.dumps({**asdict(self), "seed": seed}, sort_keys=True)
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


def simulate_slice(hu: np.ndarray, config: SimulationConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The cached arrays of one ground-truth slice (see the module docstring)."""
    pair = simulate.low_dose_pair(hu, pixel_mm=config.pixel_mm, i0=config.i0, dose_fractions=(config.dose_fraction,),
                                  n_views=config.n_views, filter=config.filter, rng=rng)
    views = int(rng.integers(config.sparse_views_min, config.sparse_views_max + 1))
    sparse = simulate.sparse_view(hu, views, pixel_mm=config.pixel_mm, i0=config.i0, filter=config.filter, rng=rng)
    return {"reference": pair["clean"], "quarter": pair[f"dose-{config.dose_fraction:g}"], "sparse": sparse,
            "sparse_views": np.array(views), "truth": hu}


def build_pair_set(cache_dir: Path, seed: int, count: int, config: SimulationConfig = SimulationConfig(), *,
                   include_shepp_logan: bool = False,
                   progress: Callable[[int, int], None] | None = None) -> PairSet:
    """Simulate (or load from the cache) ``count`` slices of the set ``seed``.

    Slice ``i`` is drawn from its own generator seeded ``(seed, i)``, so a
    larger set extends a smaller one.  ``include_shepp_logan`` makes slice 0
    the Shepp-Logan head (for test sets).
    """
    if count < 1:
        raise ValueError(f"count: expected at least 1 slice, got {count}")
    folder = Path(cache_dir) / (config.key(seed) + ("-sl" if include_shepp_logan else ""))
    folder.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, list[np.ndarray]] = {"reference": [], "quarter": [], "sparse": [], "sparse_views": []}
    for i in range(count):
        path = folder / f"slice-{i:04d}.npz"
        if not path.exists():
            rng = np.random.default_rng([seed, i])
            if include_shepp_logan and i == 0:
                hu = phantoms.shepp_logan_hu(config.size_px)
            else:
                hu = phantoms.random_slice(rng, config.size_px)
            data = simulate_slice(hu, config, rng)
            partial = path.with_suffix(".tmp.npz")
            np.savez(partial, **data)
            partial.replace(path)  # a slice is either wholly there or absent
        with np.load(path) as data:
            for name in arrays:
                arrays[name].append(data[name])
        if progress is not None:
            progress(i + 1, count)
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

    def batch(self, batch_size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        p = self.patch_px
        size = self.pairs.reference.shape[-1]
        inputs = np.empty((batch_size, 1, p, p), np.float32)
        targets = np.empty_like(inputs)
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
            k, flip = int(rng.integers(4)), bool(rng.integers(2))
            for out, image in ((inputs, source), (targets, target)):
                image = np.rot90(image, k)
                out[b, 0] = image[:, ::-1] if flip else image
        return inputs, targets
