"""The run configuration: every tunable key, its type and its allowed values, checked once.

Flower hands the apps a flat mapping (`context.run_config`) built from
`[tool.flwr.app.config]` in pyproject.toml and any `--run-config` overrides. `RunConfig.from_mapping`
turns it into a typed object, or stops with a ConfigError naming the first wrong key.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import asdict, dataclass, fields
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping

from fedcare.errors import ConfigError, FedcareError
from fedcare.imaging import Window, parse_patch_size, parse_spacing, parse_window

OPTIMIZERS = ("sgd", "adam")
DATA_FORMATS = ("dicom", "nifti")
INPUT_MODES = ("2d", "3d")
IRREGULAR_SERIES = ("exclude", "resample")
LABEL_KEYS = ("", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "AccessionNumber",
              "image", "filename", "file", "path")
STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg")
GRAD_SAMPLE_MODES = ("auto", "hooks", "functorch", "ew")
# A site's name goes into every report the server writes: letters, digits, dots, dashes, underscores.
_SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class RunConfig:
    """One federated run, as the server plans it. Field names are the config keys in snake case.

    The task and the network are names looked up in their registries (fedcare.tasks,
    fedcare.networks) when the run starts; the imaging settings are parsed here, once, into the
    typed values the sites use (`window_range`, `spacing_zyx`, `patch_zyx`).
    """

    task: str = "classification"
    num_server_rounds: int = 5
    local_epochs: int = 1
    batch_size: int = 32
    optimizer: str = "sgd"
    learning_rate: float = 0.1
    model: str = "small-cnn"
    # A JSON object of the network's own arguments, e.g. '{"dropout_prob": 0.2}'.
    model_args: str = ""
    # Classification: the class names in order; a manifest label is a name or an index into them.
    classes: str = "negative, positive"
    in_channels: int = 1
    image_size: int = 64
    data_format: str = "dicom"
    input_mode: str = "2d"
    window: str = "soft-tissue"
    label_key: str = ""
    irregular_series: str = "exclude"
    spacing: str = "1.0 1.0 2.0"
    patch_size: str = "32 32 8"
    # Lesions cover about 1% of the demo's pixels. With plain cross-entropy, predicting background
    # everywhere is where DP-SGD's clipped, noised steps settle first, and the Dice term then takes
    # rounds to pull the model out; weighting lesion pixels tenfold made the demo's sites find the
    # lesion in 2-3 rounds instead of 5-6 at epsilon 8.
    lesion_weight: float = 10.0
    seed: int = 42
    data_root: str = "outputs/demo-data"
    # Simulation: "NAME=PATH; NAME=PATH" names each simulated site and its folder (fedcare run
    # --site); empty: site-0 ... site-N-1 under data-root.
    site_folders: str = ""
    sites_dir: str = "outputs/sites"
    outputs_dir: str = "outputs"
    round_timeout: float = 600.0
    min_sites: int = 2
    strategy: str = "fedavg"
    proximal_mu: float = 0.01
    server_learning_rate: float = 0.01
    trim_fraction: float = 0.2
    max_update_norm_ratio: float = 10.0
    # The run id whose checkpoint (outputs-dir/checkpoints/<run-id>) this run continues; "": afresh.
    resume: str = ""
    dp: bool = True
    noise_multiplier: float = 0.0
    target_epsilon: float = 8.0
    target_delta: float = 0.0
    max_grad_norm: float = 1.0
    grad_sample_mode: str = "auto"

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "RunConfig":
        """Build from Flower's flat run config (kebab-case keys); unknown keys and bad values stop here."""
        known = {f.name: f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ConfigError(
                    f"run config: unknown key '{key}'; known keys: "
                    + ", ".join(sorted(k.replace("_", "-") for k in known))
                )
            if name == "resume" and isinstance(value, bool):
                value = _resume_flag(value)
            kwargs[name] = _coerce(key, value, type(getattr(cls, name)))
        config = cls(**kwargs)
        config._check()
        return config

    def to_dict(self) -> dict[str, Any]:
        """The config with its kebab-case keys, as written into metrics.json."""
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}

    def _check(self) -> None:
        positive = ("num_server_rounds", "local_epochs", "min_sites", "batch_size", "learning_rate", "in_channels",
                    "server_learning_rate", "max_update_norm_ratio",
                    "image_size", "round_timeout", "max_grad_norm", "target_epsilon", "lesion_weight")
        for name in positive:
            if getattr(self, name) <= 0:
                _fail(name, getattr(self, name), "must be greater than 0")
        if self.proximal_mu < 0:
            _fail("proximal_mu", self.proximal_mu, "must be 0 or positive")
        if not 0.0 <= self.trim_fraction < 0.5:
            _fail("trim_fraction", self.trim_fraction, "must be in [0, 0.5)")
        if self.noise_multiplier < 0:
            _fail("noise_multiplier", self.noise_multiplier, "must be 0 (derive it) or positive")
        if not 0.0 <= self.target_delta < 1.0:
            _fail("target_delta", self.target_delta, "must be 0 (automatic) or in (0, 1)")
        for name, allowed in (("optimizer", OPTIMIZERS), ("strategy", STRATEGIES),
                              ("data_format", DATA_FORMATS), ("input_mode", INPUT_MODES),
                              ("irregular_series", IRREGULAR_SERIES), ("label_key", LABEL_KEYS),
                              ("grad_sample_mode", GRAD_SAMPLE_MODES)):
            if getattr(self, name) not in allowed:
                _fail(name, getattr(self, name), "must be one of " + ", ".join(allowed))
        parse_site_folders(self.site_folders)
        for key in ("window_range", "spacing_zyx", "patch_zyx", "class_names", "network_args"):
            getattr(self, key)  # parsed once here: a wrong value stops the run before it starts

    @cached_property
    def window_range(self) -> Window:
        """The intensity window: (low, high) in the images' units, or "minmax"."""
        return _parsed("window", parse_window, self.window)

    @cached_property
    def spacing_zyx(self) -> tuple[float, float, float]:
        """3D segmentation's voxel spacing in mm, in a volume's (z, y, x) order."""
        return _parsed("spacing", parse_spacing, self.spacing)

    @cached_property
    def patch_zyx(self) -> tuple[int, int, int]:
        """3D segmentation's training patch in voxels, in a volume's (z, y, x) order."""
        return _parsed("patch-size", parse_patch_size, self.patch_size)

    @cached_property
    def class_names(self) -> tuple[str, ...]:
        """The classification classes, in label order."""
        names = tuple(name.strip() for name in self.classes.split(","))
        if len(names) < 2 or not all(names) or len(set(names)) != len(names):
            _fail("classes", self.classes, "must name two or more distinct classes, comma-separated, in label "
                  "order, e.g. \"normal, benign, malignant\"")
        return names

    @cached_property
    def network_args(self) -> dict[str, Any]:
        """The network's own arguments (`model-args`, a JSON object)."""
        if not self.model_args.strip():
            return {}
        try:
            args = json.loads(self.model_args)
        except ValueError as err:
            args = err
        if not isinstance(args, dict):
            _fail("model_args", self.model_args, "must be a JSON object of the network's arguments, e.g. "
                  "'{\"dropout_prob\": 0.2}'")
        return args


