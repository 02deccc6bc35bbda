"""E4SRec training on CPU: one process on every core against data-parallel processes of one thread each.

    python bench/e4srec_cpu_ddp.py --data <prepared Beauty> --sasrec <pretrain-sasrec output> \\
        --layouts 1x2 2x1 --max-examples 1280 --json bench/results/<date>-cpu/e4srec_cpu_ddp.json

A layout PxT runs train-e4srec through its own `run_distributed` (torchrun, gloo; one process for
P=1 too, so both layouts start alike) in P processes of T torch threads each, on
the same seeded examples and global batch, so each layout takes the same optimizer steps. Reported
per layout: training examples per second (train-e4srec's own `train/examples_per_second`, the
training loop only), the training loss first and last, and wall time including start-up. Evaluation
is cut to a few users; it is not what this measures.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from benchlib import command, emit, machine
from e4srec.stages import train_e4srec as stage


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="prepare-data output (e.g. of data/Beauty.txt)")
    parser.add_argument("--sasrec", type=Path, required=True, help="pretrain-sasrec output on it")
    parser.add_argument("--backbone", default="smollm2-135m")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--layouts", nargs="+", default=["1x2", "2x1"], help="PROCESSESxTHREADS each")
    parser.add_argument("--max-examples", type=int, default=1280)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    rows = []
    for layout in args.layouts:
        try:
            procs, threads = (int(x) for x in layout.split("x"))
        except ValueError:
            parser.error(f"layout {layout!r}: expected PROCESSESxTHREADS, e.g. 2x1")
        config = stage.TrainE4SRecConfig(dtype=args.dtype, device="cpu", threads=threads, batch_size=args.batch_size,
                                         max_examples=args.max_examples, eval_users=16)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            m = stage.run_distributed(config, args.data, args.sasrec, args.backbone, Path(tmp) / "model", procs,
                                      tracking=False)
            wall = time.perf_counter() - t0
        rows.append({"layout": layout, "processes": procs, "threads": threads,
                     "examples_per_second": round(m["train/examples_per_second"], 2),
                     "train_seconds": round(m["train/seconds"], 1), "loss_first": round(m["train/loss_first"], 4),
                     "loss_last": round(m["train/loss_last"], 4), "wall_seconds": round(wall, 1)})
        print(rows[-1], flush=True)
    emit({"command": command(), "machine": machine("cpu"), "examples": args.max_examples,
          "batch_size": args.batch_size, "dtype": args.dtype, "layouts": rows}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
