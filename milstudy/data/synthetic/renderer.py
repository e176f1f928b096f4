"""Procedural H&E-like slide images with a pixel-exact tumour ground truth (our design, specs/abmilx.md §4.1).

Colour comes from a Beer-Lambert stain model: hematoxylin (nuclei, purple) and eosin (stroma, pink) optical
densities are painted as concentration fields and converted to RGB, so the result looks and behaves like H&E
(white glass background, pink fibrous stroma, purple nuclei).

Geometry (level 0 is 0.5 µm/px by default; sizes in level-0 px):
* Tissue: 1-3 ragged elliptical pieces (smooth-noise-perturbed) with holes, drawn on a coarse grid of
  ``mask_downsample`` px cells; the border is made ragged at full resolution.
* Tumour foci: blobs on the coarse grid inside tissue, one label per focus. The label map (0 glass, 1 normal
  tissue, 2+k tumour focus k) at ``mask_downsample`` is the ground truth.
* High-magnification cue (scaled by ``signal_strength``): tumour nuclei are larger (radius ≈ 3.5-4.5 px normal vs
  up to ≈ 7 px), darker and denser than stromal nuclei.
* Low-magnification cue (``architecture_strength`` = share of tumour nuclei placed by the architecture, the rest
  scattered): ``glands`` (rings of nuclei around pale lumina, radius 50-80 px), ``clusters`` (cohesive nests,
  radius 45-70 px) or ``single_file`` (parallel cords of nuclei 110-150 px apart). Their period (100-300 px) is
  larger than a 32-px patch at 2 µm/px (128 level-0 px), so they are best seen with the 2x field of view of
  the low scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ARCHITECTURES", "FocusSpec", "render_slide"]

ARCHITECTURES = ("glands", "clusters", "single_file")

# Stain optical-density vectors (RGB), after Ruifrok & Johnston; rows normalised.
_HEMATOXYLIN = np.array([0.65, 0.70, 0.29], np.float32)
_EOSIN = np.array([0.07, 0.99, 0.11], np.float32)
_HEMATOXYLIN /= np.linalg.norm(_HEMATOXYLIN)
_EOSIN /= np.linalg.norm(_EOSIN)


_H_MAX, _E_MAX = 2.6, 1.0  # concentration ranges of the lookup table


def _stain_lut() -> np.ndarray:
    """uint8 ``[256 * 128, 3]``: RGB of hematoxylin level i (of 256) and eosin level j (of 128) at i * 128 + j."""
    global _LUT
    if _LUT is None:
        h = np.linspace(0, _H_MAX, 256, dtype=np.float32)[:, None, None]
        e = np.linspace(0, _E_MAX, 128, dtype=np.float32)[None, :, None]
        od = h * _HEMATOXYLIN + e * _EOSIN + 0.01
        _LUT = np.clip(255.0 * np.exp(-od) - 4.0, 0, 255).astype(np.uint8).reshape(-1, 3)
    return _LUT


_LUT: np.ndarray | None = None


@dataclass(frozen=True)
class FocusSpec:
    """A tumour focus: target area as a fraction of tissue, architecture, nuclear atypia in [0, 1]."""

    area_fraction: float
    architecture: str = "clusters"
    atypia: float = 0.5


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float | tuple) -> np.ndarray:
    """Unit-variance Gaussian-filtered noise; wide filters are computed on a coarser grid and upsampled."""
    from scipy import ndimage

    sig = np.broadcast_to(np.asarray(sigma, np.float64), (2,))
    factor = max(1, int(sig.min() // 3))
    small_shape = (-(-shape[0] // factor), -(-shape[1] // factor))
    field = ndimage.gaussian_filter(rng.standard_normal(small_shape).astype(np.float32), tuple(sig / factor), mode="wrap")
    if factor > 1:
        field = _upsample(field, factor, shape)
    std = float(field.std()) or 1.0
    return field / std


def _upsample(field: np.ndarray, factor: int, shape: tuple[int, int]) -> np.ndarray:
    """Separable bilinear upsampling (pixel-centre aligned) of a coarse float field, cropped to ``shape``."""

    def taps(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = np.clip((np.arange(n_out, dtype=np.float32) + 0.5) / factor - 0.5, 0, n_in - 1)
        i0 = np.floor(src).astype(np.intp)
        return i0, np.minimum(i0 + 1, n_in - 1), (src - i0).astype(np.float32)

    field = np.asarray(field, np.float32)
    r0, r1, rt = taps(shape[0], field.shape[0])
    rows = field[r0] * (1 - rt)[:, None] + field[r1] * rt[:, None]
    c0, c1, ct = taps(shape[1], field.shape[1])
    out = rows[:, c0]
    out *= 1 - ct
    right = rows[:, c1]
    right *= ct
    out += right
    return out


def _tissue_field(rng: np.random.Generator, ch: int, cw: int) -> np.ndarray:
    """Signed coarse field: > 0 is tissue (ragged pieces with holes)."""
    yy, xx = np.mgrid[0:ch, 0:cw].astype(np.float32)
    field = np.full((ch, cw), -1.0, np.float32)
    n_pieces = int(rng.integers(1, 4))
    for k in range(n_pieces):
        cy, cx = rng.uniform(0.3, 0.7) * ch, rng.uniform(0.3, 0.7) * cw
        if n_pieces > 1:  # spread pieces apart
            angle = 2 * np.pi * k / n_pieces + rng.uniform(-0.4, 0.4)
            cy, cx = ch * (0.5 + 0.22 * np.sin(angle)), cw * (0.5 + 0.22 * np.cos(angle))
        scale = 0.42 if n_pieces == 1 else 0.28
        a, b = rng.uniform(0.75, 1.1) * scale * cw, rng.uniform(0.75, 1.1) * scale * ch
        theta = rng.uniform(0, np.pi)
        dx, dy = xx - cx, yy - cy
        u = (dx * np.cos(theta) + dy * np.sin(theta)) / a
        v = (-dx * np.sin(theta) + dy * np.cos(theta)) / b
        field = np.maximum(field, 1.0 - np.sqrt(u * u + v * v))
    field += 0.22 * _smooth_noise(rng, (ch, cw), max(2.0, min(ch, cw) / 14))
    holes = _smooth_noise(rng, (ch, cw), max(1.5, min(ch, cw) / 60))
    hole_strength = np.clip(holes - 2.0, 0, None)  # sparse blobs
    field = np.minimum(field, 0.6 - 3.0 * hole_strength)
    return field


def _place_foci(
    rng: np.random.Generator, tissue: np.ndarray, foci: list[FocusSpec]
) -> np.ndarray:
    """int16 coarse focus map: 0 none, k+1 focus k. Blobs grown inside tissue to the requested areas."""
    from scipy import ndimage

    ch, cw = tissue.shape
    focus_map = np.zeros((ch, cw), np.int16)
    n_tissue = int(tissue.sum())
    if n_tissue == 0:
        return focus_map
    dist_inside = ndimage.distance_transform_edt(tissue)
    yy, xx = np.mgrid[0:ch, 0:cw].astype(np.float32)
    for k, spec in enumerate(foci):
        target = max(1, int(round(spec.area_fraction * n_tissue)))
        radius = np.sqrt(target / np.pi)
        # centre: inside tissue, preferably deep enough for the focus, away from other foci
        free = tissue & (focus_map == 0)
        weights = np.where(free, np.minimum(dist_inside, radius + 1.0) ** 2, 0).ravel().astype(np.float64)
        if weights.sum() <= 0:
            break
        centre = rng.choice(weights.size, p=weights / weights.sum())
        cy, cx = divmod(int(centre), cw)
        noise = _smooth_noise(rng, (ch, cw), max(1.0, radius / 2.5))
        dist = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) / max(radius, 0.5)
        score = dist - 0.25 * noise
        score[~free] = np.inf
        # take exactly the `target` free tissue cells with the lowest score (a noisy blob around the centre)
        order = np.argsort(score, axis=None, kind="stable")[:target]
        order = order[np.isfinite(score.ravel()[order])]
        blob = np.zeros(ch * cw, bool)
        blob[order] = True
        blob = blob.reshape(ch, cw)
        # keep the connected component of the centre so a focus is one piece
        labels, _ = ndimage.label(blob)
        if labels[cy, cx] > 0:
            blob = labels == labels[cy, cx]
        focus_map[blob] = k + 1
    return focus_map


def _stamp_templates(radius: float, aspect: float, angle: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel offsets (dy, dx) and intensity profile of an elliptical nucleus."""
    r = int(np.ceil(radius * aspect)) + 1
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1].astype(np.float32)
    c, s = np.cos(angle), np.sin(angle)
    u = (dx * c + dy * s) / (radius * aspect)
    v = (-dx * s + dy * c) / radius
    d = np.sqrt(u * u + v * v)
    inside = d <= 1.0
    profile = (0.75 + 0.25 * (1 - d**2))[inside]  # darker centre, chromatin rim softened
    return dy[inside].astype(np.int32), dx[inside].astype(np.int32), profile.astype(np.float32)


