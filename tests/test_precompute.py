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
