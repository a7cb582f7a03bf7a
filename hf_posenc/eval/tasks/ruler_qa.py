"""RULER's question answering (``qa_1``, ``qa_2``): a question over its gold document(s) hidden among
distractor documents from the rest of the dataset, as many as the length holds. Follows NVIDIA/RULER
``scripts/data/synthetic/qa.py`` (``Document i:`` blocks, seeded order) with the instructions of
``scripts/data/synthetic/constants.py`` (``TASKS["qa"]``), reworded.

RULER uses SQuAD (qa_1) and HotpotQA (qa_2); nothing is downloaded here, so the user supplies the data:
``--qa-data`` names a folder holding ``qa_1.jsonl`` / ``qa_2.jsonl`` (or ``.json``), or one such file.
A record is ``{"context": str}`` or ``{"contexts": [str, ...]}`` with ``"question": str`` and
``"answers": [str, ...]`` (a single string is accepted)."""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path
from typing import ClassVar, NamedTuple

from ...errors import InvalidParameterError
from ..prompts import Probe, fit_to_budget
from .base import ProbeTask, TaskInputs, register_task, string_match_part

RULES = "Answer the question from the documents below. Reply with the answer alone, without any other words."
INTRO = f"{RULES}\n\nHere are the documents.\n\n"
QUESTION = "\n\n" + RULES.replace("below", "above") + "\n\nQuestion: {question}"
ANSWER = " Answer:"
RECORD_FORMAT = '{"context": "..." or "contexts": ["...", ...], "question": "...", "answers": ["...", ...]}'


class QARecord(NamedTuple):
    question: str
    answers: tuple[str, ...]
    contexts: tuple[str, ...]


class QuestionAnswering(ProbeTask):
    groups = ("ruler_all",)  # not in "ruler": it needs the user's data
    has_depth = False
    new_tokens = 32  # RULER's tokens_to_generate for qa
    scoring = "string_match_part: 1 if any reference answer is found in the output"
    tolerance = "short of the length by less than one document"
    #: what RULER asks this task over
    dataset: ClassVar[str] = ""

    def validate(self, spec) -> None:
        self.data_file(spec.qa_data)

    def data_file(self, qa_data: str | None) -> Path:
        """The file this task reads from ``--qa-data`` (a folder holding ``<task>.jsonl``, or a file)."""
        how = (
            f"pass --qa-data (EvalSpec.qa_data) a folder holding {self.name}.jsonl or {self.name}.json, or one "
            f"such file, of records {RECORD_FORMAT}"
        )
        if not qa_data:
            raise InvalidParameterError(
                f"{self.name} needs a QA dataset, which is not downloaded: {how}. RULER uses {self.dataset}."
            )
        path = Path(qa_data).expanduser()
        if path.is_file():
            return path
        for candidate in (path / f"{self.name}.jsonl", path / f"{self.name}.json"):
            if candidate.is_file():
                return candidate
        raise InvalidParameterError(f"{self.name}: no QA data at {qa_data}; {how}.")

    def make_probe(self, tokenizer, length: int, depth: float | None, seed: int, inputs: TaskInputs) -> Probe:
        path = self.data_file(inputs.qa_data)
        records = load_records(str(path), path.stat().st_mtime_ns)
        order = random.Random(f"{self.name}-order").sample(range(len(records)), len(records))
        record = records[order[seed % len(records)]]  # seeds walk through the questions without repeats
        gold = set(record.contexts)
        pool = sorted({c for r in records for c in r.contexts} - gold)
        random.Random(f"{self.name}-{seed}").shuffle(pool)
        question = QUESTION.format(question=record.question) + ANSWER

        def build(k: int) -> str:  # the gold documents and k distractors (the pool repeats, as RULER's)
            docs = list(record.contexts) + [pool[i % len(pool)] for i in range(k)]
            random.Random(f"{self.name}-{seed}-{k}").shuffle(docs)
            body = "\n\n".join(f"Document {i + 1}:\n{doc}" for i, doc in enumerate(docs))
            return INTRO + body + question

        prompt, n, _ = fit_to_budget(
            tokenizer, length, build, task=self.name, limit=None if pool else 0, parts="instructions, question and gold"
        )
        return Probe(self.name, prompt, record.answers[0], length, None, n, record.answers)

    def score(self, generated: str, references) -> float:
        return string_match_part(generated, references)


@functools.lru_cache(maxsize=8)
def load_records(path: str, mtime_ns: int = 0) -> tuple[QARecord, ...]:
    """The QA records of a JSON (a list, or ``{"data": [...]}``) or JSON-lines file, checked (cached per
    path and modification time)."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        if path.endswith(".jsonl"):
            raw = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            raw = json.loads(text)
            raw = raw.get("data", raw) if isinstance(raw, dict) else raw
    except json.JSONDecodeError as exc:
        raise InvalidParameterError(f"{path} is not valid JSON{'L' * path.endswith('.jsonl')}: {exc}.") from exc
    if not isinstance(raw, list) or not raw:
        raise InvalidParameterError(f"{path} holds no QA records; expected a list of {RECORD_FORMAT}.")
    return tuple(_record(path, i, r) for i, r in enumerate(raw))


def _record(path: str, i: int, raw) -> QARecord:
    bad = InvalidParameterError(f"{path}, record {i}: expected {RECORD_FORMAT}, got {str(raw)[:200]}.")
    if not isinstance(raw, dict):
        raise bad
    contexts = raw.get("contexts", raw.get("context"))
    answers = raw.get("answers", raw.get("answer"))
    contexts = [contexts] if isinstance(contexts, str) else contexts
    answers = [answers] if isinstance(answers, str) else answers
    question = raw.get("question")
    valid = isinstance(question, str) and question.strip()
    for values in (contexts, answers):
        valid = valid and isinstance(values, list) and values and all(isinstance(v, str) and v for v in values)
    if not valid:
        raise bad
    return QARecord(question, tuple(answers), tuple(contexts))


@register_task
class QA1(QuestionAnswering):
    name = "qa_1"
    aliases = ("qa_squad",)
    dataset = "SQuAD (single-document questions)"
    summary = "A question answered by one gold document among distractor documents (--qa-data)"
    source = "RULER qa_1 (SQuAD), over the user's QA records"


@register_task
class QA2(QuestionAnswering):
    name = "qa_2"
    aliases = ("qa_hotpotqa",)
    dataset = "HotpotQA (multi-hop questions over two documents)"
    summary = "A multi-hop question over its gold documents among distractor documents (--qa-data)"
    source = "RULER qa_2 (HotpotQA), over the user's QA records"