def _stamp(
    canvas: np.ndarray,
    ys: np.ndarray,
    xs: np.ndarray,
    radius: np.ndarray,
    darkness: np.ndarray,
    rng: np.random.Generator,
    aspect_range: tuple[float, float] = (1.0, 1.5),
) -> None:
    """Paint nuclei (max-blend) into ``canvas`` (hematoxylin concentration) using a few shared templates."""
    if len(ys) == 0:
        return
    h, w = canvas.shape
    r_q = np.clip(np.round(radius * 2) / 2, 1.5, 14)
    aspect = rng.uniform(*aspect_range, size=len(ys))
    a_q = np.round(aspect * 4) / 4
    ang_q = rng.integers(0, 6, size=len(ys))
    keys = np.stack([r_q * 100, a_q * 10, ang_q], 1).astype(np.int64)
    uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
    for t, (rk, ak, gk) in enumerate(uniq):
        sel = np.flatnonzero(inverse.ravel() == t)
        oy, ox, prof = _stamp_templates(rk / 100, ak / 10, gk * np.pi / 6)
        yy = (ys[sel, None] + oy[None]).ravel()
        xx = (xs[sel, None] + ox[None]).ravel()
        val = (darkness[sel, None] * prof[None]).ravel()
        ok = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
        yy, xx, val = yy[ok], xx[ok], val[ok]
        canvas[yy, xx] = np.maximum(canvas[yy, xx], val)


