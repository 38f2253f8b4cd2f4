"""Load test of `msa serve`: N concurrent streaming clients for T seconds, greedy decoding, loopback only.

Starts a server on 127.0.0.1 over a small memory (or uses --url of a running one), asks each question
once alone for the reference answers, then runs N clients that stream questions back to back for T
seconds. Reports errors (goal 0), answers that differ from the same request alone (goal 0), p50/p95
time to first token, and generated tokens per second.

    python benchmarks/serve_load.py [--clients 32] [--seconds 60] [--max-tokens 32] [--model DIR]

Bounded: at most 64 clients and 600 s. Writes benchmarks/results/serve_load.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx

from msa_plugins import MSAEngine

DOCS = ["The lighthouse on Gull Rock was built in 1871 and its keeper, Ada Frey, kept it lit for 40 years.",
        "The bakery on Mill Street opens at five; its rye bread rises overnight in oak troughs.",
        "In the 1998 club final Tomas beat his friend Ilya with a queen sacrifice on move 31.",
        "The community garden grows tomatoes, beans and a row of sunflowers along the south fence.",
        "The Riverside music festival takes place every July and ended with a brass band this year.",
        "The robot Pim learned to paint by copying Monet's water lilies for three weeks.",
        "The night train from Zurich to Vienna crosses the Arlberg pass through a ten-kilometre tunnel.",
        "Vaccines train the immune system by showing it a harmless piece of a pathogen."]
QUESTIONS = ["Who kept the lighthouse lit?", "When does the bakery open?", "Who won the 1998 club final?",
             "What grows along the south fence?", "When is the Riverside festival?", "How did Pim learn to paint?",
             "Which pass does the night train cross?", "How do vaccines train the immune system?"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model, memory_dir, port, max_batch, max_queue):
    cmd = [sys.executable, "-m", "msa_plugins.server", "--memory", f"docs={memory_dir}", "--host", "127.0.0.1",
           "--port", str(port), "--max-batch", str(max_batch), "--max-queue", str(max_queue), "--log-level", "warning"]
    if model:
        cmd += ["--model", model]
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise SystemExit("the server did not come up in 300 s")


def ask(http: httpx.Client, question: str, max_tokens: int) -> dict:
    """One streamed answer: its text, time to first token, tokens, or the error."""
    body = {"model": "docs", "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, parts, usage = None, [], None
    try:
        with http.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}: {r.read()[:200]!r}"}
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices", []):
                    piece = choice.get("delta", {}).get("content")
                    if piece:
                        ttft = ttft if ttft is not None else time.perf_counter() - t0
                        parts.append(piece)
    except httpx.HTTPError as e:
        return {"error": f"{type(e).__name__}: {e}"}
    return {"text": "".join(parts).strip(), "ttft": ttft, "tokens": (usage or {}).get("completion_tokens", 0),
            "latency": time.perf_counter() - t0}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", default=None, help="a running server (loopback only); default: start one")
    p.add_argument("--model", default=None)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve_load.json"))
    args = p.parse_args(argv)
    if not 1 <= args.clients <= 64 or not 0 < args.seconds <= 600:
        raise SystemExit("--clients must be 1..64 and --seconds 1..600")
    proc = None
    with tempfile.TemporaryDirectory() as tmp:
        if args.url:
            if urlparse(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
                raise SystemExit("loopback only: --url must be on 127.0.0.1 / localhost")
            url = args.url.rstrip("/")
        else:
            engine = MSAEngine.from_pretrained(args.model, device="cpu")
            engine.add(DOCS, ids=[f"doc{i}" for i in range(len(DOCS))], progress=False)
            engine.save(os.path.join(tmp, "docs"))
            del engine
            proc, url = start_server(args.model, os.path.join(tmp, "docs"), free_port(), args.max_batch, args.clients)
        try:
            with httpx.Client(base_url=url, timeout=600) as http:
                alone = {q: ask(http, q, args.max_tokens) for q in QUESTIONS}  # one at a time: the reference
            bad = {q: r["error"] for q, r in alone.items() if "error" in r}
            if bad:
                raise SystemExit(f"reference requests failed: {bad}")
            results, lock = [], threading.Lock()
            t_end = time.perf_counter() + args.seconds

            def client(i: int) -> None:
                with httpx.Client(base_url=url, timeout=600) as http:
                    n = i
                    while time.perf_counter() < t_end:
                        q = QUESTIONS[n % len(QUESTIONS)]
                        r = ask(http, q, args.max_tokens)
                        r["question"] = q
                        with lock:
                            results.append(r)
                        n += 1

            t0 = time.perf_counter()
            threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            metrics = httpx.get(url + "/metrics").text
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=60)
    ok = [r for r in results if "error" not in r]
    ttfts = sorted(r["ttft"] for r in ok if r["ttft"] is not None)
    pct = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None  # noqa: E731
    report = {"clients": args.clients, "seconds": args.seconds, "max_tokens": args.max_tokens, "wall_s": wall,
              "requests": len(results), "errors": len(results) - len(ok),
              "error_samples": [r["error"] for r in results if "error" in r][:5],
              "answers_differing_from_alone": sum(r["text"] != alone[r["question"]]["text"] for r in ok),
              "ttft_p50_s": pct(ttfts, 0.5), "ttft_p95_s": pct(ttfts, 0.95),
              "ttft_alone_median_s": statistics.median(r["ttft"] for r in alone.values() if r["ttft"] is not None),
              "tokens": sum(r["tokens"] for r in ok), "tokens_per_s": sum(r["tokens"] for r in ok) / wall,
              "load": os.getloadavg()[0],
              "server_metrics": [line for line in metrics.splitlines() if line.startswith(
                  ("msa_requests_total", "msa_completion_tokens_total", "msa_decode_seconds_sum",
                   "msa_decode_seconds_count"))]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "server_metrics"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
