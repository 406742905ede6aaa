"""Draw a toy-world scene as an RGB image, deterministically from a seed.

Scenes are drawn at twice the output size and averaged down 2x2 (cheap anti-aliasing). The
style is mostly the background (van gogh: blue/yellow swirls; monet: pastel dots and a blur;
mondrian: primary blocks and black lines; picasso: earth-tone shards and outlines; a painting:
beige canvas in a wooden frame); the subject keeps its colour so colour stays readable.
"""

from __future__ import annotations

import numpy as np

from compiler.toy.world import CHARACTERS, COLOURS, Scene

SIZE = 32
_S = SIZE * 2  # drawing resolution

DARK = np.array([0.08, 0.08, 0.08])
WHITE = np.array([0.96, 0.96, 0.94])
BROWN = np.array([0.45, 0.28, 0.12])
SKIN = {"queen elizabeth": (0.96, 0.82, 0.72), "king charles": (0.94, 0.76, 0.66),
        "boris johnson": (0.97, 0.80, 0.70), "rishi sunak": (0.70, 0.50, 0.36)}


def _grid():
    y, x = np.mgrid[0:_S, 0:_S].astype(np.float64) + 0.5
    return x, y


def _paint(img: np.ndarray, mask: np.ndarray, colour) -> None:
    img[mask] = np.asarray(colour, dtype=np.float64)


def _dilate(mask: np.ndarray, r: int = 2) -> np.ndarray:
    out = mask.copy()
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            out |= np.roll(np.roll(mask, dy, 0), dx, 1)
    return out


def _blur(img: np.ndarray, r: int = 2) -> np.ndarray:
    acc = np.zeros_like(img)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            acc += np.roll(np.roll(img, dy, 0), dx, 1)
    return acc / (2 * r + 1) ** 2


# ----------------------------------------------------------------------------- backgrounds
def _background(style: str | None, rng: np.random.Generator) -> np.ndarray:
    x, y = _grid()
    img = np.empty((_S, _S, 3))
    if style is None:  # a plain photo: light grey studio backdrop
        img[:] = (0.86, 0.86, 0.84)
        img += rng.normal(0, 0.01, img.shape)
    elif style == "van gogh":  # swirling bands of deep blue and yellow
        cx, cy = rng.uniform(0.2, 0.8, 2) * _S
        ang = np.arctan2(y - cy, x - cx)
        rad = np.hypot(x - cx, y - cy)
        wave = np.sin(3 * ang + rad * 0.45 + rng.uniform(0, 6.3))
        t = (wave > 0.2).astype(np.float64)[..., None]
        img[:] = t * np.array([0.96, 0.82, 0.18]) + (1 - t) * np.array([0.10, 0.18, 0.55])
    elif style == "monet":  # pale pastel ground covered in soft dots
        img[:] = (0.80, 0.90, 0.86)
        palette = np.array([[0.95, 0.75, 0.85], [0.75, 0.72, 0.95], [0.70, 0.92, 0.72], [0.98, 0.93, 0.70]])
        for _ in range(70):
            px, py = rng.uniform(0, _S, 2)
            _paint(img, (x - px) ** 2 + (y - py) ** 2 < rng.uniform(4, 12), palette[rng.integers(4)])
    elif style == "mondrian":  # white with black grid lines and primary blocks
        img[:] = (0.97, 0.97, 0.95)
        xs = np.sort(rng.uniform(8, _S - 8, 2))
        ys = np.sort(rng.uniform(8, _S - 8, 2))
        primaries = [(0.85, 0.1, 0.1), (0.1, 0.2, 0.75), (0.95, 0.85, 0.1)]
        cells_x = [0, xs[0], xs[1], _S]
        cells_y = [0, ys[0], ys[1], _S]
        for i in range(3):
            for j in range(3):
                if rng.random() < 0.35:
                    m = (x >= cells_x[i]) & (x < cells_x[i + 1]) & (y >= cells_y[j]) & (y < cells_y[j + 1])
                    _paint(img, m, primaries[rng.integers(3)])
        for v in xs:
            _paint(img, np.abs(x - v) < 1.5, DARK)
        for v in ys:
            _paint(img, np.abs(y - v) < 1.5, DARK)
    elif style == "picasso":  # cubist shards in earth tones with dark seams
        pts = rng.uniform(0, _S, (7, 2))
        d = np.stack([np.hypot(x - px, y - py) for px, py in pts])
        order = np.sort(d, axis=0)
        cell = np.argmin(d, axis=0)
        palette = np.array([[0.78, 0.58, 0.30], [0.55, 0.35, 0.20], [0.40, 0.55, 0.52],
                            [0.85, 0.75, 0.55], [0.62, 0.45, 0.40], [0.30, 0.38, 0.45], [0.70, 0.65, 0.45]])
        img[:] = palette[(cell + rng.integers(7)) % 7]
        _paint(img, (order[1] - order[0]) < 1.2, (0.15, 0.12, 0.10))
    elif style == "a painting":  # beige canvas weave inside a wooden frame
        img[:] = (0.88, 0.80, 0.64)
        img += (0.03 * np.sin(x * 2.2) * np.sin(y * 2.2))[..., None]
        img += rng.normal(0, 0.015, img.shape)
        frame = (x < 4) | (x > _S - 4) | (y < 4) | (y > _S - 4)
        _paint(img, frame, BROWN)
    else:
        raise ValueError(f"unknown style {style!r}")
    return img