def _architecture_points(
    rng: np.random.Generator, architecture: str, bbox: tuple[int, int, int, int], nucleus_r: float
) -> tuple[np.ndarray, np.ndarray, list[tuple[float, float, float]]]:
    """Nucleus centres (y, x) of an architecture filling ``bbox`` (y0, x0, y1, x1) + lumina (cy, cx, r)."""
    y0, x0, y1, x1 = bbox
    lumina: list[tuple[float, float, float]] = []
    pts_y: list[np.ndarray] = []
    pts_x: list[np.ndarray] = []
    spacing = 2.3 * nucleus_r
    if architecture in ("glands", "clusters"):
        R = rng.uniform(50, 80) if architecture == "glands" else rng.uniform(45, 70)
        period = 2.5 * R
        gy = np.arange(y0 - period, y1 + period, period)
        gx = np.arange(x0 - period, x1 + period, period)
        cy, cx = np.meshgrid(gy, gx, indexing="ij")
        cy = cy.ravel() + rng.uniform(-0.3, 0.3, cy.size) * period
        cx = cx.ravel() + rng.uniform(-0.3, 0.3, cx.size) * period
        for yc, xc in zip(cy, cx):
            r = R * rng.uniform(0.8, 1.2)
            if architecture == "glands":
                n = max(6, int(2 * np.pi * r / spacing))
                ang = np.linspace(0, 2 * np.pi, n, endpoint=False) + rng.uniform(0, 2 * np.pi)
                rr = r + rng.normal(0, 1.5, n)
                pts_y.append(yc + rr * np.sin(ang))
                pts_x.append(xc + rr * np.cos(ang))
                # a second, looser inner layer
                rr2 = r - spacing + rng.normal(0, 2.0, n // 2)
                ang2 = ang[::2] + np.pi / n
                pts_y.append(yc + rr2 * np.sin(ang2[: len(rr2)]))
                pts_x.append(xc + rr2 * np.cos(ang2[: len(rr2)]))
                lumina.append((yc, xc, r - 1.6 * spacing))
            else:
                n = max(8, int(np.pi * r * r / (spacing * spacing) * 0.9))
                rad = r * np.sqrt(rng.uniform(0, 1, n))
                ang = rng.uniform(0, 2 * np.pi, n)
                pts_y.append(yc + rad * np.sin(ang))
                pts_x.append(xc + rad * np.cos(ang))
    elif architecture == "single_file":
        theta = rng.uniform(0, np.pi)
        gap = rng.uniform(110, 150)
        diag = np.hypot(y1 - y0, x1 - x0) + 2 * gap
        cy0, cx0 = (y0 + y1) / 2, (x0 + x1) / 2
        offsets = np.arange(-diag / 2, diag / 2, gap)
        along = np.arange(-diag / 2, diag / 2, spacing * 1.15)
        for off in offsets:
            t = theta + rng.normal(0, 0.08)
            wobble = 10 * np.sin(along / rng.uniform(60, 120) + rng.uniform(0, 6.3))
            perp = off + wobble + rng.normal(0, 1.5, along.size)
            keep = rng.uniform(size=along.size) > 0.12  # gaps in the cords
            pts_y.append((cy0 + along * np.sin(t) + perp * np.cos(t))[keep])
            pts_x.append((cx0 + along * np.cos(t) - perp * np.sin(t))[keep])
    else:
        raise ValueError(f"unknown architecture {architecture!r}; choose one of {ARCHITECTURES}")
    if not pts_y:
        return np.zeros(0), np.zeros(0), lumina
    return np.concatenate(pts_y), np.concatenate(pts_x), lumina


def render_slide(
    width: int,
    height: int,
    rng: np.random.Generator,
    foci: list[FocusSpec],
    *,
    signal_strength: float = 1.0,
    architecture_strength: float = 0.8,
    mask_downsample: int = 8,
    background_only: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Render one slide: uint8 RGB ``[height, width, 3]`` and uint8 label map ``[ceil(h/ds), ceil(w/ds)]``
    (0 glass, 1 normal tissue, 2+k tumour focus k)."""
    from scipy import ndimage

    ds = int(mask_downsample)
    if ds < 4 or ds % 4:
        raise ValueError(f"mask_downsample must be a multiple of 4 (level-0 px per mask px), got {mask_downsample}")
    ch, cw = -(-height // ds), -(-width // ds)
    field = _tissue_field(rng, ch, cw)
    if background_only:
        field[:] = -1.0
    tissue_c = field > 0
    focus_c = _place_foci(rng, tissue_c, list(foci)) if foci else np.zeros((ch, cw), np.int16)
    label_map = np.where(focus_c > 0, focus_c + 1, tissue_c.astype(np.int16)).astype(np.uint8)

    # Level-0 tissue: bilinear field + fine noise for ragged borders (combined at 1/4 scale, upsampled once).
    sh, sw = -(-height // 4), -(-width // 4)
    border = _upsample(field, ds // 4, (sh, sw))
    border = border + 0.035 * _smooth_noise(rng, (sh, sw), 1.0)
    tissue = _upsample(border, 4, (height, width)) > 0

    # Eosin: fibrous stroma texture (two anisotropic noises blended by a smooth orientation field).
    fib_a = _smooth_noise(rng, (sh, sw), (0.6, 3.0))
    fib_b = _smooth_noise(rng, (sh, sw), (3.0, 0.6))
    blend = 1 / (1 + np.exp(-2 * _smooth_noise(rng, (sh, sw), max(sh, sw) / 12)))
    stain_scale = rng.uniform(0.85, 1.15, size=2).astype(np.float32)
    fibres = (0.42 + 0.11 * (blend * fib_a + (1 - blend) * fib_b)) * stain_scale[1]
    eosin = _upsample(fibres, 4, (height, width))
    hema = np.zeros((height, width), np.float32)

    # Nuclei: stromal everywhere in tissue (sparser inside tumour), tumour nuclei by architecture.
    def cell_points(cell_mask: np.ndarray, per_px: float) -> tuple[np.ndarray, np.ndarray]:
        cells = np.flatnonzero(cell_mask.ravel())
        counts = rng.poisson(per_px * ds * ds, size=cells.size)
        idx = np.repeat(cells, counts)
        cy, cx = np.divmod(idx, cw)
        return cy * ds + rng.uniform(0, ds, idx.size), cx * ds + rng.uniform(0, ds, idx.size)

    s = float(signal_strength)
    ny, nx = cell_points(tissue_c & (focus_c == 0), 1 / 650)
    ty, tx = cell_points(focus_c > 0, 1 / 2600)  # residual stroma inside foci
    ny, nx = np.concatenate([ny, ty]), np.concatenate([nx, tx])
    n_r = rng.uniform(2.8, 4.2, ny.size)
    n_dark = rng.normal(0.95, 0.12, ny.size).clip(0.5, 1.4)
    all_y, all_x, all_r, all_d = [ny], [nx], [n_r], [n_dark]
    lumina_all: list[tuple[float, float, float]] = []

    for k, spec in enumerate(foci):
        cells = focus_c == (k + 1)
        if not cells.any():
            continue
        rows, cols = np.nonzero(cells)
        bbox = (rows.min() * ds, cols.min() * ds, (rows.max() + 1) * ds, (cols.max() + 1) * ds)
        t_r_mean = 3.6 * (1 + 0.75 * s * (0.6 + 0.4 * spec.atypia))
        ay, ax, lumina = _architecture_points(rng, spec.architecture, bbox, t_r_mean)
        keep = rng.uniform(size=ay.size) < architecture_strength
        ay, ax = ay[keep], ax[keep]
        # random (architecture-free) share of tumour nuclei
        density = (1 / 650) * (1 + 1.5 * s)
        ry, rx = cell_points(cells, density * (1 - architecture_strength))
        py, px = np.concatenate([ay, ry]), np.concatenate([ax, rx])
        iy = np.clip((py // ds).astype(np.int64), 0, ch - 1)
        ix = np.clip((px // ds).astype(np.int64), 0, cw - 1)
        inside = (py >= 0) & (px >= 0) & (py < height) & (px < width) & cells[iy, ix]
        py, px = py[inside], px[inside]
        all_y.append(py)
        all_x.append(px)
        all_r.append(rng.normal(t_r_mean, 0.12 * t_r_mean, py.size).clip(2.5, 12))
        all_d.append(rng.normal(0.95 + 0.45 * s * (0.5 + 0.5 * spec.atypia), 0.12, py.size).clip(0.5, 2.0))
        lumina_all.extend(lum for lum in lumina if cells[min(ch - 1, max(0, int(lum[0] // ds))), min(cw - 1, max(0, int(lum[1] // ds)))])

    ys = np.concatenate(all_y)
    xs = np.concatenate(all_x)
    _stamp(hema, ys.astype(np.int64), xs.astype(np.int64), np.concatenate(all_r), np.concatenate(all_d), rng)
    # Lumina: pale (little eosin) discs inside glands.
    for yc, xc, r in lumina_all:
        if r <= 3:
            continue
        y0, y1 = int(max(0, yc - r)), int(min(height, yc + r + 1))
        x0, x1 = int(max(0, xc - r)), int(min(width, xc + r + 1))
        if y0 >= y1 or x0 >= x1:
            continue
        gy, gx = np.ogrid[y0:y1, x0:x1]
        disc = (gy - yc) ** 2 + (gx - xc) ** 2 <= r * r
        eosin[y0:y1, x0:x1][disc] *= 0.15
        hema[y0:y1, x0:x1][disc] *= 0.1

    # Quantised concentrations -> RGB through a Beer-Lambert lookup table (one gather instead of 3 exp passes):
    # RGB = 255 exp(-(c_H * H + c_E * E)); glass keeps a faint, uneven tint.
    hq = np.multiply(hema, stain_scale[0] * 255.0 / _H_MAX, out=hema)
    np.multiply(hq, tissue, out=hq)
    np.clip(hq, 0, 255, out=hq)
    eq = np.multiply(eosin, 127.0 / _E_MAX, out=eosin)
    np.multiply(eq, tissue, out=eq)
    eq += 1.5  # faint tint of the glass
    np.clip(eq, 0, 127, out=eq)
    index = hq.astype(np.int32)
    index *= 128
    index += eq.astype(np.int32)
    image = _stain_lut()[index]
    return image, label_map
