"""The train stage: a head trained fold by fold on cached features (or crops), or fine-tuned.

Inputs: the features it reads (a precompute pass, or the crops of a detect-then-classify run),
and optionally the run whose test predictions are its pseudo-labels (`train.pseudo.source`) and
the whole-image model that judges NoF for crops (`crops.nof.whole`). The work itself is in
`fishcomp.training`.
"""

from __future__ import annotations

import json
from pathlib import Path

from fishcomp.cache import Artifact
from fishcomp.config import LoadedConfig, key_payload
from fishcomp.context import Context, precision_name, resolve_device, training_precision
from fishcomp.distributed import device_for
from fishcomp.errors import FishcompError
from fishcomp.features import tta_combine
from fishcomp.graph import Node, Resolver, Stage, register_stage
from fishcomp.models.heads import head_needs_size, head_uses_map
from fishcomp.predictions import predictions_stage
from fishcomp.training.folds import FoldStore, fit_folds


def features_request(loaded: LoadedConfig) -> dict:
    """What a head needs of its backbone pass: the spatial map, or (fine-tuning, which embeds the
    images itself) only the originals' pooled vectors, for the head's warm-up."""
    finetune = loaded.config.train.finetune is not None
    return {"spatial": not finetune and head_uses_map(loaded.config.head), "originals_only": finetune}


@register_stage
class Train(Stage):
    name = "train"
    section = "head"
    declares = ("head", "train", "split", "precompute.tta.combine", "crops.nof.weight", "crops.candidates.share", "crops.candidates.weights", "crops.candidates.train", "crops.candidates.inner")
    together = True  # under torchrun the folds are dealt to the ranks (or spread); rank 0 publishes
    summary = "a head trained fold by fold: out-of-fold and test predictions, checkpoints, curves"
    saves_config = True
    reuses_fit = True  # the fold models of an earlier build for other test images (EarlierFolds)

    def inputs(self, resolver: Resolver, loaded: LoadedConfig, **request) -> dict:
        config = loaded.config
        if not config.trains:
            raise FishcompError(f"{loaded.path}: nothing to train (add a `head:` section, or use an ensemble's members)")
        if config.train.finetune is not None and head_needs_size(config.head):
            raise FishcompError(f"{loaded.path}: train.finetune feeds the head the backbone's pooled vector only; "
                                f"head.kind {config.head.kind} also needs the image size (use linear or dense)")
        if config.crops is not None:
            inputs = {"features": resolver.node("crops", loaded)}
        else:
            inputs = {"features": resolver.node("precompute", loaded, **features_request(loaded))}
        if config.train.pseudo is not None:
            source = resolver.reference(loaded, config.train.pseudo.source, "train.pseudo.source")
            if source.config.ensemble is None and not source.config.trains:
                raise FishcompError(f"{source.path}: a pseudo-label source must train a head or blend an ensemble")
            inputs["pseudo"] = resolver.node(predictions_stage(source.config), source, via="train.pseudo.source")
        if config.crops is not None and config.crops.nof is not None:
            whole = resolver.reference(loaded, config.crops.nof.whole, "crops.nof.whole")
            inputs["whole"] = resolver.node("train", whole, via="crops.nof.whole")
        return inputs

    def params(self, ctx: Context, loaded: LoadedConfig, **request) -> dict:
        config = loaded.config
        params = {"head": key_payload(config.head), "train": key_payload(config.train), "split": key_payload(config.split)}
        device = resolve_device(device_for(config.train.device))
        params["precision"] = precision_name(training_precision(loaded, device))
        if tta_combine(loaded):
            params["tta_combine"] = tta_combine(loaded)
        if config.crops is not None and config.crops.nof is not None:
            params["nof"] = key_payload(config.crops.nof)
        if config.crops is not None and config.crops.candidates is not None:
            params["candidates_share"] = config.crops.candidates.share
            if config.crops.candidates.weights is not None:
                params["candidates_weights"] = config.crops.candidates.weights
            if config.crops.candidates.train:
                params["candidates_train"] = True
            if config.crops.candidates.inner:
                params["candidates_inner"] = config.crops.candidates.inner
        if getattr(config.head, "box_from", None) == "grid":
            # A grid locator keeps its cell map (`oof_cells.npy`), which older artifacts lack.
            params["writes"] = ["cells"]
        return params

    def fit_params(self, ctx: Context, loaded: LoadedConfig, params: dict) -> dict | None:
        config = loaded.config
        # Pseudo-labels train on test images; fine-tuning predicts by a backbone pass of its own.
        return None if config.train.pseudo is not None or config.train.finetune is not None else params

    def references(self, resolver: Resolver, node: Node) -> dict:
        fields = {"pseudo": "train.pseudo.source", "whole": "crops.nof.whole"}
        return {field: node.inputs[name] for name, field in fields.items() if name in node.inputs}

    def build(self, ctx: Context, node: Node, inputs: dict, tmp: Path) -> dict | None:
        return fit_folds(ctx, node.loaded, inputs["features"], tmp, inputs.get("pseudo"), inputs.get("whole"),
                         earlier=self.earlier(ctx, node))

    def after(self, ctx: Context, node: Node, artifact: Artifact) -> None:
        # The artifact is whole: the folds kept for a resume are not needed any more.
        FoldStore(ctx.cache.temp_folder(self.name, node.label, node.key)).clear()

    def describe(self, artifact: Artifact) -> str:
        summary = json.loads(artifact.file("summary.json").read_text())
        line = f"[{summary['name']}] valid logloss {summary['valid_logloss']:.4f}, accuracy {summary['valid_accuracy']:.3f}"
        if summary.get("tta_views", 1) > 1:
            line += f" (TTA x{summary['tta_views']}; {summary['valid_logloss_without_tta']:.4f} without)"
        if summary.get("nof_blend"):
            blend = summary["nof_blend"]
            line += f" (crops alone {blend['crops_alone']:.4f}, whole image {blend['whole_image']:.4f}"
            line += f", its P(NoF) weighted {blend['weight']:g} by auto)" if blend.get("weight_setting") == "auto" else ")"
        if summary.get("candidates"):
            mixed = summary["candidates"]
            rule, setting = mixed.get("weights", "cells"), mixed.get("weights_setting", "cells")
            weighed = "" if setting == "cells" else f", weighed by {rule}{' (auto)' if setting == 'auto' else ''}"
            trained = summary.get("candidate_crops_trained")
            taught = (f"; trained on {trained['fish']} further crops with a fish, {trained['nof_in_fish_photos'] + trained['nof_photos']} without"
                      if trained else "")
            line += (f" ({mixed['count'] - 1} further boxes mixed in at {mixed['share']:g}"
                     f"{' by auto' if mixed['share_setting'] == 'auto' else ''}{weighed}: usual crop alone {mixed['usual_crop_alone']:.4f}{taught})")
        return line
