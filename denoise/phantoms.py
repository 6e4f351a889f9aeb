"""CT-like slices in Hounsfield units: random anatomy-like ellipse phantoms and Shepp-Logan.

The generator follows the phantoms of the learned-reconstruction literature
(random ellipses on a body outline, as in Adler & Öktem's learned primal-dual
or Jin et al.'s FBPConvNet), with values placed where real tissues sit on the
HU scale so that the W400/L40 soft-tissue window the metrics use sees
realistic contrast:

=========================  ==========================
air outside the body       -1000
lung parenchyma            -900 ... -750
fat                        -120 ... -80
soft tissue / organs       -10 ... 80 (low-contrast lesions ±5 ... 40)
trabecular bone            150 ... 400
cortical bone              600 ... 1500
=========================  ==========================

Three body types are drawn (head, thorax, abdomen/pelvis), with a smooth
random texture (Gaussian-filtered white noise, 3 to 15 HU) inside tissue and a
slight blur (partial volume) on every edge.  Arrays are ``[H, W]`` float32,
row 0 at the top (anterior), column 0 on the patient's right as displayed.

``shepp_logan_hu`` is Kak & Slaney's 2D Shepp-Logan head with densities
mapped to HU by ``HU = 1000 (rho - 1)``: air -1000, skull +1000, brain +20,
ventricles 0, the small features +30 — contrasts of 10 to 30 HU, a hard test
for a denoiser.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["random_slice", "random_slices", "shepp_logan_hu", "BODY_TYPES"]

BODY_TYPES = ("head", "thorax", "abdomen")

# Kak & Slaney, Principles of Computerized Tomographic Imaging, table 3.1:
# (x0, y0, semi-axis a, semi-axis b, rotation in degrees, density added)
_SHEPP_LOGAN_2D = (
    (0.0, 0.0, 0.69, 0.92, 0.0, 2.0),
    (0.0, -0.0184, 0.6624, 0.874, 0.0, -0.98),
    (0.22, 0.0, 0.11, 0.31, -18.0, -0.02),
    (-0.22, 0.0, 0.16, 0.41, 18.0, -0.02),
    (0.0, 0.35, 0.21, 0.25, 0.0, 0.01),
    (0.0, 0.1, 0.046, 0.046, 0.0, 0.01),
    (0.0, -0.1, 0.046, 0.046, 0.0, 0.01),
    (-0.08, -0.605, 0.046, 0.023, 0.0, 0.01),
    (0.0, -0.605, 0.023, 0.023, 0.0, 0.01),
    (0.06, -0.605, 0.023, 0.046, 0.0, 0.01),
)


def _grid(size: int, supersampling: int) -> tuple[np.ndarray, np.ndarray]:
    """Cell-centred coordinates in [-1, 1] (y up), shape ``(size*s, size*s)``."""
    n = size * supersampling
    axis = (np.arange(n) + 0.5) / n * 2.0 - 1.0
    x = axis[None, :]
    y = -axis[:, None]
    return np.broadcast_to(x, (n, n)), np.broadcast_to(y, (n, n))


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float, angle_deg: float) -> np.ndarray:
    """Boolean mask of the ellipse on the grid ``x, y`` (``_grid``'s, maybe scaled: x along columns, y along rows).

    Only the rows and columns within ``max(a, b)`` (and a pixel) of the
    centre are computed, with the very operations the whole grid would get,
    so the mask is the same bit for bit; a small ellipse costs a small window.
    """
    t = math.radians(angle_deg)
    c, s = math.cos(t), math.sin(t)
    mask = np.zeros(x.shape, dtype=bool)
    window: tuple[slice, slice] = (slice(None), slice(None))
    if x.ndim == 2 and x.shape[0] > 1 and x[0, 0] == x[-1, 0] and y[0, 0] == y[0, -1]:  # a separable grid
        reach = max(a, b) + 2.0 * abs(float(x[0, 1] - x[0, 0]) if x.shape[1] > 1 else 1.0)
        columns = np.flatnonzero(np.abs(x[0] - cx) <= reach)
        rows = np.flatnonzero(np.abs(y[:, 0] - cy) <= reach)
        if not len(columns) or not len(rows):
            return mask
        window = (slice(rows[0], rows[-1] + 1), slice(columns[0], columns[-1] + 1))
    dx, dy = x[window] - cx, y[window] - cy
    u = (c * dx + s * dy) / a
    v = (-s * dx + c * dy) / b
    mask[window] = u * u + v * v <= 1.0
    return mask


def _depth_inside(x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float,
                  angle_deg: float) -> np.ndarray:
    """About the distance from the ellipse's outline, inward (grid units; negative outside): ``(1 - rho) / |grad rho|``."""
    t = math.radians(angle_deg)
    c, s = math.cos(t), math.sin(t)
    dx, dy = x - cx, y - cy
    u = (c * dx + s * dy) / a
    v = (-s * dx + c * dy) / b
    rho = np.maximum(np.sqrt(u * u + v * v), 1e-9)
    gradient = np.sqrt((u / a) ** 2 + (v / b) ** 2) / rho
    return (1.0 - rho) / np.maximum(gradient, 1e-9)


def _downsample(image: np.ndarray, s: int) -> np.ndarray:
    if s == 1:
        return image
    n = image.shape[0] // s
    return image.reshape(n, s, n, s).mean(axis=(1, 3))


def shepp_logan_hu(size: int = 512, *, scale: float = 0.9, supersampling: int = 2) -> np.ndarray:
    """The 2D Shepp-Logan head in HU, ``[size, size]`` float32.

    ``scale`` shrinks the unit phantom inside the field of view (1.0: the
    skull's long axis spans 92 % of the image height).  Each pixel averages
    ``supersampling**2`` points (partial-volume edges).
    """
    if size < 8:
        raise ValueError(f"size: expected at least 8 pixels, got {size}")
    x, y = _grid(size, supersampling)
    rho = np.zeros(x.shape)
    for cx, cy, a, b, angle, density in _SHEPP_LOGAN_2D:
        rho += density * _ellipse(x, y, cx * scale, cy * scale, a * scale, b * scale, angle)
    return (1000.0 * (_downsample(rho, supersampling) - 1.0)).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, n: int, sigma_px: float) -> np.ndarray:
    """White noise low-passed with a Gaussian (by FFT), scaled to unit standard deviation."""
    white = rng.standard_normal((n, n))
    f = np.fft.fftfreq(n)
    transfer = np.exp(-2.0 * (math.pi * sigma_px) ** 2 * (f[:, None] ** 2 + f[None, :] ** 2))
    field = np.fft.ifft2(np.fft.fft2(white) * transfer).real
    return field / max(field.std(), 1e-12)


