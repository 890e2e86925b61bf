"""Segmentation on a site: the Dice plus cross-entropy loss that DP-SGD can clip sample by sample,
and the mean Dice a site reports for the global model on its validation split.

Opacus computes per-sample gradients from a loss that is the batch mean of per-sample losses (its
`loss_reduction="mean"`). `DiceCrossEntropy` is exactly that: each sample's soft Dice over its own
pixels plus its own mean pixel cross-entropy, averaged over the batch. A batch-pooled Dice
(`batch=True` in MONAI) would couple the samples of a batch and make per-sample clipping wrong.

In 3D a site trains on patches but is scored on whole validation volumes (`evaluate_volumes`).
"""

from __future__ import annotations

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from torch import nn
from torch.utils.data import Dataset

from fedcare.errors import SiteDataError
from fedcare.training import make_loader

FOREGROUND = 1


class DiceCrossEntropy(nn.Module):
    """Mean over the batch of (soft Dice of the lesion + mean pixel cross-entropy) per sample.

    Logits are [B, 2, *spatial], masks [B, *spatial] with 0 background and 1 lesion.
    """

    def __init__(self) -> None:
        super().__init__()
        # batch=False: Dice per sample; the background class is left out of Dice (it would score ~1
        # on every slice and drown the lesion) but stays in the cross-entropy.
        self.loss = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=False,
                               reduction="mean")

    def forward(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        return self.loss(logits, masks[:, None])


def dice_per_sample(predicted: torch.Tensor, masks: torch.Tensor) -> np.ndarray:
    """Lesion Dice of each sample; 1.0 where both the prediction and the mask are empty."""
    pred = (predicted == FOREGROUND).flatten(1).float()
    true = (masks == FOREGROUND).flatten(1).float()
    overlap = 2.0 * (pred * true).sum(dim=1)
    size = pred.sum(dim=1) + true.sum(dim=1)
    return torch.where(size > 0, overlap / size.clamp(min=1.0), torch.ones_like(size)).numpy()


def all_background_dice(dataset: Dataset) -> float:
    """The mean Dice of a model that never predicts a lesion: the share of samples without one."""
    return float(np.mean([not bool((mask == FOREGROUND).any()) for _, mask in dataset]))


@torch.no_grad()
def evaluate_segmentation(model: nn.Module, dataset: Dataset, batch_size: int) -> dict[str, float]:
    """Loss and mean per-sample lesion Dice of the model on a site's validation split."""
    model.eval()
    loss_fn = DiceCrossEntropy()
    total_loss, dices = 0.0, []
    for images, masks in make_loader(dataset, batch_size, seed=0, shuffle=False):
        logits = model(images)
        total_loss += float(loss_fn(logits, masks)) * len(masks)
        dices.append(dice_per_sample(logits.argmax(dim=1), masks))
    dice = np.concatenate(dices)
    return {"loss": total_loss / len(dice), "dice": float(dice.mean())}


@torch.no_grad()
def evaluate_volumes(model: nn.Module, dataset: Dataset, patch_size: tuple[int, int, int],
                     batch_size: int) -> dict[str, float]:
    """Loss and mean lesion Dice per whole validation volume, by sliding-window inference.

    The network sees patch-sized windows only, as in training (`patch_size` in the volume's
    [D, H, W] order); windows overlap by a quarter and are blended with Gaussian weights, so patch
    borders leave no seams. A volume without a lesion scores 1.0 when nothing is predicted, so
    `all_background_dice` of the same split is the score to beat.
    """
    if not len(dataset):
        raise SiteDataError("the validation split holds no volume: add segmented series or raise val-fraction")
    model.eval()
    loss_fn = DiceCrossEntropy()
    losses, dices = [], []
    for index in range(len(dataset)):  # one volume at a time: volumes differ in size
        image, mask = dataset[index]
        logits = sliding_window_inference(image[None], roi_size=patch_size, sw_batch_size=batch_size,
                                          predictor=model, overlap=0.25, mode="gaussian")
        losses.append(float(loss_fn(logits, mask[None])))
        dices.append(float(dice_per_sample(logits.argmax(dim=1), mask[None])[0]))
    return {"loss": float(np.mean(losses)), "dice": float(np.mean(dices))}
