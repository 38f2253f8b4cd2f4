"""Evaluation data loaders: every format becomes one `EvalSet`.

An `EvalSet` is a memory bank (`documents`) plus questions whose `gold_doc_ids` point into that bank.
Both systems of an A/B run (RAG and MSA) receive the same `EvalDoc.memory_text()` strings, so any
difference in the results comes from the system, not from the data preparation.

Formats: HippoRAG (PopQA, HotpotQA / MuSiQue train100, NarrativeQA), the MSA reference benchmark format
(memory = list of strings, questions with `labels` byte-identical to documents), LoCoMo (one memory per
conversation, turns or sessions as documents) and a plain JSONL pair of our own.

The data lives outside the package and is found at a data root: the `data_root=` argument of every loader,
else $MSA_DATASETS, else `../shared/datasets` relative to the current working directory (the layout of
this project's checkouts, run from the repository root). Nothing here reads it at import time.
"""
from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from msa_plugins.errors import DatasetNotFoundError, InvalidArgumentError

DATASETS_ENV_VAR = "MSA_DATASETS"


@dataclass
class EvalDoc:
    id: str
    text: str
    title: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    def memory_text(self) -> str:
        """The string both systems index / encode. Titles carry the entity name (PopQA, HotpotQA)."""
        return f"{self.title}\n{self.text}" if self.title else self.text


@dataclass
class EvalQuestion:
    id: str
    question: str
    answers: list[str]
    gold_doc_ids: list[str]
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalSet:
    name: str
    documents: list[EvalDoc]
    questions: list[EvalQuestion]
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._doc_by_id: dict[str, EvalDoc] = {}
        for doc in self.documents:
            if doc.id in self._doc_by_id:
                raise InvalidArgumentError(f"{self.name}: duplicate document id {doc.id!r}")
            self._doc_by_id[doc.id] = doc
        for q in self.questions:
            missing = [g for g in q.gold_doc_ids if g not in self._doc_by_id]
            if missing:
                raise InvalidArgumentError(f"{self.name}: question {q.id!r} has gold ids not in the memory: {missing[:5]}")

    def doc(self, doc_id: str) -> EvalDoc:
        return self._doc_by_id[doc_id]

    @property
    def doc_ids(self) -> list[str]:
        return [d.id for d in self.documents]

    def memory_texts(self) -> list[str]:
        return [d.memory_text() for d in self.documents]

    def gold_texts(self, question: EvalQuestion) -> list[str]:
        return [self.doc(g).memory_text() for g in question.gold_doc_ids]

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "documents": len(self.documents),
            "questions": len(self.questions),
            "questions_with_gold": sum(1 for q in self.questions if q.gold_doc_ids),
            "memory_chars": sum(len(t) for t in self.memory_texts()),
        }


def default_data_root() -> Path:
    """$MSA_DATASETS, else `../shared/datasets` relative to the current working directory.

    Never derived from this file's location: an installed package has no repository around it."""
    env = os.environ.get(DATASETS_ENV_VAR)
    if env:
        return Path(env).expanduser()
    return (Path.cwd() / ".." / "shared" / "datasets").resolve()


def resolve_data_path(relative: str, data_root: str | os.PathLike | None = None) -> Path:
    root = Path(data_root) if data_root is not None else default_data_root()
    path = root / relative
    if not path.exists():
        raise DatasetNotFoundError(
            f"evaluation data not found: {path}. Point data_root= (msa eval --data-root) or ${DATASETS_ENV_VAR} "
            f"at the folder holding the datasets (hipporag_popqa/, locomo/, ruler_niah/, ...); the default is "
            f"../shared/datasets relative to the current directory, and the package itself ships no data."
        )
    return path


def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
            raise InvalidArgumentError(f"{path} is not valid JSON ({e}); fix or replace the file") from None


def _read_jsonl(path: Path) -> list[Any]:
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except ValueError as e:
                    raise InvalidArgumentError(f"{path}: line {n} is not valid JSON ({e})") from None
    return records


def _read_json_or_jsonl(path: Path) -> list[Any]:
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    data = _read_json(path)
    if not isinstance(data, list):
        raise InvalidArgumentError(f"{path}: expected a JSON list, got {type(data).__name__}")
    return data


# ---------------------------------------------------------------- deterministic subsets

