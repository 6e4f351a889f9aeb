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

Normalisation is BatchNorm or none, never per-image statistics
(Instance/GroupNorm): those would make a tile's output depend on what else is
in the tile, and tiled inference would show seams.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["UNetConfig", "UNet"]

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
        known = {k: values[k] for k in ("width", "depth", "norm", "residual", "hu_scale", "space_to_depth") if k in values}
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
        self.encoders = nn.ModuleList(
            [_DoubleConv(channels if level == 0 else widths[level - 1], widths[level], c.norm)
             for level in range(c.depth + 1)]
        )
        self.decoders = nn.ModuleList([_Up(widths[level + 1], widths[level], c.norm) for level in reversed(range(c.depth))])
        self.head = nn.Conv2d(widths[0], channels, 1)
        if c.residual:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"input: expected [N, 1, H, W], got shape {tuple(x.shape)}")
        m = self.config.multiple_px
        if x.shape[-2] % m or x.shape[-1] % m:
            raise ValueError(f"input: expected H and W multiples of {m} (2**depth), got {tuple(x.shape[-2:])}; "
                             "denoise.infer pads for you")
        skips = []
        h = F.pixel_unshuffle(x, self.config.space_to_depth) if self.config.space_to_depth > 1 else x
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
