"""The denoising U-Net (Ronneberger et al. 2015), sized for CT slices on a CPU.

Layout: input and output ``[N, 1, H, W]`` float32 in *scaled HU*
(``HU / hu_scale``, default 1000: air -1, water 0, dense bone ~ +1.5);
``H`` and ``W`` must be multiples of ``2**depth`` (``denoise.infer`` pads).

Encoder: at each of ``depth + 1`` levels two 3x3 convolutions (+ optional
BatchNorm) + ReLU, then 2x2 max-pooling; widths ``width * 2**level``.
Decoder: bilinear 2x up-sampling, a 3x3 convolution halving the width,
concatenation with the encoder's feature map at that level (the skip), two
3x3 convolutions.  A final 1x1 convolution gives one channel.

``residual=True`` predicts the noise: ``output = input - net(input)``.  The
network then starts as the identity (its last layer is zero-initialised), so
training begins at the FBP's quality and only has to learn the noise and
streaks (Zhang et al.'s DnCNN and Jin et al.'s FBPConvNet do the same).

With ``space_to_depth=2`` the image is first folded into 4 half-resolution
channels (``pixel_unshuffle``, as FFDNet does) and unfolded at the end: the
network then runs at a quarter of the pixels, so a wider network costs what a
narrower full-resolution one does.

With ``noise_level_input`` the network takes a second input plane, constant
over the image: the noise level of the whole slice it comes from (HU / 100),
as FFDNet does with its noise map.  A blind network must judge the noise from
what it sees through its receptive field, and a fine texture of the anatomy
looks much like noise there; the level, measured over the whole slice by
:func:`estimate_noise_hu`, tells it how much to remove.  The caller passes
it (tiles of one slice all get the slice's level); without it the network
measures its input.

Normalisation is BatchNorm or none, never per-image statistics
(Instance/GroupNorm): those would make a tile's output depend on what else is
in the tile, and tiled inference would show seams.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["UNetConfig", "UNet", "estimate_noise_hu", "NOISE_LEVEL_SCALE_HU"]

NOISE_LEVEL_SCALE_HU = 100.0  # the noise-level plane holds HU / this
_SOFT = (-300.0, 400.0)  # HU range of the pixels the noise is measured on

NORMS = ("none", "batch")


@dataclass(frozen=True)
class UNetConfig:
    """Everything that fixes a U-Net's shape; stored in every checkpoint."""

    width: int = 32
    depth: int = 3
    norm: str = "none"
    residual: bool = True
    hu_scale: float = 1000.0
    space_to_depth: int = 1
    noise_level_input: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.width <= 512:
            raise ValueError(f"width: expected 1 to 512 channels, got {self.width}")
        if not 1 <= self.depth <= 6:
            raise ValueError(f"depth: expected 1 to 6 down-samplings, got {self.depth}")
        if self.norm not in NORMS:
            raise ValueError(f"norm: expected one of {', '.join(NORMS)}, got {self.norm!r}")
        if self.space_to_depth not in (1, 2):
            raise ValueError(f"space_to_depth: expected 1 or 2, got {self.space_to_depth}")
        if not self.hu_scale > 0:
            raise ValueError(f"hu_scale: expected a positive number, got {self.hu_scale}")

    @property
    def multiple_px(self) -> int:
        """Input sides must be multiples of this."""
        return 2**self.depth * self.space_to_depth

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "UNetConfig":
        known = {k: values[k] for k in ("width", "depth", "norm", "residual", "hu_scale", "space_to_depth",
                                        "noise_level_input") if k in values}
        return cls(**known)


