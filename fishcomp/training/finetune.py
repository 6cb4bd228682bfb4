"""End-to-end fine-tuning (`train.finetune`): the config's head on the backbone's pooled vector,
and the backbone under it trained too, on decoded images.

Each fold: a new head warmed up on the cached pooled features (the backbone frozen, which costs
almost nothing since the features exist), then every layer unfrozen with timm's layer-wise
learning-rate decay, images decoded and augmented on the fly, mixed precision on a GPU. The
backbone, its normalisation and its input layout are the shared `features.Embedder`'s. Its
out-of-fold and test predictions have the same shape as any head's, so it joins ensembles.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fishcomp.cache import Artifact
from fishcomp.config import key_payload
from fishcomp.context import autocast, training_precision
from fishcomp.data.augment import DEFAULT_AUGMENT, build_transform
from fishcomp.distributed import world
from fishcomp.errors import FishcompError
from fishcomp.features import (
    DecodedImages,
    Embedder,
    load_features,
    loader_workers,
    resolved_precompute,
)
from fishcomp.metrics import accuracy, log_loss
from fishcomp.training.data import FoldResult, TrainData
from fishcomp.training.loop import check_finite, lr_at, run_phases


def _fine_tuned(embedder: Embedder, head):
    """The backbone's pooled vector into the head, as one trainable module."""
    from torch import nn

    class FineTuned(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone, self.head = embedder.model, head

        def forward(self, x):
            pooled = self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)
            return self.head(pooled.float())["logits"]

    return FineTuned()


