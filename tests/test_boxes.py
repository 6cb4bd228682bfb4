"""The one box geometry every reader shares (fishcomp.boxes), on boxes whose overlaps are known."""

import numpy as np
import pytest

from fishcomp.boxes import box_iou, covered, intersection, nearest_fish_iou

NAN = [np.nan] * 4


def test_intersection_and_iou_of_boxes_with_known_overlap_in_any_units():
    a = np.array([[0.0, 0.0, 0.2, 0.2], [10, 10, 40, 20], [0, 0, 1, 1], [0, 0, 1, 1]])
    b = np.array([[0.1, 0.1, 0.2, 0.2], [30, 20, 40, 20], [2, 2, 1, 1], [0, 0, 1, 1]])
    np.testing.assert_allclose(intersection(a, b), [0.01, 200.0, 0.0, 1.0])
    np.testing.assert_allclose(box_iou(a, b), [0.01 / 0.07, 200 / 1400, 0.0, 1.0])
    np.testing.assert_allclose(box_iou(b, a), box_iou(a, b))  # symmetric


def test_a_nan_or_empty_box_overlaps_nothing():
    box = np.array([0.1, 0.1, 0.2, 0.2])
    assert box_iou(box, np.array(NAN)) == 0.0
    assert box_iou(np.zeros(4), np.zeros(4)) == 0.0
    assert np.isnan(intersection(box, np.array(NAN)))


def test_iou_broadcasts_every_box_against_every_other():
    boxes = np.array([[0.0, 0.0, 0.2, 0.2], [0.1, 0.1, 0.2, 0.2], [0.5, 0.5, 0.1, 0.1]])
    table = box_iou(boxes[:, None], boxes[None, :])
    assert table.shape == (3, 3)
    np.testing.assert_allclose(np.diag(table), 1.0)
    assert table[0, 1] == pytest.approx(0.01 / 0.07) and table[0, 2] == 0.0


def test_nearest_fish_iou_takes_the_best_matching_fish_and_ignores_missing_rows():
    boxes = np.array([[0.5, 0.5, 0.1, 0.1], [0.0, 0.0, 0.2, 0.2]])
    fish = np.array([[[0.0, 0.0, 0.2, 0.2], [0.5, 0.5, 0.1, 0.1]], [NAN, NAN]])
    np.testing.assert_allclose(nearest_fish_iou(boxes, fish), [1.0, 0.0])


def test_covered_is_the_largest_share_of_a_fish_inside_the_rectangle():
    fish = np.array([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 20.0, 20.0]])
    rectangles = np.array([[0.0, 0.0, 5.0, 10.0], [40.0, 40.0, 100.0, 100.0], [20.0, 20.0, 5.0, 5.0], NAN])
    share = covered(rectangles, np.broadcast_to(fish, (4, 2, 4)))
    np.testing.assert_allclose(share[:3], [0.5, 1.0, 0.0])
    assert np.isnan(share[3])  # no rectangle (the cells ran out)
    assert covered(rectangles[:1], np.full((1, 2, 4), np.nan))[0] == 0.0  # no fish: holds none
