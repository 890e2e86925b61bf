"""Segmentation of lesions in 3D: volumes resampled to the run's spacing, trained on patches, scored
on whole volumes by sliding-window inference with the same patch size.

The run asks for it with task = "segmentation" and input-mode = "3d".
"""

from __future__ import annotations

from typing import Any

from torch import nn

from data_adapters import segmentation_volume_datasets
from data_adapters.dataset import SiteDatasets
from fedcare.config import RunConfig
from fedcare.networks import unet_size_multiple
from fedcare.segmentation import evaluate_volumes
from fedcare.sites import Site
from fedcare.tasks.segmentation import Segmentation



class Segmentation3D(Segmentation):
    name = "segmentation-3d"

    def input_size(self, config: RunConfig) -> tuple[int, ...]:
        return config.patch_zyx

    def config_problems(self, config: RunConfig) -> list[str]:
        problems = super().config_problems(config)
        if problems:
            return problems
        channels = config.network_args.get("channels")
        multiple = unet_size_multiple(tuple(channels)) if channels else unet_size_multiple()
        if any(size % multiple for size in config.patch_zyx):
            return [f"run config: 'patch-size' = {config.patch_size!r} must be a multiple of {multiple} voxels in "
                    "x, y and z (each level of the U-Net halves it), e.g. \"32 32 8\""]
        return []

    def datasets(self, config: RunConfig, site: Site, split: Any) -> SiteDatasets:
        return segmentation_volume_datasets(site.data_path, split, window=config.window_range,
                                            spacing=config.spacing_zyx, patch_size=config.patch_zyx,
                                            irregular=config.irregular_series,
                                            max_voxels=site.policy.max_sample_voxels)

    def evaluate(self, model: nn.Module, data: SiteDatasets, config: RunConfig) -> dict[str, float]:
        return evaluate_volumes(model, data.val, config.patch_zyx, config.batch_size, self.loss(config))
