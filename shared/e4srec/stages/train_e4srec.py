"""Stage train-e4srec: train E4SRec on the leave-one-out split and rank the whole catalog.

Output folder: the model folder `e4srec.e4srec.save_model` writes (adapter, head and projection, item
table and map, config.json), and metrics.json, metrics_by_length.json, training_log.json, *.png.

Training data as the paper's code builds it, with the history cut it forgot: every prefix of the
training sequence (items[:-2]) predicts its next item, at most `max_targets_per_user` targets per user,
histories cut to the last `max_len` items (`SequenceData.prefix_examples`). Data-parallel when started
under torchrun (WORLD_SIZE > 1): each global batch is split across processes and the loss is scaled
so gradients equal the single-process ones.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from e4srec import config as cfg
from e4srec import contracts as c
from e4srec import distributed
from e4srec.backbones import Backbone
from e4srec.checkpoints import Checkpoints, checkpoint_root
from e4srec.data import seeded_subset
from e4srec.device import resolve_device
from e4srec.e4srec import DTYPE_NAMES, WRITER, E4SRec, E4SRecConfig, backbone_dtype, save_model
from e4srec.errors import E4SRecError
from e4srec.evaluate import evaluate
from e4srec.llm import load_llm
from e4srec.outputs import preflight, staged_output
from e4srec.progress import progress as progress_bar
from e4srec.prompt import recommendation_prefix
from e4srec.sasrec import load_item_embeddings
from e4srec.settings import TrainE4SRecConfig
from e4srec.storage import fetch
from e4srec.tracking import Tracker, figure_to_artifact, tracked
from e4srec.training import Optimizer

STAGE = WRITER


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


class NonFiniteLoss(E4SRecError):
    """Training produced a NaN or infinite loss (or gradient): stop rather than train on garbage."""

    def __init__(self, value: float, step: int, epoch: int, lr: float, what: str = "loss") -> None:
        super().__init__(f"{STAGE}: {what} is {value} at optimizer step {step} (epoch {epoch}); training stopped. "
                         f"Likely causes: a learning rate too high for this batch (--lr {lr:g}: try a tenth), or "
                         f"non-finite values in the item embeddings (check the pretrain-sasrec output)")


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
    """AdamW + warmup/cosine, accumulation, clipping, autocast (CUDA; CPU if asked); resumable; data-parallel."""
    lengths = (histories > 0).sum(1)
    micro = math.ceil(len(targets) / config.batch_size)
    total = config.epochs * math.ceil(micro / config.grad_accum)
    optimizer = Optimizer(model.trainable_state().values(), lr=config.lr, weight_decay=config.weight_decay,
                          warmup_ratio=config.warmup_ratio, total_steps=total, max_grad_norm=config.max_grad_norm)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    dtype = backbone_dtype(model)
    # On CUDA a half-precision backbone trains under autocast (LoRA, projection and head in it too); on
    # CPU only when asked (--autocast, bf16 only); an fp32 backbone stays fp32 everywhere, as asked.
    if config.autocast and device.type == "cpu" and dtype != torch.bfloat16:
        raise E4SRecError(f"{STAGE}: --autocast on CPU needs a bf16 backbone, this one is "
                          f"{DTYPE_NAMES[str(dtype)]}; pass --dtype bf16 (or drop --autocast)")
    mixed = dtype != torch.float32 and (device.type == "cuda" or config.autocast)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=mixed)
    log: list[dict[str, float]] = []
    start_epoch, start_batch, step = 0, 0, 0
    if checkpoints is not None and config.resume and checkpoints.exists():
        state = checkpoints.load(model, optimizer.adamw)
        if state.get("backbone_dtype", str(dtype)) != str(dtype):
            raise E4SRecError(f"{checkpoints.root}: the checkpoint was trained with a {state['backbone_dtype']} "
                              f"backbone, this run loads it as {dtype}; resume with --dtype "
                              f"{DTYPE_NAMES[state['backbone_dtype']]} (or start afresh without --resume)")
        if state.get("autocast", mixed) != mixed:
            was, now, flag = ("with", "without", "--autocast") if state["autocast"] else ("without", "with",
                                                                                        "--no-autocast")
            raise E4SRecError(f"{checkpoints.root}: the checkpoint was trained {was} autocast, this run {now} it; "
                              f"resume with {flag} (or start afresh without --resume)")
        start_epoch, start_batch, step, log = state["epoch"], state["batch"], state["step"], state["log"]
        optimizer.skip(step)
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
            # fp32 softmax whatever autocast computed the logits in (bf16 keeps 8 bits of mantissa)
            loss = torch.nn.functional.cross_entropy(logits.float(), tgt, reduction="sum") * world / len(batches[b])
            if world == 1 and not torch.isfinite(loss):  # under DDP the gradient check below stops every rank
                raise NonFiniteLoss(float(loss.detach()), step + 1, epoch + 1, config.lr)
            (loss / config.grad_accum).backward()
            running += loss.item() / world / config.grad_accum
            seen += len(batches[b])
            last = b + 1 == len(batches)
            if (b + 1) % config.grad_accum and not last:
                continue
            norm = optimizer.clip()
            if not torch.isfinite(norm):
                raise NonFiniteLoss(float(norm), step + 1, epoch + 1, config.lr, what="gradient norm")
            optimizer.step()
            step += 1
            if world > 1:
                value = torch.tensor([running], dtype=torch.float64)
                dist.all_reduce(value)
                running = float(value.item())
            elapsed = time.perf_counter() - t0
            row = {"step": step, "epoch": epoch + (b + 1) / len(batches), "train/loss": running,
                   "train/lr": optimizer.lr, "train/examples_per_second": seen / elapsed}
            log.append(row)
            tracker.log_metrics({k: v for k, v in row.items() if k != "step"}, step=step)
            bar.update(1)
            bar.set_postfix(loss=f"{running:.3f}", refresh=False)
            running, seen, t0 = 0.0, 0, time.perf_counter()
            if checkpoints is not None and config.checkpoint_every and step % config.checkpoint_every == 0:
                done = last
                checkpoints.save(model, optimizer.adamw, {"epoch": epoch + done, "batch": 0 if done else b + 1,
                                                    "step": step, "log": log, "backbone_dtype": str(dtype),
                                                    "autocast": mixed})
    bar.close()
    model.eval()
    return log


def check(config: TrainE4SRecConfig, data_dir: Path | str, sasrec_dir: Path | str, backbone: Path | str,
          output: Path | str, overwrite: bool = False) -> None:
    """Refuse, before any work, an output (or a checkpoint folder) that is not free or that overlaps the inputs."""
    inputs = {"--data": data_dir, "--sasrec": sasrec_dir, "--backbone": backbone}
    preflight(output, overwrite, inputs)
    if config.checkpoint_every or config.resume:
        Checkpoints(checkpoint_root(config.checkpoint_dir, output), 0).check(inputs, output)


def run(config: TrainE4SRecConfig, data_dir: Path | str, sasrec_dir: Path | str, backbone: Path | str,
        output: Path | str, *, overwrite: bool = False, tracker: Tracker | None = None,
        progress: bool = True) -> dict[str, float]:
    """Train E4SRec on a prepare-data output with a pretrain-sasrec table and a backbone (an instruction-tune
    output or a backbone spec); write `output`."""
    tracker = tracker or Tracker(None)
    rank, world = distributed.init()
    if rank:
        tracker = Tracker(None)
    checkpoints = (Checkpoints(checkpoint_root(config.checkpoint_dir, output), rank)
                   if config.checkpoint_every or config.resume else None)
    if rank == 0:
        check(config, data_dir, sasrec_dir, backbone, output, overwrite)
    data = c.load_sequence_data(fetch(data_dir))
    table = load_item_embeddings(fetch(sasrec_dir), data.item_map_sha256)
    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.manual_seed(config.seed)
    decoder, descriptor, instruct_adapter = load_llm(fetch(backbone), device, config.dtype)
    model = build_model(config, decoder, table, data.n_items, data.max_len).to(device)
    histories, targets = data.prefix_examples(config.max_targets_per_user)
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
        save_model(out, model, descriptor, data.root / c.ITEM_MAP, data.item_map_sha256,
                   {"train": cfg.to_dict(config), "sasrec": str(sasrec_dir)}, instruct_adapter)
        c.write_json(out / c.METRICS, metrics)
        c.write_json(out / "metrics_by_length.json", by_length)
        (out / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
        tracker.log_metrics(metrics)
        from e4srec import plots

        if log:
            figure_to_artifact(tracker, plots.step_curves(log), "training_curves.png", out)
        figure_to_artifact(tracker, plots.metrics_by_length(by_length["test"], title="E4SRec test"),
                           "metrics_by_length.png", out)
        for name in ("config.json", c.METRICS, "metrics_by_length.json", "training_log.json"):
            tracker.log_artifact(out / name)
    if checkpoints is not None:
        checkpoints.remove()  # done: a later --resume starts afresh
    if world > 1:
        dist.barrier()
    return metrics


def run_distributed(config: TrainE4SRecConfig, data_dir: Path | str, sasrec_dir: Path | str, backbone: Path | str,
                    output: Path | str, nproc: int, *, tracking: bool = True, experiment: str = "e4srec",
                    pipeline_run_id: str = "", pipeline_run_name: str = "") -> dict[str, float]:
    """Train with `nproc` data-parallel processes on this machine (a pod's GPUs) through torchrun.

    The processes run `e4srec train-e4srec` with the same settings; rank 0 tracks and writes `output`.
    """
    preflight(output, False)
    cmd = ["e4srec.cli", "train-e4srec", "--data", str(data_dir), "--sasrec", str(sasrec_dir),
           "--backbone", str(backbone), "--output", str(output), "--experiment", experiment]
    for name, value in cfg.to_dict(config).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            cmd.append(flag if value else "--no-" + name.replace("_", "-"))
        else:
            cmd += [flag, str(value)]
    cmd.append("--tracking" if tracking else "--no-tracking")
    env = {**os.environ, **{k: v for k, v in (("E4SREC_PIPELINE_RUN_ID", pipeline_run_id),
                                              ("E4SREC_PIPELINE_RUN_NAME", pipeline_run_name)) if v}}
    if distributed.torchrun(nproc, cmd, env) != 0:
        raise E4SRecError(f"data-parallel training with {nproc} processes failed; see the log above")
    return c.read_json(Path(fetch(f"{str(output).rstrip('/')}/{c.METRICS}")))  # the one object, not the folder


run_tracked = tracked(STAGE, check, rank_zero_only=True)(run)
