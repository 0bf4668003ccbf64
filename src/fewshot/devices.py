"""Which torch device a run uses: `--device auto` and a one-line error for a device this torch
cannot use here, before any work starts (torch's own errors come late, as a long traceback)."""

from __future__ import annotations

import torch

from fewshot.errors import ConfigError

AUTO = "auto"
# Accelerators numbered like CUDA's (`torch.<kind>.is_available()`, `.device_count()`).
NUMBERED_ACCELERATORS = ("cuda", "xpu")


def accelerator_count(kind: str) -> int:
    """How many `kind` devices this torch can use here (0 where it has no such backend)."""
    backend = getattr(torch, kind, None)
    if backend is None or not backend.is_available():
        return 0
    return backend.device_count()


def available_devices() -> list[str]:
    """The devices this torch can use here, e.g. ["cpu"] or ["cpu", "cuda:0", "cuda:1"]."""
    devices = ["cpu"]
    for kind in NUMBERED_ACCELERATORS:
        devices += [f"{kind}:{index}" for index in range(accelerator_count(kind))]
    if torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def resolve_device(text: str) -> str:
    """The device `text` names, as the string the rest of fewshot takes ("cpu", "cuda",
    "cuda:1", "mps"): "auto" is CUDA where torch has it, else the CPU. A device that torch does
    not know, or cannot use here, is a ConfigError that names the available devices."""
    name = text.strip().lower()
    if name == AUTO:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise unavailable(text, "not a torch device") from None
    if device.type == "cpu":
        return "cpu"  # an index means nothing on the CPU; "cpu" is what chunk sizes test for
    available = available_devices()
    usable_kinds = {entry.split(":")[0] for entry in available}
    if str(device) in available or (device.index is None and device.type in usable_kinds):
        return str(device)
    raise unavailable(text, why_unavailable(device))


def why_unavailable(device: torch.device) -> str:
    """Why this torch cannot use `device` here, in a few words."""
    kind = device.type
    if kind == "cuda" and not torch.cuda.is_available():
        if not torch.backends.cuda.is_built():
            return "this torch was built without CUDA"
        return "no CUDA GPU is visible (check the driver and CUDA_VISIBLE_DEVICES)"
    if kind in NUMBERED_ACCELERATORS and accelerator_count(kind) > 0:
        count = accelerator_count(kind)
        return f"this machine has {count} {kind.upper()} device{'s' if count > 1 else ''}"
    return "this torch cannot use it here"


def unavailable(text: str, reason: str) -> ConfigError:
    return ConfigError(f"`device={text}`: {reason}; available: {', '.join(available_devices())}.")


def describe_device(device: str) -> str:
    """The device a run uses, for its first line: "cpu (4 threads)", "cuda:0 (NVIDIA H200)"."""
    resolved = torch.device(device)
    if resolved.type == "cpu":
        threads = torch.get_num_threads()
        return f"cpu ({threads} thread{'s' if threads > 1 else ''})"
    if resolved.type == "cuda":
        index = torch.cuda.current_device() if resolved.index is None else resolved.index
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return str(resolved)