class _DoubleConv(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, norm: str) -> None:
        layers: list[nn.Module] = []
        for c_in in (in_channels, out_channels):
            layers.append(nn.Conv2d(c_in, out_channels, 3, padding=1, bias=norm == "none"))
            if norm == "batch":
                layers.append(nn.BatchNorm2d(out_channels))
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class _Up(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, norm: str) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.fuse = _DoubleConv(2 * out_channels, out_channels, norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.fuse(torch.cat((skip, self.reduce(x)), dim=1))


class UNet(nn.Module):
    """``[N, 1, H, W]`` scaled HU -> same shape (see the module docstring)."""

    def __init__(self, config: UNetConfig | None = None) -> None:
        super().__init__()
        self.config = config or UNetConfig()
        c = self.config
        widths = [c.width * 2**level for level in range(c.depth + 1)]
        channels = c.space_to_depth**2
        first = channels + (1 if c.noise_level_input else 0)
        self.encoders = nn.ModuleList(
            [_DoubleConv(first if level == 0 else widths[level - 1], widths[level], c.norm)
             for level in range(c.depth + 1)]
        )
        self.decoders = nn.ModuleList([_Up(widths[level + 1], widths[level], c.norm) for level in reversed(range(c.depth))])
        self.head = nn.Conv2d(widths[0], channels, 1)
        if c.residual:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor, noise_level_hu: torch.Tensor | None = None) -> torch.Tensor:
        """Denoise ``x``; ``noise_level_hu`` ``[N]``: each image's noise level (``noise_level_input`` only)."""
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"input: expected [N, 1, H, W], got shape {tuple(x.shape)}")
        m = self.config.multiple_px
        if x.shape[-2] % m or x.shape[-1] % m:
            raise ValueError(f"input: expected H and W multiples of {m} (2**depth), got {tuple(x.shape[-2:])}; "
                             "denoise.infer pads for you")
        skips = []
        h = F.pixel_unshuffle(x, self.config.space_to_depth) if self.config.space_to_depth > 1 else x
        if self.config.noise_level_input:
            if noise_level_hu is None:
                noise_level_hu = estimate_noise_hu(x * self.config.hu_scale)
            level = (noise_level_hu.to(h.dtype) / NOISE_LEVEL_SCALE_HU).reshape(-1, 1, 1, 1)
            h = torch.cat((h, level.expand(h.shape[0], 1, *h.shape[-2:])), dim=1)
        for level, encoder in enumerate(self.encoders):
            h = encoder(h)
            if level < self.config.depth:
                skips.append(h)
                h = F.max_pool2d(h, 2)
        for decoder in self.decoders:
            h = decoder(h, skips.pop())
        out = self.head(h)
        if self.config.space_to_depth > 1:
            out = F.pixel_shuffle(out, self.config.space_to_depth)
        return x - out if self.config.residual else out

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())


def estimate_noise_hu(hu: torch.Tensor) -> torch.Tensor:
    """Noise standard deviation in HU of each image of ``hu`` ``[N, 1, H, W]`` (HU), as ``[N]``.

    The median absolute finest-scale diagonal Haar detail over 0.6745
    (Donoho's estimator, as scikit-image's ``estimate_sigma``), taken over the
    2x2 blocks lying wholly in -300..400 HU: soft tissue, where the metrics
    look, and where edges to bone and air do not inflate it.  With fewer than
    64 such blocks, over all blocks.  Exact for white noise; for FBP noise,
    whose power rises with frequency, it is a consistent measure of the level.
    """
    if hu.ndim != 4 or hu.shape[1] != 1:
        raise ValueError(f"hu: expected [N, 1, H, W], got shape {tuple(hu.shape)}")
    h, w = hu.shape[-2] // 2 * 2, hu.shape[-1] // 2 * 2
    if h < 2 or w < 2:
        raise ValueError(f"hu: expected images of at least 2x2 pixels, got {tuple(hu.shape[-2:])}")
    x = hu[:, 0, :h, :w].float()
    a, b, c, d = x[:, 0::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 0::2], x[:, 1::2, 1::2]
    detail = ((a - b - c + d) / 2).abs().flatten(1)
    soft = torch.stack([(v > _SOFT[0]) & (v < _SOFT[1]) for v in (a, b, c, d)]).all(dim=0).flatten(1)
    levels = []
    for values, mask in zip(detail, soft):
        chosen = values[mask] if int(mask.sum()) >= 64 else values
        levels.append(chosen.median() / 0.6745)
    return torch.stack(levels)
