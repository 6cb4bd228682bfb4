"""A seeded synthetic dataset in the competition's exact layout, hard in the same ways.

What makes the real data hard, and is reproduced here:
- fish are small (10-25 % of the image width), at any position and angle, sometimes several;
- the three tunas (ALB, BET, YFT) differ in details (fin length, eye size, a yellow stripe);
- a dozen boats, each with its own camera resolution, deck and class mix: the image size leaks
  the boat and so, partly, the class (the "leakage" of the lesson);
- day and night cameras: at night colour is gone (green, dark, noisy) and only shape is left;
- deck clutter (ropes, buckets, crew, fish-shaped floats) and NoF scenes without any fish;
- class frequencies shaped like the real train set (ALB 1719 ... LAG 67);
- `--n-stage2` adds a stage-2 test set from boats never seen in train.

The true test answers go to `DIR/solution.csv` (one-hot, submission format) so any submission
can be scored, and the test images' fish boxes to `DIR/solution_boxes.csv`, so any box source can. Every image is drawn from its own RNG stream, so the output does not depend on
the number of worker processes.
"""

from __future__ import annotations

import json
import math
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter

from fishcomp.data.layout import FISHERIES_CLASSES, SOLUTION_BOXES_FILE, SOLUTION_FILE

# The real train set's counts, which shape the synthetic class frequencies.
REAL_COUNTS = {"ALB": 1719, "BET": 200, "DOL": 117, "LAG": 67, "NoF": 465, "OTHER": 299, "SHARK": 176, "YFT": 734}
# The competition's camera resolutions (width, height), most frequent first.
REAL_SIZES = [
    (1280, 720), (1280, 750), (1280, 974), (1276, 718), (1192, 670),
    (1280, 924), (1518, 854), (1732, 974), (1334, 750), (1244, 700),
]
TRAIN_BOATS = 8  # boats 0..7 use the first 8 sizes; stage-2 boats use the last 2, unseen in train
FISH_CLASSES = [c for c in FISHERIES_CLASSES if c != "NoF"]


@dataclass(frozen=True)
class Style:
    """What a generated set varies in, so that a design cannot win on one look of the data: the
    project's comparisons run over several styles and seeds (scripts/compare.py --sets)."""

    fish_length: tuple[float, float] = (0.10, 0.25)  # share of the photo's width
    tint: int = 0  # each fish's colours moved by up to this much per channel (another population)
    clutter: tuple[int, int] = (3, 10)  # deck objects per photo
    night_boost: float = 0.0  # added to every boat's share of night photos
    blur: float = 1.2  # largest Gaussian blur radius
    boat_concentration: float = 0.6  # Dirichlet concentration of P(boat | class): lower leaks more
    # The fields below draw from random streams of their own, so that at these defaults every
    # other style's images stay byte for byte what they were (and the numbers measured on them).
    fish_aspect: tuple[float, float] = (0.9, 1.1)  # each fish's length/height, times its kind's
    # Each boat's camera height: every fish on that boat is exp(u) times as long, u ~ U(-h, h),
    # so that boats a model has not seen (stage 2) show fish at sizes it has not seen.
    camera_height: float = 0.0
    exposure: tuple[float, float] = (0.75, 1.15)  # a daylight photo's brightness factor
    glare: float = 0.0  # share of photos with a soft, saturated patch of sun or floodlight
    colour_cast: int = 0  # each photo's white balance: up to this much per channel
    # The annotations, which volunteers drew (the competition's came from its forum): each box
    # edge of a train photo moved by up to this share of the box's size, and this share of the
    # photos with fish left unannotated. Train annotations only: the test boxes stay exact.
    box_noise: float = 0.0
    box_missing: float = 0.0


STYLES = {
    # The generator the project was built on.
    "classic": Style(),
    # Small fish, busier decks, more nights, blur, another fish colouring, a weaker size leak.
    "hard": Style(fish_length=(0.06, 0.16), tint=30, clutter=(6, 16), night_boost=0.2, blur=2.0, boat_concentration=2.0),
    # Large, sharp fish on quiet decks, and boats that nearly identify the class.
    "easy": Style(fish_length=(0.18, 0.32), clutter=(0, 4), blur=0.6, boat_concentration=0.2),
    # The classic photos annotated the way hurried volunteers might: loose, shifted boxes, and
    # 30 % of the photos with fish left without one: what detect-then-classify leans on.
    "sloppy": Style(box_noise=0.35, box_missing=0.3),
    # What the others hold fixed: fish shapes that overlap between kinds, a camera height per boat,
    # harsh and uneven light, white balance; a moderate size leak. Not between easy and hard.
    "wild": Style(
        fish_length=(0.07, 0.26), tint=20, clutter=(4, 14), night_boost=0.1, blur=1.6, boat_concentration=1.0,
        fish_aspect=(0.7, 1.3), camera_height=0.35, exposure=(0.5, 1.35), glare=0.35, colour_cast=25,
    ),
}


