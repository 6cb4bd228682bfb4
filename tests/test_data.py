import hashlib
import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fishcomp.data.images import load_rgb, read_size
from fishcomp.data.layout import FISHERIES_CLASSES, load_dataset
from fishcomp.data.synth import REAL_SIZES, TRAIN_BOATS, class_counts, synthesize
from fishcomp.errors import FishcompError
from helpers import run_cli


def test_synth_layout_is_the_competitions(tiny_data):
    assert sorted(p.name for p in (tiny_data / "train").iterdir()) == sorted(FISHERIES_CLASSES)
    stage1 = pd.read_csv(tiny_data / "sample_submission_stg1.csv")
    stage2 = pd.read_csv(tiny_data / "sample_submission_stg2.csv")
    assert list(stage1.columns) == ["image", *FISHERIES_CLASSES]
    assert stage1.image.str.match(r"^img_\d{5}\.jpg$").all() and len(stage1) == 24
    assert stage2.image.tolist()[:24] == stage1.image.tolist()
    assert stage2.image.tolist()[24:] == [f"test_stg2/image_{i:05d}.jpg" for i in range(1, 13)]
    solution = pd.read_csv(tiny_data / "solution.csv")
    assert solution.image.tolist() == stage2.image.tolist()
    assert (solution[FISHERIES_CLASSES].sum(axis=1) == 1).all()
    assert sorted(p.name for p in (tiny_data / "annos").iterdir()) == sorted(
        f"{c}_{kind}.json" for c in ("alb", "bet", "dol", "lag", "shark", "yft") for kind in ("labels", "points")
    )


def test_synth_writes_the_test_images_boxes_beside_the_answers(tiny_data):
    solution = pd.read_csv(tiny_data / "solution.csv").set_index("image")
    boxes = pd.read_csv(tiny_data / "solution_boxes.csv").set_index("image")
    answer = solution[FISHERIES_CLASSES].idxmax(axis=1)
    assert set(boxes.index) == set(answer.index[answer != "NoF"])  # every fish, and no empty deck
    for image, box in boxes.iterrows():
        width, height = read_size(tiny_data / ("test_stg1/" + image if "/" not in image else image))
        assert 0 <= box.box_x and box.box_x + box.box_w <= width and 0 <= box.box_y and box.box_y + box.box_h <= height
        assert box.box_w > 0 and box.box_h > 0


def test_synth_class_mix_sizes_and_new_boats(tiny_data):
    dataset = load_dataset(tiny_data)
    counts = dataset.train.label.value_counts().sort_index()
    assert dict(zip([dataset.classes[i] for i in counts.index], counts)) == class_counts(120)
    assert class_counts(3777, minimum=0) == {"ALB": 1719, "BET": 200, "DOL": 117, "LAG": 67, "NoF": 465, "OTHER": 299, "SHARK": 176, "YFT": 734}
    scaled = lambda sizes: {(round(w * 0.2), round(h * 0.2)) for w, h in sizes}  # noqa: E731
    train_sizes = {read_size(tiny_data / p) for p in dataset.train.path}
    stage2_sizes = {read_size(tiny_data / p) for p in dataset.images[dataset.images.split == "test_stg2"].path}
    assert train_sizes <= scaled(REAL_SIZES[:TRAIN_BOATS]) and len(train_sizes) >= 4
    assert stage2_sizes <= scaled(REAL_SIZES[TRAIN_BOATS:])  # boats never seen in train


def test_synth_is_deterministic_whatever_the_worker_count(tmp_path):
    def digest(root):
        return {p.relative_to(root).as_posix(): hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}

    synthesize(tmp_path / "a", n_train=20, n_test=4, seed=5, scale=0.1, workers=1)
    synthesize(tmp_path / "b", n_train=20, n_test=4, seed=5, scale=0.1, workers=2)
    synthesize(tmp_path / "c", n_train=20, n_test=4, seed=6, scale=0.1, workers=1)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert digest(tmp_path / "a") != digest(tmp_path / "c")


def test_boxes_are_inside_the_image_and_fish_sized(tiny_data):
    """Fish are 10-25 % of the image width, so their (rotated) boxes are never slivers."""
    from fishcomp.data.annotations import load_annotations

    annos = load_annotations(tiny_data / "annos")
    dataset = load_dataset(tiny_data)
    alb = dataset.train[dataset.train.label == 0].path.head(6)
    for path in alb:
        box = annos.largest(path.split("/")[-1])
        assert box is not None
        image = np.asarray(Image.open(tiny_data / path).convert("L"), dtype=float)
        assert 0 <= box.x and box.x + box.w <= image.shape[1] + 1e-6
        assert box.w >= image.shape[1] * 0.05