class FinetuneFolds:
    def __init__(self, data: TrainData, root: Path, features_artifact: Artifact):
        config = data.loaded.config
        self.data, self.root, self.head, self.settings = data, root, config.head, config.train.finetune
        self.precompute = resolved_precompute(config.precompute, originals_only=True)
        self.pooled = np.asarray(load_features(features_artifact, "train", "pooled"), dtype=np.float32)[data.usable]
        self.paths = data.usable_index.path.to_numpy()
        self.test_paths = {split: data.index[data.index.split == split].path.to_numpy() for split in data.test_splits}
        augment = config.precompute.augment  # its transforms; the resolved precompute drops the copies
        self.transform = build_transform(augment.transforms if augment else DEFAULT_AUGMENT) if self.settings.augment else None
        self.dtype = training_precision(data.loaded, data.device)

    # -- pieces -----------------------------------------------------------------------------------

    def _model(self):
        """A fresh backbone (the shared Embedder's: device, channels_last, normalisation), made
        trainable, under a fresh head from the registry."""
        from fishcomp.models.heads import create_head

        self.embedder = Embedder(self.precompute, self.data.device, frozen=False)
        for parameter in self.embedder.model.parameters():
            parameter.requires_grad_(True)
        head = create_head(self.head, (self.embedder.num_features,), len(self.data.classes)).to(self.data.device)
        return _fine_tuned(self.embedder, head)

    def _loader(self, paths, transform=None, seed: int = 0, shuffle: bool = False, spread: bool = False):
        """Batches of decoded `paths`. Shuffled for training, through a DistributedSampler: with
        `spread` each rank gets its share of every global batch (per-rank batch = batch_size /
        ranks), and the ranks' shares make up exactly the batches one process trains on."""
        from torch.utils.data import DataLoader, DistributedSampler

        ranks, rank = (world().size, world().rank) if spread else (1, 0)
        batch_size = self.data.loaded.config.train.batch_size
        images = DecodedImages(self.root, list(paths), tuple(self.precompute.size), transform, seed)
        drop_last = shuffle and len(paths) > batch_size
        sampler = DistributedSampler(images, num_replicas=ranks, rank=rank, seed=seed) if shuffle else None
        return DataLoader(
            images, batch_size=batch_size // ranks if shuffle else batch_size, sampler=sampler, drop_last=drop_last,
            num_workers=loader_workers(self.precompute.workers), pin_memory=self.data.device.type == "cuda",
        )

    def _warm_up(self, model, train: np.ndarray, labels: np.ndarray, fold: int) -> None:
        """Train the new head alone, by gradient steps, on the cached pooled features (what the
        frozen backbone gives). Not the linear probe's exact fit, even for a linear head: that
        optimum is sharp, and on augmented images and after the backbone's first steps its loss
        was 3 to 10 times its starting value (measured on the tiny test set); a few epochs of Adam
        leave a softer head that fine-tuning improves."""
        import torch
        from torch import nn

        if self.settings.warmup_epochs == 0:
            return
        head, device = model.head, self.data.device
        head.train()
        optimiser = torch.optim.Adam(head.parameters(), lr=self.settings.warmup_lr)
        criterion = nn.CrossEntropyLoss(label_smoothing=self.data.loaded.config.train.label_smoothing)
        features = torch.from_numpy(self.pooled[train]).to(device)
        targets = torch.from_numpy(labels).to(device)
        generator = np.random.default_rng([self.data.loaded.config.train.seed, fold, 7])
        batch_size = self.data.loaded.config.train.batch_size
        for _ in range(self.settings.warmup_epochs):
            order = generator.permutation(len(train))
            for start in range(0, len(order), batch_size):
                pick = order[start : start + batch_size]
                if len(pick) < 2 < len(order):
                    continue  # BatchNorm in a head cannot normalise a batch of one
                pick = torch.from_numpy(pick).to(device)
                loss = criterion(head(features[pick])["logits"], targets[pick])
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()

    def _train_mode(self, model) -> None:
        from torch import nn

        model.train()
        if self.settings.freeze_bn:
            for module in model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()

    def predict(self, model, paths, spread: bool = False) -> np.ndarray:
        """Softmax probabilities of `paths`; `spread`: each rank decodes and runs its share of them."""
        import torch

        from fishcomp.distributed import gather_rows, my_rows

        if spread and len(paths) >= world().size:
            return gather_rows({"probs": self.predict(model, paths[my_rows(len(paths))])}, len(paths))["probs"]
        model.eval()
        outputs = []
        with torch.inference_mode():
            for batch, *_ in self._loader(paths):
                with autocast(self.dtype, self.data.device):
                    logits = model(self.embedder.inputs(batch))
                outputs.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
        return np.concatenate(outputs)

    # -- one fold ---------------------------------------------------------------------------------

    def fit(self, fold: int, train: np.ndarray, valid: np.ndarray, records: list, advance, spread: bool = False) -> FoldResult | None:
        """One fold. `spread`: on every rank with DistributedDataParallel, each rank decoding and
        training on its share of every batch and predicting its share of every set."""
        import timm.optim
        import torch
        from torch import nn

        from fishcomp.distributed import sum_across, sync_buffers, wrap_data_parallel

        data = self.data
        train_cfg = data.loaded.config.train
        here = world()
        if spread and train_cfg.batch_size % here.size:
            raise FishcompError(
                f"train.batch_size {train_cfg.batch_size} does not split evenly over {here.size} processes; "
                f"use a multiple of {here.size}"
            )
        torch.manual_seed(train_cfg.seed * 1000 + fold)
        labels, valid_labels = data.labels[train], data.labels[valid]
        model = self._model()
        # The warm-up is the same on every rank (same seed, same cached features); the wrapper then
        # broadcasts rank 0's weights anyway, so all ranks start fine-tuning from one model.
        self._warm_up(model, train, labels, fold)
        net = wrap_data_parallel(model, data.device) if spread else model
        # timm's layer-wise decay over the backbone's layer groups; the head trains at the full rate.
        groups = timm.optim.param_groups_layer_decay(model.backbone, weight_decay=train_cfg.weight_decay, layer_decay=self.settings.layer_decay)
        groups.append({"params": list(model.head.parameters()), "weight_decay": train_cfg.weight_decay, "lr_scale": 1.0})
        optimiser = torch.optim.AdamW(groups, lr=train_cfg.phases[0].lr)
        # float16 needs its gradients scaled (bfloat16 has float32's range and does not).
        scaler = torch.amp.GradScaler(data.device.type, enabled=self.dtype == torch.float16)
        criterion = nn.CrossEntropyLoss(label_smoothing=train_cfg.label_smoothing)
        targets = torch.from_numpy(labels)
        batch_size = train_cfg.batch_size
        batches = max(1, len(train) // batch_size if len(train) > batch_size else 1)

        def train_epoch(phase, phase_epoch: int, epoch: int) -> float:
            self._train_mode(net)
            # A new augmentation draw every epoch, reproducible from (seed, fold, epoch).
            loader = self._loader(self.paths[train], self.transform, seed=(train_cfg.seed * 1000 + fold) * 1000 + epoch, shuffle=True, spread=spread)
            total, seen = 0.0, 0
            for batch_index, (images, local, *_rest) in enumerate(loader):
                for group in optimiser.param_groups:
                    step_lr = lr_at(phase, phase_epoch * batches + batch_index, phase.epochs * batches, train_cfg.schedule)
                    group["lr"] = step_lr * group.get("lr_scale", 1.0)  # timm's layer-wise decay
                y = targets[local].to(data.device)
                with autocast(self.dtype, data.device):
                    loss = criterion(net(self.embedder.inputs(images)).float(), y)
                check_finite(loss, data.loaded.name, fold, epoch, "lower the fine-tuning learning rate (train.phases)")
                optimiser.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimiser)
                scaler.update()
                total += loss.item() * len(local)
                seen += len(local)
            total, seen = sum_across(total, seen) if spread else (total, seen)
            return total / max(seen, 1)

        def validate() -> dict:
            if spread:
                sync_buffers(model)
            probs = self.predict(model, self.paths[valid], spread)
            score = log_loss(valid_labels, probs)
            return {"valid_loss": score, "valid_logloss": score, "valid_accuracy": accuracy(valid_labels, probs)}

        kept_epoch = run_phases(train_cfg, fold, model, records, advance, train_epoch, validate)
        valid_probs = self.predict(model, self.paths[valid], spread) if len(valid) else np.empty((0, len(data.classes)))
        test_probs = {split: self.predict(model, paths, spread) for split, paths in self.test_paths.items()}
        return FoldResult(
            valid_probs=valid_probs, valid_probs_original=valid_probs, valid_extras={},
            test_probs=test_probs, test_extras={}, kept_epoch=kept_epoch,
            checkpoint={
                "state_dict": model.state_dict(), "head": key_payload(self.head), "classes": data.classes,
                "finetune": key_payload(self.settings), "backbone": self.precompute.backbone, "size": list(self.precompute.size),
                "mean": self.embedder.backbone.mean, "std": self.embedder.backbone.std,
            },
        )

    def summary(self) -> dict:
        return {"features": "images", "tta_views": 1, "augment_copies": 0, "pseudo": None, "finetune": key_payload(self.settings)}
