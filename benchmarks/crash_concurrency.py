"""Crash and concurrency trials of a saved memory folder, through the public `MSAEngine` API.

Kill trials: a writer process loads the folder and edits it in a loop (add two documents, delete two,
each a read-modify-write under the folder lock, `engine.edit_saved`), printing an acknowledgement after
each save returns; it is killed with SIGKILL at a random moment. After each kill the folder must load,
every acknowledged document must be there (documents whose deletion had begun are excused), and the next
save must leave no bytes beyond the manifest and the files it names.

Two-writer rounds: two writers (threads of one process, or two processes) each do read-modify-write adds
to one fresh folder at the same time; at the end every acknowledged document must be there.

Writers are forked from this process after it imported torch and transformers (a fork costs
milliseconds, a fresh interpreter seconds); every process uses one intra-op thread, so forking is safe.
Uses the tiny random Llama of tests/tiny_models.py unless --model names a model folder.

    python -m benchmarks.crash_concurrency [--kills 100] [--rounds 30] [--out docs/results/crash_concurrency.json]

Run from the repository root (`-m`: `tests.tiny_models` is imported as a module of the checkout).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import signal
import sys
import tempfile
import threading
import time

import torch

from msa_plugins import MSAEngine

ENGINE_ARGS = dict(device="cpu", chunk_size=4)


def owned_bytes_beyond_manifest(d: str) -> int:
    """Bytes of files in `d` other than the manifest, the lock file and the two files the manifest names."""
    with open(os.path.join(d, "manifest.json")) as f:
        m = json.load(f)
    keep = {"manifest.json", ".msa-lock", m["tensors"]["file"], m["documents"]["file"]}
    return sum(os.path.getsize(os.path.join(d, n)) for n in os.listdir(d) if n not in keep)


# ------------------------------------------------------------------ writers (run in forked children)
def kill_trial_writer(model: str, d: str, seed: int, out_fd: int) -> None:
    rng = random.Random(seed)
    out = os.fdopen(out_fd, "w", buffering=1)
    engine = MSAEngine.from_pretrained(model, **ENGINE_ARGS)
    out.write("ready\n")
    for step in range(10 ** 6):
        with engine.edit_saved(d):
            ids = [f"s{seed}-{step}-{i}" for i in range(2)]
            engine.add([f"Document {x} written in trial {seed}, step {step}, about topic {rng.randrange(99)}."
                        for x in ids], ids=ids, progress=False)
        out.write("add " + " ".join(ids) + "\n")
        held = engine.snapshot().ids
        if len(held) > 12:  # delete as many as were added: the memory stays small and trials fast
            victims = rng.sample(held, 2)
            out.write("begin-del " + " ".join(victims) + "\n")
            with engine.edit_saved(d):
                engine.delete(victims, missing_ok=True)
            out.write("del " + " ".join(victims) + "\n")


def rmw_writer(engine: MSAEngine, d: str, name: str, n: int, ack) -> None:
    for i in range(n):
        doc_id = f"{name}-{i}"
        with engine.edit_saved(d):
            engine.add([f"Writer {name} adds document {i}."], ids=[doc_id], progress=False)
        ack(doc_id)


def fork(fn, *args) -> tuple:
    """Run fn(*args, write_fd) in a forked child; returns (pid, read end of its pipe)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        code = 0
        try:
            fn(*args, w)
        except BaseException as e:  # noqa: BLE001 - report and exit, never return into the parent's code
            print(f"writer failed: {type(e).__name__}: {e}", file=sys.stderr)
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    return pid, r


def read_lines(fd: int, buf: bytearray, timeout: float) -> list:
    ready, _, _ = select.select([fd], [], [], timeout)
    if ready:
        chunk = os.read(fd, 65536)
        buf.extend(chunk)
        if not chunk:
            return [None]
    lines = []
    while b"\n" in buf:
        i = buf.index(b"\n")
        lines.append(buf[:i].decode())
        del buf[:i + 1]
    return lines


