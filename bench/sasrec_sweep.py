"""Run several sasrec_quality.py configurations at once (one process each) and collect their JSON.

    python bench/sasrec_sweep.py --out results/ \
        "beauty-bce: --data D/Beauty --loss bce" "beauty-ce: --data D/Beauty --loss ce"

Meant for a GPU machine, where one SASRec run leaves the device mostly idle; on a 2-core CPU run
one at a time (--parallel 1). Prints a summary table of the test metrics.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="'NAME: sasrec_quality.py arguments'")
    parser.add_argument("--out", type=Path, required=True, help="folder for NAME.json and NAME.log")
    parser.add_argument("--parallel", type=int, default=0, help="processes at once (0: all)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    specs = [(name.strip(), shlex.split(rest)) for name, rest in (r.split(":", 1) for r in args.runs)]
    width = args.parallel or len(specs)
    t0 = time.perf_counter()
    pending, running = list(specs), []
    while pending or running:
        while pending and len(running) < width:
            name, rest = pending.pop(0)
            cmd = [sys.executable, str(HERE / "sasrec_quality.py"), *rest, "--json", str(args.out / f"{name}.json")]
            log = open(args.out / f"{name}.log", "w")
            running.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log))
        time.sleep(2)
        for item in [r for r in running if r[1].poll() is not None]:
            running.remove(item)
            item[2].close()
            print(f"{item[0]}: exit {item[1].returncode} after {time.perf_counter() - t0:.0f} s", flush=True)
    keys = ["test/full/HR@10", "test/full/NDCG@10", "test/full/HR@20", "test/sampled/HR@10", "test/sampled/NDCG@10"]
    print(f"{'run':<24}{'epochs':>7}{'best':>6}{'s/ep':>7}" + "".join(f"{k.replace('test/', ''):>20}" for k in keys))
    for name, _ in specs:
        path = args.out / f"{name}.json"
        if not path.exists():
            print(f"{name:<24} failed: see {args.out / (name + '.log')}")
            continue
        r = json.loads(path.read_text())
        print(f"{name:<24}{r['epochs_run']:>7}{r['best_epoch']:>6}{r['seconds_per_epoch']:>7}"
              + "".join(f"{r['test'][k]:>20.4f}" for k in keys))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
