"""RULER's question answering (``qa_1``, ``qa_2``): a question over its gold document(s) hidden among
distractor documents from the rest of the dataset, as many as the length holds. Follows NVIDIA/RULER
``scripts/data/synthetic/qa.py`` (``Document i:`` blocks, seeded order) with the instructions of
``scripts/data/synthetic/constants.py`` (``TASKS["qa"]``), reworded.

RULER uses SQuAD (qa_1) and HotpotQA (qa_2); nothing is downloaded unasked, so the user supplies the data:
``--qa-data`` names a folder holding ``qa_1.jsonl`` / ``qa_2.jsonl`` (or ``.json``), or one such file, or
a ``datasets`` dataset as ``hf:NAME[:CONFIG]:SPLIT`` (e.g. ``hf:rajpurkar/squad_v2::validation``,
``hf:hotpotqa/hotpot_qa:distractor:validation``; a local dataset folder works offline).
A record is ``{"context": str}`` or ``{"contexts": [str, ...]}`` with ``"question": str`` and
``"answers": [str, ...]`` (a single string is accepted). Dataset rows may also have the hub's shapes:
SQuAD's ``answers = {"text": [...], ...}`` and HotpotQA's ``context = {"title": [...], "sentences":
[[...], ...]}`` (each paragraph becomes ``title\n`` + its sentences, every paragraph of a question is
gold, as in RULER). Rows without an answer (SQuAD 2.0's unanswerable questions) are left out, as
RULER leaves them out; a dataset with no answerable row is refused."""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path
from typing import ClassVar, NamedTuple

from ...errors import InvalidParameterError
from ...texts import parse_hf_source
from ..prompts import Probe, fit_to_budget
from .base import ProbeTask, TaskInputs, register_task, string_match_part

RULES = "Answer the question from the documents below. Reply with the answer alone, without any other words."
INTRO = f"{RULES}\n\nHere are the documents.\n\n"
QUESTION = "\n\n" + RULES.replace("below", "above") + "\n\nQuestion: {question}"
ANSWER = " Answer:"
RECORD_FORMAT = '{"context": "..." or "contexts": ["...", ...], "question": "...", "answers": ["...", ...]}'
HF_QA_FORMAT = "hf:NAME[:CONFIG]:SPLIT"


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

    def data_file(self, qa_data: str | None) -> Path | str:
        """What this task reads from ``--qa-data``: the file (a folder holding ``<task>.jsonl``, or a file),
        or the ``hf:`` dataset spec as given (its format checked)."""
        how = (
            f"pass --qa-data (EvalSpec.qa_data) a folder holding {self.name}.jsonl or {self.name}.json, or one "
            f"such file, of records {RECORD_FORMAT}, or a datasets dataset as {HF_QA_FORMAT}"
        )
        if not qa_data:
            raise InvalidParameterError(
                f"{self.name} needs a QA dataset, which is not downloaded: {how}. RULER uses {self.dataset}."
            )
        if qa_data.startswith("hf:"):
            parse_hf_qa_source(qa_data)
            return qa_data
        path = Path(qa_data).expanduser()
        if path.is_file():
            return path
        for candidate in (path / f"{self.name}.jsonl", path / f"{self.name}.json"):
            if candidate.is_file():
                return candidate
        raise InvalidParameterError(f"{self.name}: no QA data at {qa_data}; {how}.")

    def make_probe(self, tokenizer, length: int, depth: float | None, seed: int, inputs: TaskInputs) -> Probe:
        source = self.data_file(inputs.qa_data)
        if isinstance(source, str):
            records = load_hf_records(source)
        else:
            records = load_records(str(source), source.stat().st_mtime_ns)
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
    return tuple(_record(path, i, _hub_shape(r) if isinstance(r, dict) else r) for i, r in enumerate(raw))


def parse_hf_qa_source(source: str) -> tuple[str, str | None, str]:
    """``hf:NAME[:CONFIG]:SPLIT`` as ``(name, config, split)``."""
    name, config, split = parse_hf_source(source, ("SPLIT",), flag="--qa-data ")
    return name, config, split


@functools.lru_cache(maxsize=8)
def load_hf_records(source: str) -> tuple[QARecord, ...]:
    """The answerable QA records of a ``datasets`` dataset (``hf:NAME[:CONFIG]:SPLIT``), checked and cached."""
    name, config, split = parse_hf_qa_source(source)
    from datasets import load_dataset

    rows = [_hub_shape(row) for row in load_dataset(name, config, split=split)]
    records = tuple(_record(source, i, row) for i, row in enumerate(rows) if row.get("answers"))
    if not records:
        raise InvalidParameterError(
            f"{source} holds no answerable QA rows; expected columns question, context(s) and answer(s) "
            f"as in {RECORD_FORMAT}, SQuAD or HotpotQA."
        )
    return records


def _hub_shape(row: dict) -> dict:
    """A hub row in this module's record shape: SQuAD's ``answers`` dict and HotpotQA's ``context`` dict
    (columnar titles and sentences) unpacked; other fields as they are."""
    row = dict(row)
    answers = row.get("answers", row.get("answer"))
    if isinstance(answers, dict) and "text" in answers:
        answers = answers["text"]
    row["answers"] = [answers] if isinstance(answers, str) else answers
    row.pop("answer", None)
    context = row.get("context")
    if isinstance(context, dict) and {"title", "sentences"} <= context.keys():  # the hub's columnar form
        context = list(zip(context["title"], context["sentences"], strict=True))
    if isinstance(context, list) and context and all(isinstance(c, list | tuple) and len(c) == 2 for c in context):
        row.pop("context")  # HotpotQA: [[title, [sentence, ...]], ...]
        row["contexts"] = [f"{t}\n{''.join(s)}" for t, s in context]
    return row


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
