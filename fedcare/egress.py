"""The egress log: one JSON line for every reply a site sent, and the audit that reads it back.

A site's IT and privacy officers get proof of what left the building: array names, shapes, dtypes
and sizes (never values), every metric with its value, and the privacy numbers. `audit` checks that
nothing but the model's own parameters, whitelisted numeric metrics and the expected privacy and
site fields ever left.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping

from flwr.app import Message

from fedcare.config import RunConfig
from fedcare.errors import FedcareError
from fedcare.model import build_model, network_shape
from fedcare.privacy.record import REPLY_FIELDS, REPLY_TEXT, TEXT_FIELDS
from fedcare.tasks import TASKS

# The metrics a reply may carry are its task's validation metrics (fedcare.tasks) and the sample
# count; no training loss: it is an exact function of private batches, outside every accountant.
SAMPLE_COUNT = "num-examples"
# Strings a reply may carry: the site's name, the words of its privacy accounting, why it refused.
ALLOWED_TEXT = {("site", "name"), ("refusal", "reason"), *(("privacy", key) for key in REPLY_TEXT + TEXT_FIELDS)}
PRIVACY_NUMBERS = REPLY_FIELDS - set(REPLY_TEXT) - set(TEXT_FIELDS)


def reply_entry(reply: Message, run_id: int | str, server_round: int, model: str) -> dict[str, Any]:
    """Describe what a reply carries, without copying any array's values."""
    entry: dict[str, Any] = {
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "run": str(run_id),
        "round": server_round, "type": reply.metadata.message_type, "model": model,
        "arrays": [], "metrics": {}, "config": {}, "bytes": 0,
    }
    if reply.has_error():
        entry["error"] = str(reply.error.reason)
        entry["bytes"] = len(entry["error"].encode())
        return entry
    for record_name, record in reply.content.array_records.items():
        for name, array in record.items():
            entry["arrays"].append({"name": name, "shape": list(array.shape), "dtype": array.dtype,
                                    "bytes": len(array.data)})
    for record in reply.content.metric_records.values():
        entry["metrics"].update(dict(record))
    for record_name, record in reply.content.config_records.items():
        entry["config"][record_name] = dict(record)
    entry["bytes"] = (sum(a["bytes"] for a in entry["arrays"]) + 8 * len(entry["metrics"])
                      + len(json.dumps(entry["config"]).encode()))
    return entry