# ------------------------------------------------------------------ trials
def kill_trials(model: str, n: int, rng: random.Random, checker: MSAEngine, root: str) -> dict:
    d = os.path.join(root, "kill")
    MSAEngine.from_pretrained(model, **ENGINE_ARGS).save(d)
    acked, deleting = set(), set()
    failed_loads, lost, max_orphans, orphans_after = 0, 0, 0, 0
    for t in range(n):
        pid, fd = fork(kill_trial_writer, model, d, 1000 + t)
        buf, ready, deadline = bytearray(), False, None
        while True:
            lines = read_lines(fd, buf, 0.01)
            for line in lines:
                if line is None:
                    raise RuntimeError(f"trial {t}: the writer exited on its own; see its error above")
                kind, _, rest = line.partition(" ")
                if kind == "ready":
                    ready, deadline = True, time.monotonic() + rng.uniform(0.0, 1.5)
                elif kind == "add":
                    acked.update(rest.split())
                elif kind == "begin-del":
                    deleting.update(rest.split())
            if ready and time.monotonic() >= deadline:
                break
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        for line in read_lines(fd, buf, 0.0):  # acks written just before the kill count too
            if line and line.startswith("add "):
                acked.update(line[4:].split())
            elif line and line.startswith("begin-del "):
                deleting.update(line[10:].split())
        os.close(fd)
        max_orphans = max(max_orphans, owned_bytes_beyond_manifest(d))
        try:
            with checker.edit_saved(d):  # load (verified) and save again: the next save cleans
                pass
        except Exception as e:  # noqa: BLE001 - counted, and the trial series goes on
            failed_loads += 1
            print(f"trial {t}: folder does not load: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        held = set(checker.snapshot().ids)
        missing = acked - deleting - held
        lost += len(missing)
        acked -= missing  # count each lost document once
        orphans_after += owned_bytes_beyond_manifest(d)
        if (t + 1) % 10 == 0:
            print(f"kill trials: {t + 1}/{n}, {len(held)} documents held, {len(acked)} acknowledged so far",
                  flush=True)
    return {"kill_trials": n, "kill_folders_failing_to_load": failed_loads, "kill_acked_documents_lost": lost,
            "kill_orphan_bytes_after_next_save": orphans_after, "kill_max_orphan_bytes_before_cleanup": max_orphans,
            "kill_acknowledged_adds": len(acked)}


def two_writer_rounds(model: str, n: int, per_writer: int, engines: list, checker: MSAEngine, root: str) -> dict:
    failed_loads, lost, errors, kinds = 0, 0, 0, {"threads": 0, "processes": 0}
    for r in range(n):
        d = os.path.join(root, f"round-{r}")
        MSAEngine.from_pretrained(model, **ENGINE_ARGS).save(d)  # an empty memory: writers always load it
        acked = []
        kind = "threads" if r % 2 == 0 else "processes"
        kinds[kind] += 1
        if kind == "threads":
            errs = []

            def run(e, name):
                try:
                    rmw_writer(e, d, name, per_writer, acked.append)
                except Exception as exc:  # noqa: BLE001
                    errs.append(exc)

            threads = [threading.Thread(target=run, args=(e, f"r{r}t{i}")) for i, e in enumerate(engines)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            errors += len(errs)
        else:
            def child(name, w):
                out = os.fdopen(w, "w", buffering=1)
                e = MSAEngine.from_pretrained(model, **ENGINE_ARGS)
                rmw_writer(e, d, name, per_writer, lambda x: out.write(x + "\n"))

            procs = [fork(child, f"r{r}p{i}") for i in range(2)]
            for pid, fd in procs:
                buf = bytearray()
                while True:
                    lines = read_lines(fd, buf, 1.0)
                    if None in lines:
                        break
                    acked.extend(lines)
                _, status = os.waitpid(pid, 0)
                errors += status != 0
                os.close(fd)
        try:
            checker.load(d)
        except Exception as e:  # noqa: BLE001
            failed_loads += 1
            print(f"round {r}: folder does not load: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        lost += len(set(acked) - set(checker.snapshot().ids))
    return {"two_writer_rounds": n, "two_writer_rounds_threads": kinds["threads"],
            "two_writer_rounds_processes": kinds["processes"], "two_writer_writes_each": per_writer,
            "two_writer_folders_failing_to_load": failed_loads, "two_writer_acked_documents_lost": lost,
            "two_writer_writer_errors": errors}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a model folder (default: the tiny random Llama of the tests)")
    p.add_argument("--kills", type=int, default=100)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--writes", type=int, default=3, help="read-modify-write adds per writer and round")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the JSON result here too")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # forked writers must not inherit a live OpenMP pool
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="msa-crash-") as root:
        model = args.model
        if model is None:
            from tests.tiny_models import make_tiny_model

            model = make_tiny_model("llama", os.path.join(root, "tiny-llama"))
        checker = MSAEngine.from_pretrained(model, **ENGINE_ARGS)
        result = {"model": "tiny random llama (tests/tiny_models.py)" if args.model is None else args.model}
        result.update(kill_trials(model, args.kills, random.Random(args.seed), checker, root))
        engines = [MSAEngine.from_pretrained(model, **ENGINE_ARGS) for _ in range(2)]
        result.update(two_writer_rounds(model, args.rounds, args.writes, engines, checker, root))
    result["elapsed_s"] = round(time.perf_counter() - t0, 1)
    result["command"] = "python -m benchmarks.crash_concurrency " + " ".join(argv if argv is not None else sys.argv[1:])
    result["all_zero"] = not any(result[k] for k in (
        "kill_folders_failing_to_load", "kill_acked_documents_lost", "kill_orphan_bytes_after_next_save",
        "two_writer_folders_failing_to_load", "two_writer_acked_documents_lost", "two_writer_writer_errors"))
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
