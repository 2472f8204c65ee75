"""Procedural face drawing for the built-in benchmark.

A person is a fixed set of visual traits (face shape, skin, hair, eyes, glasses, beard, shirt); an image is
those traits rendered under a *view* (pose shift/tilt, crop scale, background, lighting). Identity lives in the
traits, so held-out views test whether recognition generalises beyond the one image used for unlearning.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageEnhance

SKIN = [(255, 224, 189), (234, 192, 134), (198, 134, 66), (141, 85, 36), (88, 57, 39)]
HAIR = [(20, 20, 20), (110, 60, 20), (230, 200, 80), (200, 60, 30), (160, 160, 160), (60, 60, 200)]
EYES = [(40, 90, 200), (30, 140, 60), (90, 50, 20)]
SHIRT = [(220, 40, 40), (40, 160, 60), (40, 60, 220), (240, 200, 40), (150, 60, 180), (250, 130, 30)]
HAIR_STYLES = ["short", "long", "bald", "spiky"]
BACKGROUNDS = [(235, 235, 235), (180, 210, 240), (200, 240, 200), (250, 225, 200), (120, 120, 140)]


@dataclass(frozen=True)
class Traits:
    face_w: float
    face_h: float
    skin: int
    hair: int
    hair_style: int
    eyes: int
    glasses: bool
    beard: bool
    shirt: int


def random_traits(rng: random.Random, taken: set[Traits]) -> Traits:
    """Draw traits not used by anyone else (so every person is visually distinct)."""
    for _ in range(10_000):
        t = Traits(
            face_w=rng.choice([0.50, 0.62]),
            face_h=rng.choice([0.62, 0.74]),
            skin=rng.randrange(len(SKIN)),
            hair=rng.randrange(len(HAIR)),
            hair_style=rng.randrange(len(HAIR_STYLES)),
            eyes=rng.randrange(len(EYES)),
            glasses=rng.random() < 0.4,
            beard=rng.random() < 0.35,
            shirt=rng.randrange(len(SHIRT)),
        )
        if all(_distance(t, o) >= 2 for o in taken):
            taken.add(t)
            return t
    raise RuntimeError("could not draw distinct traits: too many people for the trait space")


def _distance(a: Traits, b: Traits) -> int:
    return sum(x != y for x, y in zip(vars(a).values(), vars(b).values()))


def render(t: Traits, rng: random.Random, size: int = 64, render_scale: int = 4) -> Image.Image:
    """Draw one view of a person: random pose shift, crop scale, background and lighting."""
    S = size * render_scale
    bg = list(BACKGROUNDS[rng.randrange(len(BACKGROUNDS))])
    img = Image.new("RGB", (S, S), tuple(bg))
    d = ImageDraw.Draw(img)
    scale = rng.uniform(0.85, 1.1)
    cx = S / 2 + rng.uniform(-0.08, 0.08) * S
    cy = S / 2 + rng.uniform(-0.05, 0.05) * S
    fw, fh = t.face_w * S * 0.5 * scale, t.face_h * S * 0.5 * scale
    # shirt / shoulders
    d.ellipse([cx - fw * 1.6, cy + fh * 0.8, cx + fw * 1.6, cy + fh * 2.6], fill=SHIRT[t.shirt])
    hair = HAIR[t.hair]
    style = HAIR_STYLES[t.hair_style]
    if style == "long":
        d.rectangle([cx - fw * 1.15, cy - fh * 0.6, cx + fw * 1.15, cy + fh * 0.9], fill=hair)
    d.ellipse([cx - fw, cy - fh, cx + fw, cy + fh], fill=SKIN[t.skin])
    if style in ("short", "long"):
        d.chord([cx - fw * 1.05, cy - fh * 1.12, cx + fw * 1.05, cy + fh * 0.2], 180, 360, fill=hair)
    elif style == "spiky":
        for k in range(5):
            x = cx - fw + k * fw / 2
            d.polygon([(x - fw * 0.25, cy - fh * 0.7), (x, cy - fh * 1.35), (x + fw * 0.25, cy - fh * 0.7)], fill=hair)
    ey = cy - fh * 0.15
    er = fw * 0.16
    for sx in (-1, 1):
        ex = cx + sx * fw * 0.4
        d.ellipse([ex - er, ey - er, ex + er, ey + er], fill=(255, 255, 255))
        d.ellipse([ex - er * 0.6, ey - er * 0.6, ex + er * 0.6, ey + er * 0.6], fill=EYES[t.eyes])
        if t.glasses:
            d.ellipse([ex - er * 1.6, ey - er * 1.6, ex + er * 1.6, ey + er * 1.6], outline=(10, 10, 10), width=S // 40)
    if t.beard:
        d.chord([cx - fw * 0.9, cy - fh * 0.1, cx + fw * 0.9, cy + fh * 1.02], 0, 180, fill=hair)
    d.line([cx - fw * 0.3, cy + fh * 0.45, cx + fw * 0.3, cy + fh * 0.45], fill=(150, 40, 40), width=S // 50)
    img = img.rotate(rng.uniform(-12, 12), resample=Image.BILINEAR, fillcolor=tuple(bg))
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.75, 1.2))
    return img.resize((size, size), Image.LANCZOS)


SHAPES = ["circle", "square", "triangle", "star"]
SHAPE_COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 60, 220), "yellow": (240, 210, 40)}


def render_shape(shape: str, color: str, rng: random.Random, size: int = 64) -> Image.Image:
    """A coloured geometric shape: the utility set's images (knowledge unrelated to any person)."""
    S = size * 4
    img = Image.new("RGB", (S, S), BACKGROUNDS[rng.randrange(len(BACKGROUNDS))])
    d = ImageDraw.Draw(img)
    c = SHAPE_COLORS[color]
    r = S * rng.uniform(0.25, 0.35)
    cx, cy = S / 2 + rng.uniform(-0.1, 0.1) * S, S / 2 + rng.uniform(-0.1, 0.1) * S
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=c)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=c)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=c)
    else:
        pts = []
        for k in range(10):
            a = math.pi / 2 + k * math.pi / 5
            rr = r if k % 2 == 0 else r * 0.45
            pts.append((cx + rr * math.cos(a), cy - rr * math.sin(a)))
        d.polygon(pts, fill=c)
    return img.resize((size, size), Image.LANCZOS)
