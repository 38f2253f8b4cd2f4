"""RULER-style needle-in-a-haystack (NIAH) generator over the Paul Graham essays, as memory documents.

RULER builds one long prompt per sample; a memory system instead receives a bank of documents. So the
haystack is first cut into documents of about `doc_tokens` tokens and the needle sentences are then
inserted into the documents at the sampled depths. Every document without a needle is byte-identical
across samples of the same haystack and size, so an engine that caches per-document encodings pays for
the haystack once per memory size, not once per sample.

Tasks follow RULER's `synthetic.yaml` (the 8 subtasks the MSA paper averages); semantics re-implemented
from the description in ruler_niah/SOURCE.md, no RULER code copied. The key words come from a small
built-in adjective/noun list instead of the `wonderwords` package (no extra dependency).
Metric: `string_match_all` (fraction of gold values found in the prediction), see metrics.py.
"""
from __future__ import annotations

import random
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from msa_plugins.errors import InvalidArgumentError

from .datasets import EvalDoc, EvalQuestion, EvalSet, resolve_data_path

NOISE_BLOCK = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
RULER_DEPTHS = [100 * i / 39 for i in range(40)]  # 40 evenly spaced depths 0..100 %, as RULER samples


@dataclass(frozen=True)
class NiahTask:
    haystack: str          # "essay" | "noise" | "needle" (distractor needles)
    key_type: str          # "words" | "uuids"
    value_type: str        # "numbers" | "uuids"
    num_keys: int = 1      # needles with distinct keys (only the queried ones are gold)
    num_values: int = 1    # values per key (multi-value)
    num_queries: int = 1   # keys asked about in the one question (multi-query)


RULER_TASKS: dict[str, NiahTask] = {
    "niah_single_1": NiahTask("noise", "words", "numbers"),
    "niah_single_2": NiahTask("essay", "words", "numbers"),
    "niah_single_3": NiahTask("essay", "words", "uuids"),
    "niah_multikey_1": NiahTask("essay", "words", "numbers", num_keys=4),
    "niah_multikey_2": NiahTask("needle", "words", "numbers"),
    "niah_multikey_3": NiahTask("needle", "uuids", "uuids"),
    "niah_multivalue": NiahTask("essay", "words", "numbers", num_values=4),
    "niah_multiquery": NiahTask("essay", "words", "numbers", num_keys=4, num_queries=4),
}
# Short names for the four variant families of the brief / paper (SA, MK, MV, MQ).
VARIANT_ALIASES = {
    "single": "niah_single_2",
    "multikey": "niah_multikey_1",
    "multivalue": "niah_multivalue",
    "multiquery": "niah_multiquery",
}

_ADJECTIVES = (
    "abundant adorable agreeable amused ancient angry anxious bewildered brave bright calm careful cheerful "
    "clever colossal cooperative courageous crooked curious dazzling delightful determined eager elegant "
    "enchanting energetic faithful fancy fierce gentle gigantic glamorous gleaming grumpy handsome helpful "
    "hilarious hollow hungry immense jolly kind lively lonely magnificent mysterious nervous nimble obedient "
    "odd plain polite proud quaint quiet rapid rustic scary shiny silly sleepy smooth sparkling spotless "
    "stormy swift tame tender thoughtful tiny tranquil vast victorious vivacious wandering wide witty zealous"
).split()
_NOUNS = (
    "anchor apple badger balloon banjo barn beacon beetle bicycle blanket bottle bridge bucket butterfly "
    "cabinet camel candle canyon carpet castle cathedral cherry chimney cloud comet compass cottage crayon "
    "dolphin dragon drum eagle engine feather fiddle forest fountain garden giraffe glacier hammer harbor "
    "helmet island jacket kettle kitten ladder lantern lemon lighthouse lobster magnet meadow mirror "
    "mountain needle oasis orchard otter paddle parrot pebble pencil pepper piano pillow planet puzzle "
    "rabbit raincoat river saddle scarecrow seashell spoon squirrel staircase teapot thimble tiger tractor "
    "trumpet tunnel umbrella valley violin volcano wagon walrus whistle window yacht zebra"
).split()

TokenCounter = Callable[[str], int]


