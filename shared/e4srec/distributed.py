"""Data-parallel set-up: the process group under torchrun, and torchrun itself for a pod's GPUs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import torch
import torch.distributed as dist


def init() -> tuple[int, int]:
    """(rank, world size); initialises the process group under torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def torchrun(nproc: int, module_args: list[str], env: dict[str, str]) -> int:
    """Run `python -m MODULE ARGS...` in `nproc` processes on this machine; the exit status of torchrun."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(port), "-m", *module_args]
    return subprocess.run(cmd, env=env).returncode
