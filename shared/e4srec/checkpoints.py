"""Resumable training checkpoints: a folder of safetensors and JSON, switched in by one rename."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from e4srec import contracts as c
from e4srec.errors import E4SRecError
from e4srec.outputs import check_apart, check_writable_place, hidden_sibling
from e4srec.storage import is_s3


class Checkpoints:
    """Resumable state without pickles: safetensors for tensors, JSON for counters and logs.

    The folder is the training stage's own (its MARKER file says so): a folder holding anything else
    is refused before any work, and only a folder of ours is ever replaced or deleted. Under torchrun
    rank 0 writes the weights and optimizer state, and every rank its own random-number state.
    """

    MARKER = "e4srec-checkpoint.json"

    def __init__(self, root: Path, rank: int, owner: str = "train-e4srec") -> None:
        self.root, self.rank, self.owner = root, rank, owner
        self.users_folder = root.is_dir() and not (root / self.MARKER).is_file()  # an empty folder the user made

    def check(self, inputs: dict[str, Path | str], output: Path | str) -> None:
        """Refuse, before any work, a checkpoint folder that is not ours or that overlaps the run's paths."""
        check_apart(self.root, {**inputs, "--output": output}, what="checkpoint folder")
        if self.root.exists() and not self.root.is_dir():
            raise E4SRecError(f"checkpoint folder {self.root}: is a file; give --checkpoint-dir a new or empty folder")
        if self.root.is_dir() and any(self.root.iterdir()) and not (self.root / self.MARKER).is_file():
            raise E4SRecError(f"checkpoint folder {self.root}: holds files that are not {self.owner} checkpoints "
                              f"(no {self.MARKER}); give --checkpoint-dir a new or empty folder")
        if not self.root.exists():
            check_writable_place(self.root, "--checkpoint-dir")

    def exists(self) -> bool:
        return (self.root / self.MARKER).is_file() and (self.root / "progress.json").is_file()

    def remove(self) -> None:
        """Delete the checkpoints once the model folder is in place (a folder the user made stays, empty)."""
        if (self.root / self.MARKER).is_file():
            shutil.rmtree(self.root, ignore_errors=True)
            if self.users_folder:
                self.root.mkdir(exist_ok=True)

    def save(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, progress: dict[str, Any]) -> None:
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        if self.rank == 0:
            tmp = hidden_sibling(self.root, "partial")
            c.write_json(tmp / self.MARKER, {"stage": self.owner, "format": 1})
            save_file({k: v.detach().cpu().contiguous() for k, v in model.trainable_state().items()},
                      str(tmp / "trainable.safetensors"))
            state = optimizer.state_dict()
            tensors = {f"{i}.{k}": v.cpu().contiguous() for i, s in state["state"].items() for k, v in s.items()}
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            c.write_json(tmp / "progress.json", progress)
            for f in self.root.glob("rng-rank*.safetensors") if self.root.exists() else []:
                shutil.copy(f, tmp / f.name)
            save_file(rng, str(tmp / "rng-rank0.safetensors"))
            old = hidden_sibling(self.root, "old")
            if self.root.exists():  # ours (checked before training) or empty
                self.root.rename(old / "x")
            tmp.rename(self.root)  # the switch is one rename: a kill leaves the old or the new checkpoint
            shutil.rmtree(old, ignore_errors=True)
        if dist.is_initialized():
            dist.barrier()
            if self.rank:
                save_file(rng, str(self.root / f"rng-rank{self.rank}.safetensors"))
            dist.barrier()

    def load(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        try:
            return self._load(model, optimizer)
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            raise E4SRecError(f"checkpoint folder {self.root}: does not fit this run ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:160]}); it is corrupt or from other settings: delete "
                              f"it, or run without --resume") from None

    def _load(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        trainable = c.read_safetensors(self.root / "trainable.safetensors")
        with torch.no_grad():
            for name, p in model.trainable_state().items():
                p.copy_(trainable[name])
        tensors = c.read_safetensors(self.root / "optimizer.safetensors")
        state = optimizer.state_dict()
        for key, value in tensors.items():
            i, name = key.split(".", 1)
            state["state"].setdefault(int(i), {})[name] = value
        optimizer.load_state_dict(state)
        rng = c.read_safetensors(self.root / f"rng-rank{self.rank}.safetensors")
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        progress = c.read_json(self.root / "progress.json")
        for key in ("epoch", "batch", "step", "log"):
            if key not in progress:
                raise KeyError(f"progress.json has no {key!r}")
        return progress


def checkpoint_root(checkpoint_dir: str, output: Path | str) -> Path:
    """Where the run's checkpoints go: checkpoint_dir, else beside the output (on local disk for an S3 output)."""
    if checkpoint_dir:  # on a cluster a PVC path per run, so that a retried pod resumes its own run
        run_id = os.environ.get("E4SREC_PIPELINE_RUN_ID", "")
        if "{run_id}" in checkpoint_dir and not run_id:
            raise E4SRecError(f"checkpoint_dir {checkpoint_dir!r} names {{run_id}} but E4SREC_PIPELINE_RUN_ID "
                              f"is not set; set it (the pipeline does) or give a plain folder")
        return Path(checkpoint_dir.replace("{run_id}", run_id))
    if is_s3(output):  # checkpoints stay on local disk beside an S3 output's staging
        return Path(tempfile.gettempdir()) / "e4srec-checkpoints" / str(output).replace("/", "_")
    return Path(output).with_name(Path(output).name + ".checkpoints")