def make_token_counter(tokenizer: Any = None) -> TokenCounter:
    """A callable str -> token count: an HF tokenizer (anything with .encode), a callable, or, with
    None, the whitespace word count * 1.3 (a rough English BPE ratio)."""
    if tokenizer is None:
        return lambda text: int(round(len(text.split()) * 1.3))
    if hasattr(tokenizer, "encode"):
        return lambda text: len(tokenizer.encode(text, add_special_tokens=False))
    if callable(tokenizer):
        return tokenizer
    raise TypeError(f"tokenizer must have .encode or be callable, got {type(tokenizer).__name__}")


def load_essay_sentences(data_root=None) -> list[str]:
    """All 49 essays, sorted by file name, whitespace-normalised and split into sentences."""
    folder = resolve_data_path("ruler_niah/PaulGrahamEssays", data_root)
    sentences = []
    for path in sorted(Path(folder).glob("*.txt")):
        text = " ".join(path.read_text(encoding="utf-8").split())
        sentences.extend(s for s in re.split(r"(?<=[.!?])\s+", text) if s)
    if not sentences:
        raise InvalidArgumentError(f"{folder}: no essay text found")
    return sentences


def generate_niah(
    task: str = "single",
    memory_tokens: int = 32_000,
    doc_tokens: int = 512,
    seed: int = 42,
    tokenizer: Any = None,
    data_root=None,
    essay_sentences: list[str] | None = None,
) -> EvalSet:
    """One NIAH sample: a memory of about `memory_tokens` tokens in documents of about `doc_tokens`,
    with the task's needles inserted at seeded depths, and one question.

    task: a RULER subtask name (RULER_TASKS) or a variant alias (single, multikey, multivalue, multiquery).
    The same (task, memory_tokens, doc_tokens, seed, tokenizer) always gives the same EvalSet. The essay
    haystack is repeated when `memory_tokens` exceeds the ~160K tokens of the 49 essays.
    """
    task_name = VARIANT_ALIASES.get(task, task)
    if task_name not in RULER_TASKS:
        raise InvalidArgumentError(f"unknown NIAH task {task!r}; use one of {sorted(RULER_TASKS)} or {sorted(VARIANT_ALIASES)}")
    if memory_tokens < doc_tokens or doc_tokens <= 0:
        raise InvalidArgumentError(f"need 0 < doc_tokens <= memory_tokens, got {doc_tokens} and {memory_tokens}")
    spec = RULER_TASKS[task_name]
    rng = random.Random(f"{task_name}/{memory_tokens}/{doc_tokens}/{seed}")
    count = make_token_counter(tokenizer)

    keys = _distinct(lambda: _make_key(rng, spec.key_type), spec.num_keys)
    value_noun = spec.value_type  # "numbers" / "uuids", as in RULER's sentence
    needles = [(key, _make_value(rng, spec.value_type)) for key in keys for _ in range(spec.num_values)]
    queried = keys[: spec.num_queries]

    units = _haystack_units(spec, rng, count, memory_tokens, keys, data_root, essay_sentences)
    documents_units = _pack_documents(units, doc_tokens)

    # Needle positions: a sampled RULER depth -> the unit at that token fraction of the haystack.
    depths = rng.sample(RULER_DEPTHS, len(needles))
    total_tokens = sum(c for _, c in units)
    boundaries = _cumulative_starts(documents_units)
    gold_docs: list[int] = []
    insertions: dict[int, list[tuple[int, str]]] = {}
    for (key, value), depth in zip(needles, depths):
        target = depth / 100 * total_tokens
        doc_index, unit_index = _locate(boundaries, documents_units, target)
        sentence = f"One of the special magic {value_noun} for {key} is: {value}."
        insertions.setdefault(doc_index, []).append((unit_index, sentence))
        if key in queried and doc_index not in gold_docs:
            gold_docs.append(doc_index)

    documents = []
    for i, doc_units in enumerate(documents_units):
        texts = [t for t, _ in doc_units]
        for unit_index, sentence in sorted(insertions.get(i, []), key=lambda x: -x[0]):
            texts.insert(unit_index, sentence)
        documents.append(EvalDoc(f"niah-{i:06d}", " ".join(texts), "", {"needles": len(insertions.get(i, []))}))

    answers = [value for key, value in needles if key in queried]
    noun = value_noun if len(answers) > 1 else value_noun[:-1]
    query = _join_keys(queried)
    question = f"What are all the special magic {value_noun} for {query} mentioned in the provided text?"
    q_meta = {
        "task": task_name, "memory_tokens": memory_tokens, "depths": depths,
        "answer_prefix": f" The special magic {noun} for {query} mentioned in the provided text are",
    }
    q = EvalQuestion(f"{task_name}/{memory_tokens}/{seed}", question, answers,
                     [documents[i].id for i in sorted(gold_docs)], q_meta)
    meta = {"task": task_name, "memory_tokens": memory_tokens, "doc_tokens": doc_tokens, "seed": seed,
            "haystack_tokens": total_tokens, "counter": "tokenizer" if tokenizer is not None else "words*1.3"}
    return EvalSet(f"niah/{task_name}/{memory_tokens}", documents, [q], meta)