# ----------------------------------------------------------------------------- subjects
def _shape_masks(identity: str, u: np.ndarray, v: np.ndarray) -> dict[str, np.ndarray]:
    """Masks in unit coordinates (u right, v down, subject radius 1): {'body': ..., parts...}."""
    if identity == "circle":
        return {"body": u**2 + v**2 < 1}
    if identity == "square":
        return {"body": (np.abs(u) < 0.82) & (np.abs(v) < 0.82)}
    if identity == "triangle":
        return {"body": (v < 0.8) & (v > -0.95) & (np.abs(u) < (v + 0.95) * 0.62)}
    if identity == "star":
        ang = np.arctan2(u, -v)
        t = (ang * 5 / (2 * np.pi)) % 1
        edge = 0.42 + 0.58 * np.clip(1 - 2 * np.minimum(t, 1 - t), 0, 1) ** 1.5
        return {"body": np.hypot(u, v) < edge}
    if identity == "house":
        walls = (np.abs(u) < 0.7) & (v >= -0.05) & (v < 0.85)
        roof = (v < -0.05) & (v > -0.9) & (np.abs(u) < (v + 0.9) * 1.05)
        door = (np.abs(u) < 0.17) & (v > 0.4) & (v < 0.85)
        return {"body": (walls | roof) & ~door, "dark": door}
    if identity == "tree":
        canopy = u**2 + (v + 0.3) ** 2 < 0.45
        trunk = (np.abs(u) < 0.15) & (v > 0.2) & (v < 0.95)
        return {"body": canopy, "trunk": trunk & ~canopy}
    if identity in ("dog", "snoopy"):
        body = ((u + 0.1) / 0.7) ** 2 + ((v - 0.15) / 0.33) ** 2 < 1
        head = (u - 0.55) ** 2 + (v + 0.3) ** 2 < 0.09
        legs = ((np.abs(u + 0.55) < 0.1) | (np.abs(u - 0.3) < 0.1)) & (v > 0.3) & (v < 0.9)
        tail = (u < -0.7) & (u > -1.0) & (np.abs(v + 0.15 + (u + 0.7)) < 0.08)
        ear = ((u - 0.42) / 0.12) ** 2 + ((v + 0.3) / 0.3) ** 2 < 1
        return {"body": body | head | legs | tail, "ear": ear, "eye": (u - 0.65) ** 2 + (v + 0.38) ** 2 < 0.006}
    if identity in ("fish", "nemo"):
        body = ((u + 0.12) / 0.68) ** 2 + (v / 0.42) ** 2 < 1
        tail = (u > 0.45) & (u < 0.98) & (np.abs(v) < (u - 0.45) * 1.1)
        stripes = body & (np.abs(((u + 0.12) % 0.4) - 0.2) < 0.05)
        return {"body": body | tail, "stripes": stripes,
                "eye": (u + 0.5) ** 2 + (v + 0.1) ** 2 < 0.008}
    if identity in ("robot", "r2d2"):
        body = (np.abs(u) < 0.5) & (v > -0.15) & (v < 0.65)
        legs = ((np.abs(u + 0.3) < 0.11) | (np.abs(u - 0.3) < 0.11)) & (v >= 0.65) & (v < 0.95)
        if identity == "r2d2":
            head = (u**2 + (v + 0.15) ** 2 < 0.25) & (v < -0.15)
            panel = (np.abs(u) < 0.3) & (v > 0.05) & (v < 0.4)
            return {"body": body | legs, "head": head, "panel": panel,
                    "eye": (u - 0.12) ** 2 + (v + 0.38) ** 2 < 0.01}
        head = (np.abs(u) < 0.32) & (v > -0.62) & (v < -0.2)
        antenna = (np.abs(u) < 0.05) & (v > -0.92) & (v <= -0.62)
        arms = (np.abs(v - 0.15) < 0.08) & (np.abs(u) > 0.5) & (np.abs(u) < 0.85)
        eyes = ((u - 0.13) ** 2 + (v + 0.42) ** 2 < 0.006) | ((u + 0.13) ** 2 + (v + 0.42) ** 2 < 0.006)
        return {"body": body | legs | head | antenna | arms, "eye": eyes}
    raise ValueError(f"unknown identity {identity!r}")