def subset(
    evalset: EvalSet,
    limit: int | None = None,
    seed: int | None = None,
    distractors: int | None = None,
) -> EvalSet:
    """Pick questions and (optionally) shrink the memory, reproducibly.

    limit: keep this many questions; with seed=None the first ones, else a seeded sample kept in file order
        (the same seed gives the same questions on every machine).
    distractors: None keeps the full corpus (the default: the memory size is part of the benchmark);
        an int keeps the selected questions' gold documents plus that many seeded non-gold documents.
    """
    questions = list(evalset.questions)
    if limit is not None:
        if limit < 0:
            raise InvalidArgumentError(f"limit must be >= 0, got {limit}")
        if seed is None:
            questions = questions[:limit]
        elif limit < len(questions):
            picked = sorted(random.Random(seed).sample(range(len(questions)), limit))
            questions = [questions[i] for i in picked]
    documents = list(evalset.documents)
    if distractors is not None:
        if distractors < 0:
            raise InvalidArgumentError(f"distractors must be >= 0, got {distractors}")
        gold = {g for q in questions for g in q.gold_doc_ids}
        others = [i for i, d in enumerate(documents) if d.id not in gold]
        rng = random.Random(0 if seed is None else seed)
        keep = set(rng.sample(others, min(distractors, len(others))))
        documents = [d for i, d in enumerate(documents) if d.id in gold or i in keep]
    meta = dict(evalset.metadata, limit=limit, seed=seed, distractors=distractors)
    return EvalSet(evalset.name, documents, questions, meta)


# ---------------------------------------------------------------- HippoRAG format

def load_popqa(data_root=None, limit=None, seed=None, distractors=None) -> EvalSet:
    """PopQA (HippoRAG 2 split): the questions' `paragraphs` are the corpus, deduplicated by title+text."""
    records = _read_json(resolve_data_path("hipporag_popqa/popqa.json", data_root))
    documents: list[EvalDoc] = []
    id_by_content: dict[tuple[str, str], str] = {}
    used_ids: set[str] = set()
    questions = []
    for rec in records:
        gold = []
        for para in rec["paragraphs"]:
            key = (para["title"], para["text"])
            if key not in id_by_content:
                # The title is the readable id; a second text under the same title gets a suffix.
                doc_id, n = para["title"], 1
                while doc_id in used_ids:
                    n += 1
                    doc_id = f"{para['title']}#{n}"
                used_ids.add(doc_id)
                id_by_content[key] = doc_id
                documents.append(EvalDoc(doc_id, para["text"], para["title"]))
            if para.get("is_supporting", True) and id_by_content[key] not in gold:
                gold.append(id_by_content[key])
        answers = json.loads(rec["possible_answers"])  # a JSON-encoded string in this file
        questions.append(EvalQuestion(str(rec["id"]), rec["question"], answers, gold,
                                      {"prop": rec.get("prop"), "s_pop": rec.get("s_pop")}))
    return subset(EvalSet("popqa", documents, questions, {"source": "hipporag_popqa"}), limit, seed, distractors)


def load_popqa_test(data_root=None, limit=None, seed=None, distractors=None) -> EvalSet:
    """PopQA's 400 test questions over all 1,475 passages: the questions the shipped router never trained on.

    The shipped router for the default model trains on PopQA's passages and on the train split of its questions
    and early-stops on the dev split (`benchmarks/train_default_router.py`: `split_indices(1000, seed=0)`, 50/10/40
    %). Evaluating it on `popqa` would sample train questions; this keeps the test split only (file order),
    then applies limit/seed/distractors among them."""
    from msa_plugins.trainer import split_indices

    full = load_popqa(data_root)
    if len(full.questions) != 1000:  # the split is of the 1,000-question file the router was trained from
        raise InvalidArgumentError(f"popqa-test needs HippoRAG 2's 1,000-question PopQA file; this one has "
                                   f"{len(full.questions)} questions (use --dataset popqa for it)")
    test = split_indices(len(full.questions), seed=0)[2]
    questions = [full.questions[i] for i in test]
    meta = dict(full.metadata, split="test (split_indices(1000, seed=0)[2], the shipped router's held-out questions)")
    return subset(EvalSet("popqa_test", full.documents, questions, meta), limit, seed, distractors)


