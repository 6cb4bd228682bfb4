"""Map batches from maps held in memory as a channels-last tensor: the same batches as from the
cached NumPy rows (to the precision of the dtype held), the same copy chosen per image, its boxes."""

import numpy as np
import pytest
import torch

from fishcomp.training.feature_sets import FeatureSet, predict

# bfloat16 keeps 8 significant bits: rounding a float16 value to it moves it by at most half a
# unit in the last place, 2**-8 of its magnitude (float16's own rounding is already in the cache).
BF16_ROUNDING = 2.0**-8
BUDGET = 1 << 30


def _maps(seed: int, n: int = 12):
    rng = np.random.default_rng(seed)
    return rng.normal(1.0, 2.0, size=(n, 16, 3, 5)).astype(np.float16)


def _set(copy_seed: int | None = None):
    maps = _maps(0)
    boxes = np.tile(np.arange(8, dtype=np.float32), (len(maps), 1))
    copies = [_maps(copy_seed)] if copy_seed is not None else []
    copy_boxes = np.full((1, len(maps), 4), 0.5, dtype=np.float32) if copies else None
    return FeatureSet(maps, np.arange(len(maps)), boxes=boxes, copies=copies, copy_boxes=copy_boxes)


@pytest.mark.parametrize("held_as", [None, torch.bfloat16])
def test_resident_maps_give_the_cached_rows_batches(held_as):
    cached, resident = _set(copy_seed=1), _set(copy_seed=1)
    assert resident.make_resident(held_as, BUDGET) == 2 * 2 * 12 * 16 * 3 * 5  # maps and one copy
    positions = np.array([7, 2, 9, 0, 5])
    copies = np.array([1, 0, 1, 0, 0])
    expected, _, expected_boxes = cached.batch(positions, "cpu", copies=copies)
    got, _, got_boxes = resident.batch(positions, "cpu", copies=copies)
    assert got.shape == expected.shape and got.is_contiguous(memory_format=torch.channels_last)
    if held_as is None:  # held as cached (float16): the same float32 batch, exactly
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    else:  # bf16 held: handed to the bf16-autocast head as bf16, each value rounded once
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), expected, rtol=BF16_ROUNDING, atol=0)
    torch.testing.assert_close(got_boxes, expected_boxes, equal_nan=True)
    assert torch.isnan(got_boxes[copies == 1, 4:]).all() and (got_boxes[copies == 1, :4] == 0.5).all()


def test_subsets_and_predict_views_read_the_resident_rows():
    cached, resident = _set(), _set()
    resident.make_resident(None, BUDGET)
    rows = np.array([3, 4, 11])
    expected, _, _ = cached.subset(rows).view(0).batch(np.arange(3), "cpu")
    got, _, _ = resident.subset(rows).view(0).batch(np.arange(3), "cpu")
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_maps_held_from_disk_and_only_within_the_budget(tmp_path):
    path = tmp_path / "maps.npy"
    np.save(path, _maps(2))
    expected, _, _ = FeatureSet(_maps(2), np.arange(12)).batch(np.array([1, 2]), "cpu")
    too_large = FeatureSet(np.load(path, mmap_mode="r"), np.arange(12))
    assert too_large.make_resident(None, budget=12 * 16 * 3 * 5 * 2 - 1) == 0
    assert isinstance(too_large.array, np.memmap)
    assert too_large.make_resident(None, budget=BUDGET) > 0
    got, _, _ = too_large.batch(np.array([1, 2]), "cpu")
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_projected_float32_maps_are_held_as_float32_unless_the_head_computes_in_bf16():
    maps = _maps(3).astype(np.float32)  # what train.map_channels' projection hands over
    held = FeatureSet(maps, np.arange(12))
    assert held.make_resident(None, BUDGET) == maps.nbytes
    got, _, _ = held.batch(np.array([4, 0]), "cpu")
    torch.testing.assert_close(got, torch.from_numpy(maps[[4, 0]]), rtol=0, atol=0)
    halved = FeatureSet(maps, np.arange(12))
    assert halved.make_resident(torch.bfloat16, BUDGET) == maps.nbytes // 2


def test_mirror_box_tta_gives_a_photo_and_its_mirror_mirrored_boxes():
    """With `head.box_tta: mirror` the grid locator's box is read off its cells averaged over the
    photo and its mirrored view flipped back, so swapping the two views mirrors the box exactly;
    the original view's own box is kept beside it."""
    from fishcomp.config import BboxHeadConfig
    from fishcomp.models.heads import create_head

    torch.manual_seed(0)
    config = BboxHeadConfig(box_from="grid", reduce=8, hidden=16, box_tta="mirror")
    model = create_head(config, (16, 6, 10), 8).eval()
    maps = np.random.default_rng(3).normal(0, 1, size=(20, 16, 6, 10)).astype(np.float32)
    mirrored = maps[..., ::-1].copy()
    ahead = predict(model, FeatureSet(maps, np.arange(20), views=[mirrored]), "cpu", tta="mean")
    swapped = predict(model, FeatureSet(mirrored, np.arange(20), views=[maps]), "cpu", tta="mean")
    x, y, w, h = swapped["box"].T
    np.testing.assert_allclose(ahead["box"], np.stack([1 - x - w, y, w, h], axis=1), atol=1e-5)
    alone = predict(model, FeatureSet(maps, np.arange(20)), "cpu")
    np.testing.assert_array_equal(ahead["box_original"], alone["box"])
    assert np.abs(ahead["box"] - alone["box"]).max() > 0.01  # the second look moved some boxes


