"""What the speed levers must not change: loader workers and draft-mode JPEG decoding."""

import numpy as np
import pytest
from PIL import Image

from fishcomp.data.images import load_rgb
from fishcomp.config import load_config
from fishcomp.stages.context import Context
from fishcomp.stages.precompute import ensure_precompute, load_features, load_index

from conftest import CONFIGS


def test_loader_workers_give_exactly_the_same_features(tiny_data, tmp_path):
    arrays = []
    for workers in (0, 2):
        loaded = load_config(CONFIGS / "dense.yaml", [f"precompute.workers={workers}", "precompute.batch_size=7"])
        artifact = ensure_precompute(Context(data_dir=tiny_data, work_dir=tmp_path / f"w{workers}"), loaded)
        index = load_index(artifact)
        arrays.append((index.to_csv(), [np.asarray(load_features(artifact, s, "pooled")) for s in ("train", "test_stg1", "test_stg2")]))
    (index_a, features_a), (index_b, features_b) = arrays
    assert index_a == index_b
    for a, b in zip(features_a, features_b):
        np.testing.assert_array_equal(a, b)


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
