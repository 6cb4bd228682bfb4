"""What the speed levers must not change: loader workers and draft-mode JPEG decoding."""

import numpy as np
import pytest
from helpers import CONFIGS
from PIL import Image

from fishcomp.config import load_config
from fishcomp.context import Context
from fishcomp.data.images import load_rgb
from fishcomp.features import load_index
from fishcomp.pipeline import build


def test_loader_workers_and_decoding_threads_give_exactly_the_same_features(tiny_data, tmp_path):
    """No loader, two worker processes, and `auto` on the CPU (a thread per core, alternating with the
    model): the same rows in the same order, augmented copies and test-time views included."""
    outputs = []
    for workers in (0, 2, "auto"):
        loaded = load_config(
            CONFIGS / "dense_aug.yaml",
            [f"precompute.workers={workers}", "precompute.batch_size=7", "precompute.device=cpu",
             "precompute.augment.copies=1", "precompute.tta.views=2",
             # What is compared is the decoding and the order of rows, not the backbone's size.
             "precompute.size=[96,96]"],
        )
        artifact = build(Context(data_dir=tiny_data, work_dir=tmp_path / f"w{workers}"), "precompute", loaded)
        arrays = {path.name: np.load(path) for path in sorted(artifact.path.glob("*.npy"))}
        outputs.append((load_index(artifact).to_csv(), arrays))
    (index_a, arrays_a), *others = outputs
    assert {"train_pooled.npy", "train_aug_pooled.npy", "train_aug_boxes.npy", "test_stg1_tta_pooled.npy"} <= set(arrays_a)
    for index_b, arrays_b in others:
        assert index_a == index_b and arrays_a.keys() == arrays_b.keys()
        for name, array in arrays_a.items():
            np.testing.assert_array_equal(array, arrays_b[name], err_msg=name)


@pytest.mark.parametrize("target", [(224, 224), (640, 360)])
def test_draft_decode_is_close_to_the_full_decode(tmp_path, target):
    from skimage import data as samples

    photo = Image.fromarray(samples.astronaut()).resize((1280, 720), Image.BICUBIC)
    path = tmp_path / "photo.jpg"
    photo.save(path, quality=92)
    drafted, size = load_rgb(path, target=target)
    full, _ = load_rgb(path)
    assert size == (1280, 720) and drafted.size[0] < 1280  # the DCT-domain downscale did happen
    a = np.asarray(drafted.resize(target, Image.BILINEAR), dtype=np.float32)
    b = np.asarray(full.resize(target, Image.BILINEAR), dtype=np.float32)
    assert np.abs(a - b).mean() < 4.0  # out of 255: invisible at the backbone's input size


def test_the_backbone_gives_the_same_features_however_many_images_go_through_it_a_call(tiny_data):
    """On a CPU the backbone takes a few images a call (`precompute.cpu_chunk`, auto: about
    CPU_CALL_PIXELS a call), which is faster there; the features are those of one call for all."""
    from types import SimpleNamespace

    import torch

    from fishcomp.errors import FishcompError
    from fishcomp.features import Embedder

    loaded = load_config(CONFIGS / "dense.yaml", ["precompute.precision=fp32", "precompute.size=[96,160]"])
    photos = [np.asarray(load_rgb(path)[0].resize((160, 96), Image.BILINEAR)) for path in sorted((tiny_data / "train").rglob("*.jpg"))[:7]]
    batch = torch.from_numpy(np.stack(photos))
    results = {}
    for chunk in (32, 1, 3):
        embedder = Embedder(loaded.config.precompute.model_copy(update={"cpu_chunk": chunk}), torch.device("cpu"))
        with torch.inference_mode():
            results[chunk] = embedder.embed(batch, spatial=True)
    for chunk in (1, 3):
        for together, apart in zip(results[32], results[chunk]):
            # float32 throughout: only the kernels' summation order may differ with the batch's
            # size (a few ulp per layer), far inside 1e-4 of the features' norm.
            assert together.shape == apart.shape and np.linalg.norm(together - apart) < 1e-4 * np.linalg.norm(together)
    rule = Embedder.images_per_call
    cpu = SimpleNamespace(device=torch.device("cpu"), cpu_chunk="auto")
    assert [rule(cpu, h, w, 32) for h, w in ((224, 224), (260, 260), (360, 640), (720, 1280))] == [4, 3, 1, 1]
    assert rule(SimpleNamespace(device=torch.device("cpu"), cpu_chunk=5), 360, 640, 32) == 5
    assert rule(SimpleNamespace(device=torch.device("cuda"), cpu_chunk=5), 360, 640, 32) == 32  # a GPU takes the batch
    with pytest.raises(FishcompError, match="cpu_chunk"):
        load_config(CONFIGS / "dense.yaml", ["precompute.cpu_chunk=0"])


