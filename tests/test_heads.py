"""Every registered head, tested for free: forward shapes, and a short training that learns."""

import numpy as np
import pytest
import torch
from helpers import CONFIGS as CONFIG_DIR

from fishcomp.config import (
    BboxHeadConfig,
    DenseHeadConfig,
    FcnHeadConfig,
    InceptionHeadConfig,
    load_config,
)
from fishcomp.models.heads import create_head, head_uses_map, list_heads
from fishcomp.models.losses import head_loss

# Every head as the shipped configs define it, plus variants on the other input.
CONFIGS = {
    # Heads on cached features (fine-tuning trains the backbone itself; see test_finetune.py).
    **{
        path.stem: load_config(path).config.head
        for path in sorted(CONFIG_DIR.glob("*.yaml"))
        if load_config(path).config.head and load_config(path).config.head.kind in list_heads()
    },
    "dense-map": DenseHeadConfig(input="map"),
    "bbox-pooled": BboxHeadConfig(input="pooled"),
    "bbox-reduce": BboxHeadConfig(reduce=16),
    "fcn-reduce": FcnHeadConfig(reduce=16),
    "inception-reduce": InceptionHeadConfig(reduce=16),
}


def config_for(kind):
    return CONFIGS[kind]


def shapes(config):
    return (32, 6, 10) if head_uses_map(config) else (64,)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_forward_shapes_and_interface(name):
    config = config_for(name)
    head = create_head(config, shapes(config), 8, num_sizes=5)
    head.eval()
    x = torch.randn(4, *shapes(config))
    size = torch.eye(5)[[0, 1, 4, 2]]
    out = head(x, size=size)
    assert out["logits"].shape == (4, 8)
    features = head.forward_features(x, size)
    assert features.shape[:2] == (4, head.num_features)
    torch.testing.assert_close(head.forward_head(features), out["logits"])
    if "box" in out:
        assert out["box"].shape == (4, 4) and ((out["box"] >= 0) & (out["box"] <= 1)).all()
    if "heatmaps" in out:
        assert out["heatmaps"].shape[:2] == (4, 8)
        torch.testing.assert_close(out["heatmaps"].mean(dim=(2, 3)), out["logits"])
    head.reset_classifier(3)
    assert head(x, size=size)["logits"].shape == (4, 3)


MAP_HEADS = sorted(name for name, config in CONFIGS.items() if head_uses_map(config))


@pytest.mark.parametrize("name", MAP_HEADS)
def test_map_heads_learn_nothing_on_the_map_itself(name):
    # A learnable scale on the 37 input channels would need the first convolution's gradient with
    # respect to the whole map every step: the cost that made map heads slow.
    channels = 37
    head = create_head(config_for(name), (channels, 6, 10), 8, num_sizes=5)
    norms = [m for m in head.modules() if isinstance(m, torch.nn.BatchNorm2d) and m.num_features == channels]
    assert not any(p.requires_grad for m in norms for p in m.parameters())
    # The heads that pool the map before anything else (the lesson's max-pooled dense trunk, the
    # probe that pools it itself) have no normalisation of it to check.
    assert norms or name in {"bbox", "dense-map"} or config_for(name).kind == "linear"