def parse_site_folders(text: str) -> list[tuple[str, str]]:
    """Parse 'h1=/data/h1; h2=/data/h2' into [('h1', '/data/h1'), ('h2', '/data/h2')], in order."""
    found: list[tuple[str, str]] = []
    for item in (part.strip() for part in text.split(";")):
        if not item:
            continue
        name, sep, folder = (piece.strip() for piece in item.partition("="))
        if not sep or not folder or not _SITE_NAME.fullmatch(name):
            raise ConfigError(f"run config: site-folders entry '{item}' is not NAME=PATH with a NAME of letters, "
                              "digits, '.', '-' or '_', e.g. site-folders = \"north=/data/north; south=/data/south\"")
        if any(name == other for other, _ in found):
            raise ConfigError(f"run config: site-folders names site '{name}' twice: give each site its own name")
        found.append((name, folder))
    return found


def read_preset(path: Path) -> dict[str, Any]:
    """The keys of a preset in configs/, checked against the defaults as a run would check them."""
    try:
        with open(path, "rb") as handle:
            values = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{path}: run-config file not found") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML ({err})") from None
    try:
        RunConfig.from_mapping(values)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    return values


def load_preset(path: Path) -> RunConfig:
    """A preset from configs/ as a checked RunConfig."""
    return RunConfig.from_mapping(read_preset(path))


def _coerce(key: str, value: Any, kind: type) -> Any:
    # TOML gives ints where users mean floats ("target-epsilon = 8"); anything else is a mistake.
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise ConfigError(
        f"run config: '{key}' = {value!r} must be of type {kind.__name__}"
    )


def _resume_flag(value: bool) -> str:
    # Before runs had their own checkpoints, `resume = true` took whatever checkpoint was there, even
    # another run's; now the run is named, and `false` keeps meaning "afresh".
    if value:
        raise ConfigError("run config: 'resume' = true no longer picks a checkpoint: name the run to continue, "
                          "resume = \"<run-id>\" (its checkpoint is outputs-dir/checkpoints/<run-id>), or "
                          "resume = \"\" to start afresh")
    return ""


def _parsed(key: str, parse: Any, value: str) -> Any:
    try:
        return parse(value)
    except FedcareError as err:
        raise ConfigError(f"run config: '{key}': {err}") from None


def _fail(name: str, value: Any, rule: str) -> None:
    raise ConfigError(f"run config: '{name.replace('_', '-')}' = {value!r} {rule}")