def test_every_view_of_a_photo_comes_from_one_decode_with_the_pixels_of_decoding_it_for_that_view_alone(tmp_path, monkeypatch):
    """Precompute decodes each photo once for all its views (the original, augmented copies of the
    train photos, test-time views): each view's pixels and moved box are exactly those of decoding
    the photo for that view alone, with that view's per-image seed."""
    from skimage import data as samples

    import fishcomp.features as features
    from fishcomp.data.augment import build_transform
    from fishcomp.features import DecodedImages, DecodedViews, View, transform_seed

    photo = Image.fromarray(samples.astronaut()).resize((320, 180), Image.BICUBIC)
    paths = []
    for number in range(6):
        path = tmp_path / f"img_{number}.jpg"
        photo.rotate(number * 7).save(path, quality=90)
        paths.append(path.name)
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    paths.append("broken.jpg")
    is_train = np.array([True, False, True, True, False, True, True])
    train_position = np.cumsum(is_train) - 1
    boxes = np.array([[40, 30, 80, 60], [np.nan] * 4, [10, 20, 50, 40], [np.nan] * 4, [0, 0, 30, 30], [200, 100, 90, 70], [5, 5, 5, 5]], dtype=np.float32)
    augment = build_transform(load_config(CONFIGS / "dense_aug.yaml").config.precompute.augment.transforms)
    flip = build_transform([{"name": "HorizontalFlip", "p": 1.0}])
    looks = [
        View(),
        View(augment, transform_seed(0, 1), wanted=is_train, numbering=train_position, moves_boxes=True),
        View(flip, transform_seed(0, 0)),
    ]
    decodes = []
    real_load = features.load_rgb
    monkeypatch.setattr(features, "load_rgb", lambda path, target=None: decodes.append(path) or real_load(path, target=target))
    size = (64, 96)
    items = [DecodedViews(tmp_path, paths, size, looks, boxes)[i] for i in range(len(paths))]
    assert len(decodes) == len(paths)  # one decode a photo, not one a view

    train = [p for p, t in zip(paths, is_train) if t]
    alone = [
        DecodedImages(tmp_path, paths, size),
        DecodedImages(tmp_path, train, size, augment, transform_seed(0, 1), boxes[is_train]),
        DecodedImages(tmp_path, paths, size, flip, transform_seed(0, 0)),
    ]
    for index, (pixels, item_index, width, height, ok, moved, wanted) in enumerate(items):
        assert item_index == index and ok == (paths[index] != "broken.jpg")
        assert (width, height) == ((320, 180) if ok else (0, 0))
        assert wanted.tolist() == [True, bool(is_train[index]), True]
        for number, dataset in enumerate(alone):
            if not wanted[number]:
                assert not pixels[number].any()
                continue
            expected = dataset[int(train_position[index]) if number == 1 else index]
            np.testing.assert_array_equal(pixels[number].numpy(), expected[0].numpy(), err_msg=f"image {index} view {number}")
            if number == 1:
                np.testing.assert_array_equal(moved[number].numpy(), expected[5].numpy())
    augmented = [moved[1].numpy() for *_, moved, wanted in items if wanted[1]]
    assert sum(not np.isnan(box).any() for box in augmented) >= 3  # the boxes that exist did come back moved


