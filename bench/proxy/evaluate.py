"""Measure whether sampled images match their captions: the named colour, in the named quadrant.

The background is whatever colour the border of the image has (its median: the object rarely covers
much of the border). Object pixels are those farther than OBJECT_DISTANCE from it in RGB. The
predicted colour is the palette colour nearest to the median object pixel; the predicted position is
the quadrant holding most object pixels. Background-relative on purpose: a sampled background may be
tinted (at 2000 training steps the proxy does not always commit to black / gray / white), and a
saturation threshold would then mistake the whole background for the object.
"""
from __future__ import annotations

import torch

from .data import COLOURS, COLOUR_NAMES, HELD_OUT, POSITION_NAMES, SHAPES

OBJECT_DISTANCE = 0.25
QUADRANTS = {  # name -> (row slice, col slice) for a 32x32 image
    "top left": (slice(0, 16), slice(0, 16)),
    "top right": (slice(0, 16), slice(16, 32)),
    "bottom left": (slice(16, 32), slice(0, 16)),
    "bottom right": (slice(16, 32), slice(16, 32)),
}
_PALETTE = torch.tensor([COLOURS[c] for c in COLOUR_NAMES])


def object_mask(image: torch.Tensor) -> torch.Tensor:
    """(H, W) bool: pixels far from the background colour (median of the border pixels)."""
    border = torch.cat([image[:, 0], image[:, -1], image[:, 1:-1, 0], image[:, 1:-1, -1]], dim=1)
    background = border.median(dim=1).values
    return (image - background[:, None, None]).norm(dim=0) > OBJECT_DISTANCE


def predict(image: torch.Tensor):
    """image (3, 32, 32) in [0, 1] -> (position name, colour name), or (None, None) without an object."""
    mask = object_mask(image)
    if int(mask.sum()) == 0:
        return None, None
    counts = {q: int(mask[rs, cs].sum()) for q, (rs, cs) in QUADRANTS.items()}
    position = max(counts, key=counts.get)
    colour = image[:, mask].median(dim=1).values
    return position, COLOUR_NAMES[int(torch.cdist(colour[None], _PALETTE).argmin())]


def score(images: torch.Tensor, specs):
    """images (N,3,32,32) in [0,1]; specs: list of (colour, shape, position). Returns a dict of accuracies."""
    pos_ok = col_ok = both_ok = 0
    rows = []
    for img, (colour, shape, position) in zip(images, specs):
        pred_pos, pred_col = predict(img)
        p, c = pred_pos == position, pred_col == colour
        pos_ok += p
        col_ok += c
        both_ok += p and c
        rows.append(dict(colour=colour, shape=shape, position=position, pred_position=pred_pos,
                         pred_colour=pred_col, correct=bool(p and c)))
    n = len(specs)
    return dict(n=n, position_acc=pos_ok / n, colour_acc=col_ok / n, accuracy=both_ok / n, rows=rows)


def eval_specs():
    """The evaluation prompts: every HELD_OUT combination, plus one seen (training) combination per colour."""
    held = list(HELD_OUT)
    seen = [(c, SHAPES[(i + 1) % len(SHAPES)], POSITION_NAMES[(i + 2) % len(POSITION_NAMES)])
            for i, c in enumerate(COLOUR_NAMES)]
    assert not set(seen) & set(held)
    return held, seen
