"""A site's privacy policy: what the site allows, decided by the site and never by the run config.

The policy comes from the site's own settings (its node config in deployment, its `site.toml` in
simulation). The coordinator's run config only *asks* for a round: DP on or off, a noise level or
a target epsilon, a delta. `refusal` answers each request with None (allowed) or the reason the
site refuses it, and the site checks it before it reads any data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from fedcare.config import RunConfig
from fedcare.privacy.record import ACCOUNTANTS, PATIENT, PRIVACY_UNITS
from fedcare.errors import ConfigError

# The node-config keys of a policy, with their defaults; budget-epsilon has none: a site must set it.
POLICY_DEFAULTS: dict[str, Any] = {
    "budget-delta": 0.0,            # 0: fixed at the site's first round from its N (see fedcare.privacy.accounting)
    "dp-required": True,            # false lets the run switch DP off; the ledger then records an unbounded release
    "accountant": "rdp",
    "min-noise-multiplier": 0.5,    # a round planned with less noise than this is refused
    "max-run-epsilon": 0.0,         # the most one run may spend; 0: only the lifetime budget limits it
    "evaluation-quota": 100,        # evaluation replies one run may get from this site
    "val-fraction": 0.2,            # share of the site's cases held out for validation, split once and kept
    "privacy-unit": PATIENT,        # patient: epsilon protects a patient; image: only for one image per patient
    "patient-key": "",              # the label manifest's pseudonymous patient column; empty: DICOM PatientID
    "missing-images": "report",     # a labels.csv row without a readable image: report it and train on the rest | stop
    # The largest network (in parameters) the site builds for a run; 0: no cap. The run config names the
    # network and its arguments, so without a cap a coordinator could have the site build one that fills
    # its memory. fedcare's largest preset network, DenseNet121, has 7 million.
    "max-model-parameters": 100_000_000,
    # The most voxels (times channels) of one sample the site prepares: an image at the run's image-size,
    # a volume, a 3D patch, or a whole volume resampled to the run's spacing; 0: no cap. The run config
    # sets those sizes, so without a cap a coordinator could have the site fill its memory and its
    # decode cache's disk. 33,554,432 is a 512 x 512 x 128 volume.
    "max-sample-voxels": 33_554_432,
}
MISSING_IMAGES = ("report", "stop")
POLICY_KEYS = ("budget-epsilon", *POLICY_DEFAULTS)


@dataclass(frozen=True)
class SitePolicy:
    """What a site allows any run to do with its data."""

    budget_epsilon: float
    budget_delta: float = 0.0
    dp_required: bool = True
    accountant: str = "rdp"
    min_noise_multiplier: float = 0.5
    max_run_epsilon: float = 0.0
    evaluation_quota: int = 100
    val_fraction: float = 0.2
    privacy_unit: str = PATIENT
    patient_key: str = ""
    missing_images: str = "report"
    max_model_parameters: int = 100_000_000
    max_sample_voxels: int = 33_554_432

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], source: str = "node config") -> "SitePolicy":
        """The policy in a site's settings; a missing budget or a wrong value stops with one line."""
        if "budget-epsilon" not in settings:
            raise ConfigError(f"{source}: 'budget-epsilon' is missing: a site sets its own lifetime epsilon budget "
                              "(e.g. budget-epsilon=8.0); the run config cannot set it")
        values = {key: settings.get(key, default) for key, default in POLICY_DEFAULTS.items()}
        values["budget-epsilon"] = settings["budget-epsilon"]
        policy = cls(
            budget_epsilon=_number(source, "budget-epsilon", values["budget-epsilon"], low=0.0),
            budget_delta=_number(source, "budget-delta", values["budget-delta"], low=0.0, high=1.0, low_open=False),
            dp_required=_flag(source, "dp-required", values["dp-required"]),
            accountant=_choice(source, "accountant", values["accountant"], ACCOUNTANTS),
            min_noise_multiplier=_number(source, "min-noise-multiplier", values["min-noise-multiplier"], low=0.0,
                                         low_open=False),
            max_run_epsilon=_number(source, "max-run-epsilon", values["max-run-epsilon"], low=0.0, low_open=False),
            evaluation_quota=_count(source, "evaluation-quota", values["evaluation-quota"]),
            val_fraction=_number(source, "val-fraction", values["val-fraction"], low=0.0, high=1.0),
            privacy_unit=_choice(source, "privacy-unit", values["privacy-unit"], PRIVACY_UNITS),
            patient_key=_text(source, "patient-key", values["patient-key"]),
            missing_images=_choice(source, "missing-images", values["missing-images"], MISSING_IMAGES),
            max_model_parameters=_count(source, "max-model-parameters", values["max-model-parameters"]),
            max_sample_voxels=_count(source, "max-sample-voxels", values["max-sample-voxels"]),
        )
        return policy


    def refusal(self, config: RunConfig) -> str | None:
        """Why this site refuses what the run config asks, or None; checked before any data is read."""
        if not config.dp:
            return None if not self.dp_required else "the run asks for training without DP, and this site requires DP"
        if config.noise_multiplier and config.noise_multiplier < self.min_noise_multiplier:
            return (f"the run asks for noise multiplier {config.noise_multiplier:g}, below this site's minimum "
                    f"{self.min_noise_multiplier:g}")
        if self.max_run_epsilon and config.target_epsilon > self.max_run_epsilon:
            return (f"the run asks to spend epsilon {config.target_epsilon:g}, over the {self.max_run_epsilon:g} this "
                    "site allows one run")
        return None

    def size_refusal(self, parameters: int, sample_voxels: int) -> str | None:
        """Why this site will not build the run's network of `parameters` parameters, or prepare samples of
        `sample_voxels` voxels, or None; both counted from the run config before anything is allocated."""
        if self.max_model_parameters and parameters > self.max_model_parameters:
            return (f"the run's network has {parameters:,} parameters, over the {self.max_model_parameters:,} this "
                    "site builds (its max-model-parameters)")
        if self.max_sample_voxels and sample_voxels > self.max_sample_voxels:
            return (f"the run's samples have {sample_voxels:,} voxels, over the {self.max_sample_voxels:,} this site "
                    "prepares (its max-sample-voxels)")
        return None

    def delta_refusal(self, requested: float, delta: float) -> str | None:
        """Why a run asking for delta `requested` is refused by a site whose delta is `delta`, or None."""
        if requested and requested != delta:
            return f"the run asks for delta {requested:g}; this site's delta is {delta:g}, fixed for its ledger"
        return None

    def noise_refusal(self, noise_multiplier: float) -> str | None:
        """Why a planned noise multiplier is too small for this site, or None."""
        if noise_multiplier < self.min_noise_multiplier:
            return (f"the run's plan gives noise multiplier {noise_multiplier:.3g}, below this site's minimum "
                    f"{self.min_noise_multiplier:g} (ask for a smaller target-epsilon or more rounds)")
        return None


def _number(source: str, key: str, value: Any, low: float, high: float = math.inf, low_open: bool = True) -> float:
    inside = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    inside = inside and (value > low if low_open else value >= low) and value < high
    if not inside:
        bound = f"{'above' if low_open else 'at least'} {low:g}" + (f" and below {high:g}" if high < math.inf else "")
        raise ConfigError(f"{source}: '{key}' = {value!r} must be a number {bound}")
    return float(value)


def _flag(source: str, key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{source}: '{key}' = {value!r} must be true or false")
    return value


def _choice(source: str, key: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ConfigError(f"{source}: '{key}' = {value!r} must be one of {', '.join(allowed)}")
    return str(value)


def _text(source: str, key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{source}: '{key}' = {value!r} must be text (a column name)")
    return value.strip()


def _count(source: str, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{source}: '{key}' = {value!r} must be a whole number, 0 or more")
    return value
