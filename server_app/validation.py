"""Check every site's update before it is aggregated: one broken or hostile update must not
poison the global model.

An update is rejected when its arrays do not match the global model's names, shapes and dtypes,
when it holds a NaN or an infinity, or when it moves the model far more than the other sites do
(its distance from the global model above `max_ratio` times the median distance).
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, Message


def update_problem(update: ArrayRecord, reference: dict[str, np.ndarray]) -> str | None:
    """What makes this update unusable on its own, or None."""
    arrays = {name: array.numpy() for name, array in update.items()}
    missing, extra = sorted(reference.keys() - arrays.keys()), sorted(arrays.keys() - reference.keys())
    if missing or extra:
        return f"arrays do not match the model (missing {missing[:3]}, unexpected {extra[:3]})"
    for name, expected in reference.items():
        got = arrays[name]
        if got.shape != expected.shape:
            return f"array '{name}' has shape {list(got.shape)}, the model's is {list(expected.shape)}"
        if got.dtype != expected.dtype:
            return f"array '{name}' has dtype {got.dtype}, the model's is {expected.dtype}"
        if np.issubdtype(got.dtype, np.floating) and not np.isfinite(got).all():
            return f"array '{name}' holds NaN or infinite values"
    return None


def distance(update: ArrayRecord, reference: dict[str, np.ndarray]) -> float:
    """L2 distance between an update and the global model it started from."""
    squares = sum(float(np.sum((update[name].numpy().astype(np.float64) - ref) ** 2))
                  for name, ref in reference.items() if np.issubdtype(ref.dtype, np.floating))
    return squares ** 0.5


def screen_updates(
    replies: list[Message], reference: ArrayRecord, max_ratio: float, arrays_key: str = "arrays"
) -> tuple[list[Message], list[tuple[Message, str]]]:
    """Split replies into (accepted, [(rejected, reason)])."""
    model = {name: array.numpy() for name, array in reference.items()}
    rejected: list[tuple[Message, str]] = []
    sound: list[Message] = []
    for msg in replies:
        problem = update_problem(msg.content[arrays_key], model)
        if problem:
            rejected.append((msg, problem))
        else:
            sound.append(msg)
    distances = [distance(msg.content[arrays_key], model) for msg in sound]
    # The median of at least three updates is a robust yardstick; with fewer, any outlier is half the data.
    if len(sound) < 3:
        return sound, rejected
    median = float(np.median(distances))
    accepted = []
    for msg, moved in zip(sound, distances):
        if median > 0 and moved > max_ratio * median:
            rejected.append((msg, f"update moves the model {moved / median:.1f}x further than the median "
                                  f"site's (limit {max_ratio:g}x)"))
        else:
            accepted.append(msg)
    return accepted, rejected