def append_entry(log_path: Path, entry: dict[str, Any]) -> None:
    """Append one line and make it durable before the reply is handed to Flower."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def count_replies(log_path: Path, run_id: str, message_type: str) -> int:
    """How many answered (not failed, not refused) replies of `message_type` this run got from the site."""
    if not log_path.is_file():
        return 0
    count = 0
    for line in log_path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        answered = entry.get("type") == message_type and not entry.get("error") and "refusal" not in entry["config"]
        count += entry.get("run") == str(run_id) and answered
    return count

# Set in a ClientApp's process by the site's gate (fedcare_ops/deploy/gate.py), which writes each reply's
# line itself: the bundle's own mod (client_app/egress.py) then stands down, so no line is written twice.
EGRESS_BY_GATE = "FEDCARE_EGRESS_BY_GATE"

THREE_D = "-3d"


def network_spec(config: RunConfig) -> str:
    """What an egress line names as the run's network: everything that fixes its parameters' shapes."""
    shape = network_shape(config)
    return json.dumps({"model": config.model, "model-args": config.network_args, "task": config.task,
                       "input-mode": config.input_mode, "in-channels": shape.in_channels,
                       "outputs": shape.out_channels}, sort_keys=True, separators=(",", ":"))


def _spec_config(spec: str) -> RunConfig:
    if not spec.startswith("{"):  # a log from before specs: a name, "-3d" for the 3D build
        return RunConfig(model=spec.removesuffix(THREE_D), input_mode="3d" if spec.endswith(THREE_D) else "2d",
                         task="segmentation" if spec.startswith("unet") else "classification")
    values = json.loads(spec)
    classes = ", ".join(f"class {k}" for k in range(values["outputs"]))
    return RunConfig(model=values["model"], model_args=json.dumps(values["model-args"]), task=values["task"],
                     input_mode=values["input-mode"], in_channels=values["in-channels"],
                     classes=classes if values["outputs"] > 1 else RunConfig.classes)


class ModelShapes(Mapping[str, dict[str, list[int]]]):
    """Parameter shapes of each network an egress log names (`network_spec`), each built once and
    only when a log names it; a name that builds no network is not in the mapping."""

    def __init__(self) -> None:
        self._built: dict[str, dict[str, list[int]]] = {}

    def __getitem__(self, spec: str) -> dict[str, list[int]]:
        if spec not in self._built:
            try:
                state = build_model(_spec_config(spec)).state_dict()
            except (FedcareError, ValueError, KeyError, TypeError):
                raise KeyError(spec) from None
            self._built[spec] = {key: list(value.shape) for key, value in state.items()}
        return self._built[spec]

    def __iter__(self) -> Iterator[str]:
        return iter(self._built)

    def __len__(self) -> int:
        return len(self._built)


@dataclass
class Audit:
    """What an egress log shows: counts, bytes, and every line that breaks the rules."""

    replies: dict[str, int] = field(default_factory=dict)
    bytes: int = 0
    rounds: set[tuple[str, int]] = field(default_factory=set)
    violations: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.violations


def audit(log_path: Path, model_shapes: Mapping[str, dict[str, list[int]]]) -> Audit:
    """Check every line of a site's egress log; `model_shapes` maps model name -> {array: shape}."""
    if not log_path.is_file():
        raise FedcareError(f"{log_path}: egress log not found; a site's log is <state folder>/egress.jsonl")
    result = Audit()
    for number, line in enumerate(log_path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            entry = json.loads(line)
            result.replies[entry["type"]] = result.replies.get(entry["type"], 0) + 1
            result.bytes += int(entry["bytes"])
            result.rounds.add((entry["run"], int(entry["round"])))
            problems = _entry_problems(entry, model_shapes)
        except (ValueError, KeyError, TypeError) as err:
            problems = [f"not a valid egress entry ({type(err).__name__}: {err})"]
        result.violations += [f"line {number}: {problem}" for problem in problems]
    return result


def _entry_problems(entry: dict[str, Any], model_shapes: Mapping[str, dict[str, list[int]]]) -> list[str]:
    problems = []
    shapes = model_shapes.get(entry["model"])
    if shapes is None:
        return [f"unknown model '{entry['model']}'"]
    for array in entry["arrays"]:
        if array["name"] not in shapes:
            problems.append(f"array '{array['name']}' is not a parameter of the model")
        elif list(array["shape"]) != list(shapes[array["name"]]):
            problems.append(f"array '{array['name']}' has shape {array['shape']}, the model's is {shapes[array['name']]}")
    for name, value in entry["metrics"].items():
        if not allowed_metric(name):
            problems.append(f"metric '{name}' is not on the list of metrics allowed to leave the site")
        if not _numeric(value):
            problems.append(f"metric '{name}' is not numeric")
    for record, values in entry["config"].items():
        for key, value in values.items():
            if (record, key) in ALLOWED_TEXT:
                continue
            if record != "privacy" or key not in PRIVACY_NUMBERS:
                problems.append(f"field '{record}.{key}' is not allowed to leave the site")
            elif not _numeric(value):
                problems.append(f"field '{record}.{key}' is not numeric")
    return problems


def allowed_metric(name: str) -> bool:
    """Whether a metric of this name may leave a site: the sample count, or a task's validation metric."""
    return name == SAMPLE_COUNT or any(task.allows_metric(name) for task in TASKS.values())


def _numeric(value: Any) -> bool:
    values = value if isinstance(value, list) else [value]
    return all(isinstance(v, (int, float)) for v in values)