def style_for(name: str, seed: int) -> Style:
    """A named style, or `mixed`: one drawn from the seed between easy and hard."""
    if name == "mixed":
        rng = np.random.default_rng([seed, 97])
        t = float(rng.uniform(0, 1))
        easy, hard = STYLES["easy"], STYLES["hard"]
        mix = lambda a, b: a + t * (b - a)  # noqa: E731
        return Style(
            fish_length=(mix(easy.fish_length[0], hard.fish_length[0]), mix(easy.fish_length[1], hard.fish_length[1])),
            tint=round(mix(easy.tint, hard.tint)), clutter=(round(mix(easy.clutter[0], hard.clutter[0])), round(mix(easy.clutter[1], hard.clutter[1]))),
            night_boost=mix(easy.night_boost, hard.night_boost), blur=mix(easy.blur, hard.blur),
            boat_concentration=mix(easy.boat_concentration, hard.boat_concentration),
        )
    if name not in STYLES:
        from fishcomp.errors import FishcompError
        from fishcomp.suggest import did_you_mean

        raise FishcompError(f"unknown synth style `{name}`{did_you_mean(name, [*STYLES, 'mixed'])} (styles: {', '.join([*STYLES, 'mixed'])})")
    return STYLES[name]


@dataclass(frozen=True)
class Boat:
    index: int
    size: tuple[int, int]
    deck: tuple[int, int, int]
    plank_angle: float
    plank_spacing: float
    rail: tuple[int, int, int]
    night_share: float
    seed: int


def make_boats(seed: int, count: int, first_size: int) -> list[Boat]:
    rng = np.random.default_rng([seed, 7, first_size])
    boats = []
    for i in range(count):
        deck = tuple(int(v) for v in rng.integers(60, 190, size=3))
        rail = tuple(int(v) for v in rng.integers(20, 240, size=3))
        boats.append(
            Boat(
                index=first_size + i,
                size=REAL_SIZES[(first_size + i) % len(REAL_SIZES)],
                deck=deck,
                plank_angle=float(rng.uniform(-0.6, 0.6)),
                plank_spacing=float(rng.uniform(0.03, 0.08)),
                rail=rail,
                night_share=float(rng.choice([0.0, 0.2, 0.4, 0.6])),
                seed=int(rng.integers(1 << 30)),
            )
        )
    return boats


def class_counts(total: int, minimum: int = 2) -> dict[str, int]:
    """Largest-remainder apportionment of `total` by the real frequencies, every class >= minimum."""
    weights = np.array([REAL_COUNTS[c] for c in FISHERIES_CLASSES], dtype=float)
    floor = min(minimum, total // len(weights))
    rest = total - floor * len(weights)
    share = weights / weights.sum() * rest
    counts = np.floor(share).astype(int)
    for i in np.argsort(-(share - counts))[: rest - counts.sum()]:
        counts[i] += 1
    return {c: int(n) + floor for c, n in zip(FISHERIES_CLASSES, counts)}


# ----------------------------------------------------------------------------- drawing


def _jitter(colour: tuple[int, int, int], rng: np.random.Generator, amount: int = 18) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in colour)


# Per kind: length/height aspect, back colour, belly colour, and details drawn by `_details`.
FISH_LOOKS = {
    "ALB": dict(aspect=3.6, back=(40, 50, 90), belly=(190, 195, 205)),
    "BET": dict(aspect=2.6, back=(45, 35, 95), belly=(175, 180, 195)),
    "DOL": dict(aspect=3.8, back=(40, 150, 90), belly=(215, 200, 60)),
    "LAG": dict(aspect=1.7, back=(200, 70, 60), belly=(225, 120, 100)),
    "OTHER": dict(aspect=2.4, back=(120, 80, 50), belly=(170, 130, 90)),
    "SHARK": dict(aspect=5.0, back=(105, 110, 115), belly=(200, 200, 200)),
    "YFT": dict(aspect=3.2, back=(35, 45, 80), belly=(200, 200, 195)),
}


