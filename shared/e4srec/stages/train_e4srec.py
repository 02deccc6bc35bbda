"""Stage train-e4srec: train E4SRec on the leave-one-out split and rank the whole catalog.

Output folder:
  adapter/                     PEFT adapter of the decoder (PeftModel.from_pretrained(decoder, "adapter"))
  head_proj.safetensors        input projection (64 -> hidden) and item head (hidden -> N+1)
  item_embeddings.safetensors  the frozen SASRec table (copied, so the model is self-contained)
  item_map.parquet             original item ids of rows 1..N
  instruct_adapter/            the instruction adapter the backbone carried, when there was one
  config.json                  architecture, training settings, backbone descriptor, prompt, item-map hash
  metrics.json, metrics_by_length.json, training_log.json, *.png

Training data as the paper's code builds it, with the history cut it forgot: every prefix of the
training sequence (items[:-2]) predicts its next item, at most `max_targets_per_user` targets per user,
histories cut to the last `max_len` items. Data-parallel when started under torchrun (WORLD_SIZE > 1):
each global batch is split across processes and the loss is scaled so gradients equal the
single-process ones.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from e4srec import config as cfg
from e4srec import contracts as c
from e4srec.backbones import Backbone, BackboneOptions, fingerprint, load_backbone, parse_spec
from e4srec.data import seeded_subset
from e4srec.device import resolve_device
from e4srec.e4srec import E4SRec, E4SRecConfig
from e4srec.errors import E4SRecError
from e4srec.evaluate import evaluate
from e4srec.outputs import check_apart, check_writable_place, hidden_sibling, preflight, staged_output
from e4srec.progress import progress as progress_bar
from e4srec.prompt import PromptOptions, recommendation_prefix
from e4srec.stages import instruction_tune, pretrain_sasrec
from e4srec.storage import fetch, is_s3
from e4srec.tracking import Tracker, figure_to_artifact, stage_run

STAGE = "train-e4srec"
ADAPTER = "adapter"
HEAD = "head_proj.safetensors"
CONFIG = "config.json"
INSTRUCT_ADAPTER = "instruct_adapter"
LLM_FIELDS = ("backbone", "dtype", "quantization", "local_files_only")  # config.json "llm": BackboneOptions


@dataclass
class TrainE4SRecConfig(PromptOptions):
    """Settings of train-e4srec (CLI flags, KFP parameters and config.json share them)."""

    epochs: int = cfg.option(1, "passes over the training examples")
    batch_size: int = cfg.option(64, "examples per micro-batch, summed over all processes (the paper: 16; 64 "
                                     "trains 1.4x faster per example on CPU)")
    grad_accum: int = cfg.option(1, "micro-batches per optimizer step")
    lr: float = cfg.option(1e-3, "peak AdamW learning rate (linear warmup, cosine decay)")
    warmup_ratio: float = cfg.option(0.05, "fraction of optimizer steps spent warming up")
    weight_decay: float = cfg.option(0.0, "AdamW weight decay")
    max_grad_norm: float = cfg.option(1.0, "gradient clipping norm")
    item_dim: int = cfg.option(64, "SASRec embedding size the input projection Linear(item_dim -> hidden) takes")
    lora_r: int = cfg.option(16, "LoRA rank")
    lora_alpha: int = cfg.option(16, "LoRA alpha")
    lora_dropout: float = cfg.option(0.05, "LoRA dropout")
    target_modules: str = cfg.option("gate_proj,up_proj,down_proj", "comma-separated modules LoRA wraps")
    head_init: str = cfg.option("items", "how the item head starts: random (nn.Linear's init) or items (each "
                                          "row the item's projected SASRec embedding, so similar items start alike)",
                                choices=("random", "items"))
    dtype: str = cfg.option("auto", "backbone precision for training and scoring (LoRA, projection and head stay "
                                    "fp32): auto (bf16 on CUDA and on CPUs with bf16 units, else fp32), fp32, bf16, "
                                    "fp16", choices=("auto", "fp32", "bf16", "fp16"))
    max_targets_per_user: int = cfg.option(50, "training targets per user (the last ones)")
    max_examples: int = cfg.option(0, "train on this many examples, drawn with the seed (0: all); CPU demos")
    eval_users: int = cfg.option(0, "evaluate on this many users, drawn with the seed (0: all); CPU demos")
    eval_batch_size: int = cfg.option(64, "users per scoring batch")
    prefix_cache: bool = cfg.option(True, "reuse the instruction tokens' keys/values when scoring")
    shared_prefix: bool = cfg.option(True, "train with the instruction tokens computed once per batch, not per "
                                           "row (same loss; LoRA dropout on them drawn once per batch)")
    bucket_by_length: bool = cfg.option(True, "batch examples of similar history length (less padding)")
    checkpoint_every: int = cfg.option(0, "save a resumable checkpoint every N optimizer steps (0: off)")
    checkpoint_dir: str = cfg.option("", "where checkpoints go (default: OUTPUT.checkpoints beside the output); "
                                         "{run_id} becomes the pipeline run's id ($E4SREC_PIPELINE_RUN_ID)")
    resume: bool = cfg.option(False, "continue from the checkpoint in checkpoint_dir when there is one")
    seed: int = cfg.option(42, "seed for LoRA/head initialisation, example order and dropout")
    device: str = cfg.option("auto", "cpu, cuda, cuda:N or auto (under torchrun: this process's GPU)")
    threads: int = cfg.option(0, "CPU threads for torch (0: torch's default)")

    def __post_init__(self) -> None:
        cfg.check_fields(self)
        for name in ("epochs", "batch_size", "grad_accum", "item_dim", "lora_r", "lora_alpha", "max_targets_per_user",
                     "eval_batch_size"):
            cfg.require(getattr(self, name) >= 1, self, name, "must be >= 1")
        for name in ("max_examples", "eval_users", "checkpoint_every", "threads"):
            cfg.require(getattr(self, name) >= 0, self, name, "must be >= 0")
        cfg.require(0 < self.lr < math.inf, self, "lr", "must be a finite number > 0")
        cfg.require(0 <= self.lora_dropout < 1, self, "lora_dropout", "must be in [0, 1)")
        cfg.require(0 <= self.warmup_ratio < 1, self, "warmup_ratio", "must be in [0, 1)")
        cfg.require(self.weight_decay >= 0, self, "weight_decay", "must be >= 0")
        cfg.require(self.max_grad_norm > 0, self, "max_grad_norm", "must be > 0")
        cfg.require(any(m.strip() for m in self.target_modules.split(",")), self, "target_modules",
                    "name at least one module")


def build_examples(data: c.SequenceData, max_targets: int) -> tuple[np.ndarray, np.ndarray]:
    """(histories (E, max_len) left-padded, targets (E,)): every prefix of items[:-2] and its next item."""
    L = data.max_len
    starts = data.offsets[:-1]
    n_train = data.lengths - 2  # items[:-2]
    first = np.maximum(1, n_train - max_targets)  # first target position per user (>= 1: a history)
    counts = np.maximum(n_train - first, 0)
    user = np.repeat(np.arange(data.n_users), counts)
    k = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts) + first[user]  # target pos
    target_abs = starts[user] + k
    lengths = np.minimum(k, L)
    cols = np.arange(L)[None, :]
    keep = cols >= L - lengths[:, None]  # (E, L): the right-aligned part holds the history
    src = target_abs[:, None] - L + cols  # item index of each column
    histories = np.zeros((len(k), L), dtype=np.int64)
    histories[keep] = data.values[src[keep]]
    return histories, data.values[target_abs]


def _distributed() -> tuple[int, int]:
    """(rank, world size); initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def load_llm(llm: str | Path, device: torch.device, dtype: str = "auto"
             ) -> tuple[Backbone, dict[str, Any], Path | None]:
    """An instruction-tune output folder, or a backbone spec: (backbone, descriptor, instruct adapter dir).

    `dtype` is this stage's precision; it replaces the one the instruction-tune output was made with.
    """
    path = Path(llm)
    if (path / instruction_tune.DESCRIPTOR).is_file():
        backbone, descriptor = instruction_tune.load_tuned_backbone(path, device, dtype)
        adapter = path / descriptor[instruction_tune.ADAPTER] if descriptor.get(instruction_tune.ADAPTER) else None
        return backbone, descriptor, adapter
    if path.exists():
        raise E4SRecError(f"{path}: no {instruction_tune.DESCRIPTOR}; pass an instruction-tune output or a backbone spec")
    parse_spec(str(llm))  # a spec, or the one-line error with the registered names
    options = BackboneOptions(backbone=str(llm), dtype=dtype)
    descriptor = {k: getattr(options, k) for k in LLM_FIELDS}
    return load_backbone(options, device), descriptor, None