def load_hotpotqa_train100(data_root=None, limit=None, seed=None, distractors=None) -> EvalSet:
    """HotpotQA train100 (HippoRAG v1): corpus dict title -> sentences; gold = supporting-fact titles."""
    folder = "hipporag_v1_hotpotqa_train100"
    corpus = _read_json(resolve_data_path(f"{folder}/hotpotqa_train_corpus.json", data_root))
    records = _read_json(resolve_data_path(f"{folder}/hotpotqa_train.json", data_root))
    documents = [EvalDoc(title, "".join(sentences), title) for title, sentences in corpus.items()]
    questions = []
    for rec in records:
        gold = list(dict.fromkeys(title for title, _ in rec["supporting_facts"]))
        questions.append(EvalQuestion(rec["_id"], rec["question"], [rec["answer"]], gold,
                                      {"type": rec.get("type"), "level": rec.get("level")}))
    return subset(EvalSet("hotpotqa_train100", documents, questions, {"source": folder}), limit, seed, distractors)


def load_musique_train100(data_root=None, limit=None, seed=None, distractors=None) -> EvalSet:
    """MuSiQue train100 (HippoRAG v1): corpus list; gold = is_supporting paragraphs matched by title+text."""
    folder = "hipporag_v1_musique_train100"
    corpus = _read_json(resolve_data_path(f"{folder}/musique_train_corpus.json", data_root))
    records = _read_json(resolve_data_path(f"{folder}/musique_train.json", data_root))
    documents, id_by_content = [], {}
    for i, entry in enumerate(corpus):
        doc = EvalDoc(f"musique-{i:05d}", entry["text"], entry["title"])
        documents.append(doc)
        id_by_content.setdefault((entry["title"], entry["text"]), doc.id)
    questions = []
    for rec in records:
        gold = []
        for para in rec["paragraphs"]:
            if not para["is_supporting"]:
                continue
            key = (para["title"], para["paragraph_text"])
            if key not in id_by_content:
                raise InvalidArgumentError(f"MuSiQue question {rec['id']}: supporting paragraph {para['title']!r} not in corpus")
            gold.append(id_by_content[key])
        answers = [rec["answer"], *rec.get("answer_aliases", [])]
        questions.append(EvalQuestion(rec["id"], rec["question"], list(dict.fromkeys(answers)), gold,
                                      {"hops": rec["id"].split("__")[0]}))
    return subset(EvalSet("musique_train100", documents, questions, {"source": folder}), limit, seed, distractors)


def load_narrativeqa(data_root=None, limit=None, seed=None, distractors=None) -> EvalSet:
    """NarrativeQA (HippoRAG 2, 10 documents): no gold passages, so answer metrics only.

    Chunk texts repeat (script boilerplate), so documents are keyed by the corpus `idx`, never by text.
    """
    folder = "hipporag_narrativeqa"
    corpus = _read_json(resolve_data_path(f"{folder}/narrativeqa_dev_10_doc_corpus.json", data_root))
    records = _read_json(resolve_data_path(f"{folder}/narrativeqa_questions.json", data_root))
    documents = [EvalDoc(entry["idx"], entry["text"], entry["title"]) for entry in corpus]
    questions = [EvalQuestion(str(rec["id"]), rec["question"], list(rec["gold_answers"]), []) for rec in records]
    return subset(EvalSet("narrativeqa", documents, questions, {"source": folder, "has_gold_docs": False}),
                  limit, seed, distractors)


# ---------------------------------------------------------------- MSA reference benchmark format

