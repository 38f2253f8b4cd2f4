"""Per-system answer quality split by retrieval and prompt, and the length of what the generator reads.

    python docs/results/ab/prompt_analysis.py RUN_DIR [RUN_DIR ...]

For each run folder (records.jsonl of `msa eval`): answer_contains overall and on the questions where BOTH
rag-minilm and msa put a gold document at rank 1 (hit@1; retrieval then equal at the top), median context
characters, median rank-1 document characters, median prompt tokens; then paired answer_contains wins
for every pair of systems.
"""
import json
import statistics
import sys
from collections import defaultdict


def load(run):
    with open(f"{run}/records.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def main(runs):
    for run in runs:
        recs = load(run)
        by = defaultdict(dict)
        for r in recs:
            by[r["system"]][r["question_id"]] = r
        systems = list(by)
        hit1 = lambda r: bool(r["retrieved"]) and r["retrieved"][0]["doc_id"] in r["gold_doc_ids"]  # noqa: E731
        both = [q for q in by.get("rag-minilm", {}) if q in by.get("msa", {})
                and hit1(by["rag-minilm"][q]) and hit1(by["msa"][q])]
        same = sum(by["rag-minilm"][q]["retrieved"][0]["doc_id"] == by["msa"][q]["retrieved"][0]["doc_id"] for q in both)
        print(f"\n{run}: {len(next(iter(by.values())))} questions; both rag-minilm and msa gold at rank 1: "
              f"{len(both)} (the same rank-1 document in {same})")
        print("| system | answer_contains | on both-rank-1 | context chars (median) | rank-1 doc chars (median) "
              "| prompt tokens (median) |")
        print("|---|---|---|---|---|---|")
        for s in systems:
            rs = list(by[s].values())
            ac = statistics.mean(r["scores"]["answer_contains"] for r in rs)
            acb = statistics.mean(by[s][q]["scores"]["answer_contains"] for q in both) if both else float("nan")
            cc = statistics.median(sum(len(c["text"]) for c in r["retrieved"]) for r in rs)
            r1 = statistics.median(len(r["retrieved"][0]["text"]) for r in rs if r["retrieved"])
            pt = statistics.median(r["tokens"].get("prompt_tokens", 0) for r in rs)
            print(f"| {s} | {ac:.3f} | {acb:.3f} | {cc:.0f} | {r1:.0f} | {pt:.0f} |")
        print("paired answer_contains (same question): A right & B wrong / B right & A wrong")
        for i, a in enumerate(systems):
            for b in systems[i + 1:]:
                qs = [q for q in by[a] if q in by[b]]
                aw = sum(by[a][q]["scores"]["answer_contains"] > by[b][q]["scores"]["answer_contains"] for q in qs)
                bw = sum(by[b][q]["scores"]["answer_contains"] > by[a][q]["scores"]["answer_contains"] for q in qs)
                print(f"  {a} vs {b}: {aw} / {bw}")


if __name__ == "__main__":
    main(sys.argv[1:])