def build_model(config: TrainE4SRecConfig, backbone: Backbone, table: torch.Tensor, n_items: int,
                max_len: int) -> E4SRec:
    """E4SRec over the backbone's decoder (the LM head over the vocabulary is never used)."""
    model_config = E4SRecConfig(n_items=n_items, item_dim=config.item_dim, lora_r=config.lora_r,
                                lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                                target_modules=config.target_modules, max_len=max_len)
    model = E4SRec(model_config, backbone.model.get_decoder(), backbone.tokenizer, table,
                   recommendation_prefix(config.instruction), config.response_prefix)
    if config.head_init == "items":
        model.init_head_from_items()
    return model


class Checkpoints:
    """Resumable state without pickles: safetensors for tensors, JSON for counters and logs.

    The folder is train-e4srec's own (its MARKER file says so): a folder holding anything else is
    refused before any work, and only a folder of ours is ever replaced or deleted.
    """

    MARKER = "e4srec-checkpoint.json"

    def __init__(self, root: Path, rank: int) -> None:
        self.root, self.rank = root, rank
        self.users_folder = root.is_dir() and not (root / self.MARKER).is_file()  # an empty folder the user made

    def check(self, inputs: dict[str, Path | str], output: Path | str) -> None:
        """Refuse, before any work, a checkpoint folder that is not ours or that overlaps the run's paths."""
        check_apart(self.root, {**inputs, "--output": output}, what="checkpoint folder")
        if self.root.exists() and not self.root.is_dir():
            raise E4SRecError(f"checkpoint folder {self.root}: is a file; give --checkpoint-dir a new or empty folder")
        if self.root.is_dir() and any(self.root.iterdir()) and not (self.root / self.MARKER).is_file():
            raise E4SRecError(f"checkpoint folder {self.root}: holds files that are not train-e4srec checkpoints "
                              f"(no {self.MARKER}); give --checkpoint-dir a new or empty folder")
        if not self.root.exists():
            check_writable_place(self.root, "--checkpoint-dir")

    def exists(self) -> bool:
        return (self.root / self.MARKER).is_file() and (self.root / "progress.json").is_file()

    def remove(self) -> None:
        """Delete the checkpoints once the model is published (a folder the user made stays, empty)."""
        if (self.root / self.MARKER).is_file():
            shutil.rmtree(self.root, ignore_errors=True)
            if self.users_folder:
                self.root.mkdir(exist_ok=True)

    def save(self, model: E4SRec, optimizer: torch.optim.Optimizer, progress: dict[str, Any]) -> None:
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        if self.rank == 0:
            tmp = hidden_sibling(self.root, "partial")
            c.write_json(tmp / self.MARKER, {"stage": STAGE, "format": 1})
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

    def load(self, model: E4SRec, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        try:
            return self._load(model, optimizer)
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            raise E4SRecError(f"checkpoint folder {self.root}: does not fit this run ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:160]}); it is corrupt or from other settings: delete "
                              f"it, or run without --resume") from None

    def _load(self, model: E4SRec, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
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


class NonFiniteLoss(E4SRecError):
    """Training produced a NaN or infinite loss (or gradient): stop rather than train on garbage."""

    def __init__(self, value: float, step: int, epoch: int, lr: float, what: str = "loss") -> None:
        super().__init__(f"{STAGE}: {what} is {value} at optimizer step {step} (epoch {epoch}); training stopped. "
                         f"Likely causes: a learning rate too high for this batch (--lr {lr:g}: try a tenth), or "
                         f"non-finite values in the item embeddings (check the pretrain-sasrec output)")


DTYPE_NAMES = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}


def backbone_dtype(model: E4SRec) -> torch.dtype:
    """The precision the backbone computes in (its input embeddings': quantized layers compute in it too)."""
    return model.llm.get_input_embeddings().weight.dtype


def checkpoint_root(config: TrainE4SRecConfig, output: Path | str) -> Path:
    """Where the run's checkpoints go: checkpoint_dir, else beside the output (on local disk for an S3 output)."""
    if config.checkpoint_dir:  # on a cluster a PVC path per run, so that a retried pod resumes its own run
        run_id = os.environ.get("E4SREC_PIPELINE_RUN_ID", "")
        if "{run_id}" in config.checkpoint_dir and not run_id:
            raise E4SRecError(f"checkpoint_dir {config.checkpoint_dir!r} names {{run_id}} but E4SREC_PIPELINE_RUN_ID "
                              f"is not set; set it (the pipeline does) or give a plain folder")
        return Path(config.checkpoint_dir.replace("{run_id}", run_id))
    if is_s3(output):  # checkpoints stay on local disk beside an S3 output's staging
        return Path(tempfile.gettempdir()) / "e4srec-checkpoints" / str(output).replace("/", "_")
    return Path(output).with_name(Path(output).name + ".checkpoints")


def epoch_batches(lengths: np.ndarray, config: TrainE4SRecConfig, epoch: int) -> list[np.ndarray]:
    """Global micro-batches of example indices for one epoch; a pure function of (seed, epoch)."""
    rng = np.random.default_rng([config.seed, epoch])
    order = rng.permutation(len(lengths))
    if config.bucket_by_length:
        order = order[np.argsort(lengths[order], kind="stable")]
    chunks = [order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)]
    return [chunks[j] for j in rng.permutation(len(chunks))]


