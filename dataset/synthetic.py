"""Deterministic class-conditional toy ImageFolder.

Each class is one shape or pattern family drawn in a palette colour at a random position, size and
rotation on a smooth background (flat, or a slow linear gradient). Like natural images, a
picture mixes large flat regions with edges and textures, so the information per token
varies across the image, which is what dynamic patchification exploits.

    python -m dataset.synthetic --out data/toy --classes 10 --per-class 100 --size 64 --masks

writes data/toy/<class>/<i>.png (class names like "00_disc") and, with --masks, a mask per
image in the sibling folder data/toy_masks/<class>/<i>.png (255 = detailed: near an edge or
inside a texture, 0 = flat). The masks live outside the image folder, so an ImageFolder over
data/toy sees exactly the requested classes. Image (class k, index i) depends only on
(seed, k, i) and the style flags: the same seed gives byte-identical files. The style flags make
the data easier to learn from or harder: --colours (the first N palette colours), --flat-share
(flat backgrounds instead of gradients) and --radius (object size).
"""
import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from utils.cli import HelpFormatter

# Families drawn as a filled region whose inside carries a pattern of two colours.
TEXTURED = ("stripes", "checker", "dots", "noise_blob")
# Solid shapes first: a run with few classes gets the ones that stay distinct at a small image size.
FAMILIES = (
    "disc", "square", "triangle", "ring", "cross", "star",
    "stripes", "checker", "dots", "noise_blob", "polygon", "ellipse",
)
MIN_SIZE = 16
# Object colours and background base colours: a small palette of distinct colours, so that a
# small tokenizer can reproduce flat regions exactly (gradient backgrounds still vary continuously).
PALETTE = np.array([
    (0.9, 0.1, 0.1), (0.1, 0.7, 0.2), (0.15, 0.3, 0.9), (0.95, 0.85, 0.1), (0.9, 0.45, 0.05), (0.6, 0.2, 0.8),
    (0.1, 0.75, 0.8), (0.95, 0.95, 0.95), (0.08, 0.08, 0.08), (0.5, 0.5, 0.5), (0.95, 0.5, 0.7), (0.45, 0.3, 0.15),
])
RADIUS = (0.2, 0.34)  # object radius range, in image sizes (>= 6 pixels at 32px: shapes stay recognisable)
FLAT_SHARE = 0.4  # share of flat backgrounds (the rest are gradients)
EDGE_THRESHOLD = 0.08  # per-pixel colour step (0..1) that counts as an edge; gradients stay below


def class_names(num_classes: int) -> list[str]:
    """Folder names of the first num_classes families, e.g. ["00_disc", "01_square", ...]."""
    if not 1 <= num_classes <= len(FAMILIES):
        raise ValueError(f"classes must be between 1 and {len(FAMILIES)}, got {num_classes}")
    return [f"{k:02d}_{name}" for k, name in enumerate(FAMILIES[:num_classes])]


def mask_dir(out: str | Path) -> Path:
    """Folder holding the detail masks of the image folder `out` (a sibling, `<out>_masks`)."""
    out = Path(out)
    return out.parent / f"{out.name}_masks"


class _Canvas:
    """Pixel-centre coordinates of a size x size image plus the per-image random draws."""

    def __init__(self, size: int, rng: np.random.Generator, radius: tuple[float, float] = RADIUS):
        self.size = size
        self.rng = rng
        y, x = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5  # (S, S) each
        self.x, self.y = x, y
        self.cx, self.cy = rng.uniform(0.3, 0.7, size=2) * size
        self.radius = rng.uniform(*radius) * size
        self.angle = rng.uniform(0.0, 2 * np.pi)

    def local(self) -> tuple[np.ndarray, np.ndarray]:
        """Coordinates relative to the object centre, rotated into the object's frame."""
        dx, dy = self.x - self.cx, self.y - self.cy
        c, s = np.cos(self.angle), np.sin(self.angle)
        return c * dx + s * dy, -s * dx + c * dy

    def polar(self) -> tuple[np.ndarray, np.ndarray]:
        qx, qy = self.local()
        return np.hypot(qx, qy), np.arctan2(qy, qx)


# Signed distances in pixels (negative inside); coverage = clip(0.5 - d, 0, 1) antialiases.