@pytest.mark.parametrize("name", MAP_HEADS)
def test_map_heads_give_the_same_logits_in_either_memory_layout(name):
    from fishcomp.training.feature_sets import as_input

    torch.manual_seed(0)
    head = create_head(config_for(name), shapes(config_for(name)), 8, num_sizes=5).eval()
    maps = torch.randn(4, *shapes(config_for(name))).half()
    batch = as_input(maps, "cpu")
    assert batch.dtype == torch.float32 and batch.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(batch, maps.float())  # float16 -> float32 is exact
    size = torch.eye(5)[[0, 1, 4, 2]]
    with torch.no_grad():
        # Same sums in another order: float32 rounding of ~1e-6 relative, far below this.
        torch.testing.assert_close(head(batch, size=size)["logits"], head(batch.contiguous(), size=size)["logits"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", MAP_HEADS)
def test_a_map_head_has_a_stem_to_freeze_exactly_where_the_config_allows_stem_epochs(name):
    from fishcomp.config import _reads_map_with_one_conv

    head = create_head(config_for(name), shapes(config_for(name)), 8, num_sizes=5)
    stem = head.stem() if hasattr(head, "stem") else None
    assert (stem is not None) == _reads_map_with_one_conv(config_for(name))
    if stem is not None:  # the map's normalisation, then the one convolution that reads it
        assert isinstance(stem[0], torch.nn.BatchNorm2d) and isinstance(stem[1], torch.nn.Conv2d)
        assert stem[1].in_channels == shapes(config_for(name))[0]


def test_every_registered_head_has_a_shipped_config():
    assert set(list_heads()) == {c.kind for c in CONFIGS.values()}
    assert {"dense", "gap", "leakage", "bbox", "fcn", "inception", "resblock"} <= set(list_heads())


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_short_training_lowers_the_loss(name):
    torch.manual_seed(0)
    config = config_for(name)
    in_shape = shapes(config)
    labels = torch.arange(96) % 8
    # Class signal spread over the whole map, so global pooling keeps it as well as flattening does.
    centres = torch.randn(8, in_shape[0], *([1] * (len(in_shape) - 1))).expand(8, *in_shape)
    x = centres[labels] + 0.8 * torch.randn(96, *in_shape)
    head = create_head(config, in_shape, 8, num_sizes=3)
    size = torch.eye(3)[labels % 3]
    optimiser = torch.optim.Adam(head.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        head.train()
        loss = torch.nn.functional.cross_entropy(head(x, size=size)["logits"], labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3])


def _blob_maps(n, rng, height=6, width=10, channels=16):
    """Feature maps with a class-coded blob at a random cell, and that cell as a box."""
    labels = rng.integers(0, 8, n)
    maps = rng.normal(0, 0.5, (n, channels, height, width)).astype(np.float32)
    cells = np.stack([rng.integers(0, width, n), rng.integers(0, height, n)], axis=1)
    codes = rng.normal(0, 1, (8, channels)).astype(np.float32)
    for i, (cx, cy) in enumerate(cells):
        maps[i, :, cy, cx] += 3 * codes[labels[i]]
    boxes = np.stack([cells[:, 0] / width, cells[:, 1] / height, np.full(n, 1 / width), np.full(n, 1 / height)], axis=1)
    return torch.from_numpy(maps), torch.from_numpy(labels), boxes.astype(np.float32)


# The grid locator as configs/bbox_grid.yaml has it: its widths and heights start at the training
# boxes' median. Started at the sigmoid's midpoint, on these one-cell boxes its width output went to
# 0 and stayed there on two of four seeds (IoU 0.000) and recovered on another only after 60 of 120
# steps: a test that any CPU's rounding could tip. Started at the median, every seed's IoU passed
# 0.9 within 30 steps.
@pytest.mark.parametrize("box_from, box_start, steps, floor", [(None, None, 120, 0.2), ("grid", "median", 60, 0.6)])
def test_bbox_iou_rises_with_training(box_from, box_start, steps, floor):
    """Both box branches learn; the grid locator, which keeps the map's cells, finds the blob's
    cell far better (in half the steps) than the regression on the pooled, flattened trunk."""
    from fishcomp.boxes import box_iou
    from fishcomp.models.losses import head_loss

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x, labels, boxes = _blob_maps(256, rng)
    config = BboxHeadConfig(input="map", dropout=0.1, hidden=128, box_weight=50.0, box_from=box_from, box_start=box_start)
    head = create_head(config, tuple(x.shape[1:]), 8)
    head.start_from_targets(boxes)  # as training does: nothing without box_start
    optimiser = torch.optim.Adam(head.parameters(), lr=2e-3)

    def iou():
        head.eval()
        with torch.no_grad():
            return box_iou(head(x)["box"].numpy(), boxes).mean()

    before = iou()
    for _ in range(steps):
        head.train()
        loss = head_loss(head(x), labels, torch.from_numpy(boxes), config, torch.nn.CrossEntropyLoss())
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert iou() > max(floor, 3 * before)


def _two_fish_maps(n, rng, height=6, width=10, channels=16):
    """Maps with two blobs of the image's class code at distinct cells, the first twice as
    strong (the larger fish); targets laid out as `geometry_targets` does with every fish."""
    labels = rng.integers(0, 8, n)
    maps = rng.normal(0, 0.5, (n, channels, height, width)).astype(np.float32)
    codes = rng.normal(0, 1, (8, channels)).astype(np.float32)
    cells = np.stack([rng.choice(height * width, 2, replace=False) for _ in range(n)])  # (n, 2)
    targets = np.zeros((n, 8), dtype=np.float32)
    for i in range(n):
        for k, (strength, cell) in enumerate(zip((3.0, 1.5), cells[i])):
            maps[i, :, cell // width, cell % width] += strength * codes[labels[i]]
            targets[i, 4 * k:4 * k + 4] = [(cell % width) / width, (cell // width) / height, 1 / width, 1 / height]
    return torch.from_numpy(maps), torch.from_numpy(labels), targets, cells


def test_grid_locator_taught_every_fish_points_at_the_others_too():
    """`box_targets: every`: the other fish's cell gets a share of the locator's probability,
    which the largest-only target teaches it to withhold; the best cell still holds a fish."""
    torch.manual_seed(0)
    rng = np.random.default_rng(5)
    x, labels, targets, cells = _two_fish_maps(128, rng)

    def trained(box_targets):
        torch.manual_seed(1)
        config = BboxHeadConfig(input="map", dropout=0.1, hidden=128, box_weight=50.0, box_from="grid", box_targets=box_targets)
        head = create_head(config, tuple(x.shape[1:]), 8)
        optimiser = torch.optim.Adam(head.parameters(), lr=2e-3)
        given = torch.from_numpy(targets if box_targets else targets[:, :4])
        for _ in range(120):
            head.train()
            loss = head_loss(head(x), labels, given, config, torch.nn.CrossEntropyLoss())
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        head.eval()
        with torch.no_grad():
            return torch.softmax(head(x)["box_cells"].flatten(1), dim=1).numpy()

    rows = np.arange(len(cells))
    every, largest = trained("every"), trained(None)
    assert every[rows, cells[:, 1]].mean() > 0.25 > 2 * largest[rows, cells[:, 1]].mean()
    assert (every.argmax(axis=1)[:, None] == cells).any(axis=1).mean() > 0.9


def test_grid_loss_with_unknown_other_fish_is_the_one_fish_loss():
    """Padding rows (NaN: a photo with fewer fish than the most) change nothing."""
    from fishcomp.models.losses import grid_box_loss

    torch.manual_seed(0)
    cells, geometry = torch.randn(6, 4, 5), torch.rand(6, 4, 4, 5)
    boxes = torch.tensor([[0.1, 0.2, 0.2, 0.3]] * 6) + 0.1 * torch.rand(6, 4)
    padded = torch.cat([boxes[:, None], torch.full((6, 2, 4), float("nan"))], dim=1)
    one = grid_box_loss(cells, geometry, boxes, 20.0, torch.nn.functional.mse_loss)
    torch.testing.assert_close(grid_box_loss(cells, geometry, padded, 20.0, torch.nn.functional.mse_loss), one, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("box_from", [None, "grid"])
def test_box_outputs_start_at_the_training_boxes_median_size(box_from):
    """`box_start: median`: before any step, predicted boxes are about the annotated size, not
    half the image (the sigmoid's midpoint), which a few dozen steps did not leave."""
    torch.manual_seed(0)
    rng = np.random.default_rng(4)
    x, _, _ = _blob_maps(256, rng)
    sizes = rng.uniform(0.05, 0.2, (256, 2))
    boxes = np.concatenate([rng.uniform(0, 0.7, (256, 2)), sizes], axis=1).astype(np.float32)
    boxes[::5] = np.nan  # images without a fish say nothing about the size
    median = np.median(sizes[~np.isnan(boxes).any(axis=1)], axis=0)

    def start_size(box_start):
        config = BboxHeadConfig(input="map", dropout=0.1, hidden=128, box_from=box_from, box_start=box_start)
        head = create_head(config, tuple(x.shape[1:]), 8)
        head.start_from_targets(boxes)
        head.eval()
        with torch.no_grad():
            return np.median(head(x)["box"].numpy()[:, 2:], axis=0)

    # The layers below add a random offset to the started logit, the same one for every image:
    # with PyTorch's default init a few tenths, far less than the factor of 2 allowed here
    # (0.7 in logit), while the midpoint, 0.5, is 2.5 to 10 times these sizes.
    np.testing.assert_array_less(np.abs(np.log(start_size("median") / median)), np.log(2))
    assert (start_size(None) > 2 * median).all()


def test_bbox_head_learns_head_and_tail_points_where_they_are_given():
    from fishcomp.models.losses import head_loss

    torch.manual_seed(0)
    rng = np.random.default_rng(2)
    x, labels, boxes = _blob_maps(128, rng)
    # The head at the blob's cell centre, the tail a little to its left; a quarter have no points.
    centre = boxes[:, :2] + boxes[:, 2:] / 2
    points = np.concatenate([centre, centre - [0.08, 0.0]], axis=1).astype(np.float32)
    points[::4] = np.nan
    targets = torch.from_numpy(np.concatenate([boxes, points], axis=1))
    config = BboxHeadConfig(input="map", dropout=0.1, hidden=128, box_weight=50.0, box_from="grid", points_weight=50.0)
    head = create_head(config, tuple(x.shape[1:]), 8)
    optimiser = torch.optim.Adam(head.parameters(), lr=2e-3)
    have = ~np.isnan(points).any(axis=1)

    def error():
        head.eval()
        with torch.no_grad():
            return np.abs(head(x)["points"].numpy()[have] - points[have]).mean()

    before = error()
    for _ in range(150):
        head.train()
        loss = head_loss(head(x), labels, targets, config, torch.nn.CrossEntropyLoss())
        assert torch.isfinite(loss)  # images without points add nothing, not NaN
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert error() < before / 3


def test_fcn_heatmap_peaks_in_the_box_far_more_often_than_chance():
    from fishcomp.config import FcnHeadConfig
    from fishcomp.models.losses import pointing_hits

    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    x, labels, boxes = _blob_maps(320, rng)
    head = create_head(FcnHeadConfig(channels=32, blocks=0, dropout=0.0), tuple(x.shape[1:]), 8)
    optimiser = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(200):
        head.train()
        loss = torch.nn.functional.cross_entropy(head(x)["logits"], labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    head.eval()
    with torch.no_grad():
        maps = head(x)["heatmaps"][torch.arange(len(labels)), labels].numpy()
    chance = 1 / 60  # one cell of a 6x10 map
    assert pointing_hits(maps, boxes).mean() > 20 * chance


def test_grid_locator_and_trunk_normalise_the_map_once_between_them():
    head = create_head(config_for("bbox_grid"), (37, 6, 10), 8)
    norms = [m for m in head.modules() if isinstance(m, torch.nn.BatchNorm2d) and m.num_features == 37]
    assert len(norms) == 1
    # Both branches still read the normalised map: its statistics come from the batch.
    head.eval()
    x = torch.randn(4, 37, 6, 10)
    torch.testing.assert_close(head(x)["logits"], head.forward_head(head.forward_features(x)))


def test_a_class_map_box_outlines_the_peak_region_of_the_most_probable_fish_class():
    from fishcomp.models.losses import CLASS_MAP_UPSAMPLE, class_map_boxes

    nof = 4
    maps = np.zeros((3, 8, 3, 5), dtype=np.float32)
    maps[:, nof, 0, 0] = 9.0  # NoF's map lights up the empty deck: never the fish's box
    maps[0, 2, 1, 3] = 1.0  # image 0: one hot cell in class 2's map
    maps[1, 6, 0, 1] = maps[1, 6, 0, 2] = 1.0  # image 1: two adjacent hot cells, and a separate
    maps[1, 6, 2, 4] = 0.9  # blob that is not the peak's
    probs = np.full((3, 8), 0.01)
    probs[:, nof] = 0.9  # NoF the most probable class everywhere
    probs[0, 2] = probs[1, 6] = 0.05
    boxes = class_map_boxes(maps, probs, background=nof)
    # Bilinear upsampling between cell centres: a lone hot cell is above half its peak exactly
    # within half a cell of its centre, i.e. on the cell, up to one upsampled pixel.
    pixel = 1 / (CLASS_MAP_UPSAMPLE * 5), 1 / (CLASS_MAP_UPSAMPLE * 3)
    tolerance = np.array([pixel[0], pixel[1], 2 * pixel[0], 2 * pixel[1]])
    assert (np.abs(boxes[0] - [3 / 5, 1 / 3, 1 / 5, 1 / 3]) <= tolerance).all(), boxes[0]
    assert (np.abs(boxes[1] - [1 / 5, 0, 2 / 5, 1 / 3]) <= tolerance).all(), boxes[1]
    # A flat map says nothing about where the fish is: the whole image.
    np.testing.assert_allclose(boxes[2], [0, 0, 1, 1])
    # Without a background class the brightest map (NoF's here) is used.
    assert (np.abs(class_map_boxes(maps[:1], probs[:1])[0] - [0, 0, 1 / 5, 1 / 3]) <= tolerance).all()


def test_a_channel_silent_in_training_reaches_the_dense_layers_at_most_ten_median_deviations_out():
    """The dense head's input norm (`head.input_floor`, 0.1): trained on rows where one channel is
    always 0, its running variance for that channel is ~0 and a plain batch norm would pass a
    firing value of 1.0 on as 1 / sqrt(eps) ~ 316; floored at a tenth of the median channel's
    running deviation (~1 on unit-normal rows) it arrives at ~10. Training steps use the batch's
    own statistics either way, so the two heads' training outputs are the same."""
    torch.manual_seed(0)
    heads = {floor: create_head(DenseHeadConfig(input_floor=floor), (16,), 4) for floor in (None, 0.1)}
    heads[0.1].load_state_dict(heads[None].state_dict())
    rows = torch.randn(256, 16)
    rows[:, 3] = 0.0
    for head in heads.values():
        head.train()
        for _ in range(250):  # the silent channel's running variance decays from 1 by 0.9 a step: 0.9^250 ~ 4e-12
            head(rows[torch.randperm(256)[:64]])
    batch = rows[:64]
    outs = {}
    for floor, head in heads.items():
        torch.manual_seed(1)
        outs[floor] = head(batch)["logits"]
    torch.testing.assert_close(outs[0.1], outs[None])
    fired = torch.zeros(1, 16)
    fired[0, 3] = 1.0
    normed = {floor: head.eval().trunk[1](fired)[0, 3].item() for floor, head in heads.items()}
    assert normed[None] > 250  # 1 / sqrt(4e-12 + 1e-5)
    assert 5 < normed[0.1] < 15


def test_a_dense_checkpoint_saved_before_the_input_floor_is_rebuilt_with_the_norm_it_was_trained_with():
    """A fold checkpoint's head fields are its config's key payload; one written before
    `input_floor` existed lacks the field, and its head must evaluate as it did then (the plain
    norm), while a current one gets the floor it was trained with."""
    from fishcomp.config import key_payload
    from fishcomp.models.heads.dense import FlooredBatchNorm1d
    from fishcomp.training.folds import model_from_checkpoint

    current = key_payload(DenseHeadConfig())
    old = {name: value for name, value in current.items() if name != "input_floor"}
    model = create_head(DenseHeadConfig(input_floor=None), (16,), 4)
    rebuilt = {}
    for label, fields in (("old", old), ("current", current)):
        checkpoint = {"state_dict": model.state_dict(), "head": fields, "in_shape": [16], "classes": list("abcd"), "size_vocabulary": []}
        rebuilt[label] = model_from_checkpoint(checkpoint, torch.device("cpu")).trunk[1]
    assert type(rebuilt["old"]) is torch.nn.BatchNorm1d
    assert isinstance(rebuilt["current"], FlooredBatchNorm1d) and rebuilt["current"].floor == 0.1