def _job(boat_index: int, number: int, style, label: str = "ALB"):
    from fishcomp.data.synth import ImageJob, make_boats

    boat = make_boats(4, TRAIN_BOATS, 0)[boat_index]
    return ImageJob("", label, boat, 0.25, (4, 1, number), style)


def _drawn(job, tmp_path):
    from dataclasses import replace

    from fishcomp.data.synth import render

    job = replace(job, path=str(tmp_path / f"{job.boat.index}-{job.seed[-1]}-{hash(job.style)}.jpg"))
    boxes, points = render(job)
    return boxes, points, np.asarray(Image.open(job.path), dtype=float)


def test_a_styles_light_changes_the_pixels_but_not_the_fish(tmp_path):
    """Glare, white balance and exposure draw from streams of their own: the same photo under
    another light holds the same fish in the same places."""
    from dataclasses import replace

    from fishcomp.data.synth import STYLES

    plain = STYLES["classic"]
    harsh = replace(plain, glare=1.0, colour_cast=40, exposure=(0.5, 0.5))
    for number in range(3):
        boxes, points, pixels = _drawn(_job(0, number, plain), tmp_path)
        lit_boxes, lit_points, lit_pixels = _drawn(_job(0, number, harsh), tmp_path)
        assert boxes and lit_boxes == boxes and lit_points == points
        assert np.abs(lit_pixels - pixels).mean() > 10  # the light did change (JPEG noise is ~1)


def test_camera_height_makes_every_fish_of_one_boat_larger_or_smaller_alike(tmp_path):
    """Each boat's camera sits at its own height: its fish are all scaled by one factor (so new
    boats show new fish sizes), within exp(+-h); the rest of the photo is drawn as before."""
    from dataclasses import replace

    from fishcomp.data.synth import STYLES

    plain, high = STYLES["classic"], replace(STYLES["classic"], camera_height=0.35)
    factors = {}
    for boat in range(3):
        ratios = []
        for number in range(4):
            (box, *_), _, _ = _drawn(_job(boat, number, plain), tmp_path)
            (scaled, *_), _, _ = _drawn(_job(boat, number, high), tmp_path)
            # A rotated fish's box scales with it; a few pixels of rounding on ~60-pixel boxes.
            ratios.append(np.sqrt(scaled["width"] * scaled["height"] / (box["width"] * box["height"])))
        assert max(ratios) / min(ratios) < 1.15, ratios
        factors[boat] = float(np.median(ratios))
        assert np.exp(-0.35) - 0.05 < factors[boat] < np.exp(0.35) + 0.05
    assert max(factors.values()) / min(factors.values()) > 1.05, factors  # the boats differ


def test_fish_aspect_makes_the_same_kind_slimmer_or_stouter():
    from fishcomp.data.synth import draw_fish

    def height(aspect_range):
        fish = draw_fish("BET", 200, np.random.default_rng(0), aspect_range)
        left, top, right, bottom = fish.getchannel("A").getbbox()
        return bottom - top

    assert height((1.3, 1.3)) < height((1.0, 1.0)) < height((0.7, 0.7))


def test_synth_wild_style_through_the_cli(tmp_path, capsys):
    code, out, err = run_cli(["synth", tmp_path / "wild", "--n-train", 24, "--n-test", 6, "--n-stage2", 4, "--scale", 0.15, "--style", "wild"], capsys)
    assert code == 0, err
    dataset = load_dataset(tmp_path / "wild")
    assert len(dataset.train) == 24 and (dataset.images.split == "test_stg2").sum() == 4
    assert (tmp_path / "wild" / "annos" / "alb_labels.json").is_file()
    code, _, err = run_cli(["synth", tmp_path / "other", "--style", "wilder"], capsys)
    assert code == 2 and "unknown synth style `wilder`" in err and "wild" in err


