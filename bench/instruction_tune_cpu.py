"""instruction-tune with a real backbone on a slice: loss falls, held-out loss before/after, wall time.

    python bench/instruction_tune_cpu.py --max-examples 64 --threads 2

Runs the stage exactly as `e4srec instruction-tune` does (100 held-out examples), then reloads the
adapter with plain `PeftModel.from_pretrained` and compares its logits with the stage's own loader.
Prints one JSON object with the command, machine and numbers.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from benchlib import command, emit, machine
from e4srec import contracts as c
from e4srec import llm
from e4srec.backbones import BackboneOptions, load_backbone
from e4srec.stages import instruction_tune as stage


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instructions", type=Path, default=Path("data/instructions.json"))
    parser.add_argument("--backbone", default="smollm2-135m")
    parser.add_argument("--max-examples", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    config = stage.InstructionTuneConfig(backbone=args.backbone, max_examples=args.max_examples, epochs=args.epochs,
                                         threads=args.threads, device=args.device)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "tuned"
        metrics = stage.run(config, args.instructions, out)
        wall = time.perf_counter() - t0
        from peft import PeftModel

        mine, _ = llm.load_tuned_backbone(out)
        ids = mine.tokenizer("Name three colors.", return_tensors="pt")["input_ids"]
        plain = PeftModel.from_pretrained(load_backbone(BackboneOptions(backbone=args.backbone)).model,
                                          str(out / "adapter"))
        with torch.no_grad():
            diff = (mine.model(input_ids=ids).logits - plain(input_ids=ids).logits).abs().max().item()
        generations = c.read_json(out / "generations.json")
    result = {
        "command": command(),
        "machine": machine(args.device),
        "config": dict(config.__dict__),
        "wall_seconds": round(wall, 1),
        "metrics": {k: round(v, 4) for k, v in metrics.items()},
        "reload_max_abs_logit_diff": diff,
        "generations": generations,
    }
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
