"""One folder per run: what was asked, what came back, and how the systems compare.

Files: records.jsonl (one line per question and system), summary.json, report.md (the systems side by
side, the first system being the baseline A, with the ratio of every other system to it per metric),
command.txt, and PNG charts (matplotlib Agg, no display): metrics.png, latency.png, recall_curve.png
and, for NIAH runs, niah.png.
"""
from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

# Rows of the Markdown table, in this order when present; anything else follows alphabetically.
_METRIC_ORDER = [*(f"{m}@{k}" for m in ("recall", "hit", "all") for k in (1, 2, 3, 5, 10, 20)), "mrr",
                 "answer_contains", "string_presence_words", "ragas_string_presence", "token_f1", "string_match_all",
                 "judge_score"]


def current_command() -> str:
    """The exact command line of this process, shell-quoted so it can be pasted back."""
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def write_report(out_dir, records: list[dict[str, Any]], summary: dict[str, Any], command: str | None = None) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = dict(summary, command=command or current_command(),
                   created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    with open(out / "records.jsonl", "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False, default=str) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
    (out / "command.txt").write_text(summary["command"] + "\n", encoding="utf-8")
    (out / "report.md").write_text(markdown_report(summary), encoding="utf-8")
    write_charts(out, summary)
    return out


def _metric_names(systems: dict[str, Any]) -> list[str]:
    names = {m for s in systems.values() for m in s["metrics"]}
    return [m for m in _METRIC_ORDER if m in names] + sorted(names - set(_METRIC_ORDER))


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _ratio(b: float | None, a: float | None) -> str:
    if a is None or b is None or a == 0:
        return "–"
    return f"{b / a:.2f}"


def _table(systems: dict[str, Any], names: list[str], key: str = "metrics", timings: bool = True) -> list[str]:
    """The systems side by side (the first is the baseline A), one row per metric of `key`, then latency,
    ingest and memory rows when `timings`."""
    header = ["metric", *[f"`{n}`" for n in names], *[f"`{n}`/A" for n in names[1:]]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for metric in _metric_names({n: {"metrics": systems[n].get(key) or {}} for n in names}):
        values = [(systems[n].get(key) or {}).get(metric) for n in names]
        lines.append("| " + " | ".join([metric, *map(_fmt, values), *[_ratio(v, values[0]) for v in values[1:]]]) + " |")
    if not timings:
        return lines
    for lat in ("median_s", "p95_s"):
        values = [systems[n]["latency"].get(lat) for n in names]
        lines.append("| " + " | ".join([f"latency {lat}", *[_fmt(v, 4) for v in values],
                                         *[_ratio(v, values[0]) for v in values[1:]]]) + " |")
    extra_keys = list(dict.fromkeys(k for n in names for k in systems[n].get("extra", {})))
    for extra in extra_keys:  # latency breakdown, ingest and memory (run_eval adds these)
        values = [systems[n].get("extra", {}).get(extra) for n in names]
        digits = 0 if extra.endswith(("bytes", "tokens", "tokens_per_s", "hits")) else 4
        lines.append("| " + " | ".join([extra, *[_fmt(v, digits) if v is not None else "–" for v in values],
                                         *[_ratio(v, values[0]) for v in values[1:]]]) + " |")
    counts = [f"{systems[n]['questions']} ({systems[n]['errors']} errors)" for n in names]
    lines.append("| " + " | ".join(["questions", *counts, *["" for _ in names[1:]]]) + " |")
    return lines


def _load(values) -> str:
    return "/".join(f"{v:.2f}" for v in values) if values else "–"


def machine_lines(summary: dict[str, Any]) -> list[str]:
    """The machine the timings were measured on (load averages over 1/5/15 min at start and end) and
    where the MSA memories came from (bank cache)."""
    lines = []
    m = summary.get("machine")
    if m:
        lines.append(f"Machine (timings above were measured under this load): {m.get('cpu_count')} CPUs, "
                     f"load average {_load(m.get('load_avg_start'))} at start, {_load(m.get('load_avg_end'))} at end "
                     f"(1/5/15 min), torch threads {m.get('torch_threads')}, device {m.get('device')}, "
                     f"{m.get('platform')}")
    cache = summary.get("bank_cache")
    if cache:
        if cache.get("dir"):
            lines.append(f"MSA bank cache: {cache.get('hits', 0)} hits (loaded, not encoded), "
                         f"{cache.get('misses', 0)} misses (encoded and stored) in `{cache['dir']}`")
        else:
            lines.append("MSA bank cache: off (every memory encoded)")
    return lines


def markdown_report(summary: dict[str, Any]) -> str:
    systems = summary["systems"]
    names = list(systems)
    baseline = names[0] if names else None
    lines = [f"# {summary.get('kind', 'eval')} run", "", "```", summary.get("command", ""), "```", ""]
    for ds in summary.get("datasets", [])[:20]:
        lines.append(f"- dataset `{ds['name']}`: {ds['questions']} questions, {ds['documents']} documents, "
                     f"{ds['memory_chars']:,} characters of memory")
    if len(summary.get("datasets", [])) > 20:
        lines.append(f"- ... {len(summary['datasets']) - 20} more memories")
    lines += ["", f"Baseline (A) = `{baseline}`; ratio columns = system / A.", ""]
    headline = summary.get("headline_answer_metric")
    if headline and names:
        values = ", ".join(f"`{n}` {_fmt(systems[n]['metrics'].get(headline))}" for n in names)
        clean = ", ".join(f"`{n}` {_fmt((systems[n].get('metrics_answer_not_in_question') or {}).get(headline))}"
                          for n in names)
        lines += [f"**Headline: `{headline}`** (a normalised reference answer appears in the answer as whole words): "
                  f"{values}; on the questions that do not contain their answer: {clean}.", ""]
    lines += _table(systems, names)
    lines += ["", *machine_lines(summary)]
    flagged = {n: systems[n].get("answer_in_question") for n in names}
    n_flagged = max((v or 0 for v in flagged.values()), default=0)
    if any(v is not None for v in flagged.values()) and not n_flagged:
        lines += ["", "No question contains one of its own reference answers (`answer_in_question`: 0)."]
    elif n_flagged:
        n_questions = max(systems[n]["questions"] for n in names)
        lines += ["", f"## Questions that do not contain their answer ({n_questions - n_flagged} of {n_questions}; "
                      f"{n_flagged} flagged `answer_in_question`)", "",
                  "A question whose own text holds a reference answer (normalised, whole words) can be answered by "
                  "copying it; every metric again, without those questions:", ""]
        lines += _table(systems, names, key="metrics_answer_not_in_question", timings=False)
    niah = {n: systems[n].get("niah_accuracy_by_memory_tokens") for n in names if systems[n].get("niah_accuracy_by_memory_tokens")}
    if niah:
        sizes = sorted({int(s) for acc in niah.values() for s in acc})
        lines += ["", "## NIAH accuracy (string_match_all) by memory size", "",
                  "| system | " + " | ".join(f"{s:,}" for s in sizes) + " |", "|---|" + "---|" * len(sizes)]
        for n, acc in niah.items():
            lines.append(f"| `{n}` | " + " | ".join(_fmt(acc.get(str(s))) for s in sizes) + " |")
    lines += ["", "Charts: metrics.png, latency.png, recall_curve.png" + (", niah.png" if niah else ""), ""]
    return "\n".join(lines)


def write_charts(out: Path, summary: dict[str, Any]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    systems = summary["systems"]
    names = list(systems)
    written = []

    # Bars for the 0-1 metrics; hit@k / all@k stay in the table (they echo recall@k) and the 0-5 judge
    # score would squash the others.
    metric_names = [m for m in _metric_names(systems) if not m.startswith(("hit@", "all@")) and m != "judge_score"]
    if metric_names:
        fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(metric_names) * max(1, len(names))), 4.5))
        width = 0.8 / max(1, len(names))
        for i, n in enumerate(names):
            values = [systems[n]["metrics"].get(m) or 0.0 for m in metric_names]
            ax.bar([x + i * width for x in range(len(metric_names))], values, width, label=n)
        ax.set_xticks([x + width * (len(names) - 1) / 2 for x in range(len(metric_names))])
        ax.set_xticklabels(metric_names, rotation=45, ha="right")
        ax.set_ylabel("score (mean over questions)")
        ax.set_ylim(0, 1.05)
        ax.legend()
        written.append(_save(fig, out / "metrics.png"))

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for key, offset in (("median_s", -0.2), ("p95_s", 0.2)):
        ax.bar([i + offset for i in range(len(names))], [systems[n]["latency"].get(key, 0.0) for n in names],
               0.4, label=key)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names)
    ax.set_ylabel("seconds per question")
    ax.legend()
    written.append(_save(fig, out / "latency.png"))

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for n in names:
        curve = systems[n].get("recall_curve") or []
        if curve:
            ax.plot(range(1, len(curve) + 1), curve, marker="o", markersize=3, label=n)
    ax.set_xticks([1, 5, 10, 15, 20])
    ax.set_xlabel("k")
    ax.set_ylabel("recall@k")
    ax.set_ylim(0, 1.02)
    ax.legend()
    written.append(_save(fig, out / "recall_curve.png"))

    niah = {n: systems[n]["niah_accuracy_by_memory_tokens"] for n in names
            if systems[n].get("niah_accuracy_by_memory_tokens")}
    if niah:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for n, acc in niah.items():
            sizes = sorted(int(s) for s in acc)
            ax.plot(sizes, [acc[str(s)] for s in sizes], marker="o", label=n)
        ax.set_xscale("log")
        ax.set_xlabel("memory size (tokens)")
        ax.set_ylabel("NIAH accuracy")
        ax.set_ylim(0, 1.02)
        ax.legend()
        written.append(_save(fig, out / "niah.png"))
    return written


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
