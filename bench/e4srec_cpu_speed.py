"""E4SRec training speed on a CPU: precision, torch.compile, batch size and threads, per history length.

    python bench/e4srec_cpu_speed.py --data <prepared Beauty> --variants fp32 bf16 autocast \\
        --batch-sizes 16 64 --threads 2 --json bench/results/<date>-cpu/e4srec_cpu_speed.json

A training step's cost depends on the history length of its batch (batches are bucketed by length
and trimmed to their longest history), so one random batch says little about an epoch. For each
variant, batch size and thread count this times optimizer steps (train-e4srec's own model, loss and
shared prefix) at a ladder of history lengths, on real training examples of exactly that length,
then prices a whole epoch by interpolating over the widths of the epoch's actual batches. Then it
ranks the whole catalog for a seeded sample of test users (evaluate() with the prefix cache).

Variants:
  fp32      backbone weights in fp32 (LoRA, projection and head are fp32 in every variant)
  bf16      backbone weights in bf16, with the attention load_backbone picks for bf16 on CPU (eager)
  autocast  fp32 weights, matmuls under torch.autocast(cpu, bf16)
  NAME+eager, NAME+sdpa   the same with that attention implementation
  NAME+fused     the same with the fused AdamW kernel
  bf16+autocast  bf16 weights and autocast: LoRA and the head compute in bf16 too (fp32 master weights)
  NAME+compile   the same with the decoder under torch.compile(dynamic=True); compile time is
                 reported apart
Suffixes combine: bf16+eager+fused.
The machine record includes the CPU model and its bf16/AMX flags: figures only compare on one machine.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import numpy as np
import torch
from benchlib import command, emit, machine
from e4srec import contracts as c
from e4srec.backbones import BackboneOptions, load_backbone
from e4srec.evaluate import evaluate
from e4srec.stages import train_e4srec as stage

WIDTHS = (1, 2, 4, 8, 16, 32, 50)


def epoch_widths(lengths: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(width, rows) of every batch of one bucketed epoch at this batch size."""
    config = stage.TrainE4SRecConfig(batch_size=batch_size)
    batches = stage.epoch_batches(lengths, config, epoch=0)
    return np.array([max(int(lengths[b].max()), 1) for b in batches]), np.array([len(b) for b in batches])