def train(config: TrainE4SRecConfig, model: E4SRec, histories: np.ndarray, targets: np.ndarray,
          device: torch.device, checkpoints: Checkpoints | None, tracker: Tracker, progress: bool,
          rank: int = 0, world: int = 1) -> list[dict[str, float]]:
    """AdamW + warmup/cosine, accumulation, clipping, bf16 autocast on CUDA; resumable; data-parallel."""
    from transformers import get_cosine_schedule_with_warmup

    params = list(model.trainable_state().values())
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    lengths = (histories > 0).sum(1)
    micro = math.ceil(len(targets) / config.batch_size)
    steps_per_epoch = math.ceil(micro / config.grad_accum)
    total = config.epochs * steps_per_epoch
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(config.warmup_ratio * total), total)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    dtype = backbone_dtype(model)
    # On CUDA a half-precision backbone trains under autocast (LoRA, projection and head in it too);
    # an fp32 backbone stays fp32 everywhere, as asked.
    autocast = torch.autocast("cuda", dtype=dtype, enabled=device.type == "cuda" and dtype != torch.float32)
    log: list[dict[str, float]] = []
    start_epoch, start_batch, step = 0, 0, 0
    if checkpoints is not None and config.resume and checkpoints.exists():
        state = checkpoints.load(model, optimizer)
        if state.get("backbone_dtype", str(dtype)) != str(dtype):
            raise E4SRecError(f"{checkpoints.root}: the checkpoint was trained with a {state['backbone_dtype']} "
                              f"backbone, this run loads it as {dtype}; resume with --dtype "
                              f"{DTYPE_NAMES[state['backbone_dtype']]} (or start afresh without --resume)")
        start_epoch, start_batch, step, log = state["epoch"], state["batch"], state["step"], state["log"]
        for _ in range(step):
            scheduler.step()
    bar = progress_bar(range(total), desc=STAGE, unit="step", disable=not progress or rank > 0, mininterval=5,
                       initial=step)
    model.train()
    running, seen, t0 = 0.0, 0, time.perf_counter()
    for epoch in range(start_epoch, config.epochs):
        batches = epoch_batches(lengths, config, epoch)
        for b in range(start_batch if epoch == start_epoch else 0, len(batches)):
            rows = np.array_split(batches[b], world)[rank]  # this process's share of the global batch
            width = max(int(lengths[batches[b]].max()), 1)
            hist = torch.as_tensor(histories[rows, -width:], device=device)
            tgt = torch.as_tensor(targets[rows], device=device)
            with autocast:
                logits = net(hist, shared_prefix=config.shared_prefix)
            # Sum over this share / global batch, times world: DDP's gradient average then equals the
            # single-process mean over the global batch, whatever the split.
            loss = torch.nn.functional.cross_entropy(logits, tgt, reduction="sum") * world / len(batches[b])
            if world == 1 and not torch.isfinite(loss):  # under DDP the gradient check below stops every rank
                raise NonFiniteLoss(float(loss.detach()), step + 1, epoch + 1, config.lr)
            (loss / config.grad_accum).backward()
            running += loss.item() / world / config.grad_accum
            seen += len(batches[b])
            last = b + 1 == len(batches)
            if (b + 1) % config.grad_accum and not last:
                continue
            norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            if not torch.isfinite(norm):
                raise NonFiniteLoss(float(norm), step + 1, epoch + 1, config.lr, what="gradient norm")
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if world > 1:
                value = torch.tensor([running], dtype=torch.float64)
                dist.all_reduce(value)
                running = float(value.item())
            elapsed = time.perf_counter() - t0
            row = {"step": step, "epoch": epoch + (b + 1) / len(batches), "train/loss": running,
                   "train/lr": scheduler.get_last_lr()[0], "train/examples_per_second": seen / elapsed}
            log.append(row)
            tracker.log_metrics({k: v for k, v in row.items() if k != "step"}, step=step)
            bar.update(1)
            bar.set_postfix(loss=f"{running:.3f}", refresh=False)
            running, seen, t0 = 0.0, 0, time.perf_counter()
            if checkpoints is not None and config.checkpoint_every and step % config.checkpoint_every == 0:
                done = last
                checkpoints.save(model, optimizer, {"epoch": epoch + done, "batch": 0 if done else b + 1,
                                                    "step": step, "log": log, "backbone_dtype": str(dtype)})
    bar.close()
    model.eval()
    return log


