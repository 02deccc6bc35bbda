"""The REST endpoint under load: `mlflow models serve` on 127.0.0.1, real users' histories, N clients.

    python bench/serving_load.py --model models:/e4srec-Beauty/1 --model models:/e4srec-Beauty/2 \\
        --data <prepare-data output> --duration 60 --clients 1 8 32 --batch 64 \\
        --json bench/results/<date>-cpu/serving_load.json

For each model: start the server (env manager `local`, the project's environment, default workers),
wait for /ping, then for each client count run that many threads for `--duration` seconds, each
sending single-user requests back to back on its own keep-alive connection (a history drawn from the
data's users with the seed, their last max_len items, k=10), and record every latency and status.
Then one client sends requests of `--batch` users. Then a set of malformed and oversized requests,
each of which must get a 4xx with a one-line reason, and a last /ping proves the server still up.
Reported per level: requests, users/s, p50/p90/p99/max latency (ms), errors (non-2xx, timeouts).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from benchlib import command, emit, machine
from e4srec import contracts as c

BAD_REQUESTS = {
    "not JSON": b"not json",
    "no history field": b'{"dataframe_records": [{"hist": ["1"], "k": 3}]}',
    "history as a string": b'{"dataframe_records": [{"history": "1 2", "k": 3}]}',
    "negative k": b'{"dataframe_records": [{"history": ["1"], "k": -2}]}',
    "k as text": b'{"dataframe_records": [{"history": ["1"], "k": "ten"}]}',
    "2,000 users in one request": json.dumps({"dataframe_records": [{"history": ["1"], "k": 3}] * 2000}).encode(),
    "a history of 20,000 items": json.dumps({"dataframe_records": [{"history": ["1"] * 20000, "k": 3}]}).encode(),
}


def post(conn: http.client.HTTPConnection, body: bytes) -> tuple[int, bytes]:
    conn.request("POST", "/invocations", body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    return response.status, response.read()


def load(port: int, bodies: list[bytes], clients: int, duration: float, users_per_request: int) -> dict:
    """`clients` threads posting `bodies` round-robin for `duration` s: latency percentiles, throughput, errors."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    kinds: dict[str, int] = {}
    stop = time.perf_counter() + duration

    def client(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        j = i
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            try:
                status, _ = post(conn, bodies[j % len(bodies)])
            except (OSError, http.client.HTTPException) as e:
                status = 0
                kinds[type(e).__name__] = kinds.get(type(e).__name__, 0) + 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            if status == 200:
                latencies[i].append(time.perf_counter() - t0)
            else:
                errors[i] += 1
                if status:
                    kinds[f"HTTP {status}"] = kinds.get(f"HTTP {status}", 0) + 1
            j += clients

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ms = np.array([x for per in latencies for x in per]) * 1000
    ok = len(ms)
    return {"clients": clients, "users_per_request": users_per_request, "seconds": round(wall, 1), "requests": ok,
            "errors": sum(errors), "error_kinds": kinds, "requests_per_s": round(ok / wall, 2),
            "users_per_s": round(ok * users_per_request / wall, 2),
            **{f"p{q}_ms": round(float(np.percentile(ms, q)), 1) if ok else None for q in (50, 90, 99)},
            "max_ms": round(float(ms.max()), 1) if ok else None}


def serve(model: str, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", model, "--env-manager",
                               "local", "-h", "127.0.0.1", "-p", str(port)], env=env, stdout=open(log, "w"),
                              stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited: {log.read_text()[-2000:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/ping")
            if conn.getresponse().status == 200:
                return server
        except OSError:
            pass
        time.sleep(1)
    raise SystemExit(f"the server did not answer /ping in 600 s: {log}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, help="models:/NAME/VERSION (repeat for several)")
    parser.add_argument("--data", type=Path, required=True, help="prepare-data output: real users' histories")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds per load level")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32], help="concurrent clients per level")
    parser.add_argument("--batch", type=int, default=64, help="users per request in the batch level (0: skip)")
    parser.add_argument("--port", type=int, default=5093)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the result here too")
    args = parser.parse_args(argv)

    data = c.load_sequence_data(args.data)
    rng = np.random.default_rng(args.seed)
    users = rng.choice(data.n_users, size=min(2048, data.n_users), replace=False)
    histories = [[str(data.item_ids[i]) for i in data.sequence(int(u))[-data.max_len:]] for u in users]
    singles = [json.dumps({"dataframe_records": [{"history": h, "k": 10}]}).encode() for h in histories]
    batches = [json.dumps({"dataframe_records": [{"history": h, "k": 10} for h in histories[s:s + args.batch]]}).encode()
               for s in range(0, len(histories) - args.batch + 1, args.batch)] if args.batch else []
    result = {"command": command(), "machine": machine(), "duration_s": args.duration,
              "histories": {"users": len(histories), "mean_items": round(float(np.mean([len(h) for h in histories])), 2)},
              "models": {}}
    for n, model in enumerate(args.model):
        port = args.port + n  # a fresh port per server: never a stale answer from the previous one
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            server = serve(model, port, Path(tmp) / "serve.log")
            ready = time.perf_counter() - t0
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                post(conn, singles[0])  # warm-up
                levels = [load(port, singles, c, args.duration, 1) for c in args.clients]
                if batches:
                    levels.append(load(port, batches, 1, args.duration, args.batch))
                bad = {}
                for name, body in BAD_REQUESTS.items():
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                    t1 = time.perf_counter()
                    status, text = post(conn, body)
                    message = json.loads(text).get("message", "") if text.startswith(b"{") else text.decode()[:200]
                    bad[name] = {"status": status, "ms": round((time.perf_counter() - t1) * 1000, 1),
                                 "message": message.splitlines()[0][:200] if message else "",
                                 "one_line": "\n" not in message.strip()}
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                conn.request("GET", "/ping")
                alive = conn.getresponse().status == 200
            finally:
                os.killpg(server.pid, signal.SIGTERM)
                server.wait(timeout=60)
        result["models"][model] = {"ready_s": round(ready, 1), "levels": levels, "bad_requests": bad,
                                   "alive_after_bad_requests": alive}
        for level in levels:
            print(f"{model}: {level}", file=sys.stderr)
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