def _sd_box(qx: np.ndarray, qy: np.ndarray, half_w: float, half_h: float) -> np.ndarray:
    dx, dy = np.abs(qx) - half_w, np.abs(qy) - half_h
    outside = np.hypot(np.maximum(dx, 0), np.maximum(dy, 0))
    return outside + np.minimum(np.maximum(dx, dy), 0)


def _sd_regular_polygon(cv: _Canvas, sides: int, circumradius: float) -> np.ndarray:
    qx, qy = cv.local()
    normals = 2 * np.pi * (np.arange(sides) + 0.5) / sides  # (n,) edge normal angles
    proj = qx[..., None] * np.cos(normals) + qy[..., None] * np.sin(normals)  # (S, S, n)
    return proj.max(-1) - circumradius * np.cos(np.pi / sides)


def _region(cv: _Canvas) -> np.ndarray:
    """A disc or a rotated square that carries a texture."""
    if cv.rng.random() < 0.5:
        return np.hypot(cv.x - cv.cx, cv.y - cv.cy) - cv.radius
    qx, qy = cv.local()
    return _sd_box(qx, qy, cv.radius * 0.9, cv.radius * 0.9)


def _disc(cv: _Canvas) -> tuple[np.ndarray, None]:
    return np.hypot(cv.x - cv.cx, cv.y - cv.cy) - cv.radius, None


def _square(cv: _Canvas) -> tuple[np.ndarray, None]:
    qx, qy = cv.local()
    return _sd_box(qx, qy, cv.radius * 0.85, cv.radius * 0.85), None


def _triangle(cv: _Canvas) -> tuple[np.ndarray, None]:
    return _sd_regular_polygon(cv, 3, cv.radius * 1.1), None


def _ring(cv: _Canvas) -> tuple[np.ndarray, None]:
    width = max(1.5, cv.rng.uniform(0.12, 0.3) * cv.radius)
    return np.abs(np.hypot(cv.x - cv.cx, cv.y - cv.cy) - cv.radius) - width, None


def _cross(cv: _Canvas) -> tuple[np.ndarray, None]:
    qx, qy = cv.local()
    arm = max(1.5, cv.rng.uniform(0.2, 0.35) * cv.radius)
    return np.minimum(_sd_box(qx, qy, cv.radius, arm), _sd_box(qx, qy, arm, cv.radius)), None


def _star(cv: _Canvas) -> tuple[np.ndarray, None]:
    points = int(cv.rng.integers(5, 9))
    inner = cv.rng.uniform(0.35, 0.55) * cv.radius
    r, phi = cv.polar()
    tri = np.abs(((phi * points / (2 * np.pi)) % 1.0) - 0.5) * 2  # 1 at a tip, 0 between tips
    return r - (inner + (cv.radius - inner) * tri), None


def _polygon(cv: _Canvas) -> tuple[np.ndarray, None]:
    return _sd_regular_polygon(cv, int(cv.rng.integers(5, 9)), cv.radius), None


def _ellipse(cv: _Canvas) -> tuple[np.ndarray, None]:
    qx, qy = cv.local()
    a, b = cv.radius, cv.radius * cv.rng.uniform(0.35, 0.7)
    return (np.hypot(qx / a, qy / b) - 1.0) * b, None


def _stripes(cv: _Canvas) -> tuple[np.ndarray, np.ndarray]:
    qx, _ = cv.local()
    period = max(3.0, cv.rng.uniform(0.06, 0.14) * cv.size)
    t = (qx / period) % 1.0
    return _region(cv), np.clip(0.5 - (np.abs(t - 0.5) - 0.25) * period, 0.0, 1.0)


def _checker(cv: _Canvas) -> tuple[np.ndarray, np.ndarray]:
    qx, qy = cv.local()
    cell = max(2.0, cv.rng.uniform(0.05, 0.12) * cv.size)
    parity = (np.floor(qx / cell) + np.floor(qy / cell)) % 2
    return _region(cv), parity