def test_sloppy_annotations_are_the_classic_photos_with_loose_and_missing_train_boxes(tmp_path, capsys):
    """The `sloppy` style draws the very photos of `classic` (same seed) and annotates them as a
    hurried volunteer might: each box edge moved by at most 35 % of the box's size, some photos
    left without a box; the test answers (`solution_boxes.csv`) stay exact."""
    import json
    from pathlib import Path

    from fishcomp.data.synth import STYLES

    noise = STYLES["sloppy"].box_noise
    for style in ("classic", "sloppy"):
        code, _, err = run_cli(["synth", tmp_path / style, "--n-train", 60, "--n-test", 6, "--scale", 0.15, "--seed", 5, "--style", style], capsys)
        assert code == 0, err
    for photo in (tmp_path / "classic").rglob("*.jpg"):
        assert photo.read_bytes() == (tmp_path / "sloppy" / photo.relative_to(tmp_path / "classic")).read_bytes()
    assert (tmp_path / "classic" / "solution_boxes.csv").read_text() == (tmp_path / "sloppy" / "solution_boxes.csv").read_text()
    kept = moved = total = 0
    for labels in (tmp_path / "classic" / "annos").glob("*_labels.json"):
        exact = {Path(e["filename"]).name: e["annotations"] for e in json.loads(labels.read_text())}
        loose = {Path(e["filename"]).name: e["annotations"] for e in json.loads((tmp_path / "sloppy" / "annos" / labels.name).read_text())}
        assert set(loose) <= set(exact)
        total, kept = total + len(exact), kept + len(loose)
        for name, boxes in loose.items():
            for a, b in zip(exact[name], boxes):
                x0, x1 = a["x"], a["x"] + a["width"]
                assert abs(b["x"] - x0) <= noise * a["width"] + 1e-6 and abs(b["x"] + b["width"] - x1) <= noise * a["width"] + 1e-6
                assert abs(b["y"] - a["y"]) <= noise * a["height"] + 1e-6
                moved += b != a
    assert 0 < kept < total and moved > 0


def make_layout(root, extra=None):
    for cls in ("ALB", "NoF"):
        (root / "train" / cls).mkdir(parents=True)
        Image.new("RGB", (40, 30)).save(root / "train" / cls / f"img_{cls}.jpg")
    (root / "test_stg1").mkdir()
    Image.new("RGB", (40, 30)).save(root / "test_stg1" / "img_t.jpg")
    if extra:
        extra(root)
    return root


def test_layout_errors_and_warnings(tmp_path):
    with pytest.raises(FishcompError, match="data folder not found"):
        load_dataset(tmp_path / "none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FishcompError, match="no train/ folder"):
        load_dataset(tmp_path / "empty")

    def duplicate(root):
        Image.new("RGB", (4, 4)).save(root / "train" / "NoF" / "img_ALB.jpg")

    with pytest.raises(FishcompError, match=r"same file name is in two class folders: .*ALB/img_ALB.jpg and .*NoF/img_ALB.jpg"):
        load_dataset(make_layout(tmp_path / "dup", duplicate))

    def stray(root):
        (root / "train" / "sample_submission_stg1.csv").mkdir()
        (root / "sample_submission_stg1.csv").write_text("image,ALB,NoF\n")

    dataset = load_dataset(make_layout(tmp_path / "stray", stray))
    assert dataset.classes == ["ALB", "NoF"]
    assert any("not a class of this competition" in w for w in dataset.warnings)

    def no_test(root):
        (root / "test_stg1" / "img_t.jpg").unlink()

    with pytest.raises(FishcompError, match="no test images"):
        load_dataset(make_layout(tmp_path / "notest", no_test))


@pytest.mark.parametrize(
    "mode, fmt",
    [("L", "JPEG"), ("RGBA", "PNG"), ("P", "PNG"), ("CMYK", "JPEG"), ("I;16", "PNG"), ("RGB", "WEBP")],
)
def test_images_decode_by_content_whatever_the_name(tmp_path, mode, fmt):
    source = Image.new("RGB", (64, 48), (200, 120, 40)).convert(mode) if mode != "I;16" else Image.fromarray(np.full((48, 64), 40000, np.uint16))
    path = tmp_path / "img_x.jpg"  # the extension lies for PNG and WebP
    buffer = io.BytesIO()
    source.save(buffer, format=fmt)
    path.write_bytes(buffer.getvalue())
    image, size = load_rgb(path)
    assert image.mode == "RGB" and size == (64, 48)
    assert np.asarray(image).mean() > 30  # not blacked out (16-bit is rescaled, not clipped to 255)


def test_exif_orientation_is_applied(tmp_path):
    array = np.zeros((40, 80, 3), np.uint8)
    array[:, :40] = 255  # left half white
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    path = tmp_path / "rot.jpg"
    image.save(path, exif=exif)
    upright, size = load_rgb(path)
    assert size == (40, 80) == upright.size == read_size(path)
    top = np.asarray(upright)[:20].mean()
    assert top > 200  # the white half is on top once rotated


def test_draft_decode_is_close_to_full_decode(tiny_data):
    path = next((tiny_data / "train" / "ALB").iterdir())
    full, _ = load_rgb(path)
    fast, size = load_rgb(path, target=(64, 36))
    assert size == full.size
    a = np.asarray(full.resize((64, 36), Image.BILINEAR), dtype=float)
    b = np.asarray(fast.resize((64, 36), Image.BILINEAR), dtype=float)
    assert np.abs(a - b).mean() < 6