def run(config: TrainE4SRecConfig, data_dir: Path | str, sasrec_dir: Path | str, llm: Path | str,
        output: Path | str, *, overwrite: bool = False, tracker: Tracker | None = None,
        progress: bool = True) -> dict[str, float]:
    """Train E4SRec on a prepare-data output with a pretrain-sasrec table and an LLM; write `output`."""
    tracker = tracker or Tracker(None)
    rank, world = _distributed()
    if rank:
        tracker = Tracker(None)
    inputs = {"--data": data_dir, "--sasrec": sasrec_dir, "--llm": llm}
    checkpoints = Checkpoints(checkpoint_root(config, output), rank) if config.checkpoint_every or config.resume else None
    if rank == 0:
        preflight(output, overwrite, inputs)
        if checkpoints is not None:
            checkpoints.check(inputs, output)
    data = c.load_sequence_data(fetch(data_dir))
    table = pretrain_sasrec.load_item_embeddings(fetch(sasrec_dir), data.item_map_sha256)
    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.manual_seed(config.seed)
    backbone, descriptor, instruct_adapter = load_llm(fetch(llm), device, config.dtype)
    model = build_model(config, backbone, table, data.n_items, data.max_len).to(device)
    histories, targets = build_examples(data, config.max_targets_per_user)
    keep = seeded_subset(len(targets), config.max_examples, config.seed)
    if keep is not None:
        histories, targets = histories[keep], targets[keep]
    tracker.log_params(cfg.to_dict(config) | {"backbone": descriptor["backbone"], "examples": len(targets),
                                               "backbone_dtype": DTYPE_NAMES[str(backbone_dtype(model))],
                                               "world_size": world, "item_map_sha256": data.item_map_sha256})
    t0 = time.perf_counter()
    log = train(config, model, histories, targets, device, checkpoints, tracker, progress, rank, world)
    train_seconds = time.perf_counter() - t0
    if rank:
        dist.barrier()
        return {}
    users = seeded_subset(data.n_users, config.eval_users, config.seed)
    t1 = time.perf_counter()
    cache = model.prefix_cache() if config.prefix_cache else None
    scorer = lambda h: model.score_all_items(h, cache)  # noqa: E731
    results = [evaluate(scorer, data, split, batch_size=config.eval_batch_size, device=device, users=users,
                        progress=progress) for split in c.SPLITS]
    eval_seconds = time.perf_counter() - t1
    metrics: dict[str, float] = {k: v for r in results for k, v in r.metrics().items()}
    metrics |= {
        "train/examples": float(len(targets)), "train/steps": float(len(log)), "train/seconds": train_seconds,
        "train/examples_per_second": len(targets) * config.epochs / max(train_seconds, 1e-9),
        "train/loss_first": log[0]["train/loss"] if log else float("nan"),
        "train/loss_last": log[-1]["train/loss"] if log else float("nan"),
        "eval/users": float(len(results[0].history_lengths)),
        "train/world_size": float(world),
        "eval/users_per_second": 2 * len(results[0].history_lengths) / eval_seconds,
    }
    by_length = {r.split: r.by_length() for r in results}
    with staged_output(output, overwrite) as out:
        save_model(out, model, config, descriptor, instruct_adapter, data, sasrec_dir)
        c.write_json(out / c.METRICS, metrics)
        c.write_json(out / "metrics_by_length.json", by_length)
        (out / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
        tracker.log_metrics(metrics)
        from e4srec import plots

        if log:
            figure_to_artifact(tracker, plots.step_curves(log), "training_curves.png", out)
        figure_to_artifact(tracker, plots.metrics_by_length(by_length["test"], title="E4SRec test"),
                           "metrics_by_length.png", out)
        for name in (CONFIG, c.METRICS, "metrics_by_length.json", "training_log.json"):
            tracker.log_artifact(out / name)
    if checkpoints is not None:
        checkpoints.remove()  # done: a later --resume starts afresh
    if world > 1:
        dist.barrier()
    return metrics


def save_model(out: Path, model: E4SRec, config: TrainE4SRecConfig, descriptor: dict[str, Any],
               instruct_adapter: Path | None, data: c.SequenceData, sasrec_dir: Path | str) -> None:
    """Write the self-contained model folder (no backbone weights: the spec names them)."""
    model.llm.save_pretrained(str(out / ADAPTER))
    save_file({"proj.weight": model.proj.weight.detach().float().cpu().contiguous(),
               "proj.bias": model.proj.bias.detach().float().cpu().contiguous(),
               "head.weight": model.head.weight.detach().float().cpu().contiguous()}, str(out / HEAD))
    pretrain_sasrec.save_item_embeddings(out / pretrain_sasrec.EMBEDDINGS, model.item_emb.weight.detach(),
                                         data.item_map_sha256, "sasrec")
    shutil.copyfile(data.root / c.ITEM_MAP, out / c.ITEM_MAP)
    if instruct_adapter is not None:
        shutil.copytree(instruct_adapter, out / INSTRUCT_ADAPTER)
    llm = {k: descriptor[k] for k in LLM_FIELDS} | {"fingerprint": fingerprint(model.llm.get_base_model().config)}
    c.write_json(out / CONFIG, {
        "stage": STAGE, "model": model.config.to_dict(), "train": cfg.to_dict(config), "llm": llm,
        "instruct_adapter": INSTRUCT_ADAPTER if instruct_adapter is not None else None,
        "prompt": {"prefix": recommendation_prefix(config.instruction), "response_prefix": config.response_prefix},
        "item_map_sha256": data.item_map_sha256, "sasrec": str(sasrec_dir),
        "trained_dtype": DTYPE_NAMES[str(backbone_dtype(model))],  # what `auto` meant on the training machine
    })


def load_model(model_dir: Path | str, device: torch.device | str = "cpu", dtype: str | None = None,
               backbone: str | None = None) -> E4SRec:
    """Rebuild a trained E4SRec from its folder: backbone by spec, then the saved trainable weights.

    `dtype` replaces the recorded backbone precision (e.g. fp32 on a CPU without bf16 units); the
    trained weights are fp32 whatever the precision they were trained in. `backbone` replaces the
    recorded spec with another source of the same weights (a registered model's logged copy); its
    architecture must match the recorded fingerprint.
    """
    model_dir = Path(fetch(model_dir))
    try:
        return _load_model(model_dir, torch.device(device), dtype, backbone)
    except (KeyError, TypeError, RuntimeError) as e:
        raise E4SRecError(f"{model_dir}: not a train-e4srec model folder that this version reads ({type(e).__name__}: "
                          f"{' '.join(str(e).split())[:160]}); re-run train-e4srec or point at its output") from None


def _load_model(model_dir: Path, device: torch.device, dtype: str | None, backbone: str | None) -> E4SRec:
    from peft import set_peft_model_state_dict

    meta = c.read_model_config(model_dir / CONFIG, STAGE)
    options = {k: meta["llm"][k] for k in LLM_FIELDS}
    overrides = ({"dtype": dtype} if dtype else {}) | ({"backbone": backbone} if backbone else {})
    loaded = load_backbone(BackboneOptions(**(options | overrides)), device)
    if backbone:  # another copy of the recorded backbone: it must be the same architecture, and keeps its name
        recorded = meta["llm"].get("fingerprint")
        if recorded and loaded.fingerprint != recorded:
            raise E4SRecError(f"{model_dir / CONFIG}: backbone {backbone} has architecture {loaded.fingerprint}, "
                              f"the model was trained on {recorded}; serve it with the backbone it was trained on")
        loaded = dataclasses.replace(loaded, spec=options["backbone"])
    backbone = loaded
    if meta.get("instruct_adapter"):
        backbone = instruction_tune.apply_adapter(backbone, model_dir / meta["instruct_adapter"],
                                                  merge=meta["llm"]["quantization"] == "none")
    table = pretrain_sasrec.load_item_embeddings(model_dir, meta["item_map_sha256"])
    train_config = TrainE4SRecConfig(**meta["train"])
    model = build_model(train_config, backbone, table, meta["model"]["n_items"], meta["model"]["max_len"])
    set_peft_model_state_dict(model.llm, c.read_safetensors(model_dir / ADAPTER / "adapter_model.safetensors"))
    head = c.read_safetensors(model_dir / HEAD)
    with torch.no_grad():
        model.proj.weight.copy_(head["proj.weight"])
        model.proj.bias.copy_(head["proj.bias"])
        model.head.weight.copy_(head["head.weight"])
    return model.to(device).eval()


def run_distributed(config: TrainE4SRecConfig, data_dir: Path | str, sasrec_dir: Path | str, llm: Path | str,
                    output: Path | str, nproc: int, *, tracking: bool = True, experiment: str = "e4srec",
                    pipeline_run_id: str = "", pipeline_run_name: str = "") -> dict[str, float]:
    """Train with `nproc` data-parallel processes on this machine (a pod's GPUs) through torchrun.

    The processes run `e4srec train-e4srec` with the same settings; rank 0 tracks and writes `output`.
    """
    import socket
    import subprocess
    import sys

    preflight(output, False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(port), "-m", "e4srec.cli", "train-e4srec", "--data", str(data_dir),
           "--sasrec", str(sasrec_dir), "--llm", str(llm), "--output", str(output), "--experiment", experiment]
    for name, value in cfg.to_dict(config).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            cmd.append(flag if value else "--no-" + name.replace("_", "-"))
        else:
            cmd += [flag, str(value)]
    cmd.append("--tracking" if tracking else "--no-tracking")
    env = {**os.environ, **{k: v for k, v in (("E4SREC_PIPELINE_RUN_ID", pipeline_run_id),
                                              ("E4SREC_PIPELINE_RUN_NAME", pipeline_run_name)) if v}}
    if subprocess.run(cmd, env=env).returncode != 0:
        raise E4SRecError(f"data-parallel training with {nproc} processes failed; see the log above")
    return c.read_json(Path(fetch(f"{str(output).rstrip('/')}/{c.METRICS}")))  # the one object, not the folder


def run_tracked(config: TrainE4SRecConfig, data_dir: Path | str, sasrec_dir: Path | str, llm: Path | str,
                output: Path | str, *, overwrite: bool = False, tracking: bool = True, experiment: str = "e4srec",
                pipeline_run_id: str = "", pipeline_run_name: str = "", progress: bool = True) -> dict[str, float]:
    """`run` inside the stage's MLflow run (rank 0 only under torchrun)."""
    # before the MLflow run: a refused output leaves no FAILED run behind
    preflight(output, overwrite, {"--data": data_dir, "--sasrec": sasrec_dir, "--llm": llm})
    enabled = tracking and int(os.environ.get("RANK", "0")) == 0
    with stage_run(STAGE, enabled=enabled, experiment=experiment, pipeline_run_id=pipeline_run_id,
                   pipeline_run_name=pipeline_run_name) as tracker:
        return run(config, data_dir, sasrec_dir, llm, output, overwrite=overwrite, tracker=tracker, progress=progress)