def load_msa_benchmark(path, name: str | None = None, limit=None, seed=None, distractors=None) -> EvalSet:
    """The MSA reference benchmark format: memory = list of document strings; questions are
    {question, labels: [document strings], answer}; labels are byte-identical to memory entries.

    `path` is either one JSON file {"memory": [...], "questions": [...]} or a folder holding
    memory.json(l) and questions.json(l). Identical memory strings share one gold label, so a label
    marks every document with that exact text as gold (the reference loader would collapse them).
    """
    path = Path(path)
    if path.is_dir():
        memory = _read_json_or_jsonl(_first_existing(path, ["memory.json", "memory.jsonl"]))
        raw_questions = _read_json_or_jsonl(_first_existing(path, ["questions.json", "questions.jsonl"]))
    elif path.is_file():
        data = _read_json(path)
        if not isinstance(data, dict) or "memory" not in data or "questions" not in data:
            raise InvalidArgumentError(f"{path}: expected a JSON object with 'memory' and 'questions' lists")
        memory, raw_questions = data["memory"], data["questions"]
    else:
        raise DatasetNotFoundError(f"MSA benchmark not found: {path}")
    documents, ids_by_text = [], {}
    for i, text in enumerate(memory):
        if not isinstance(text, str):
            raise InvalidArgumentError(f"{path}: memory[{i}] is {type(text).__name__}, expected a string")
        documents.append(EvalDoc(f"doc-{i:06d}", text))
        ids_by_text.setdefault(text, []).append(documents[-1].id)
    questions = []
    for i, rec in enumerate(raw_questions):
        gold = []
        for label in rec.get("labels", []):
            if label not in ids_by_text:
                raise InvalidArgumentError(f"{path}: question {i}: a label is not byte-identical to any memory entry: "
                                 f"{label[:80]!r}")
            gold.extend(g for g in ids_by_text[label] if g not in gold)
        answer = rec.get("answer", [])
        answers = [answer] if isinstance(answer, str) else [str(a) for a in answer]
        questions.append(EvalQuestion(str(rec.get("id", i)), rec["question"], answers, gold))
    return subset(EvalSet(name or path.stem, documents, questions, {"source": str(path)}), limit, seed, distractors)


def _first_existing(folder: Path, names: list[str]) -> Path:
    for n in names:
        if (folder / n).exists():
            return folder / n
    raise DatasetNotFoundError(f"{folder}: none of {names} exists")


# ---------------------------------------------------------------- plain JSONL of our own

def load_jsonl(docs_path, questions_path, name: str | None = None, limit=None, seed=None,
               distractors=None) -> EvalSet:
    """docs: one {"text", "id"?, "title"?, "metadata"?} per line (id defaults to the line number);
    questions: one {"question", "answers", "gold_ids"?, "id"?} per line."""
    docs_path, questions_path = Path(docs_path), Path(questions_path)
    for p in (docs_path, questions_path):
        if not p.exists():
            raise DatasetNotFoundError(f"file not found: {p}")
    documents = []
    for i, rec in enumerate(_read_json_or_jsonl(docs_path)):
        if "text" not in rec:
            raise InvalidArgumentError(f"{docs_path}: line {i + 1} has no 'text'")
        documents.append(EvalDoc(str(rec.get("id", i)), rec["text"], rec.get("title", ""), rec.get("metadata", {})))
    questions = []
    for i, rec in enumerate(_read_json_or_jsonl(questions_path)):
        if "question" not in rec:
            raise InvalidArgumentError(f"{questions_path}: line {i + 1} has no 'question'")
        answers = rec.get("answers", [])
        answers = [answers] if isinstance(answers, str) else list(answers)
        questions.append(EvalQuestion(str(rec.get("id", i)), rec["question"], answers,
                                      [str(g) for g in rec.get("gold_ids", [])], rec.get("metadata", {})))
    return subset(EvalSet(name or docs_path.stem, documents, questions, {"source": str(docs_path)}),
                  limit, seed, distractors)


# ---------------------------------------------------------------- LoCoMo

LOCOMO_ADVERSARIAL_CATEGORY = 5