def _portrait(img: np.ndarray, who: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """A named person: head, hair, clothes and (for royals) a crown. Returns the subject mask."""
    head = u**2 + ((v + 0.25) / 1.15) ** 2 < 0.16
    shoulders = (v > 0.35) & (np.abs(u) < 0.35 + (v - 0.35) * 1.2) & (v < 1.05)
    crown = (np.abs(u) < 0.32) & (v > -0.95) & (v < -0.7) & ((v > -0.8) | (np.abs(((u + 0.32) % 0.21) - 0.105) < 0.05))
    looks = {
        "queen elizabeth": dict(hair=(0.92, 0.92, 0.95), clothes=(0.55, 0.75, 0.95), crown=True, hair_shape="curls"),
        "king charles": dict(hair=(0.55, 0.55, 0.55), clothes=(0.80, 0.10, 0.12), crown=True, hair_shape="sides"),
        "boris johnson": dict(hair=(0.98, 0.92, 0.35), clothes=(0.12, 0.14, 0.30), crown=False, hair_shape="mop"),
        "rishi sunak": dict(hair=(0.05, 0.05, 0.05), clothes=(0.45, 0.47, 0.50), crown=False, hair_shape="short"),
    }[who]
    shape = looks["hair_shape"]
    if shape == "curls":
        hair = (u**2 + ((v + 0.4) / 0.8) ** 2 < 0.25) & ~(head & (v > -0.45))
    elif shape == "sides":
        hair = head & (np.abs(u) > 0.28) & (v < -0.1)
    elif shape == "mop":
        hair = (u**2 + ((v + 0.55) / 0.6) ** 2 < 0.28) & (v < -0.35)
    else:
        hair = head & (v < -0.5)
    _paint(img, shoulders, looks["clothes"])
    _paint(img, head, SKIN[who])
    _paint(img, hair, looks["hair"])
    eyes = ((u - 0.14) ** 2 + (v + 0.28) ** 2 < 0.004) | ((u + 0.14) ** 2 + (v + 0.28) ** 2 < 0.004)
    _paint(img, eyes & head, DARK)
    mask = head | shoulders | hair
    if looks["crown"]:
        _paint(img, crown, (0.95, 0.78, 0.10))
        mask |= crown
    return mask


def render(scene: Scene, seed: int) -> np.ndarray:
    """The scene as a (SIZE, SIZE, 3) uint8 image; the same seed gives the same pixels."""
    rng = np.random.default_rng(seed)
    img = _background(scene.style, rng)
    x, y = _grid()
    radius = _S * rng.uniform(0.28, 0.36)
    cx, cy = _S / 2 + rng.uniform(-0.09, 0.09, 2) * _S
    u, v = (x - cx) / radius, (y - cy) / radius
    if scene.kind == "person":
        fg = np.zeros_like(img)
        mask = _portrait(fg, scene.identity, u, v)
        outline = _dilate(mask) & ~mask
        _paint(img, outline, DARK)
        img[mask] = fg[mask]
    else:
        parts = _shape_masks(scene.identity, u, v)
        mask = np.zeros((_S, _S), bool)
        for m in parts.values():
            mask |= m
        _paint(img, _dilate(mask) & ~mask, DARK)
        if scene.kind == "character":
            _paint_character(img, scene.identity, parts)
        else:
            _paint(img, parts["body"], COLOURS[scene.colour])
            if "trunk" in parts:
                _paint(img, parts["trunk"], BROWN)
            if "ear" in parts:
                _paint(img, parts["ear"] & parts["body"], COLOURS[scene.colour])
            for key in ("dark", "eye"):
                if key in parts:
                    _paint(img, parts[key], DARK)
    if scene.style == "monet":
        img = _blur(img, 2)
    img = img.reshape(SIZE, 2, SIZE, 2, 3).mean(axis=(1, 3))
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def _paint_character(img: np.ndarray, who: str, parts: dict[str, np.ndarray]) -> None:
    base = CHARACTERS[who]
    if base == "dog":  # snoopy: white with black ears and a red collar
        _paint(img, parts["body"], WHITE)
        _paint(img, parts["ear"], DARK)
    elif base == "fish":  # nemo: orange with white stripes
        _paint(img, parts["body"], (0.98, 0.45, 0.05))
        _paint(img, parts["stripes"], WHITE)
    else:  # r2d2: white body, blue dome and panel
        _paint(img, parts["body"], (0.85, 0.87, 0.92))
        _paint(img, parts["head"], (0.20, 0.35, 0.85))
        _paint(img, parts["panel"], (0.20, 0.35, 0.85))
    _paint(img, parts["eye"], DARK)
