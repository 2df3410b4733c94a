"""Measure whether sampled images match their captions (colour + quadrant of the object).

For each image: "object" pixels are the saturated ones (max(rgb) - min(rgb) > SAT_THRESHOLD; every
background is gray and every object colour is saturated). The predicted position is the quadrant
holding the largest saturation mass; the predicted colour is the majority vote, over object pixels
of the named quadrant, of the nearest palette colour. An image is correct when both match.
"""
from __future__ import annotations

import torch

from .data import COLOURS, COLOUR_NAMES, POSITION_NAMES, HELD_OUT, SHAPES

SAT_THRESHOLD = 0.3
QUADRANTS = {  # name -> (row slice, col slice) for a 32x32 image
    "top left": (slice(0, 16), slice(0, 16)),
    "top right": (slice(0, 16), slice(16, 32)),
    "bottom left": (slice(16, 32), slice(0, 16)),
    "bottom right": (slice(16, 32), slice(16, 32)),
}


def predict(image: torch.Tensor):
    """image (3, 32, 32) in [0, 1] -> (position name, colour name or None for 'no object pixels')."""
    sat = image.max(0).values - image.min(0).values
    obj = sat > SAT_THRESHOLD
    mass = {q: float((sat * obj)[rs, cs].sum()) for q, (rs, cs) in QUADRANTS.items()}
    pos = max(mass, key=mass.get)
    return pos, mass


def colour_in_region(image: torch.Tensor, position: str):
    rs, cs = QUADRANTS[position]
    region = image[:, rs, cs].reshape(3, -1).T  # (P, 3)
    sat = region.max(1).values - region.min(1).values
    pix = region[sat > SAT_THRESHOLD]
    if pix.shape[0] == 0:
        return None
    pal = torch.tensor([COLOURS[c] for c in COLOUR_NAMES])
    nearest = torch.cdist(pix, pal).argmin(1)
    return COLOUR_NAMES[int(torch.bincount(nearest, minlength=len(pal)).argmax())]


def score(images: torch.Tensor, specs):
    """images (N,3,32,32) in [0,1]; specs: list of (colour, shape, position). Returns a dict of accuracies."""
    pos_ok = col_ok = both_ok = 0
    rows = []
    for img, (colour, shape, position) in zip(images, specs):
        pred_pos, _ = predict(img)
        pred_col = colour_in_region(img, position)
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
