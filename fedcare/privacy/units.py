"""The privacy unit: what one DP-SGD sample stands for, and so what epsilon protects.

At `privacy-unit = "patient"` (the default) the training set DP-SGD sees holds one item per
patient: Poisson sampling draws patients (q over N patients), and a drawn patient contributes one
of their images, picked at random from the site's entropy each time it is drawn, so one patient
gives one clipped gradient per step and clipping bounds what that patient can change. The 3D task
already draws one random patch per series; a patient with several series gets one random series,
then one random patch. At `"image"` every image is its own unit, which protects a patient only
where each patient has a single image.
"""

from __future__ import annotations

from torch.utils.data import Dataset

from fedcare.privacy.randomness import site_rng
from fedcare.privacy.record import IMAGE


class OnePerPatient(Dataset):
    """A dataset of patients: item `i` is one image of patient `i`, drawn anew every time it is read."""

    def __init__(self, images: Dataset, units: list[str]) -> None:
        if len(units) != len(images):
            raise ValueError(f"{len(units)} unit keys for {len(images)} training images")  # a programming error
        members: dict[str, list[int]] = {}
        for index, unit in enumerate(units):
            members.setdefault(unit, []).append(index)
        self.images = images
        self.members = list(members.values())
        self.rng = site_rng()

    def __len__(self) -> int:
        return len(self.members)

    def __getitem__(self, patient: int):
        return self.images[int(self.rng.choice(self.members[patient]))]


def private_units(images: Dataset, units: list[str], privacy_unit: str) -> Dataset:
    """The training set DP-SGD samples from: patients, or the images themselves when the unit is the image."""
    return images if privacy_unit == IMAGE else OnePerPatient(images, units)