def load_locomo(
    data_root=None,
    granularity: str = "turn",
    categories: Iterable[int] = (1, 2, 3, 4),
    conversations: Iterable[str] | None = None,
    limit=None,
    seed=None,
) -> list[EvalSet]:
    """LoCoMo: one EvalSet per conversation (each conversation is its own memory).

    granularity: "turn" (a document per utterance, id = dia_id "D3:7") or "session" (a document per
    session, id "D3"); every document carries its session date, which temporal questions need.
    categories: category 5 (adversarial, no answer in the memory) is left out by default, as most
    memory papers do. Gold = the documents holding the evidence dia_ids; malformed evidence strings in
    the file ("D:11:26", "D8:6; D9:17", "D30:05") are normalised, unresolved ones kept in metadata.
    limit/seed apply per conversation.
    """
    if granularity not in ("turn", "session"):
        raise InvalidArgumentError(f"granularity must be 'turn' or 'session', got {granularity!r}")
    categories = set(categories)
    wanted = set(conversations) if conversations is not None else None
    samples = _read_json(resolve_data_path("locomo/locomo10.json", data_root))
    evalsets = []
    for sample in samples:
        if wanted is not None and sample["sample_id"] not in wanted:
            continue
        documents, doc_of_dia = _locomo_documents(sample["conversation"], granularity)
        questions = []
        for i, qa in enumerate(sample["qa"]):
            if qa["category"] not in categories:
                continue
            gold, unresolved = [], []
            for dia_id in _normalise_evidence(qa.get("evidence", [])):
                doc_id = doc_of_dia.get(dia_id)
                if doc_id is None:
                    unresolved.append(dia_id)
                elif doc_id not in gold:
                    gold.append(doc_id)
            answer = qa.get("answer")
            meta = {"category": qa["category"], "evidence": qa.get("evidence", [])}
            if unresolved:
                meta["unresolved_evidence"] = unresolved
            if "adversarial_answer" in qa:
                meta["adversarial_answer"] = qa["adversarial_answer"]
            answers = [] if answer is None else [str(answer)]
            questions.append(EvalQuestion(f"{sample['sample_id']}/{i}", qa["question"], answers, gold, meta))
        es = EvalSet(f"locomo/{sample['sample_id']}", documents, questions,
                     {"source": "locomo", "granularity": granularity, "sample_id": sample["sample_id"]})
        evalsets.append(subset(es, limit, seed))
    if wanted is not None and len(evalsets) != len(wanted):
        found = {e.metadata["sample_id"] for e in evalsets}
        raise InvalidArgumentError(f"LoCoMo conversations not found: {sorted(wanted - found)}")
    return evalsets


def _locomo_documents(conversation: dict, granularity: str) -> tuple[list[EvalDoc], dict[str, str]]:
    session_numbers = sorted(int(m.group(1)) for k in conversation if (m := re.fullmatch(r"session_(\d+)", k)))
    documents, doc_of_dia = [], {}
    for n in session_numbers:
        date = conversation.get(f"session_{n}_date_time", "")
        lines = []
        for turn in conversation[f"session_{n}"]:
            line = _locomo_turn_text(turn)
            if granularity == "turn":
                documents.append(EvalDoc(turn["dia_id"], f"[{date}] {line}", "",
                                         {"session": n, "speaker": turn["speaker"], "date_time": date}))
                doc_of_dia[turn["dia_id"]] = turn["dia_id"]
            else:
                lines.append(line)
                doc_of_dia[turn["dia_id"]] = f"D{n}"
        if granularity == "session" and lines:
            documents.append(EvalDoc(f"D{n}", f"Session {n} ({date})\n" + "\n".join(lines), "",
                                     {"session": n, "date_time": date}))
    return documents, doc_of_dia


def _locomo_turn_text(turn: dict) -> str:
    # Same rendering as EverMemOS's LoCoMo loader: images are not released, only their BLIP captions.
    text = turn.get("text", "")
    if turn.get("blip_caption"):
        text = f"[{turn['speaker']} shared an image: {turn['blip_caption']}] {text}".rstrip()
    return f"{turn['speaker']}: {text}"


def _normalise_evidence(evidence: list[str]) -> list[str]:
    out = []
    for item in evidence:
        for piece in re.split(r"[;\s]+", item.strip()):
            m = re.fullmatch(r"D:?(\d+):0*(\d+)", piece)
            if m:
                out.append(f"D{int(m.group(1))}:{int(m.group(2))}")
            elif piece:
                out.append(piece)
    return out


# ---------------------------------------------------------------- registry

HIPPORAG_LOADERS = {
    "popqa": load_popqa,
    "popqa_test": load_popqa_test,
    "hotpotqa_train100": load_hotpotqa_train100,
    "musique_train100": load_musique_train100,
    "narrativeqa": load_narrativeqa,
}


def load_evalset(name: str, **kwargs) -> EvalSet:
    """Load one of the bundled-on-disk single-memory datasets by name (see HIPPORAG_LOADERS)."""
    if name not in HIPPORAG_LOADERS:
        raise InvalidArgumentError(f"unknown dataset {name!r}; known: {sorted(HIPPORAG_LOADERS)} "
                         f"(LoCoMo: load_locomo(), one memory per conversation)")
    return HIPPORAG_LOADERS[name](**kwargs)
