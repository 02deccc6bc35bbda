"""Backbone memory and speed by dtype and quantization: bf16 vs NF4 vs 8-bit (meant for a GPU).

    python bench/backbone_memory_speed.py --device cuda --variants bf16 nf4 8bit --batch 64 --seq 110

For each variant: load the backbone, then time a LoRA training step (r 16 on gate/up/down, as the
E4SRec stage uses) and a no-grad forward at E4SRec's prompt length, after warm-up. Reports load time,
weights memory and peak memory (CUDA) or RSS (CPU), and sequences per second. Imports no MLflow or KFP.
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import torch
from benchlib import command, emit, machine
from e4srec.backbones import BackboneOptions, load_backbone


def measure(spec: str, variant: str, device: torch.device, batch: int, seq: int, steps: int) -> dict:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    dtype, quant = ("bf16", "none") if variant == "bf16" else ("fp32", "none") if variant == "fp32" else ("auto", variant)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    bb = load_backbone(BackboneOptions(backbone=spec, dtype=dtype, quantization=quant), device)
    load_s = time.perf_counter() - t0
    weights_mb = torch.cuda.memory_allocated() / 2**20 if device.type == "cuda" else None
    model = bb.model
    if quant != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.05,
                                             target_modules=["gate_proj", "up_proj", "down_proj"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(10, bb.tokenizer.vocab_size - 1, (batch, seq), device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def train_step() -> None:
        with autocast:
            out = model(input_ids=ids, output_hidden_states=False)
            loss = out.logits[:, -1].float().logsumexp(-1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def forward() -> None:
        with autocast:
            model(input_ids=ids)

    result = {"variant": variant, "load_seconds": round(load_s, 1),
              "weights_MiB": round(weights_mb, 1) if weights_mb is not None else None}
    for name, fn in (("train", train_step), ("forward", forward)):
        fn()  # warm-up
        sync()
        t = time.perf_counter()
        for _ in range(steps):
            fn()
        sync()
        result[f"{name}_seq_per_s"] = round(batch * steps / (time.perf_counter() - t), 1)
    if device.type == "cuda":
        result["peak_MiB"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    else:
        result["max_rss_MiB"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="smollm2-135m")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--variants", nargs="+", default=["bf16", "nf4", "8bit"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq", type=int, default=110, help="E4SRec prompt: 54 instruction + 50 items + 6")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = [measure(args.backbone, v, device, args.batch, args.seq, args.steps) for v in args.variants]
    result = {
        "command": command(),
        "machine": machine(device),
        "backbone": args.backbone, "batch": args.batch, "seq": args.seq, "steps": args.steps, "results": rows,
    }
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
