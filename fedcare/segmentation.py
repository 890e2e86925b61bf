"""Segmentation on a site: the Dice plus cross-entropy loss that DP-SGD can clip sample by sample,
and the lesion Dice a site reports for the global model on its validation split.

Opacus computes per-sample gradients from a loss that is the batch mean of per-sample losses (its
`loss_reduction="mean"`). `DiceCrossEntropy` is exactly that: each sample's soft Dice over its own
pixels plus its own mean pixel cross-entropy, averaged over the batch. A batch-pooled Dice
(`batch=True` in MONAI) would couple the samples of a batch and make per-sample clipping wrong.

In 3D a site trains on patches but is scored on whole validation volumes (`evaluate_volumes`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from monai.losses import DiceLoss
from torch import nn
from torch.utils.data import Dataset

from fedcare.device import model_device
from fedcare.errors import SiteDataError
from fedcare.training import make_loader

FOREGROUND = 1


class DiceCrossEntropy(nn.Module):
    """Mean over the batch of (soft Dice of the lesion + weighted mean pixel cross-entropy) per sample.

    Logits are [B, 2, *spatial], masks [B, *spatial] with 0 background and 1 lesion.
    """

    def __init__(self, lesion_weight: float) -> None:
        super().__init__()
        # batch=False: Dice per sample; the background class is left out of Dice (it would score ~1
        # on every slice and drown the lesion) but stays in the cross-entropy.
        self.dice = DiceLoss(include_background=False, to_onehot_y=True, softmax=True, batch=False,
                             reduction="mean")
        self.register_buffer("class_weight", torch.tensor([1.0, lesion_weight]))

    def forward(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        # Each sample's own pixel mean, never torch's weighted batch mean: that one divides by the
        # weights of the whole batch, so one sample's labels would scale every other sample's gradient.
        pixel_loss = F.cross_entropy(logits, masks, weight=self.class_weight, reduction="none")
        return self.dice(logits, masks[:, None]) + pixel_loss.flatten(1).mean(dim=1).mean()


class LesionTally:
    """Voxel counts of one site's validation split, summed over every slice or volume it holds.

    A site's Dice is the Dice of these sums (the "global Dice" of the LiTS and KiTS challenges):
    each lesion voxel found and each false alarm counts by its size, wherever it lies. Averaging
    Dice per slice or per series instead scores an empty prediction on an empty slice as perfect,
    so a model that never predicts a lesion scores the share of lesion-free slices (0.7-0.85 on the
    demo), and one stray voxel on a lesion-free slice costs as much as missing a whole lesion.
    """

    def __init__(self) -> None:
        self.overlap = self.predicted = self.lesion = 0

    def add(self, predicted: torch.Tensor, masks: torch.Tensor) -> None:
        pred, true = predicted == FOREGROUND, masks == FOREGROUND
        self.overlap += int((pred & true).sum())
        self.predicted += int(pred.sum())
        self.lesion += int(true.sum())

    @property
    def dice(self) -> float:
        """2|P and L| / (|P| + |L|); 1.0 when neither the model nor the masks mark a lesion voxel."""
        size = self.predicted + self.lesion
        return 2.0 * self.overlap / size if size else 1.0


def all_background_dice(dataset: Dataset) -> float:
    """The Dice of a model that never predicts a lesion: 0 once the split holds any lesion voxel."""
    tally = LesionTally()
    for _, mask in dataset:
        tally.add(torch.zeros_like(mask), mask)
    return tally.dice


def _require_validation(dataset: Dataset) -> None:
    if not len(dataset):
        raise SiteDataError("the validation split holds no segmented series: add series or raise val-fraction")


@torch.no_grad()
def evaluate_segmentation(model: nn.Module, dataset: Dataset, batch_size: int,
                          loss_fn: nn.Module) -> dict[str, float]:
    """Loss (`loss_fn`, the run's training loss) and lesion Dice over all the split's pixels, on a site's slices."""
    _require_validation(dataset)
    model.eval()
    device = model_device(model)
    loss_fn = loss_fn.to(device)
    total_loss, tally = 0.0, LesionTally()
    for images, masks in make_loader(dataset, batch_size, None, shuffle=False):
        images, masks = images.to(device), masks.to(device)
        logits = model(images)
        total_loss += float(loss_fn(logits, masks)) * len(masks)
        tally.add(logits.argmax(dim=1), masks)
    return {"loss": total_loss / len(dataset), "dice": tally.dice}


@torch.no_grad()
def evaluate_volumes(model: nn.Module, dataset: Dataset, patch_size: tuple[int, int, int],
                     batch_size: int, loss_fn: nn.Module) -> dict[str, float]:
    """Loss (`loss_fn`, the run's training loss) and lesion Dice over all the split's voxels, on whole volumes.

    The network sees patch-sized windows only, as in training (`patch_size` in the volume's
    [D, H, W] order); windows overlap by a quarter and are blended with Gaussian weights, so patch
    borders leave no seams.
    """
    _require_validation(dataset)
    model.eval()
    device = model_device(model)
    loss_fn = loss_fn.to(device)
    losses, tally = [], LesionTally()
    for index in range(len(dataset)):  # one volume at a time: volumes differ in size
        image, mask = (tensor.to(device) for tensor in dataset[index])
        logits = sliding_window_inference(image[None], roi_size=patch_size, sw_batch_size=batch_size,
                                          predictor=model, overlap=0.25, mode="gaussian")
        losses.append(float(loss_fn(logits, mask[None])))
        tally.add(logits.argmax(dim=1), mask[None])
    return {"loss": float(np.mean(losses)), "dice": tally.dice}
