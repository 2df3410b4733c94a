"""Seeded synthetic captioned dataset: one coloured shape per 32x32 RGB image, caption names it.

Factors: shape (circle / square / triangle), colour (6 saturated colours), position (4 quadrants),
size (small / large), background (black / gray / white), plus small colour jitter and sub-pixel
position jitter; shapes are anti-aliased by 4x supersampling.

Captions: ``"a [small|large] <colour> <shape> in the <top|bottom> <left|right>[ on a <bg> background]"``;
the size word and the background phrase are each left out with probability 0.5, so both short
("a red circle in the top left") and long prompts are in-distribution.

``HELD_OUT`` (colour, shape, position) triples never appear in training: the test samples them to
check compositional generalisation.
"""
from __future__ import annotations

import torch

SHAPES = ("circle", "square", "triangle")
COLOURS = {  # name -> RGB in [0, 1]
    "red": (0.86, 0.12, 0.12),
    "green": (0.12, 0.70, 0.20),
    "blue": (0.15, 0.25, 0.88),
    "yellow": (0.92, 0.84, 0.12),
    "purple": (0.58, 0.18, 0.76),
    "cyan": (0.12, 0.80, 0.84),
}
POSITIONS = {  # name -> (x, y) centre in pixels of a 32x32 image
    "top left": (8.0, 8.0),
    "top right": (24.0, 8.0),
    "bottom left": (8.0, 24.0),
    "bottom right": (24.0, 24.0),
}
SIZES = {"small": 3.5, "large": 6.0}  # "radius" in pixels
BACKGROUNDS = {"black": (0.06, 0.06, 0.06), "gray": (0.50, 0.50, 0.50), "white": (0.93, 0.93, 0.93)}
IMAGE_SIZE = 32
SUPERSAMPLE = 4
COLOUR_JITTER = 0.05
POS_JITTER = 1.5

COLOUR_NAMES = tuple(COLOURS)
POSITION_NAMES = tuple(POSITIONS)
SIZE_NAMES = tuple(SIZES)
BACKGROUND_NAMES = tuple(BACKGROUNDS)

# one held-out (colour, shape, position) per colour, covering every shape and every position
HELD_OUT = (
    ("red", "circle", "top left"),
    ("green", "square", "top right"),
    ("blue", "triangle", "bottom left"),
    ("yellow", "circle", "bottom right"),
    ("purple", "triangle", "top right"),
    ("cyan", "square", "bottom left"),
)
_HELD = set(HELD_OUT)


def caption(colour: str, shape: str, position: str, size: str | None = None, background: str | None = None) -> str:
    words = ["a"] + ([size] if size else []) + [colour, shape, "in", "the", position]
    if background:
        words += ["on", "a", background, "background"]
    return " ".join(words)


def _masks(shape_idx, cx, cy, radius, size=IMAGE_SIZE, ss=SUPERSAMPLE):
    """Anti-aliased coverage masks (N, size, size) in [0, 1]."""
    n = shape_idx.shape[0]
    coords = (torch.arange(size * ss, dtype=torch.float32) + 0.5) / ss  # pixel-centre coordinates
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    dx = xs[None] - cx[:, None, None]
    dy = ys[None] - cy[:, None, None]
    r = radius[:, None, None]
    circle = dx * dx + dy * dy <= r * r
    half = r * 0.886  # square of the same area as the circle
    square = (dx.abs() <= half) & (dy.abs() <= half)
    # upward isosceles triangle, apex at top; height 2r*0.95, base 2r*1.15
    top, bottom = -r * 1.0, r * 0.9
    frac = (dy - top) / (bottom - top)
    triangle = (dy >= top) & (dy <= bottom) & (dx.abs() <= frac * r * 1.15)
    sel = shape_idx[:, None, None]
    mask = torch.where(sel == 0, circle, torch.where(sel == 1, square, triangle)).float()
    return mask.view(n, size, ss, size, ss).mean(dim=(2, 4))