def _without_stage2(source, target):
    import shutil

    shutil.copytree(source, target, ignore=shutil.ignore_patterns("test_stg2", "sample_submission_stg2.csv"))


def _add_stage2(source, target):
    import shutil

    shutil.copytree(source / "test_stg2", target / "test_stg2")  # copies keep their times: the same images
    shutil.copy2(source / "sample_submission_stg2.csv", target)


def test_stage_2_photos_added_after_a_pass_are_the_only_ones_embedded_and_the_pass_is_a_fresh_ones(tiny_data, tmp_path):
    """The competition's stage-2 photos arrive after stage 1: the next pass takes the train and
    stage-1 rows (augmented copies and test-time views included) from the earlier pass and embeds
    only the new photos; its key, index and arrays are those of a pass over all of them. A touched
    stage-1 photo leaves only the train rows to take."""
    import json
    import os

    overrides = ["precompute.augment.copies=1", "precompute.tta.views=2", "precompute.size=[96,96]", "precompute.batch_size=8"]
    loaded = load_config(CONFIGS / "dense_aug.yaml", overrides)
    data, work = tmp_path / "data", tmp_path / "work"
    _without_stage2(tiny_data, data)
    stage1 = build(Context(data_dir=data, work_dir=work), "precompute", loaded)
    _add_stage2(tiny_data, data)
    both = build(Context(data_dir=data, work_dir=work), "precompute", loaded)
    fresh = build(Context(data_dir=data, work_dir=tmp_path / "fresh"), "precompute", loaded)

    index = load_index(fresh)
    taken = int(index.split.isin(["train", "test_stg1"]).sum())
    assert both.key == fresh.key != stage1.key and (index.split == "test_stg2").sum() > 0
    manifest = json.loads(both.file("manifest.json").read_text())
    assert manifest["reused"] == {"from": stage1.path.name, "splits": ["train", "test_stg1"], "images": taken}
    assert json.loads(both.file("meta.json").read_text())["reused_images"] == taken
    assert load_index(both).equals(index)
    names = sorted(p.name for p in fresh.path.glob("*.npy"))
    assert {"train_aug_pooled.npy", "train_aug_boxes.npy", "test_stg1_tta_pooled.npy", "test_stg2_tta_pooled.npy"} <= set(names)
    for name in names:
        ours, theirs = np.load(both.file(name)).astype(np.float32), np.load(fresh.file(name)).astype(np.float32)
        assert ours.shape == theirs.shape, name
        if not name.startswith("test_stg2"):
            np.testing.assert_array_equal(ours, np.load(stage1.file(name)), err_msg=name)  # taken as they were
        np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs), err_msg=name)  # the copies' missing boxes
        ours, theirs = np.nan_to_num(ours), np.nan_to_num(theirs)
        # Stage 2's photos go through the backbone in other batches than a fresh pass puts them in:
        # the kernels may sum in another order (float32, within 1e-4 of the norm, see the test
        # above), then one float16 rounding step apart at most (2^-11 relative).
        assert np.linalg.norm(ours - theirs) <= 1e-3 * np.linalg.norm(theirs), name

    picture = data / "test_stg1" / sorted(os.listdir(data / "test_stg1"))[0]
    os.utime(picture, ns=(picture.stat().st_atime_ns, picture.stat().st_mtime_ns + 10**9))
    touched = build(Context(data_dir=data, work_dir=work), "precompute", loaded)
    assert json.loads(touched.file("manifest.json").read_text())["reused"]["splits"] == ["train"]
    for name in names:
        if name.startswith("test_stg1"):
            ours, theirs = np.load(touched.file(name)).astype(np.float32), np.load(fresh.file(name)).astype(np.float32)
            assert np.linalg.norm(ours - theirs) <= 1e-3 * np.linalg.norm(theirs), name
