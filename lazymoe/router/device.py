"""Which device the router pass runs on: ``auto`` (the GPU when there is one), ``cpu``, ``cuda`` or ``cuda:N``."""

from __future__ import annotations

from ..errors import ConfigError, Setting, Text
from ..lazy import torch


#: what the device messages name (each front end words it: device=, --device)
_DEVICE, _CPU = Setting("device", ..., noun=True), Setting("device", "cpu")


def pick_device(device: str | None = None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(Text(f"{_DEVICE.placeholder} {device!r} is not a device; use auto, cpu, cuda or cuda:N.",
                               (_DEVICE,))) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(Text(f"{_DEVICE.placeholder} asks for cuda but this machine has no CUDA GPU; "
                               f"{_CPU.placeholder}.", (_DEVICE, _CPU)))
    return dev