def time_variant(name: str, args: argparse.Namespace, data: c.SequenceData, histories: np.ndarray,
                 targets: np.ndarray, lengths: np.ndarray, table: torch.Tensor) -> dict:
    """Seconds per step at each width and batch size, and the epoch they price, for one variant."""
    base, *extras = name.split("+")
    if base not in ("fp32", "bf16", "autocast") or not set(extras) <= {"eager", "sdpa", "fused", "compile", "autocast"}:
        raise SystemExit(f"variant {name!r}: expected fp32, bf16 or autocast, then +eager, +sdpa, +fused, "
                         f"+autocast or +compile")
    compiled = "compile" in extras
    dtype = "bf16" if base == "bf16" else "fp32"
    backbone = load_backbone(BackboneOptions(backbone=args.backbone, dtype=dtype), "cpu")
    for attention in ("eager", "sdpa"):
        if attention in extras:
            backbone.model.set_attn_implementation(attention)
    config = stage.TrainE4SRecConfig(device="cpu")
    torch.manual_seed(0)
    model = stage.build_model(config, backbone, table, data.n_items, data.max_len)
    compile_seconds = 0.0
    if compiled:
        model.llm = torch.compile(model.llm, dynamic=True)
    model.train()
    params = list(model.trainable_state().values())
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused="fused" in extras)
    rng = np.random.default_rng(0)

    def step(rows: np.ndarray) -> float:
        width = max(int(lengths[rows].max()), 1)
        hist = torch.as_tensor(histories[rows, -width:])
        tgt = torch.as_tensor(targets[rows])
        autocast = base == "autocast" or "autocast" in extras
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        t0 = time.perf_counter()
        with ctx:
            loss = model.loss(hist, tgt, shared_prefix=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    out: dict = {"variant": name, "backbone_dtype": str(next(backbone.model.parameters()).dtype),
                 "attention": backbone.model.config._attn_implementation, "by_batch": {}}
    for threads in args.threads:
        torch.set_num_threads(threads)
        for batch in args.batch_sizes:
            per_width = {}
            for width in args.widths:
                pool = np.flatnonzero(lengths == width) if width < data.max_len else np.flatnonzero(lengths >= width)
                if len(pool) < batch:
                    continue
                t_first = step(rng.choice(pool, batch, replace=False))  # warm-up (and compile, when on)
                if compiled:
                    compile_seconds += t_first
                times = [step(rng.choice(pool, batch, replace=False)) for _ in range(args.steps)]
                per_width[width] = {"seconds_per_step": round(float(np.median(times)), 4),
                                    "all": [round(t, 4) for t in times],
                                    "sequences_per_second": round(batch / float(np.median(times)), 2)}
            widths, rows = epoch_widths(lengths, batch)
            known = np.array(sorted(per_width))
            secs = np.array([per_width[w]["seconds_per_step"] for w in known])
            # Price each batch by its width (linear between measured widths), scaled by its row count.
            epoch_seconds = float(np.sum(np.interp(widths, known, secs) * rows / batch))
            out["by_batch"][f"threads={threads},batch={batch}"] = {
                "threads": threads, "batch_size": batch, "per_width": per_width,
                "epoch_seconds_estimate": round(epoch_seconds), "epoch_minutes_estimate": round(epoch_seconds / 60, 1),
                "sequences_per_second_over_epoch": round(len(targets) / epoch_seconds, 2)}
            print(name, threads, batch, round(epoch_seconds / 60, 1), "min/epoch", flush=True)
    if compiled:
        out["compile_and_warmup_seconds"] = round(compile_seconds, 1)
    if args.rank_users:  # full ranking (evaluate() with the prefix cache), at the last thread count
        model.eval()
        users = np.sort(np.random.default_rng(0).choice(data.n_users, args.rank_users, replace=False))
        with torch.no_grad():
            cache = model.prefix_cache()
            evaluate(lambda h: model.score_all_items(h, cache), data, "test", batch_size=64, users=users[:64],
                     progress=False)  # warm-up
            t0 = time.perf_counter()
            cache = model.prefix_cache()
            evaluate(lambda h: model.score_all_items(h, cache), data, "test", batch_size=64, users=users,
                     progress=False)
        out["ranking_users_per_second"] = round(len(users) / (time.perf_counter() - t0), 1)
        print(name, "ranking", out["ranking_users_per_second"], "users/s", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="prepare-data output (e.g. of data/Beauty.txt)")
    parser.add_argument("--backbone", default="smollm2-135m")
    parser.add_argument("--variants", nargs="+", default=["fp32", "bf16", "autocast"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--threads", type=int, nargs="+", default=[2])
    parser.add_argument("--widths", type=int, nargs="+", default=list(WIDTHS), help="history lengths timed")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per width (after one warm-up)")
    parser.add_argument("--rank-users", type=int, default=512, help="test users ranked per variant (0: skip)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    data = c.load_sequence_data(args.data)
    histories, targets = data.prefix_examples(50)
    lengths = (histories > 0).sum(1)
    torch.manual_seed(0)
    table = torch.randn(data.n_items + 1, 64) * 0.1  # speed does not depend on the table's values
    table[0] = 0
    t0 = time.perf_counter()
    results = [time_variant(v, args, data, histories, targets, lengths, table) for v in args.variants]
    emit({"command": command(), "machine": machine("cpu"), "backbone": args.backbone,
          "training_examples": len(targets), "widths": args.widths, "timed_steps_per_width": args.steps,
          "variants": results, "wall_seconds": round(time.perf_counter() - t0, 1)}, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
