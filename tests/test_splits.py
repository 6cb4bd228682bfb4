import numpy as np
import pytest

from fishcomp.config import SplitConfig
from fishcomp.data.splits import assign_folds
from fishcomp.errors import FishcompError

LABELS = np.array([0] * 40 + [1] * 20 + [2] * 10 + [3] * 3)


def test_kfold_validates_every_image_exactly_once_and_stratifies():
    folds = assign_folds(LABELS, SplitConfig(kind="kfold", folds=5, seed=1))
    assert sorted(np.unique(folds)) == [0, 1, 2, 3, 4]
    assert (folds >= 0).all()
    for fold in range(5):
        assert (LABELS[folds == fold] == 0).sum() == 8


def test_holdout_and_seed():
    folds = assign_folds(LABELS, SplitConfig(kind="holdout", valid_fraction=0.2, seed=0))
    assert set(np.unique(folds)) == {-1, 0} and (folds == 0).sum() == 15
    again = assign_folds(LABELS, SplitConfig(kind="holdout", valid_fraction=0.2, seed=0))
    other = assign_folds(LABELS, SplitConfig(kind="holdout", valid_fraction=0.2, seed=1))
    assert (folds == again).all() and (folds != other).any()


def test_group_kfold_never_splits_a_boat():
    rng = np.random.default_rng(0)
    groups = rng.choice(["1280x720", "1280x750", "1192x670", "1276x718", "1732x974", "1518x854"], len(LABELS))
    folds = assign_folds(LABELS, SplitConfig(kind="group_kfold", folds=3), groups=groups)
    assert (folds >= 0).all()
    for group in np.unique(groups):
        assert len(np.unique(folds[groups == group])) == 1
    with pytest.raises(FishcompError, match="needs at least split.folds=5 groups"):
        assign_folds(LABELS, SplitConfig(kind="group_kfold", folds=5), groups=np.array(["a", "b"] * 36 + ["a"]))
