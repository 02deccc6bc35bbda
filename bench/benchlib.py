"""What every benchmark here prints: the command, the commit, the machine, and the result as one JSON object."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from e4srec.device import cpu_flags, cpu_has_bf16_units, cpu_model


def machine(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Node, CPU model and its bf16/AMX flags, torch build and threads, and the GPU when the device is CUDA."""
    device = torch.device(device)
    return {"node": platform.node(), "cpu": cpu_model(), "cpu_flags": cpu_flags(),
            "cpu_bf16_units": cpu_has_bf16_units(), "os_cpus": os.cpu_count(), "device": str(device),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}


def command() -> str:
    """The command line as typed."""
    return " ".join([Path(sys.executable).name, *sys.argv])


def commit() -> str:
    """The checkout's commit (with -dirty when the tree has changes)."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=40"], capture_output=True,
                              text=True, cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def emit(result: dict[str, Any], path: Path | None) -> None:
    """Print the result as JSON (with the commit first when it has none), and write it to `path` when given."""
    result = result if "commit" in result else {"commit": commit(), **result}
    text = json.dumps(result, indent=2)
    print(text)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")
