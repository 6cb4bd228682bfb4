"""End-to-end fine-tuning (`head.kind: finetune`): the whole backbone trains on decoded images.

Each fold: a new classifier warmed up on the cached pooled features (the backbone frozen, which
costs almost nothing since the features exist), then every layer unfrozen with timm's layer-wise
learning-rate decay, images decoded and augmented on the fly, mixed precision on a GPU. Its
out-of-fold and test predictions have the same shape as any head's, so it joins ensembles.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fishcomp.cache import Artifact
from fishcomp.config import key_payload
from fishcomp.data.augment import DEFAULT_AUGMENT, build_transform
from fishcomp.distributed import world
from fishcomp.errors import FishcompError
from fishcomp.features import (
    DecodedImages,
    load_features,
    loader_workers,
    resolved_precompute,
    to_model_input,
)
from fishcomp.metrics import accuracy, log_loss
from fishcomp.training.data import FoldResult, TrainData
from fishcomp.training.loop import check_finite, lr_at, run_phases


class FinetuneFolds:
    def __init__(self, data: TrainData, root: Path, features_artifact: Artifact):
        config = data.loaded.config
        self.data, self.root, self.head = data, root, config.head
        self.precompute = resolved_precompute(config.precompute, originals_only=True)
        self.pooled = np.asarray(load_features(features_artifact, "train", "pooled"), dtype=np.float32)[data.usable]
        self.paths = data.usable_index.path.to_numpy()
        self.test_paths = {split: data.index[data.index.split == split].path.to_numpy() for split in data.test_splits}
        augment = config.precompute.augment  # its transforms; the resolved precompute drops the copies
        self.transform = build_transform(augment.transforms if augment else DEFAULT_AUGMENT) if self.head.augment else None

    # -- pieces -----------------------------------------------------------------------------------

    def _model(self):
        from fishcomp.models.backbones import create_backbone

        backbone = create_backbone(self.precompute)
        model = backbone.model
        model.reset_classifier(len(self.data.classes))
        model.drop_rate = self.head.dropout
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        self.mean = np.asarray(backbone.mean, dtype=np.float32) * 255
        self.std = np.asarray(backbone.std, dtype=np.float32) * 255
        return model.to(self.data.device)

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

    def _inputs(self, batch):
        import torch

        device = self.data.device
        mean = torch.from_numpy(self.mean).view(1, 3, 1, 1).to(device)
        std = torch.from_numpy(self.std).view(1, 3, 1, 1).to(device)
        return to_model_input(batch, device, mean, std)

    def _autocast(self):
        import torch

        device = self.data.device
        if device.type != "cuda":
            return torch.autocast("cpu", enabled=False)
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)

    def _warm_up(self, model, train: np.ndarray, labels: np.ndarray, fold: int) -> None:
        """Train the new classifier alone on the cached pooled features (what the frozen backbone gives)."""
        import torch
        from torch import nn

        if self.head.warmup_epochs == 0:
            return
        classifier = model.get_classifier()
        optimiser = torch.optim.Adam(classifier.parameters(), lr=self.head.warmup_lr)
        criterion = nn.CrossEntropyLoss(label_smoothing=self.data.loaded.config.train.label_smoothing)
        features = torch.from_numpy(self.pooled[train]).to(self.data.device)
        targets = torch.from_numpy(labels).to(self.data.device)
        generator = np.random.default_rng([self.data.loaded.config.train.seed, fold, 7])
        batch_size = self.data.loaded.config.train.batch_size
        for _ in range(self.head.warmup_epochs):
            order = generator.permutation(len(train))
            for start in range(0, len(order), batch_size):
                pick = torch.from_numpy(order[start : start + batch_size]).to(self.data.device)
                loss = criterion(classifier(nn.functional.dropout(features[pick], self.head.dropout)), targets[pick])
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()

    def _train_mode(self, model) -> None:
        from torch import nn

        model.train()
        if self.head.freeze_bn:
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
                with self._autocast():
                    logits = model(self._inputs(batch))
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
        optimiser = timm.optim.create_optimizer_v2(
            model, opt="adamw", lr=train_cfg.phases[0].lr, weight_decay=train_cfg.weight_decay, layer_decay=self.head.layer_decay
        )
        scaler = torch.amp.GradScaler("cuda", enabled=data.device.type == "cuda" and not torch.cuda.is_bf16_supported())
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
                with self._autocast():
                    loss = criterion(net(self._inputs(images)).float(), y)
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

        best_epoch = run_phases(train_cfg, fold, model, records, advance, train_epoch, validate)
        valid_probs = self.predict(model, self.paths[valid], spread) if len(valid) else np.empty((0, len(data.classes)))
        test_probs = {split: self.predict(model, paths, spread) for split, paths in self.test_paths.items()}
        return FoldResult(
            valid_probs=valid_probs, valid_probs_original=valid_probs, valid_extras={},
            test_probs=test_probs, test_extras={}, best_epoch=best_epoch,
            checkpoint={
                "state_dict": model.state_dict(), "head": key_payload(self.head), "classes": data.classes,
                "backbone": self.precompute.backbone, "size": list(self.precompute.size), "mean": self.mean.tolist(), "std": self.std.tolist(),
            },
        )

    def summary(self) -> dict:
        return {"features": "images", "tta_views": 1, "augment_copies": 0, "pseudo": None, "layer_decay": self.head.layer_decay}