def _power_law_noise(rng: np.random.Generator, n: int, beta: float) -> np.ndarray:
    """White noise shaped to a 1/f**beta power spectrum (all scales at once), unit standard deviation."""
    white = rng.standard_normal((n, n))
    f = np.fft.fftfreq(n)
    radius = np.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
    radius[0, 0] = 1.0  # the mean is removed below
    field = np.fft.ifft2(np.fft.fft2(white) * radius ** (-beta / 2.0)).real
    field -= field.mean()
    return field / max(field.std(), 1e-12)


def _blur(image: np.ndarray, sigma_px: float) -> np.ndarray:
    n = image.shape[0]
    # Pad by reflection so the circular FFT does not wrap edges into each other.
    padded = np.pad(image, n // 8, mode="reflect")
    m = padded.shape[0]
    g = np.fft.fftfreq(m)
    transfer = np.exp(-2.0 * (math.pi * sigma_px) ** 2 * (g[:, None] ** 2 + g[None, :] ** 2))
    out = np.fft.ifft2(np.fft.fft2(padded) * transfer).real
    return out[n // 8 : n // 8 + n, n // 8 : n // 8 + n]


def random_slice(rng: np.random.Generator, size: int = 512, *, body_type: str | None = None,
                 extras: bool = False, variety: bool = False, edge_blur_px: float | None = None,
                 head_layers: bool = False) -> np.ndarray:
    """One random CT-like slice in HU, ``[size, size]`` float32.

    ``body_type`` is one of ``BODY_TYPES`` or None (drawn at random).

    ``extras`` adds what real scans have and the plain phantoms lack (each
    drawn at random): anatomy magnified up to 1.5x so that it crosses the
    edge of the measured field of view, thin dense arcs outside the body (a
    head holder, a table), cortical bone up to 2,000 HU with sharper edges,
    and fine high-contrast texture (1-3 px, up to 40 HU) in soft tissue.
    ``variety`` widens what edges and tissue look like: a power-law (1/f)
    texture of 5-50 HU through all tissue, bone included, at every scale
    from a pixel to the whole body, and an edge blur (partial volume) drawn
    from 0 to 2 pixels instead of 0.3-0.7.
    ``edge_blur_px`` draws the edge blur from 0.3 to that many pixels instead
    (the partial volume of a thick slice, or a soft reconstruction kernel:
    a real skull rises over 3-4 pixels), whatever ``extras`` and ``variety``.
    ``head_layers`` lines a head's skull with what lies under it in a real
    head: a layer of fluid 0.5-4 pixels thick (0-15 HU), then a cortex of
    grey matter 2-6 pixels thick (32-45 HU) around the white matter
    (20-32 HU), where the plain head has one brain value against the bone.
    Without these the generator draws exactly what it always drew.
    Coordinates are fractions of the half field of view, so the anatomy
    scales with ``size``.
    """
    if size < 16:
        raise ValueError(f"size: expected at least 16 pixels, got {size}")
    if edge_blur_px is not None and not 0.3 <= edge_blur_px <= size / 16:
        raise ValueError(f"edge_blur_px: expected 0.3 to {size / 16:g} pixels, got {edge_blur_px}")
    kind = body_type if body_type is not None else BODY_TYPES[int(rng.integers(len(BODY_TYPES)))]
    if kind not in BODY_TYPES:
        raise ValueError(f"body_type: expected one of {', '.join(BODY_TYPES)} or None, got {kind!r}")
    s = 2
    x, y = _grid(size, s)
    if extras and rng.random() < 0.4:
        zoom = rng.uniform(1.05, 1.5)  # the body crosses the inscribed circle, as in a truncated scan
        x, y = x / zoom, y / zoom
    n = size * s
    hu = np.full((n, n), -1000.0)
    u = rng.uniform

    def ellipse(cx, cy, a, b, angle=0.0):
        return _ellipse(x, y, cx, cy, a, b, angle)

    tissue = lambda: u(-10.0, 80.0)  # noqa: E731
    if kind == "head":
        a, b = u(0.55, 0.8), u(0.7, 0.92)
        tilt = u(-10, 10)
        hu[ellipse(0, 0, a, b, tilt)] = u(-60, 40)  # scalp
        skull = ellipse(0, 0, a * 0.96, b * 0.96, tilt)
        hu[skull] = u(700, 1500)
        thickness = u(0.03, 0.07)
        brain = ellipse(0, 0, a * 0.96 - thickness, b * 0.96 - thickness, tilt)
        hu[brain] = u(20, 45)
        interior = (a * 0.96 - thickness, b * 0.96 - thickness)
        if head_layers:  # fluid under the skull, then grey matter around the white
            fluid, cortex = u(0.5, 4.0) / (size / 2), u(2.0, 6.0) / (size / 2)
            hu[brain] = u(0, 15)
            hu[ellipse(0, 0, interior[0] - fluid, interior[1] - fluid, tilt)] = u(32, 45)
            hu[ellipse(0, 0, interior[0] - fluid - cortex, interior[1] - fluid - cortex, tilt)] = u(20, 32)
        body = brain
    else:
        a, b = u(0.7, 0.95), u(0.45, 0.75)
        tilt = u(-6, 6)
        cy0 = u(-0.08, 0.08)
        body_mask = ellipse(0, cy0, a, b, tilt)
        hu[body_mask] = u(-120, -80)  # subcutaneous fat
        fat_layer = u(0.03, 0.12)
        inner = ellipse(0, cy0, a - fat_layer, b - fat_layer, tilt)
        hu[inner] = u(20, 60) if kind == "abdomen" else u(-100, -60)
        interior = (a - fat_layer, b - fat_layer)
        body = inner
        # spine: vertebral body (trabecular) with a cortical rim, posterior
        sy = cy0 - (b - fat_layer) * u(0.55, 0.75)
        r = u(0.07, 0.12)
        hu[ellipse(0, sy, r * 1.1, r)] = u(600, 1200)
        hu[ellipse(0, sy, r * 0.85, r * 0.8)] = u(150, 400)
        hu[ellipse(0, sy - r * 1.4, r * 0.45, r * 0.35)] = u(500, 1000)  # spinous process
        if kind == "thorax":
            for side in (-1, 1):  # lungs
                la, lb = (a - fat_layer) * u(0.35, 0.45), (b - fat_layer) * u(0.6, 0.8)
                lx = side * (a - fat_layer) * u(0.42, 0.55)
                lung = ellipse(lx, cy0 + u(-0.05, 0.1), la, lb, side * u(0, 15)) & inner
                hu[lung] = u(-900, -750)
                for _ in range(int(rng.integers(5, 25))):  # vessels and nodules
                    vx, vy = lx + u(-0.8, 0.8) * la, cy0 + u(-0.8, 0.8) * lb
                    vr = u(0.004, 0.02)
                    hu[ellipse(vx, vy, vr, vr * u(0.6, 1.6), u(0, 180)) & lung] = u(-100, 60)
            hu[ellipse(u(-0.1, 0.1), cy0 + u(0.0, 0.15), u(0.15, 0.25), u(0.15, 0.22), u(0, 180)) & inner] = u(30, 60)  # heart
            for _ in range(int(rng.integers(6, 14))):  # ribs
                t = u(0, 2 * math.pi)
                rx, ry = (a - fat_layer * 1.6) * math.cos(t), cy0 + (b - fat_layer * 1.6) * math.sin(t)
                rr = u(0.015, 0.03)
                hu[ellipse(rx, ry, rr * u(1, 2), rr, math.degrees(t))] = u(400, 1100)
        else:  # abdomen / pelvis: organs, kidneys, bowel gas, pelvic bones
            for _ in range(int(rng.integers(3, 8))):
                ox, oy = u(-0.6, 0.6) * interior[0], cy0 + u(-0.5, 0.6) * interior[1]
                organ = ellipse(ox, oy, u(0.08, 0.3), u(0.06, 0.25), u(0, 180)) & inner
                hu[organ] = tissue()
            for _ in range(int(rng.integers(0, 5))):  # bowel gas
                gx, gy = u(-0.5, 0.5) * interior[0], cy0 + u(-0.3, 0.6) * interior[1]
                gr = u(0.015, 0.06)
                hu[ellipse(gx, gy, gr, gr * u(0.6, 1.5), u(0, 180)) & inner] = u(-1000, -850)
            if rng.random() < 0.5:
                for side in (-1, 1):  # iliac wings
                    bx = side * interior[0] * u(0.5, 0.7)
                    hu[ellipse(bx, sy + u(0.05, 0.2), u(0.05, 0.1), u(0.15, 0.25), side * u(10, 40)) & inner] = u(300, 1000)
    # organs and lesions inside the interior (all body types)
    for _ in range(int(rng.integers(2, 7))):
        ox, oy = u(-0.6, 0.6) * interior[0], u(-0.6, 0.6) * interior[1]
        blob = ellipse(ox, oy, u(0.04, 0.2), u(0.04, 0.2), u(0, 180)) & body & (hu > -200) & (hu < 200)
        hu[blob] = tissue()
    for _ in range(int(rng.integers(3, 12))):  # low-contrast lesions
        lx, ly = u(-0.7, 0.7) * interior[0], u(-0.7, 0.7) * interior[1]
        lr = u(0.01, 0.05)
        lesion = ellipse(lx, ly, lr, lr * u(0.7, 1.4), u(0, 180)) & body & (hu > -200) & (hu < 200)
        hu[lesion] += rng.choice([-1.0, 1.0]) * u(5, 40)
    for _ in range(int(rng.integers(0, 4))):  # calcifications
        cx, cy = u(-0.7, 0.7) * interior[0], u(-0.7, 0.7) * interior[1]
        cr = u(0.004, 0.012)
        hu[ellipse(cx, cy, cr, cr) & body] = u(200, 1000)
    # smooth tissue texture, only where there is tissue (not air, not lung)
    if extras:
        _add_extras(hu, x, y, rng, n, s)
    texture = _smooth_noise(rng, n, u(1.5, 8.0) * s) * u(3, 15)
    soft = (hu > -200) & (hu < 300)
    hu = np.where(soft, hu + texture, hu)
    lungs = (hu > -950) & (hu <= -600)
    hu = np.where(lungs, hu + _smooth_noise(rng, n, 3.0 * s) * u(10, 30), hu)
    if variety:
        tissue = hu > -950
        hu = np.where(tissue, hu + _power_law_noise(rng, n, u(1.5, 3.0)) * u(5, 50), hu)
    hu = _downsample(hu, s)
    blur = u(0.0, 2.0) if variety else u(0.0, 0.7) if extras else u(0.3, 0.7)
    if edge_blur_px is not None:  # drawn after the usual one, so the rest of the slice is the same
        blur = u(0.3, edge_blur_px)
    hu = _blur(hu, blur)
    return np.clip(hu, -1024.0, 3071.0).astype(np.float32)


def sharp_kernel(hu: np.ndarray, rng: np.random.Generator, amount: tuple[float, float] = (0.2, 1.0),
                 sigma_px: tuple[float, float] = (0.7, 2.5)) -> np.ndarray:
    """``hu`` as a scanner's sharp reconstruction kernel leaves it: every edge rings.

    Clinical images are reconstructed with kernels that enhance edges, so
    along a bone a band a pixel or two wide is brighter on its bright side
    and darker on its dark side (inside the skull, tens of HU below the
    brain).  Drawn as unsharp masking, ``hu + a (hu - G_sigma * hu)`` with
    the amount ``a`` and the Gaussian's ``sigma`` (pixels) uniform in their
    ranges; air stays at -1000 HU or above.
    """
    a = rng.uniform(*amount)
    sigma = rng.uniform(*sigma_px)
    sharpened = hu + a * (hu - _blur(hu.astype(np.float64), sigma))
    return np.clip(sharpened, -1000.0, 3071.0).astype(np.float32)


def _add_extras(hu: np.ndarray, x: np.ndarray, y: np.ndarray, rng: np.random.Generator, n: int, s: int) -> None:
    """The ``extras`` of :func:`random_slice`, drawn into ``hu`` (supersampled by ``s``) in place."""
    u = rng.uniform
    air = hu <= -990
    for _ in range(int(rng.integers(0, 3))):  # head holder / table: thin dense arcs in the air around the body
        a, b = u(0.6, 1.1), u(0.5, 1.0)
        cy = u(-0.3, 0.3)
        thickness = u(0.004, 0.015)
        outer = _ellipse(x, y, 0, cy, a, b, 0.0)
        ring = outer & ~_ellipse(x, y, 0, cy, a - thickness, b - thickness, 0.0) & air
        if rng.random() < 0.7:  # an open arc (the lower or the upper part), not a closed ring
            ring &= (y < cy) if rng.random() < 0.7 else (y > cy)
        hu[ring] = u(100, 1200)
    if rng.random() < 0.5:  # denser cortical bone
        cortical = hu >= 600
        hu[cortical] = hu[cortical] * u(1.0, 1.6)
        np.minimum(hu, 2000.0, out=hu)
    if rng.random() < 0.6:  # fine high-contrast texture in soft tissue (muscle fibres, fat marbling)
        soft = (hu > -200) & (hu < 300)
        fine = _smooth_noise(rng, n, u(0.5, 1.5) * s) * u(5, 40)
        hu[soft] += fine[soft]


def dead_leaves_slice(rng: np.random.Generator, size: int = 512, edge_px: float = 0.0,
                      rim_fraction: float = 0.0) -> np.ndarray:
    """A slice of random occluding shapes ("dead leaves") inside a body outline, HU ``[size, size]`` float32.

    Ellipses and rectangles of every size, their radii drawn from a power
    law (density ~ r**-3, from 1.5 pixels to a third of the body), painted
    front to back until the body is covered: images with the scale-free
    statistics of natural images (Lee, Mumford & Huang 2001), which teach a
    denoiser edges, corners and textures of every shape rather than those
    of one family of phantoms (Achddou et al. 2021).  Values are those of
    CT: mostly soft tissue and fat, some bone, some lung or gas; then the
    usual smooth texture and an edge blur of 0 to 1 pixel.

    ``edge_px`` > 0 gives each leaf an edge of its own: a linear ramp from 0
    to ``edge_px`` pixels wide across its outline (leaves blend where they
    overlap), as the partial volume of a thick slice cutting an oblique
    surface makes in real scans: a skull's inner table seen in a 5 mm slice
    rises from brain to bone over several pixels.  At 0 (the default) the
    generator is drawn from exactly as before the option existed.

    ``rim_fraction`` > 0 gives that fraction of the leaves a rim: a layer 0.5
    to 4 pixels thick just inside the outline, of another value (a small
    contrast of 10-150 HU either way, or another tissue), as anatomy is
    layered: skin over fat, the cerebrospinal fluid between the skull's inner
    table and the cortex, the cortical shell of a bone; the body outline gets, as
    often, a skin and a layer beneath it.  At 0 (the default)
    nothing more is drawn.
    """
    if size < 16:
        raise ValueError(f"size: expected at least 16 pixels, got {size}")
    if not 0.0 <= edge_px <= size / 8:
        raise ValueError(f"edge_px: expected 0 to {size / 8:g} pixels, got {edge_px}")
    if not 0.0 <= rim_fraction <= 1.0:
        raise ValueError(f"rim_fraction: expected a fraction in [0, 1], got {rim_fraction}")
    s = 2
    n = size * s
    u = rng.uniform
    x, y = _grid(size, s)
    outline = (u(-0.05, 0.05), u(-0.05, 0.05), u(0.45, 0.9), u(0.4, 0.85), u(-20, 20))
    body = _ellipse(x, y, *outline)
    # front to back: each leaf takes what the leaves above it let through ("uncovered", 1 to 0) times its alpha
    leaves, cover = np.zeros((n, n)), np.zeros((n, n))  # sums of alpha-weighted values and of alphas
    uncovered = body.astype(np.float64)
    r_min, r_max = 1.5 * s, n * u(0.1, 0.3)
    kinds = (((-20.0, 90.0), 0.65), ((-120.0, -60.0), 0.2), ((200.0, 1800.0), 0.07), ((-950.0, -500.0), 0.08))
    ranges, weights = zip(*kinds)
    bound = np.argwhere(body)
    # pixels still visible through the leaves, kept up to date per leaf: testing the whole image after
    # every draw cost far more than drawing (most draws land where the body is already covered)
    visible = int(np.count_nonzero(uncovered > 0.01))
    for _ in range(60_000):
        if not visible:
            break
        # r ~ r**-3 on [r_min, r_max], by inverting its distribution function
        r = (r_min ** -2 - u() * (r_min ** -2 - r_max ** -2)) ** -0.5
        cy, cx = bound[int(rng.integers(len(bound)))] + rng.uniform(-0.5, 0.5, 2)
        ramp = u(0.0, edge_px) * s if edge_px else 0.0  # this leaf's edge width, supersampled pixels
        half = int(math.ceil(r + ramp / 2)) + 1
        y0, y1 = max(int(cy) - half, 0), min(int(cy) + half + 1, n)
        x0, x1 = max(int(cx) - half, 0), min(int(cx) + half + 1, n)
        window = (slice(y0, y1), slice(x0, x1))
        visible_here = int(np.count_nonzero(uncovered[window] > 0.01))
        if not visible_here:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1]
        dy, dx = yy + 0.5 - cy, xx + 0.5 - cx
        t = u(0, math.pi)
        c, sn = math.cos(t), math.sin(t)
        aspect = u(0.3, 1.0)
        along, across = (c * dx + sn * dy) / r, (-sn * dx + c * dy) / (r * aspect)
        # rectangles (a quarter of the leaves) give corners and straight edges; rho is 1 on the outline
        rho = np.maximum(np.abs(along), np.abs(across)) if rng.random() < 0.25 else np.sqrt(along * along + across * across)
        lo, hi = ranges[int(rng.choice(len(ranges), p=weights))]
        value = u(lo, hi)
        if rim_fraction and rng.random() < rim_fraction:
            if rng.random() < 0.5:
                rim_value = value + rng.choice((-1.0, 1.0)) * u(10.0, 150.0)
            else:
                rim_lo, rim_hi = ranges[int(rng.choice(len(ranges), p=weights))]
                rim_value = u(rim_lo, rim_hi)
            thickness, inner_ramp = u(0.5, 4.0) * s, max(u(0.0, edge_px) * s, 1.0)
            depth = (1.0 - rho) * r * aspect  # about the distance inside the outline, supersampled pixels
            value = rim_value + (value - rim_value) * np.clip(0.5 + (depth - thickness) / inner_ramp, 0.0, 1.0)
        if ramp:  # (1 - rho) times the short radius: about the distance inside the outline, in pixels
            alpha = np.clip(0.5 + (1.0 - rho) * r * aspect / ramp, 0.0, 1.0)
        else:
            alpha = (rho <= 1.0).astype(np.float64)
        seen = alpha * uncovered[window]
        leaves[window] += seen * value
        cover[window] += seen
        uncovered[window] *= 1.0 - alpha
        visible -= visible_here - int(np.count_nonzero(uncovered[window] > 0.01))
    background = u(-20.0, 90.0)  # where no leaf covers the body
    if edge_px:
        u()  # a draw soft-edged slices have always made here: the sets simulated before stay reproducible
    hu = np.where(body, (leaves + uncovered * background) / np.maximum(cover + uncovered, 1e-9), -1000.0)
    if rim_fraction and rng.random() < rim_fraction:  # the body's own layers: skin, then fat or muscle
        depth = _depth_inside(x, y, *outline) * (n / 2.0)  # supersampled pixels
        for lo, hi in ((-20.0, 90.0), (-120.0, 60.0)):
            thickness = u(0.5, 4.0) * s if lo == -20.0 else u(0.0, 12.0) * s
            layer = np.clip(0.5 + (thickness - depth) / max(u(0.0, edge_px) * s, 1.0), 0.0, 1.0)
            hu = np.where(body, hu + layer * (u(lo, hi) - hu), hu)
            depth = depth - thickness
    soft = (hu > -200) & (hu < 300)
    hu = np.where(soft, hu + _smooth_noise(rng, n, u(1.5, 8.0) * s) * u(3, 15), hu)
    hu = _blur(_downsample(hu, s), u(0.0, 1.0))
    return np.clip(hu, -1024.0, 3071.0).astype(np.float32)


def random_slices(count: int, seed: int, size: int = 512) -> np.ndarray:
    """``count`` random slices ``[count, size, size]`` float32 HU from one seed.

    The same seed gives the same slices; training, validation and test sets
    use different seeds.
    """
    rng = np.random.default_rng(seed)
    return np.stack([random_slice(rng, size) for _ in range(count)])