def render(colour_idx, shape_idx, pos_idx, size_idx, bg_idx, generator: torch.Generator | None = None,
           jitter: bool = True) -> torch.Tensor:
    """Render images (N, 3, 32, 32) in [0, 1] from factor indices (LongTensors of length N)."""
    n = colour_idx.shape[0]
    pal = torch.tensor(list(COLOURS.values()))
    bgs = torch.tensor(list(BACKGROUNDS.values()))
    centres = torch.tensor(list(POSITIONS.values()))
    radii = torch.tensor(list(SIZES.values()))
    fg = pal[colour_idx]
    bg = bgs[bg_idx]
    c = centres[pos_idx]
    if jitter:
        fg = fg + COLOUR_JITTER * (2 * torch.rand(n, 3, generator=generator) - 1)
        bg = bg + COLOUR_JITTER * (2 * torch.rand(n, 3, generator=generator) - 1)
        c = c + POS_JITTER * (2 * torch.rand(n, 2, generator=generator) - 1)
    mask = _masks(shape_idx, c[:, 0], c[:, 1], radii[size_idx])[:, None]
    img = mask * fg[:, :, None, None] + (1 - mask) * bg[:, :, None, None]
    return img.clamp(0, 1)


def make_batch(n: int, generator: torch.Generator, exclude_held_out: bool = True):
    """Sample n random (image, caption) pairs. Returns (images (n,3,32,32) in [0,1], captions, factors)."""
    colour = torch.randint(len(COLOURS), (n,), generator=generator)
    shape = torch.randint(len(SHAPES), (n,), generator=generator)
    pos = torch.randint(len(POSITIONS), (n,), generator=generator)
    if exclude_held_out:
        # resample held-out combinations until none is left (deterministic given the generator)
        while True:
            bad = torch.tensor([(COLOUR_NAMES[c], SHAPES[s], POSITION_NAMES[p]) in _HELD
                                for c, s, p in zip(colour.tolist(), shape.tolist(), pos.tolist())])
            if not bad.any():
                break
            k = int(bad.sum())
            colour[bad] = torch.randint(len(COLOURS), (k,), generator=generator)
            shape[bad] = torch.randint(len(SHAPES), (k,), generator=generator)
            pos[bad] = torch.randint(len(POSITIONS), (k,), generator=generator)
    size = torch.randint(len(SIZES), (n,), generator=generator)
    bg = torch.randint(len(BACKGROUNDS), (n,), generator=generator)
    keep_size = torch.rand(n, generator=generator) < 0.5
    keep_bg = torch.rand(n, generator=generator) < 0.5
    images = render(colour, shape, pos, size, bg, generator=generator)
    captions = [caption(COLOUR_NAMES[c], SHAPES[s], POSITION_NAMES[p],
                        SIZE_NAMES[z] if ks else None, BACKGROUND_NAMES[b] if kb else None)
                for c, s, p, z, b, ks, kb in zip(colour.tolist(), shape.tolist(), pos.tolist(), size.tolist(),
                                                 bg.tolist(), keep_size.tolist(), keep_bg.tolist())]
    factors = dict(colour=colour, shape=shape, position=pos, size=size, background=bg)
    return images, captions, factors


def save_grid_ppm(images: torch.Tensor, path, nrow: int = 8, scale: int = 2):
    """Write images (N,3,H,W) in [0,1] as one binary PPM grid (no image library needed)."""
    n, _, h, w = images.shape
    ncol = min(nrow, n)
    rows = (n + ncol - 1) // ncol
    grid = torch.ones(3, rows * (h + 1) + 1, ncol * (w + 1) + 1)
    for i in range(n):
        r, c = divmod(i, ncol)
        grid[:, 1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + c * (w + 1): 1 + c * (w + 1) + w] = images[i]
    grid = grid.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    data = (grid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).contiguous().numpy().tobytes()
    with open(path, "wb") as f:
        f.write(b"P6\n%d %d\n255\n" % (grid.shape[2], grid.shape[1]))
        f.write(data)


def save_grid(images: torch.Tensor, path, nrow: int = 8, scale: int = 2):
    """PNG grid when Pillow is installed (or the path ends in .ppm), else a PPM next to ``path``."""
    from pathlib import Path

    path = Path(path)
    try:
        from PIL import Image
    except ImportError:
        Image = None
    if Image is None or path.suffix == ".ppm":
        save_grid_ppm(images, path.with_suffix(".ppm"), nrow, scale)
        return path.with_suffix(".ppm")
    tmp = path.with_suffix(".tmp.ppm")
    save_grid_ppm(images, tmp, nrow, scale)
    Image.open(tmp).save(path)
    tmp.unlink()
    return path
