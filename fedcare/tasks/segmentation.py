"""Segmentation of lesions in 2D slices, from DICOM SEG masks: every pixel is background or lesion.

The loss is each slice's soft Dice plus its own weighted pixel cross-entropy (fedcare.segmentation);
a site reports loss and its lesion Dice over all its validation pixels, the headline.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from data_adapters import segmentation_datasets
from data_adapters.dataset import SiteDatasets
from fedcare.config import RunConfig
from fedcare.segmentation import DiceCrossEntropy, evaluate_segmentation
from fedcare.sites import Site
from fedcare.tasks.base import Task


# Background and lesion.
MASK_CLASSES = 2


class Segmentation(Task):
    name = "segmentation"
    headline = "dice"
    metrics = ("loss", "dice")

    def out_channels(self, config: RunConfig) -> int:
        return MASK_CLASSES

    def config_problems(self, config: RunConfig) -> list[str]:
        if config.in_channels != 1:
            return [f"run config: 'in-channels' = {config.in_channels}: segmentation reads one channel (the "
                    "image under its SEG mask); set in-channels = 1"]
        return []

    def output_fits(self, output: Any, size: tuple[int, ...]) -> bool:
        # A segmentation network hands back a mask of the image's own size.
        return tuple(output.shape[2:]) == tuple(size)

    def datasets(self, config: RunConfig, site: Site, split: Any) -> SiteDatasets:
        return segmentation_datasets(site.data_path, split, config.image_size, window=config.window_range)

    def loss(self, config: RunConfig) -> nn.Module:
        return DiceCrossEntropy(config.lesion_weight)

    def evaluate(self, model: nn.Module, data: SiteDatasets, config: RunConfig) -> dict[str, float]:
        return evaluate_segmentation(model, data.val, config.batch_size, self.loss(config))