def _profile(kind: str, t: np.ndarray) -> np.ndarray:
    """Half-height of the body along its length (t=0 tail, t=1 snout), in units of max height."""
    if kind == "DOL":  # blunt, square forehead
        return np.sin(np.pi * np.clip(0.05 + 0.6 * t, 0, 0.5)) ** 0.8
    if kind == "LAG":  # nearly round
        return np.sin(np.pi * (0.04 + 0.92 * t)) ** 0.5
    if kind == "SHARK":  # long and slim, pointed snout
        return np.sin(np.pi * (0.03 + 0.94 * t)) ** 1.1
    return np.sin(np.pi * (0.06 + 0.9 * t)) ** 0.75


def draw_fish(kind: str, length: int, rng: np.random.Generator, aspect_range: tuple[float, float] = (0.9, 1.1)) -> Image.Image:
    """An RGBA fish lying horizontally with its head to the right."""
    look = FISH_LOOKS[kind]
    aspect = look["aspect"] * rng.uniform(*aspect_range)
    body_len = length * 0.78
    height = length / aspect
    pad = int(height * 0.9) + 4
    canvas = Image.new("RGBA", (length + 2 * pad, int(height * 2.2) + 2 * pad), (0, 0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    cy = canvas.height / 2
    x_tail = pad + length - body_len
    t = np.linspace(0, 1, 40)
    half = _profile(kind, t) * height / 2
    xs = x_tail + t * body_len
    upper = list(zip(xs, cy - half))
    lower = list(zip(xs[::-1], (cy + half * 1.05)[::-1]))
    back, belly = _jitter(look["back"], rng), _jitter(look["belly"], rng)
    fin = back

    # Tail fin: forked; sharks have a long upper lobe.
    span = length - body_len
    upper_lobe = 1.4 if kind == "SHARK" else 0.9
    draw.polygon(
        [(x_tail + 2, cy), (pad, cy - height * upper_lobe), (x_tail - span * 0.35, cy),
         (pad + span * (0.5 if kind == "SHARK" else 0.0), cy + height * 0.8)],
        fill=fin,
    )
    draw.polygon(upper + lower, fill=belly)
    draw.polygon(upper + [(xs[-1], cy + half[-1] * 0.2), (xs[0], cy)], fill=back)
    _details(kind, draw, rng, xs, cy, half, height, body_len, back)
    eye_r = height * (0.11 if kind == "BET" else 0.055)
    ex, ey = xs[int(len(xs) * 0.9)], cy - height * 0.08
    draw.ellipse([ex - eye_r, ey - eye_r, ex + eye_r, ey + eye_r], fill=(15, 15, 15))
    return canvas


def _details(kind, draw, rng, xs, cy, half, height, body_len, back) -> None:
    def at(fraction: float) -> float:
        return xs[0] + fraction * body_len

    if kind == "ALB":  # very long pectoral fin, the albacore's mark
        draw.polygon([(at(0.72), cy), (at(0.15), cy + height * 0.05), (at(0.68), cy + height * 0.16)], fill=back)
    elif kind == "BET":  # short pectoral, dark stripe
        draw.polygon([(at(0.7), cy), (at(0.5), cy + height * 0.12), (at(0.66), cy + height * 0.14)], fill=back)
    elif kind == "YFT":  # yellow side stripe and long yellow sickle fins
        yellow = _jitter((230, 200, 30), rng)
        draw.line([(at(0.2), cy - height * 0.05), (at(0.85), cy - height * 0.1)], fill=yellow, width=max(2, int(height * 0.09)))
        draw.polygon([(at(0.5), cy - half[20] + 2), (at(0.3), cy - height * 1.05), (at(0.42), cy - half[20] + 2)], fill=yellow)
        draw.polygon([(at(0.5), cy + half[20] - 2), (at(0.3), cy + height * 1.05), (at(0.42), cy + half[20] - 2)], fill=yellow)
    elif kind == "DOL":  # dorsal fin along the whole back, blue speckles
        draw.polygon([(at(0.95), cy - half[-3]), (at(0.1), cy - half[4] - height * 0.12), (at(0.1), cy - half[4])], fill=_jitter((30, 90, 160), rng))
        for _ in range(10):
            px, py = at(rng.uniform(0.1, 0.9)), cy + rng.uniform(-0.3, 0.3) * height
            r = max(1.0, height * 0.04)
            draw.ellipse([px - r, py - r, px + r, py + r], fill=(40, 80, 200))
    elif kind == "LAG":  # white spots and red fins
        for _ in range(14):
            px, py = at(rng.uniform(0.1, 0.9)), cy + rng.uniform(-0.35, 0.35) * height
            r = max(1.0, height * 0.045)
            draw.ellipse([px - r, py - r, px + r, py + r], fill=(245, 245, 240))
        draw.polygon([(at(0.7), cy - half[28]), (at(0.45), cy - height * 0.75), (at(0.5), cy - half[20])], fill=(230, 40, 40))
    elif kind == "OTHER":  # vertical bars of a random colour
        bar = _jitter((70, 50, 30), rng, 40)
        for f in np.linspace(0.2, 0.8, int(rng.integers(3, 6))):
            draw.line([(at(f), cy - height * 0.4), (at(f), cy + height * 0.4)], fill=bar, width=max(2, int(height * 0.07)))
    elif kind == "SHARK":  # tall triangular dorsal fin and large pectoral
        draw.polygon([(at(0.65), cy - half[26] + 2), (at(0.5), cy - height * 1.1), (at(0.42), cy - half[17] + 2)], fill=back)
        draw.polygon([(at(0.7), cy + half[28] - 2), (at(0.5), cy + height * 0.9), (at(0.58), cy + half[23] - 2)], fill=back)


@lru_cache(maxsize=16)  # a set has about ten boats; each pattern is 7 MB at full size
def _deck_pattern(plank_angle: float, plank_spacing: float, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """What one boat's photos share: the falling light's slope and the planks' shade (read-only).
    Computed once per boat instead of per photo, with the same arithmetic, so the same bytes."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    direction = xx * math.cos(plank_angle) + yy * math.sin(plank_angle)
    planks = (np.sin(direction / (plank_spacing * width) * 2 * math.pi) > 0.92).astype(np.float32)
    slope, shade = 0.35 * (1 - yy / height), 1 - 0.35 * planks[..., None]
    slope.flags.writeable = shade.flags.writeable = False
    return slope, shade


def _deck(boat: Boat, rng: np.random.Generator, width: int, height: int) -> Image.Image:
    slope, shade = _deck_pattern(boat.plank_angle, boat.plank_spacing, width, height)
    light = 0.75 + slope * rng.uniform(0.5, 1.0)  # brighter far from the camera
    base = np.array(_jitter(boat.deck, rng, 12), dtype=np.float32)
    image = np.multiply(base[None, None, :], light[..., None])
    image *= shade
    image += rng.normal(0, 6, size=(height, width, 1)).astype(np.float32)
    canvas = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    # The boat's fixed structure: a rail and a hatch, always in the same place for one camera.
    frame = np.random.default_rng(boat.seed)
    rail_y = int(height * frame.uniform(0.05, 0.25))
    draw.rectangle([0, rail_y, width, rail_y + int(height * 0.04)], fill=boat.rail)
    hx, hy = frame.uniform(0.05, 0.6) * width, frame.uniform(0.35, 0.7) * height
    draw.rectangle([hx, hy, hx + width * 0.25, hy + height * 0.2], outline=boat.rail, width=max(2, width // 200))
    return canvas


def _clutter(canvas: Image.Image, rng: np.random.Generator, count: tuple[int, int] = (3, 10)) -> None:
    draw = ImageDraw.Draw(canvas)
    width, height = canvas.size
    for _ in range(int(rng.integers(count[0], count[1]))):
        kind = rng.integers(4)
        x, y = rng.uniform(0, width), rng.uniform(0.2 * height, height)
        s = width * rng.uniform(0.02, 0.08)
        colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
        if kind == 0:  # bucket
            draw.ellipse([x, y, x + s, y + s], fill=colour, outline=(20, 20, 20))
        elif kind == 1:  # rope
            points = [(x + rng.uniform(-3, 3) * s, y + rng.uniform(-2, 2) * s) for _ in range(4)]
            draw.line(points, fill=colour, width=max(2, int(s * 0.12)), joint="curve")
        elif kind == 2:  # crew member seen from above: orange or yellow oilskins
            coat = (230, int(rng.integers(90, 200)), 20)
            draw.rectangle([x, y, x + s * 1.2, y + s * 2], fill=coat)
            draw.ellipse([x + s * 0.2, y - s * 0.7, x + s, y + s * 0.1], fill=(200, 160, 130))
        else:  # a grey, fish-shaped float: a distractor for detectors
            draw.ellipse([x, y, x + s * 2.5, y + s * 0.7], fill=tuple(int(v) for v in rng.integers(90, 150, size=3)))


def _night(canvas: Image.Image, rng: np.random.Generator) -> Image.Image:
    grey = np.asarray(canvas.convert("L"), dtype=np.float32)
    darkness = rng.uniform(0.35, 0.6)
    green = np.stack([grey * 0.35, grey, grey * 0.45], axis=-1) * darkness
    green += rng.normal(0, 10, size=green.shape[:2] + (1,))
    return Image.fromarray(np.clip(green, 0, 255).astype(np.uint8))


def _lit(canvas: Image.Image, rng: np.random.Generator, style: Style) -> Image.Image:
    """The style's glare and white balance, drawn from the photo's own stream (`rng`)."""
    if not style.glare and not style.colour_cast:
        return canvas
    image = np.asarray(canvas, dtype=np.float32)
    if rng.random() < style.glare:
        height, width = image.shape[:2]
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        radius = rng.uniform(0.15, 0.45) * width
        yy, xx = np.ogrid[0:height, 0:width]
        patch = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius**2))
        image = image + rng.uniform(90, 200) * patch[..., None]
    if style.colour_cast:
        image = image + rng.integers(-style.colour_cast, style.colour_cast + 1, size=3)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


@dataclass(frozen=True)
class ImageJob:
    path: str
    label: str
    boat: Boat
    scale: float
    seed: tuple[int, ...]
    style: Style = None  # type: ignore[assignment]  (set by synthesize; the classic style when absent)


def head_and_tail(upright: Image.Image, length: int, angle: float, rotated_size: tuple[int, int]) -> list[tuple[float, float]]:
    """Where the snout and the tail fork of a fish drawn by `draw_fish` (head right, `length`
    long, centred) end up once rotated by `angle` degrees (PIL: counter-clockwise, canvas
    expanded), in the rotated canvas's pixels."""
    pad = (upright.width - length) / 2
    cy = upright.height / 2
    body_start = pad + length * 0.22  # the tail fin is the first 22 % of the length
    snout, fork = (pad + length, cy), (body_start - length * 0.22 * 0.35, cy)
    theta = math.radians(angle)
    cx, cy0, ncx, ncy = upright.width / 2, upright.height / 2, rotated_size[0] / 2, rotated_size[1] / 2
    return [
        (ncx + (px - cx) * math.cos(theta) + (py - cy0) * math.sin(theta), ncy - (px - cx) * math.sin(theta) + (py - cy0) * math.cos(theta))
        for px, py in (snout, fork)
    ]


def render(job: ImageJob) -> tuple[list[dict], list[dict]]:
    """Draw one photo, save it as JPEG, return its fish boxes and head/tail points in original pixels."""
    rng = np.random.default_rng(list(job.seed))
    style = job.style or STYLES["classic"]
    width, height = (max(32, round(v * job.scale)) for v in job.boat.size)
    canvas = _deck(job.boat, rng, width, height)
    _clutter(canvas, rng, style.clutter)
    boxes, points = [], []
    camera_zoom = math.exp(np.random.default_rng([job.boat.seed, 43]).uniform(-1, 1) * style.camera_height)
    if job.label != "NoF":
        count = 1 + int(rng.random() < 0.25) + int(rng.random() < 0.08)
        for _ in range(count):
            length = max(12, int(width * rng.uniform(*style.fish_length) * camera_zoom))
            upright = draw_fish(job.label, length, rng, style.fish_aspect)
            if style.tint:
                upright = _tinted(upright, np.random.default_rng([job.seed[0], 41, FISHERIES_CLASSES.index(job.label)]), style.tint)
            angle = rng.uniform(0, 360)
            fish = upright.rotate(angle, expand=True, resample=Image.BICUBIC)
            left, top, right, bottom = fish.getchannel("A").getbbox()
            x = int(rng.uniform(-left, width - right))
            y = int(rng.uniform(max(-top, 0.15 * height - top), height - bottom))
            canvas.paste(fish, (x, y), fish)
            x0, y0 = max(0, x + left), max(0, y + top)
            x1, y1 = min(width, x + right), min(height, y + bottom)
            if x1 > x0 and y1 > y0:
                boxes.append({"class": "rect", "x": float(x0), "y": float(y0), "width": float(x1 - x0), "height": float(y1 - y0)})
                for px, py in head_and_tail(upright, length, angle, fish.size):
                    points.append({"class": "point", "x": float(x + px), "y": float(y + py)})
    if rng.random() < min(1.0, job.boat.night_share + style.night_boost):
        canvas = _night(canvas, rng)
    else:
        canvas = Image.fromarray(np.clip(np.asarray(canvas, dtype=np.float32) * rng.uniform(*style.exposure), 0, 255).astype(np.uint8))
    canvas = _lit(canvas, np.random.default_rng([*job.seed, 47]), style)
    canvas = canvas.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.0, style.blur)))
    Path(job.path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(job.path, quality=88)
    return boxes, points


# ----------------------------------------------------------------------------- the dataset


def _class_boat_mix(seed: int, boats: list[Boat], concentration: float = 0.6) -> dict[str, np.ndarray]:
    """P(boat | class): each class favours a few boats, which is what makes image size leak."""
    rng = np.random.default_rng([seed, 11])
    return {c: rng.dirichlet(np.full(len(boats), concentration)) for c in FISHERIES_CLASSES}


def _tinted(fish: Image.Image, rng: np.random.Generator, amount: int) -> Image.Image:
    """The fish's colours moved by one offset per channel, drawn once per class and seed: another
    population of the same species, not noise."""
    array = np.asarray(fish, dtype=np.int16).copy()
    array[..., :3] = np.clip(array[..., :3] + rng.integers(-amount, amount + 1, size=3), 0, 255)
    return Image.fromarray(array.astype(np.uint8), mode="RGBA")


def synthesize(
    root: str | Path,
    n_train: int = 1000,
    n_test: int = 300,
    n_stage2: int = 0,
    seed: int = 0,
    scale: float = 1.0,
    workers: int | None = None,
    on_image=None,
    style: str = "classic",
) -> dict[str, int]:
    root = Path(root)
    look = style_for(style, seed)
    rng = np.random.default_rng(seed)
    train_boats = make_boats(seed, TRAIN_BOATS, 0)
    new_boats = make_boats(seed, len(REAL_SIZES) - TRAIN_BOATS, TRAIN_BOATS)
    mix = _class_boat_mix(seed, train_boats, look.boat_concentration)

    train_labels = [c for c, n in class_counts(n_train).items() for _ in range(n)]
    rng.shuffle(train_labels)
    weights = np.array([REAL_COUNTS[c] for c in FISHERIES_CLASSES], dtype=float)
    test_labels = list(rng.choice(FISHERIES_CLASSES, size=n_test, p=weights / weights.sum()))
    stage2_labels = list(rng.choice(FISHERIES_CLASSES, size=n_stage2, p=weights / weights.sum()))
    numbers = rng.permutation(n_train + n_test) + 1  # train and stage-1 test share one numbering

    jobs: list[tuple[str, str, ImageJob]] = []  # (split, row name, job)
    for i, label in enumerate(train_labels):
        boat = train_boats[rng.choice(len(train_boats), p=mix[label])]
        name = f"img_{numbers[i]:05d}.jpg"
        jobs.append(("train", name, ImageJob(str(root / "train" / label / name), label, boat, scale, (seed, 1, i), look)))
    for i, label in enumerate(test_labels):
        boat = train_boats[rng.choice(len(train_boats), p=mix[label])]
        name = f"img_{numbers[n_train + i]:05d}.jpg"
        jobs.append(("test_stg1", name, ImageJob(str(root / "test_stg1" / name), label, boat, scale, (seed, 2, i), look)))
    for i, label in enumerate(stage2_labels):
        boat = new_boats[int(rng.integers(len(new_boats)))]
        name = f"image_{i + 1:05d}.jpg"
        jobs.append(("test_stg2", f"test_stg2/{name}", ImageJob(str(root / "test_stg2" / name), label, boat, scale, (seed, 3, i), look)))

    workers = workers or min(len(jobs), os.cpu_count() or 1)
    boxes: list[tuple[list[dict], list[dict]]] = []
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            for result in pool.map(render, [job for _, _, job in jobs], chunksize=8):
                boxes.append(result)
                if on_image:
                    on_image()
    else:
        for _, _, job in jobs:
            boxes.append(render(job))
            if on_image:
                on_image()

    _write_annotations(root, jobs, boxes, rng)
    _write_csvs(root, jobs, n_stage2 > 0)
    return {"train": n_train, "test_stg1": n_test, "test_stg2": n_stage2}


def _write_annotations(root: Path, jobs, drawn, rng: np.random.Generator) -> None:
    """The forum's files: boxes, one file per fish class except OTHER, some names path-prefixed, as
    in the real ones; and head/tail points (`<class>_points.json`: head, then tail, per fish).
    The test images' boxes go to SOLUTION_BOXES_FILE, beside the class answers."""
    per_class: dict[str, list[dict]] = {c.lower(): [] for c in FISH_CLASSES if c != "OTHER"}
    points: dict[str, list[dict]] = {c.lower(): [] for c in FISH_CLASSES if c != "OTHER"}
    for (split, name, job), (rects, ends) in zip(jobs, drawn):
        if split != "train" or job.label.lower() not in per_class:
            continue
        filename = f"../data/fish/train/{job.label}/{name}" if rng.random() < 0.2 else name
        style = job.style or STYLES["classic"]
        if style.box_noise or style.box_missing:
            sloppy = np.random.default_rng([*job.seed, 53])  # a stream of its own: other styles' files unchanged
            if sloppy.random() < style.box_missing:
                continue
            rects = [_loosened(rect, style.box_noise, sloppy) for rect in rects]
        per_class[job.label.lower()].append({"annotations": rects, "class": "image", "filename": filename})
        points[job.label.lower()].append({"annotations": ends, "class": "image", "filename": name})
    test_boxes = []
    for (split, name, _), (rects, _) in zip(jobs, drawn):
        if split != "train" and rects:
            largest = max(rects, key=lambda r: r["width"] * r["height"])
            test_boxes.append((name, largest["x"], largest["y"], largest["width"], largest["height"]))
    columns = ["image", "box_x", "box_y", "box_w", "box_h"]
    pd.DataFrame(test_boxes, columns=columns).sort_values("image").to_csv(root / SOLUTION_BOXES_FILE, index=False)
    (root / "annos").mkdir(parents=True, exist_ok=True)
    for cls, entries in per_class.items():
        (root / "annos" / f"{cls}_labels.json").write_text(json.dumps(entries, indent=1))
        (root / "annos" / f"{cls}_points.json").write_text(json.dumps(points[cls], indent=1))


def _loosened(rect: dict, noise: float, rng: np.random.Generator) -> dict:
    """An annotator's box: each edge moved by up to `noise` of the box's width or height, in
    either direction (never inverted)."""
    w, h = rect["width"], rect["height"]
    x0, x1 = rect["x"] + rng.uniform(-noise, noise) * w, rect["x"] + w + rng.uniform(-noise, noise) * w
    y0, y1 = rect["y"] + rng.uniform(-noise, noise) * h, rect["y"] + h + rng.uniform(-noise, noise) * h
    return {**rect, "x": float(x0), "y": float(y0), "width": float(max(x1 - x0, 1.0)), "height": float(max(y1 - y0, 1.0))}


def _write_csvs(root: Path, jobs, with_stage2: bool) -> None:
    uniform = 1.0 / len(FISHERIES_CLASSES)
    tests = [(split, name, job) for split, name, job in jobs if split != "train"]
    stage1 = sorted(name for split, name, _ in tests if split == "test_stg1")
    stage2 = sorted(name for split, name, _ in tests if split == "test_stg2")

    def sample(rows: list[str]) -> pd.DataFrame:
        frame = pd.DataFrame(uniform, index=rows, columns=FISHERIES_CLASSES)
        frame.index.name = "image"
        return frame.reset_index()

    sample(stage1).to_csv(root / "sample_submission_stg1.csv", index=False)
    if with_stage2:
        sample(stage1 + stage2).to_csv(root / "sample_submission_stg2.csv", index=False)
    truth = {name: job.label for _, name, job in tests}
    solution = pd.DataFrame(0, index=stage1 + stage2, columns=FISHERIES_CLASSES)
    for name in solution.index:
        solution.loc[name, truth[name]] = 1
    solution.index.name = "image"
    solution.reset_index().to_csv(root / SOLUTION_FILE, index=False)
