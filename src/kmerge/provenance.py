"""What results record about how they were made: the machine, and the run's settings as JSON
values, compared when a stored result or checkpoint is reused (one check for every reuse)."""

from __future__ import annotations

import json
import os
import platform

import torch


def machine_info(device: torch.device | None = None, dtype: torch.dtype | None = None) -> dict:
    """The machine a measurement ran on; with ``device``/``dtype``, what it ran in."""
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if device is not None:
        info["device"] = str(device)
        if device.type == "cuda":
            info["gpu"] = torch.cuda.get_device_name(device)
    if dtype is not None:
        info["dtype"] = str(dtype).removeprefix("torch.")
    return info


def as_json(value: object) -> object:
    """``value`` as it reads back from JSON (tuples become lists, keys strings), so that settings
    held in memory compare equal to the same settings read from a file."""
    return json.loads(json.dumps(value))


def with_defaults(saved: dict, defaults: dict) -> dict:
    """``saved`` with the keys it lacks taken from ``defaults`` (nested): a setting added to
    kmerge after ``saved`` was written ran at its default then, so it is no difference."""
    out = dict(saved)
    for key, value in defaults.items():
        if key not in out:
            out[key] = value
        elif isinstance(value, dict) and isinstance(out[key], dict):
            out[key] = with_defaults(out[key], value)
    return out


def differences(saved: dict, current: dict, prefix: str = "") -> dict[str, tuple]:
    """``{"model.k": (saved value, current value)}`` for every leaf that differs (nested
    dictionaries compared key by key), in key order."""
    out: dict[str, tuple] = {}
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out |= differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out[f"{prefix}{key}"] = (a, b)
    return out