def _dots(cv: _Canvas) -> tuple[np.ndarray, np.ndarray]:
    qx, qy = cv.local()
    spacing = max(4.0, cv.rng.uniform(0.08, 0.15) * cv.size)
    cells = int(np.ceil(2 * cv.size / spacing)) + 2
    jitter = cv.rng.uniform(-0.2, 0.2, size=(2, cells, cells)) * spacing  # per lattice cell
    i = np.clip(np.floor(qx / spacing).astype(int) + cells // 2, 0, cells - 1)  # (S, S)
    j = np.clip(np.floor(qy / spacing).astype(int) + cells // 2, 0, cells - 1)
    dx = qx - (i - cells // 2 + 0.5) * spacing - jitter[0, i, j]
    dy = qy - (j - cells // 2 + 0.5) * spacing - jitter[1, i, j]
    dot = np.clip(0.5 - (np.hypot(dx, dy) - 0.28 * spacing), 0.0, 1.0)
    return _region(cv), dot


def _noise_blob(cv: _Canvas) -> tuple[np.ndarray, np.ndarray]:
    r, phi = cv.polar()
    harmonics = np.arange(2, 6)
    amps = cv.rng.uniform(-0.08, 0.08, size=4)
    phases = cv.rng.uniform(0, 2 * np.pi, size=4)
    wobble = (amps * np.sin(harmonics * phi[..., None] + phases)).sum(-1)  # (S, S)
    noise = cv.rng.random((cv.size + 1, cv.size + 1))
    texture = (noise[:-1, :-1] + noise[1:, :-1] + noise[:-1, 1:] + noise[1:, 1:]) / 4
    return r - cv.radius * (1 + wobble), np.clip((texture - 0.5) * 2.5 + 0.5, 0.0, 1.0)


_RENDER: dict[str, Callable[[_Canvas], tuple[np.ndarray, np.ndarray | None]]] = {
    "disc": _disc, "square": _square, "triangle": _triangle, "ring": _ring,
    "stripes": _stripes, "checker": _checker, "cross": _cross, "star": _star,
    "dots": _dots, "noise_blob": _noise_blob, "polygon": _polygon, "ellipse": _ellipse,
}


def _contrasting_colour(rng: np.random.Generator, palette: np.ndarray, avoid: list[np.ndarray]) -> np.ndarray:
    """A random palette colour at least 0.35 away from every colour in `avoid` (the farthest
    colour where none is)."""
    gaps = np.linalg.norm(palette[:, None] - np.asarray(avoid)[None], axis=-1).min(1)  # (P,)
    far = np.flatnonzero(gaps >= 0.35)
    return palette[rng.choice(far)] if len(far) else palette[gaps.argmax()]


def _background(cv: _Canvas, palette: np.ndarray, flat_share: float) -> tuple[np.ndarray, list[np.ndarray]]:
    """Flat colour (with probability flat_share) or a slow linear gradient across the image:
    (S, S, 3) and its end colours."""
    a = palette[cv.rng.integers(len(palette))]
    if cv.rng.random() < flat_share:
        return np.broadcast_to(a, (cv.size, cv.size, 3)), [a]
    b = np.clip(a + cv.rng.uniform(-0.5, 0.5, size=3), 0.0, 1.0)
    theta = cv.rng.uniform(0, 2 * np.pi)
    t = ((cv.x - cv.size / 2) * np.cos(theta) + (cv.y - cv.size / 2) * np.sin(theta)) / cv.size
    t = np.clip(t + 0.5, 0.0, 1.0)[..., None]  # (S, S, 1)
    return a * (1 - t) + b * t, [a, b]


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation with a (2r+1) x (2r+1) square, by shifted maxima."""
    padded = np.pad(mask, radius)
    out = np.zeros_like(mask)
    size = mask.shape[0]
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out |= padded[dy:dy + size, dx:dx + size]
    return out


def detail_mask(image: np.ndarray, textured: np.ndarray | None = None) -> np.ndarray:
    """Detailed pixels of a float image (S, S, 3) in [0, 1]: near an edge or inside a texture.

    An edge is a colour step above EDGE_THRESHOLD to a 4-neighbour; the edge map is dilated by
    max(1, S // 32) pixels. `textured` (S, S) bool marks texture regions, always detailed.
    """
    step = np.zeros(image.shape[:2], dtype=bool)
    dy = np.abs(np.diff(image, axis=0)).max(-1) > EDGE_THRESHOLD  # (S-1, S)
    dx = np.abs(np.diff(image, axis=1)).max(-1) > EDGE_THRESHOLD  # (S, S-1)
    step[:-1] |= dy
    step[1:] |= dy
    step[:, :-1] |= dx
    step[:, 1:] |= dx
    mask = _dilate(step, max(1, image.shape[0] // 32))
    return mask | textured if textured is not None else mask


def render_image(family: str, size: int, rng: np.random.Generator, colours: int = len(PALETTE),
                 flat_share: float = FLAT_SHARE, radius: tuple[float, float] = RADIUS) -> tuple[np.ndarray, np.ndarray]:
    """One image of a family, drawn with the first `colours` palette colours and an object radius
    in `radius` (fractions of the image size): (uint8 (S, S, 3), detail mask bool (S, S))."""
    palette = PALETTE[:colours]
    cv = _Canvas(size, rng, radius)
    bg, bg_colours = _background(cv, palette, flat_share)
    sdf, pattern = _RENDER[family](cv)
    alpha = np.clip(0.5 - sdf, 0.0, 1.0)[..., None]  # (S, S, 1) antialiased coverage
    fg = _contrasting_colour(rng, palette, bg_colours)
    if pattern is None:
        colour = np.broadcast_to(fg, bg.shape)
        textured = None
    else:
        fg2 = _contrasting_colour(rng, palette, [fg])
        colour = fg * pattern[..., None] + fg2 * (1 - pattern[..., None])  # (S, S, 3)
        textured = alpha[..., 0] > 0.5
    image = bg * (1 - alpha) + colour * alpha
    mask = detail_mask(image, textured)
    return np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8), mask


def generate_dataset(out: str | Path, classes: int, per_class: int, size: int, seed: int = 0,
                     masks: bool = False, colours: int = len(PALETTE), flat_share: float = FLAT_SHARE,
                     radius: tuple[float, float] = RADIUS) -> list[str]:
    """Write out/<class>/<i>.png (and masks under mask_dir(out)); returns the class names."""
    if not 2 <= colours <= len(PALETTE):
        raise ValueError(f"colours must be between 2 and {len(PALETTE)}, got {colours}")
    if not 0 <= flat_share <= 1:
        raise ValueError(f"flat_share must be between 0 and 1, got {flat_share}")
    if not 0 < radius[0] <= radius[1] <= 0.5:
        raise ValueError(f"radius must be a range 0 < min <= max <= 0.5 (fractions of the image size), got {radius}")
    if size < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE}, got {size}")
    if per_class < 1:
        raise ValueError(f"per_class must be positive, got {per_class}")
    names = class_names(classes)
    out, radius = Path(out), tuple(radius)
    for k, name in enumerate(names):
        (out / name).mkdir(parents=True, exist_ok=True)
        if masks:
            (mask_dir(out) / name).mkdir(parents=True, exist_ok=True)
        family = FAMILIES[k]
        for i in range(per_class):
            image, mask = render_image(family, size, np.random.default_rng([seed, k, i]), colours, flat_share, radius)
            Image.fromarray(image).save(out / name / f"{i}.png", format="PNG")
            if masks:
                Image.fromarray(mask.astype(np.uint8) * 255).save(
                    mask_dir(out) / name / f"{i}.png", format="PNG")
    return names


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--out", type=str, required=True, help="ImageFolder root to write: <class>/<image>.png")
    parser.add_argument("--classes", type=int, default=10, help=f"1..{len(FAMILIES)}")
    parser.add_argument("--per-class", type=int, default=100, help="images per class")
    parser.add_argument("--size", type=int, default=64, help="image size in pixels")
    parser.add_argument("--seed", type=int, default=0, help="seed of the images")
    parser.add_argument("--masks", action="store_true", help="also write detail masks to <out>_masks")
    parser.add_argument("--colours", type=int, default=len(PALETTE),
                        help=f"draw with the first N palette colours (2..{len(PALETTE)}; fewer = simpler data)")
    parser.add_argument("--flat-share", type=float, default=FLAT_SHARE,
                        help="share of flat backgrounds; the rest are slow linear gradients")
    parser.add_argument("--radius", type=float, nargs=2, default=RADIUS, metavar=("MIN", "MAX"),
                        help="object radius range, as fractions of the image size")
    args = parser.parse_args(argv)
    try:
        names = generate_dataset(args.out, args.classes, args.per_class, args.size, args.seed, args.masks,
                                 args.colours, args.flat_share, args.radius)
    except ValueError as e:
        raise SystemExit(f"dataset.synthetic: error: {e}")
    print(f"wrote {len(names) * args.per_class} images ({len(names)} classes) to {args.out}"
          + (f", masks to {mask_dir(args.out)}" if args.masks else ""))


if __name__ == "__main__":
    main()
