import json

import pytest

from fishcomp.data.annotations import Annotations, Box, basename, clip_box, load_annotations
from fishcomp.errors import FishcompError


def write(folder, name, entries):
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(json.dumps(entries))


def test_path_prefixed_names_empty_lists_and_largest_box(tmp_path):
    annos = tmp_path / "annos"
    write(annos, "alb_labels.json", [
        {"annotations": [{"class": "rect", "x": 1, "y": 2, "width": 10, "height": 10},
                         {"class": "rect", "x": 5, "y": 6, "width": 30.5, "height": 20}],
         "class": "image", "filename": "../data/fish/train/ALB/img_00003.jpg"},
        {"annotations": [], "class": "image", "filename": "img_00010.jpg"},
    ])
    write(annos, "yft_labels.json", [
        {"annotations": [{"class": "rect", "x": 0, "y": 0, "width": 4, "height": 4}],
         "class": "image", "filename": "C:\\fish\\img_00020.jpg"},
    ])
    result = load_annotations(annos)
    assert set(result.boxes) == {"img_00003.jpg", "img_00010.jpg", "img_00020.jpg"}
    assert result.largest("img_00003.jpg") == Box(5, 6, 30.5, 20)
    assert result.largest("img_00010.jpg") is None
    assert result.largest("img_00020.jpg") == Box(0, 0, 4, 4)
    assert result.counts["boxes"] == 3


def test_bad_rects_are_counted_not_fatal(tmp_path):
    annos = tmp_path / "annos"
    write(annos, "bet_labels.json", [
        {"annotations": [{"class": "rect", "x": 1, "y": 1, "width": -5, "height": 3},
                         {"class": "point", "x": 1, "y": 1},
                         {"class": "rect", "x": "a", "y": 1, "width": 2, "height": 3},
                         {"class": "rect", "x": 1, "y": 1, "width": 2, "height": 3}],
         "filename": "img_1.jpg"},
    ])
    result = load_annotations(annos)
    assert result.largest("img_1.jpg") == Box(1, 1, 2, 3)
    assert result.counts["rects with non-positive size dropped"] == 1
    assert result.counts["points"] == 1  # read as a point (half of a head/tail pair), not a box
    assert result.counts["rects with missing or non-numeric x/y/width/height"] == 1


def test_malformed_json_names_file_and_line(tmp_path):
    annos = tmp_path / "annos"
    annos.mkdir()
    (annos / "dol_labels.json").write_text('[\n{"filename": "a.jpg",\n "annotations": [}\n]')
    with pytest.raises(FishcompError, match=r"dol_labels.json: malformed JSON at line 3"):
        load_annotations(annos)


def test_missing_folder_means_no_boxes(tmp_path):
    assert load_annotations(tmp_path / "nope").boxes == {}


def test_basename_and_clip():
    assert basename("../data/fish/train/ALB/img_00003.jpg") == "img_00003.jpg"
    assert clip_box(Box(-10, 5, 30, 10), 100, 100) == Box(0, 5, 20, 10)
    assert clip_box(Box(95, 95, 30, 30), 100, 100) == Box(95, 95, 5, 5)
    assert clip_box(Box(200, 5, 30, 10), 100, 100) is None


def test_head_tail_points_pair_up_and_follow_the_largest_box(tmp_path):
    annos = tmp_path / "annos"
    write(annos, "alb_labels.json", [
        {"annotations": [{"class": "rect", "x": 0, "y": 0, "width": 10, "height": 10},
                         {"class": "rect", "x": 100, "y": 100, "width": 50, "height": 40}],
         "filename": "img_1.jpg"},
    ])
    write(annos, "alb_points.json", [
        {"annotations": [{"class": "point", "x": 2, "y": 3}, {"class": "point", "x": 8, "y": 7},
                         {"class": "point", "x": 140, "y": 110}, {"class": "point", "x": 105, "y": 130}],
         "filename": "../train/ALB/img_1.jpg"},
        {"annotations": [{"class": "point", "x": 1, "y": 1}], "filename": "img_2.jpg"},
        {"annotations": [{"class": "point", "x": "?", "y": 1}], "filename": "img_3.jpg"},
    ])
    result = load_annotations(annos)
    assert result.head_tail("img_1.jpg") == (140.0, 110.0, 105.0, 130.0)  # the pair inside the largest box
    assert result.largest("img_1.jpg") == Box(100, 100, 50, 40)  # the points file adds no boxes
    assert result.head_tail("img_2.jpg") is None  # half a pair
    assert result.head_tail("img_9.jpg") is None
    assert result.counts["points with missing or non-numeric x/y"] == 1


def test_every_fish_targets_follow_the_largest_box_and_points_largest_first():
    """`head.box_targets: every`: after the index's largest box (and the points, when the head
    regresses them) come the photo's other fish, largest first, clipped to the image, as
    fractions of it, NaN-padded to the most any photo has; `split_geometry` reads them back."""
    import numpy as np
    import pandas as pd

    from fishcomp.config import BboxHeadConfig
    from fishcomp.models.losses import split_geometry
    from fishcomp.training.data import geometry_targets

    annotations = Annotations(boxes={
        "a.jpg": [Box(10, 10, 20, 10), Box(100, 50, 60, 40), Box(180, 90, 40, 20)],  # the last partly outside
        "b.jpg": [Box(0, 0, 50, 50)],
        "c.jpg": [],
    })
    index = pd.DataFrame({"image": ["a.jpg", "b.jpg", "c.jpg"], "width": [200] * 3, "height": [100] * 3,
                          "box_x": [100.0, 0.0, np.nan], "box_y": [50.0, 0.0, np.nan], "box_w": [60.0, 50.0, np.nan], "box_h": [40.0, 50.0, np.nan]})
    config = BboxHeadConfig(box_from="grid", box_targets="every", points_weight=1.0)
    targets = geometry_targets(index, config, annotations)
    assert targets.shape == (3, 4 + 4 + 2 * 4)
    largest, points, every_fish = split_geometry(targets, config)
    np.testing.assert_allclose(largest[0], [0.5, 0.5, 0.3, 0.4])
    assert np.isnan(points).all()  # the index has no point columns
    np.testing.assert_allclose(every_fish[0], [[0.5, 0.5, 0.3, 0.4], [0.9, 0.9, 0.1, 0.1], [0.05, 0.1, 0.1, 0.1]])
    assert np.isnan(every_fish[1, 1:]).all() and np.isnan(every_fish[2]).all()
    # Without `every` the layout is as before: box, then points.
    assert geometry_targets(index, BboxHeadConfig(box_from="grid", points_weight=1.0), annotations).shape == (3, 8)