def generate_niah_suite(
    tasks=tuple(RULER_TASKS),
    memory_sizes=(32_000,),
    samples: int = 5,
    doc_tokens: int = 512,
    seed: int = 42,
    tokenizer: Any = None,
    data_root=None,
) -> list[EvalSet]:
    """Every (task, memory size, sample) combination, each its own memory; sample s uses seed + s."""
    sentences = load_essay_sentences(data_root)
    return [
        generate_niah(t, size, doc_tokens, seed + s, tokenizer, data_root, essay_sentences=sentences)
        for t in tasks for size in memory_sizes for s in range(samples)
    ]


# ---------------------------------------------------------------- helpers

def _make_key(rng: random.Random, key_type: str) -> str:
    if key_type == "words":
        return f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"
    if key_type == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise InvalidArgumentError(f"unknown key type {key_type!r}")


def _make_value(rng: random.Random, value_type: str) -> str:
    if value_type == "numbers":
        return str(rng.randint(1_000_000, 9_999_999))
    if value_type == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise InvalidArgumentError(f"unknown value type {value_type!r}")


def _distinct(make: Callable[[], str], n: int, avoid: set[str] = frozenset()) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        item = make()
        if item not in out and item not in avoid:
            out.append(item)
    return out


def _join_keys(keys: list[str]) -> str:
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + f", and {keys[-1]}"


def _haystack_units(spec, rng, count, memory_tokens, keys, data_root, essay_sentences):
    """(text, tokens) units adding up to ~memory_tokens; essays repeat cyclically when too short."""
    if spec.haystack == "essay":
        base = essay_sentences if essay_sentences is not None else load_essay_sentences(data_root)
        base_units = [(s, count(s)) for s in base]
    elif spec.haystack == "noise":
        base_units = [(NOISE_BLOCK, count(NOISE_BLOCK))]
    elif spec.haystack == "needle":
        # Distractor needles with fresh keys/values: one line each, never a queried key.
        base_units = None
    else:
        raise InvalidArgumentError(f"unknown haystack {spec.haystack!r}")
    units, total, i = [], 0, 0
    taken = set(keys)
    while total < memory_tokens:
        if base_units is None:
            key = _distinct(lambda: _make_key(rng, spec.key_type), 1, taken)[0]
            taken.add(key)
            text = f"One of the special magic {spec.value_type} for {key} is: {_make_value(rng, spec.value_type)}."
            unit = (text, count(text))
        else:
            unit = base_units[i % len(base_units)]
        units.append(unit)
        total += unit[1]
        i += 1
    return units


def _pack_documents(units: list[tuple[str, int]], doc_tokens: int) -> list[list[tuple[str, int]]]:
    """Greedy packing of whole sentences into documents of about doc_tokens (never splitting one)."""
    docs, current, size = [], [], 0
    for unit in units:
        if current and size + unit[1] > doc_tokens:
            docs.append(current)
            current, size = [], 0
        current.append(unit)
        size += unit[1]
    if current:
        docs.append(current)
    return docs


def _cumulative_starts(documents_units) -> list[int]:
    starts, total = [], 0
    for doc in documents_units:
        starts.append(total)
        total += sum(c for _, c in doc)
    return starts


def _locate(starts: list[int], documents_units, target_tokens: float) -> tuple[int, int]:
    """(document index, unit index inside it) of the sentence boundary at target_tokens."""
    doc_index = max(i for i, s in enumerate(starts) if s <= target_tokens) if target_tokens > 0 else 0
    position = starts[doc_index]
    for unit_index, (_, c) in enumerate(documents_units[doc_index]):
        if position + c / 2 > target_tokens:
            return doc_index, unit_index
        position += c
    return doc_index, len(documents_units[doc_index])