def test_the_mirror_box_tta_needs_a_mirrored_view_and_a_grid_locator():
    from fishcomp.config import RunConfig

    with pytest.raises(ValueError, match="precompute.tta"):
        RunConfig(head={"kind": "bbox", "box_from": "grid", "box_tta": "mirror"})
    with pytest.raises(ValueError, match="box_from: grid"):
        RunConfig(head={"kind": "bbox", "box_tta": "mirror"})
    RunConfig(
        head={"kind": "bbox", "box_from": "grid", "box_tta": "mirror"},
        precompute={"size": [360, 640], "tta": {"views": 2, "transforms": [{"name": "HorizontalFlip", "p": 1.0}]}},
    )


def test_mirrored_copies_are_the_views_with_their_boxes_mirrored_and_held_once():
    maps, mirrored = _maps(0), _maps(1)
    boxes = np.tile(np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.5, 0.6, 0.6], dtype=np.float32), (len(maps), 1))
    boxes[3] = np.nan  # an image without a box keeps none when mirrored
    features = FeatureSet(maps, np.arange(len(maps)), boxes=boxes, views=[mirrored])
    features.add_mirrored_copies(points=True)
    assert features.copies[0] is features.views[0] and features.copy_count == 2
    # Held once although it is both a copy and a view: the maps and one mirrored array.
    assert features.make_resident(None, BUDGET) == 2 * 12 * 16 * 3 * 5 * 2
    assert features.copies[0] is features.views[0]
    x, _, box = features.batch(np.array([0, 3, 5]), "cpu", copies=np.array([1, 1, 0]))
    torch.testing.assert_close(x[0], torch.from_numpy(mirrored[0].astype(np.float32)), rtol=0, atol=0)
    torch.testing.assert_close(x[2], torch.from_numpy(maps[5].astype(np.float32)), rtol=0, atol=0)
    np.testing.assert_allclose(box[0, :4].numpy(), [0.6, 0.2, 0.3, 0.4], atol=1e-6)  # x -> 1 - x - w
    assert torch.isnan(box[0, 4:]).all()  # head and tail are not mirrored with it: left out
    assert torch.isnan(box[1]).all()
    np.testing.assert_array_equal(box[2].numpy(), boxes[5])


def test_mirrored_copies_mirror_every_fish_box_and_drop_the_points():
    """Targets laid out as `geometry_targets` does: the largest box, head/tail points, then two
    other fish (the second unknown); a mirrored copy moves every box and drops the points."""
    maps, mirrored = _maps(0), _maps(1)
    row = [0.1, 0.2, 0.3, 0.4, 0.5, 0.5, 0.6, 0.6, 0.0, 0.5, 0.2, 0.1] + [np.nan] * 4
    boxes = np.tile(np.array(row, dtype=np.float32), (len(maps), 1))
    features = FeatureSet(maps, np.arange(len(maps)), boxes=boxes, views=[mirrored])
    features.add_mirrored_copies(points=True)
    _, _, box = features.batch(np.array([0, 1]), "cpu", copies=np.array([1, 0]))
    np.testing.assert_allclose(box[0, :4].numpy(), [0.6, 0.2, 0.3, 0.4], atol=1e-6)
    assert torch.isnan(box[0, 4:8]).all()
    np.testing.assert_allclose(box[0, 8:12].numpy(), [0.8, 0.5, 0.2, 0.1], atol=1e-6)
    assert torch.isnan(box[0, 12:]).all()
    np.testing.assert_array_equal(box[1].numpy(), boxes[1])


def test_mirror_copies_need_the_mirrored_view_and_no_other_copies():
    from fishcomp.config import RunConfig

    mirror = {"views": 2, "transforms": [{"name": "HorizontalFlip", "p": 1.0}]}
    with pytest.raises(ValueError, match="precompute.tta"):
        RunConfig(head={"kind": "fcn"}, train={"mirror_copies": True})
    with pytest.raises(ValueError, match="drop precompute.augment"):
        RunConfig(head={"kind": "fcn"}, train={"mirror_copies": True}, precompute={"tta": mirror, "augment": {"copies": 1}})
    RunConfig(head={"kind": "fcn"}, train={"mirror_copies": True}, precompute={"tta": mirror})
