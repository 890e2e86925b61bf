"""The site's own randomness: every draw that DP-SGD's guarantee rests on comes from here.

DP-SGD's noise and its Poisson batch sampling must be unpredictable to the coordinator: a
coordinator that could replay the noise could subtract it and recover the clipped gradient sum,
and every epsilon would be void. So nothing here is seeded from the run config: each round draws
fresh seeds from the operating system's entropy (`os.urandom`).

Opacus' `secure_mode` would draw from a cryptographic generator, but it needs `torchcsprng`, whose
last release predates torch 2.x; a `torch.Generator` seeded from `os.urandom` is unpredictable but
not a cryptographically secure sampler (the floating-point attack on Gaussian sampling of Mironov,
2012, is not addressed), and the privacy report states this.
"""

from __future__ import annotations

import os

import numpy as np
import torch

SOURCE = ("a torch.Generator per round seeded from the site's os.urandom (not a cryptographically secure "
          "sampler: Opacus' secure_mode needs torchcsprng, which has no build for torch 2.x)")


def entropy_seed() -> int:
    """64 bits from the operating system's entropy pool."""
    return int.from_bytes(os.urandom(8), "little")


def site_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator seeded from the site's entropy, on `device`."""
    return torch.Generator(device=device).manual_seed(entropy_seed())


def site_rng() -> np.random.Generator:
    """A NumPy generator seeded from the site's entropy (patch positions, plain shuffling)."""
    return np.random.default_rng(entropy_seed())


def reseed_global() -> None:
    """Re-seed torch's global generator from the site's entropy.

    Building the model seeds it from the run's seed (so every site starts from the same weights);
    nothing that runs afterwards on the site may draw from a generator the coordinator can predict.
    """
    torch.manual_seed(entropy_seed())
