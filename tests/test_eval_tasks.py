"""The task registry and its tasks: the frozen passkey/needle/multikey prompts, RULER's synthetic tasks
(answered from the prompt alone, sized, seeded), QA over local data, batched generation, the report's
depth x length tables and heatmaps, and a task added from outside the package."""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections import Counter

import pytest
from conftest import char_tokenizer, tiny_model

import hf_posenc
from hf_posenc.cli import main
from hf_posenc.eval import (
    EvalSpec,
    Probe,
    ProbeTask,
    greedy_continuation,
    greedy_continuations,
    load_texts,
    make_probe,
    markdown_report,
    plot_results,
    run_eval,
    run_retrieval,
)
from hf_posenc.eval.journal import entry_key
from hf_posenc.eval.prompts import build_prompt, split_sentences
from hf_posenc.eval.tasks import base as registry
from hf_posenc.eval.tasks import expand_tasks, get_task, list_groups, list_tasks, register_task
from hf_posenc.eval.tasks.ruler_niah import NOISE

RULER = list(list_groups()["ruler"])
ALL_RULER = list(list_groups()["ruler_all"])


@functools.cache
def two_books() -> str:
    return " ".join(load_texts("kjv")[:2])


def word_tokenizer():
    """One token per whitespace-separated word (all unknown): a tokenizer whose counts are easy to check."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={"<unk>": 0}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


@pytest.fixture(scope="module")
def qa_data(tmp_path_factory) -> str:
    """A folder with qa_1.jsonl (one document per question) and qa_2.json (two per question)."""
    folder = tmp_path_factory.mktemp("qa")
    single = [
        {"context": f"The harbour of Vel{i} holds the ship Aurora-{i * 7}. Gulls circle it.", "question": f"Which ship is in Vel{i}?", "answers": [f"Aurora-{i * 7}"]}  # noqa: E501
        for i in range(30)
    ]  # fmt: skip
    multi = [
        {"contexts": [f"Mira{i} was born in Tal{i}.", f"Tal{i} lies on the river Oss-{i * 3}."], "question": f"On which river was Mira{i} born?", "answer": f"Oss-{i * 3}"}  # noqa: E501
        for i in range(30)
    ]  # fmt: skip
    (folder / "qa_1.jsonl").write_text("\n".join(json.dumps(r) for r in single) + "\n")
    (folder / "qa_2.json").write_text(json.dumps({"data": multi}))
    return str(folder)


def qa_answers(qa_data: str) -> dict[str, str]:
    from hf_posenc.eval.tasks.ruler_qa import load_records

    out = {}
    for name in ("qa_1.jsonl", "qa_2.json"):
        out.update({r.question: r.answers[0] for r in load_records(f"{qa_data}/{name}")})
    return out


# --- solvers: answer a probe from its prompt alone, as a perfect model would ---------------------------


def solve(task: str, prompt: str, qa: dict[str, str] | None = None) -> str:
    if task == "passkey":
        return " " + re.search(r"The pass key is (\d+)", prompt).group(1)
    if task in ("needle", "multikey"):
        key = re.search(r"special magic number for (\w+) mentioned", prompt).group(1)
        return " " + re.search(rf"numbers for {key} is: (\d+)", prompt).group(1)
    if task.startswith("niah"):
        query = re.search(r"Which special magic \w+ for (.+) does the text above mention\?", prompt).group(1)
        keys = re.split(r", and |, ", query)
        values = [v for key in keys for v in re.findall(rf"for {re.escape(key)} is: ([\w-]+)\.", prompt)]
        return " " + ", ".join(values)
    if task == "vt":
        value = re.findall(r"assigned the value (\d+) in the text above", prompt)[-1]
        main_part = prompt[prompt.rindex("Keep track") :]
        held, found = {value}, []
        for name, source in re.findall(r"VAR (\w+) = (?:VAR )?(\w+)", main_part):
            if source in held:
                held.add(name)
                found.append(name)
        return " " + " ".join(found)
    if task == "cwe":
        listing = prompt[prompt.rindex("memorize the most frequent.") :]
        counts = Counter(re.findall(r"\d+\. (\w+)", listing[: listing.index("\nQuestion")]))
        return " " + " ".join(f"{i + 1}. {w}" for i, (w, _) in enumerate(counts.most_common(10)))
    if task == "fwe":
        start = prompt.index("occur most often. ") + len("occur most often. ")
        text = prompt[start : prompt.index("\nQuestion")].split()
        counts = Counter(w for w in text if w != "...")
        return " " + " ".join(w for w, _ in counts.most_common(3))
    if task.startswith("qa"):
        return " " + qa[re.search(r"Question: (.+?) Answer:", prompt).group(1)]
    raise AssertionError(task)


# --- the frozen tasks -----------------------------------------------------------------------------------

#: (task, length, depth, seed, haystack, sha256 of the prompt, answer, token count), recorded before the
#: task registry existed; a resumable run keys its journal on these prompts
GOLDEN = [
    ("passkey", 500, 0.5, 0, "two_books", "13c90d9d21c80ad386e761f7ec0c316644038894ebdb1842a7b0ed8552cc542e", "82690", 492),  # noqa: E501
    ("passkey", 600, 0.1, 3, "two_books", "ec27ccb314467f9f4e214263a54ff24c1aa20445136d57f5e85864631d4842f7", "47421", 600),  # noqa: E501
    ("passkey", 1000, 0.9, 7, "two_books", "051802506a140407cc4def15e418dd707cc76ca0af1824430aa9466fcd3febbc", "71908", 998),  # noqa: E501
    ("passkey", 2048, 0.0, 1, "runner", "9e30db4bda0c8158d7f31e9589a255d9f2e7e62a4f4f9118277b0fe46a47bbb7", "26167", 2048),  # noqa: E501
    ("needle", 500, 0.5, 0, "two_books", "9b8b1c92a72e9527ec58ebace5a6add6813f417e2ead5df828b848b2cfc948f3", "8328439", 494),  # noqa: E501
    ("needle", 600, 0.1, 3, "two_books", "a3a5fabae0bf0ec7754482b2e18fd0d75d601d2c6e6bb378d7c91757a5511fe0", "6554243", 593),  # noqa: E501
    ("needle", 1000, 0.9, 7, "two_books", "01e7666bcce14fd479bc37715d72a094721103fa629039143d83b4b4a82902bc", "3242252", 1000),  # noqa: E501
    ("needle", 2048, 0.0, 1, "runner", "b6cb16833b0b27d52c1521b9cbf9445ffb407fd794457c2059639d4430b8091e", "6777663", 2014),  # noqa: E501
    ("multikey", 500, 0.5, 0, "two_books", "970b9fbcbf2952998ddde67bc864a0dda01c3ed4421a8c9fe318ba4b372e63ca", "2533158", 461),  # noqa: E501
    ("multikey", 600, 0.1, 3, "two_books", "5997253657ffcbae08a425b87a1de6da5aff86dc1e066a73425c8b2e5f5766ce", "4390865", 598),  # noqa: E501
    ("multikey", 1000, 0.9, 7, "two_books", "5796151f1ac898c11fe72bd4328c4d46d26138f2e98e5fead361e378df142db7", "8007211", 978),  # noqa: E501
    ("multikey", 2048, 0.0, 1, "runner", "d2b8c34641db108aefc3d8cff458b9dd67a6ebc19a08cc40804df583e45f1a28", "6443061", 2020),  # noqa: E501
]  # fmt: skip


@pytest.mark.parametrize(("task", "length", "depth", "seed", "haystack", "digest", "answer", "n_tokens"), GOLDEN)
def test_frozen_tasks_build_the_prompts_they_always_built(
    task, length, depth, seed, haystack, digest, answer, n_tokens
):
    """Byte for byte the prompts of hf_posenc before the registry (the haystack as run_eval cuts it for
    retrieval lengths up to 2048, or two books), so journals recorded then are still reused."""
    text = " ".join(load_texts("kjv"))[: 2048 * 8] if haystack == "runner" else two_books()
    probe = make_probe(task, char_tokenizer(), length, depth, seed, text)
    assert (hashlib.sha256(probe.prompt.encode()).hexdigest(), probe.answer, probe.n_tokens) == (
        digest,
        answer,
        n_tokens,
    )
    assert probe.references == (answer,)


def test_frozen_tasks_score_as_before():
    passkey, needle = get_task("passkey"), get_task("needle")
    assert passkey.score(" 68220. Remember", ["68220"]) == 1.0
    assert passkey.score(" the key is 1 68220", ["68220"]) == 0.0  # the first number only
    assert needle.score(" 1234567.", ["1234567"]) == 1.0 and needle.score("123456", ["1234567"]) == 0.0
    # the max_new_tokens of their journal keys when none is given, as before
    assert passkey.new_tokens == needle.new_tokens == get_task("multikey").new_tokens == 12
    assert EvalSpec().max_new_tokens is None


def test_answers_are_journaled_under_the_same_keys():
    """The journal key of an answer is (weights, scheme, backend, max_new_tokens, prompt hash), as before
    batching: an answer recorded one at a time is reused by a batched rerun and the other way round."""
    from hf_posenc.eval import runner

    class Recorder:
        def __init__(self):
            self.fields, self.values = [], {}

        def get(self, fields):
            return self.values.get(entry_key(fields))

        def put(self, fields, value):
            self.fields.append(fields)
            self.values[entry_key(fields)] = value

    model, tok = tiny_model("llama"), char_tokenizer()
    prompts = ["The pass key is 123.", "Tell me", "Once upon a time there"]
    journal = Recorder()
    one = runner._journaled_answers(journal, model, tok, 3, weights="w", scheme="none", attn="eager")
    answers = one(prompts)
    assert journal.fields[0] == {
        "kind": "answer", "weights": "w", "scheme": "none", "attn": "eager", "max_new_tokens": 3,
        "prompt": entry_key({"p": prompts[0]}),
    }  # fmt: skip
    batched = runner._journaled_answers(journal, model, tok, 3, batch_size=2, weights="w", scheme="none", attn="eager")
    assert batched(prompts) == answers and len(journal.fields) == 3  # all reused, nothing generated again


# --- the registry ---------------------------------------------------------------------------------------


def test_registry_lists_every_task_with_aliases_and_groups():
    names = list(list_tasks())
    assert names[:4] == ["ppl", "passkey", "needle", "multikey"]
    assert RULER == [
        "niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2", "niah_multikey_3",
        "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe",
    ]  # fmt: skip
    assert [*RULER, "qa_1", "qa_2"] == ALL_RULER
    assert get_task("variable_tracking") is get_task("vt") and get_task("perplexity").name == "ppl"
    assert expand_tasks(["ppl", "ruler", "cwe", "passkey"]) == ["ppl", *RULER, "passkey"]
    for name in names:  # every task documents itself
        task = get_task(name)
        assert task.summary and task.scoring and task.source, name


def test_unknown_tasks_get_a_did_you_mean():
    with pytest.raises(
        hf_posenc.InvalidParameterError, match=r"Unknown task 'nia_single_1'\. Did you mean 'niah_single_1'"
    ):
        get_task("nia_single_1")
    with pytest.raises(hf_posenc.InvalidParameterError, match=r"Did you mean 'ruler'.*Valid: .*cwe"):
        EvalSpec(tasks=["rulr"])
    with pytest.raises(hf_posenc.InvalidParameterError, match=r"'ppl' is not a retrieval task; choose from passkey"):
        make_probe("ppl", char_tokenizer(), 100, 0.5, 0)


def test_a_task_is_registered_once():
    with pytest.raises(ValueError, match="registered twice"):
        register_task(type("Again", (ProbeTask,), {"name": "vt"}))
    with pytest.raises(ValueError, match="also a task name"):
        register_task(type("Grouped", (ProbeTask,), {"name": "fresh_name", "groups": ("cwe",)}))
    assert "fresh_name" not in list_tasks()


def test_eval_spec_expands_groups_and_checks_qa_data(qa_data):
    assert EvalSpec(tasks=["ppl", "ruler"]).tasks == ["ppl", *RULER]
    with pytest.raises(hf_posenc.InvalidParameterError, match=r"qa_1 needs a QA dataset.*pass --qa-data"):
        EvalSpec(tasks=["qa_1"])
    with pytest.raises(hf_posenc.InvalidParameterError, match=r"qa_2: no QA data at .*qa_2\.jsonl"):
        EvalSpec(tasks=["qa_2"], qa_data=str(qa_data) + "/missing")
    assert EvalSpec(tasks=["ruler_all"], qa_data=qa_data).tasks == ALL_RULER
    with pytest.raises(hf_posenc.InvalidParameterError, match="gen_batch_size must be an integer >= 1"):
        EvalSpec(gen_batch_size=0)


def test_cli_names_bad_tasks_and_missing_qa_data_in_one_line(tmp_path, capsys):
    from test_cli_errors import one_line_error

    argv = ["eval", "tiny:llama", "--lengths", "64", "--out", str(tmp_path), "--no-plots"]
    assert main([*argv, "--tasks", "ppl,niah_singel_2"]) == 2
    assert "Did you mean 'niah_single_2'" in one_line_error(capsys)
    assert main([*argv, "--tasks", "qa_2"]) == 2
    assert "pass --qa-data" in one_line_error(capsys)


# --- every RULER task ------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ALL_RULER)
def test_ruler_tasks_score_an_oracle_1_and_a_wrong_answer_0(task, qa_data):
    tok, qa = char_tokenizer(), qa_answers(qa_data)
    kw = dict(lengths=[1900, 2048], depths=[0.0, 0.5, 1.0], trials=2, haystack_text=two_books(), qa_data=qa_data)
    right = run_retrieval(task, None, tok, answer_fn=lambda p: solve(task, p, qa), **kw)
    wrong = run_retrieval(task, None, tok, answer_fn=lambda p: " nothing here", **kw)
    cells = 3 if get_task(task).has_depth else 1
    assert right.accuracy == [[1.0] * cells] * 2 and right.mean == 1.0
    assert wrong.mean == 0.0 and len(wrong.samples) == 2 * cells * 2
    assert all(s["score"] == 1.0 and s["correct"] for s in right.samples)


@pytest.mark.parametrize("task", ALL_RULER)
def test_ruler_probes_are_seeded(task, qa_data):
    tok = char_tokenizer()

    def probe(seed: int, depth: float = 0.5) -> Probe:
        return make_probe(task, tok, 2048, depth, seed, two_books(), qa_data=qa_data)

    assert probe(3) == probe(3)
    assert probe(3).prompt != probe(4).prompt
    if get_task(task).has_depth:
        assert probe(3, 0.2).prompt != probe(3, 0.8).prompt
        # the same question at every length: a length sweep adds haystack, not other needles
        shorter = make_probe(task, tok, 1500, 0.5, 3, two_books())
        assert shorter.references == probe(3).references and shorter.n_tokens < probe(3).n_tokens


def unit_tokens(task: str, probe: Probe, count) -> int:
    """The tokens of the largest unit the task's prompt grows by (its stated tolerance)."""
    if task in ("niah_single_1", "vt"):
        return count(NOISE)
    if task in ("niah_multikey_2", "niah_multikey_3"):
        return max(count(line) for line in probe.prompt.splitlines() if line.startswith("One of"))
    if task == "cwe":  # one more rare word: 1 list entry below 4096 tokens, 3 above
        return (1 if probe.length < 4096 else 3) * max(count(e) for e in re.findall(r"\d+\. \w+", probe.prompt))
    if task == "fwe":  # one more unit of the Zipf budget adds a few words
        return 4 * count("abcdef")
    if task.startswith("qa"):
        return max(count(doc) for doc in probe.prompt.split("\n\n") if doc.startswith("Document"))
    return max(count(s) for s in split_sentences(two_books()))  # real-text haystacks: one sentence


@pytest.mark.parametrize("task", ALL_RULER)
@pytest.mark.parametrize(("tokenizer", "length"), [("char", 2048), ("word", 700), ("word", 2000)])
def test_ruler_prompts_have_the_requested_length(task, tokenizer, length, qa_data):
    """At most the length, and short of it by less than the unit the prompt grows by (plus its separator)."""
    tok = char_tokenizer() if tokenizer == "char" else word_tokenizer()

    def count(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    probe = make_probe(task, tok, length, 0.5, 1, two_books(), qa_data=qa_data)
    assert probe.n_tokens == count(probe.prompt)
    assert length - unit_tokens(task, probe, count) - 2 < probe.n_tokens <= length


@pytest.mark.parametrize("task", [t for t in RULER if get_task(t).has_depth])
def test_niah_depth_places_the_asked_needle(task):
    tok = char_tokenizer()
    for depth, where in ((0.0, lambda i, n: i < 0.2 * n), (1.0, lambda i, n: i > 0.8 * n)):
        probe = make_probe(task, tok, 2048, depth, 2, two_books())
        first_answer = probe.prompt.index(probe.references[0])
        assert where(first_answer, len(probe.prompt)), (task, depth)


def test_ruler_answers_and_prompt_shapes():
    tok = char_tokenizer()
    multi = make_probe("niah_multivalue", tok, 2048, 0.5, 0, two_books())
    assert len(multi.references) == 4 and multi.prompt.endswith("mentioned in the text above are")
    query = make_probe("niah_multiquery", tok, 2048, 0.5, 0, two_books())
    assert len(query.references) == 4 and ", and " in query.prompt.splitlines()[-1]
    uuid_probe = make_probe("niah_multikey_3", tok, 2048, 0.5, 0, two_books())
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", uuid_probe.answer)
    vt = make_probe("vt", tok, 2048, None, 0, "")
    assert len(vt.references) == 5 and vt.prompt.count("Keep track of the chain(s)") == 2  # with its example
    assert re.search(r"VAR [A-Z]{5} = \d{5}\n", vt.prompt)
    cwe = make_probe("cwe", tok, 2048, None, 0, "")
    assert len(set(cwe.references)) == 10 and cwe.prompt.count("Question:") == 2  # with its example
    fwe = make_probe("fwe", tok, 2048, None, 0, "")
    assert len(fwe.references) == 3 and all(re.fullmatch(r"[a-z]{6}", w) for w in fwe.references)


def test_ruler_scoring_follows_ruler():
    """string_match_all: the fraction of references found; string_match_part: any (case-insensitive)."""
    multi, qa = get_task("niah_multivalue"), get_task("qa_1")
    assert multi.score(" 111, 222 and 333", ["111", "222", "333", "444"]) == 0.75
    assert get_task("vt").score(" abcde FGHIJ", ["ABCDE", "FGHIJ"]) == 1.0
    assert qa.score(" It is the Aurora-7.", ["the ship", "aurora-7"]) == 1.0
    assert qa.score(" no idea", ["Aurora-7"]) == 0.0


def test_tasks_refuse_what_they_cannot_build(tmp_path):
    tok = char_tokenizer()
    with pytest.raises(hf_posenc.InvalidParameterError, match="niah_single_2 needs a real-text haystack"):
        make_probe("niah_single_2", tok, 2048, 0.5, 0)
    with pytest.raises(hf_posenc.InvalidParameterError, match=r"A cwe prompt of 800 tokens is too short.*at least"):
        make_probe("cwe", tok, 800, None, 0)
    with pytest.raises(hf_posenc.InvalidParameterError, match="qa_1 needs a QA dataset"):
        make_probe("qa_1", tok, 2048, None, 0)
    bad = tmp_path / "qa_1.jsonl"
    bad.write_text('{"question": "Q?", "answers": ["A"]}\n')
    with pytest.raises(hf_posenc.InvalidParameterError, match=r"record 0: expected .*contexts"):
        make_probe("qa_1", tok, 2048, None, 0, qa_data=str(tmp_path))


def test_qa_reads_a_file_or_a_folder_and_hides_the_gold_documents(qa_data):
    tok = char_tokenizer()
    folder = make_probe("qa_2", tok, 2048, None, 5, qa_data=qa_data)
    file = make_probe("qa_2", tok, 2048, None, 5, qa_data=f"{qa_data}/qa_2.json")
    assert folder == file
    question = re.search(r"Question: (.+?) Answer:", folder.prompt).group(1)
    i = re.search(r"Mira(\d+)", question).group(1)
    assert f"Mira{i} was born in Tal{i}." in folder.prompt and f"Tal{i} lies on the river" in folder.prompt
    assert folder.prompt.count("Document ") > 10  # and many distractors


def test_qa_reads_datasets_in_squad_and_hotpotqa_shapes(tmp_path):
    """``--qa-data hf:...``: SQuAD rows (answers as a dict; unanswerable SQuAD 2.0 rows left out) and
    HotpotQA rows (columnar title/sentences context, every paragraph gold) from local dataset folders."""
    from hf_posenc.eval.tasks.ruler_qa import load_hf_records

    squad, hotpot = tmp_path / "squad", tmp_path / "hotpot"
    squad.mkdir(), hotpot.mkdir()
    rows = [
        {"context": f"The harbour of Vel{i} holds the ship Aurora-{i}.", "question": f"Which ship is in Vel{i}?",
         "answers": {"text": [f"Aurora-{i}", f"the Aurora-{i}"] if i else [], "answer_start": [0, 0] if i else []}}
        for i in range(12)
    ]  # fmt: skip
    (squad / "validation.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    rows = [
        {"question": f"On which river was Mira{i} born?", "answer": f"Oss-{i}",
         "context": {"title": [f"Mira{i}", f"Tal{i}"], "sentences": [[f"Mira{i} was ", f"born in Tal{i}."], [f"Tal{i} lies on Oss-{i}."]]}}  # noqa: E501
        for i in range(12)
    ]  # fmt: skip
    (hotpot / "validation.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    records = load_hf_records(f"hf:{squad}:validation")
    assert len(records) == 11 and records[0].answers == ("Aurora-1", "the Aurora-1")  # row 0 unanswerable
    assert records[0].contexts == ("The harbour of Vel1 holds the ship Aurora-1.",)
    assert load_hf_records(f"hf:{hotpot}::validation")[3].contexts == (
        "Mira3\nMira3 was born in Tal3.",
        "Tal3\nTal3 lies on Oss-3.",
    )
    tok = char_tokenizer()
    probe = make_probe("qa_2", tok, 2048, None, 4, qa_data=f"hf:{hotpot}:validation")
    i = re.search(r"Mira(\d+)", re.search(r"Question: (.+?) Answer:", probe.prompt).group(1)).group(1)
    assert "Document" in probe.prompt and f"Tal{i}\nTal{i} lies on Oss-{i}." in probe.prompt
    assert probe.references == (f"Oss-{i}",) and get_task("qa_2").score(f" Oss-{i}", probe.references) == 1.0
    assert EvalSpec(tasks=["qa_1"], qa_data=f"hf:{squad}:validation").qa_data.startswith("hf:")
    with pytest.raises(hf_posenc.InvalidParameterError, match=r"Expected --qa-data hf:NAME\[:CONFIG\]:SPLIT"):
        EvalSpec(tasks=["qa_1"], qa_data="hf:only-a-name")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "train.jsonl").write_text(json.dumps({"question": "Q?", "context": "c"}) + "\n")
    with pytest.raises(hf_posenc.InvalidParameterError, match="holds no answerable QA rows"):
        make_probe("qa_1", tok, 2048, None, 0, qa_data=f"hf:{tmp_path / 'empty'}:train")


# --- batched generation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "scheme"), [("llama", None), ("gpt2", None), ("llama", "yarn")])
def test_batched_greedy_answers_equal_unbatched(family, scheme):
    """Left padding with an attention mask: each row keeps its own positions (GPT-2's learned table would
    notice a shift), so a batch answers exactly as one prompt at a time."""
    model, tok = tiny_model(family, initializer_range=0.2), char_tokenizer()
    if scheme:
        hf_posenc.patch(model, scheme, factor=2.0)
    prompts = ["The pass key is 4242. What is it?", "Hi", "A longer prompt, about keys and values: 77", "x y z"]
    one = [greedy_continuation(model, tok, p, 6) for p in prompts]
    assert greedy_continuations(model, tok, prompts, 6) == one
    assert len({len(tok(p)["input_ids"]) for p in prompts}) == 4  # really padded


def test_run_retrieval_batches_probes_without_changing_answers():
    model, tok = tiny_model("llama"), char_tokenizer()
    kw = dict(lengths=[300, 340], depths=[0.2, 0.8], trials=2, max_new_tokens=3)
    one = run_retrieval("passkey", model, tok, **kw)
    three = run_retrieval("passkey", model, tok, gen_batch_size=3, **kw)
    assert three.samples == one.samples and three.accuracy == one.accuracy


def test_probes_are_built_once_for_every_scheme(monkeypatch):
    """Prompts at long lengths take seconds to fit: run_eval builds each once and asks every scheme."""
    passkey, built = type(get_task("passkey")), []
    real = passkey.make_probe
    monkeypatch.setattr(passkey, "make_probe", lambda self, *a: built.append(a[1:4]) or real(self, *a))
    spec = EvalSpec(
        schemes=["none", "linear:factor=2"], tasks=["passkey"], lengths=[64], retrieval_lengths=[300, 340],
        depths=[0.5], trials=2, max_new_tokens=1,
    )  # fmt: skip
    output = run_eval(tiny_model("llama"), char_tokenizer(), spec, progress=False, log=lambda *_: None)
    assert sorted(built) == [(300, 0.5, 0), (300, 0.5, 1), (340, 0.5, 0), (340, 0.5, 1)]
    assert [s["n_tokens"] for s in output["results"]["linear:factor=2"]["passkey"]["samples"]] == [
        s["n_tokens"] for s in output["results"]["none"]["passkey"]["samples"]
    ]


# --- report and plots -----------------------------------------------------------------------------------


def test_report_gives_heatmap_cells_and_the_ruler_average(tmp_path):
    model, tok = tiny_model("llama"), char_tokenizer()
    spec = EvalSpec(
        tasks=["niah_single_1", "vt"],
        lengths=[64],
        retrieval_lengths=[1050, 1100],
        depths=[0.0, 1.0],
        trials=2,
        max_new_tokens=2,
        gen_batch_size=4,
    )
    output = run_eval(model, tok, spec, progress=False, log=lambda *_: None)
    result = output["results"]["none"]
    assert result["vt"]["depths"] == [None] and len(result["vt"]["samples"]) == 4
    assert result["niah_single_1"]["trials"] == 2 and len(result["niah_single_1"]["samples"]) == 8
    # the tiny model answers nothing right; give it a known score to check the tables
    result["niah_single_1"]["accuracy"] = [[0.5, 1.0], [0.0, 0.5]]
    report = markdown_report(output)
    assert "niah_single_1 accuracy (mean over depths [0.0, 1.0])" in report
    assert "| depth | 1050 | 1100 |" in report and "| 0 | 1/2 | 0/2 |" in report and "| 1 | 2/2 | 1/2 |" in report
    assert "vt accuracy (2 probe(s) per length; string_match_all)" in report
    assert "RULER average over 2 tasks (niah_single_1, vt)" in report
    assert "| none | 0.38 | 0.12 |" in report  # (0.75 + 0) / 2, (0.25 + 0) / 2
    assert "| 1050 | 0.75 | 0.00 | 0.38 |" in report  # per task, then the average
    assert "RULER (all tasks)" not in report  # the same tasks: not repeated
    written = {p.name for p in plot_results(output, tmp_path)}
    assert written == {"niah_single_1_heatmap.png"}  # vt has no depth


def test_cli_runs_the_ruler_group(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["eval", "tiny:llama", "--tasks", "ruler", "--lengths", "64", "--retrieval-lengths", "2048"]
    argv += ["--depths", "0.5", "--max-new-tokens", "2", "--gen-batch-size", "4", "--out", str(out), "--no-plots"]
    assert main(argv) == 0
    report = (out / "report.md").read_text()
    assert f"RULER average over 11 tasks ({', '.join(RULER)})" in report
    results = json.loads((out / "results.json").read_text())
    assert results["spec"]["tasks"] == RULER and results["spec"]["gen_batch_size"] == 4
    assert len((out / "journal.jsonl").read_text().splitlines()) == 11


# --- a task added from outside the package ---------------------------------------------------------------


@pytest.fixture
def echo_task():
    """A task defined in one place (here, a test): it hides a word and asks for it back."""

    class Echo(ProbeTask):
        name = "echo_word"
        aliases = ("echo",)
        summary, scoring, source = "Repeat a hidden word", "string_match_all", "this test"

        def make_probe(self, tokenizer, length, depth, seed, inputs):
            word = ["alpha", "bravo", "charlie"][seed % 3]
            prompt, n = build_prompt(
                tokenizer, length, depth, [NOISE], [(depth, f"The word is {word}.")], "Remember.", "The word is"
            )
            return Probe(self.name, prompt, word, length, depth, n)

    register_task(Echo)
    yield Echo
    del registry._TASKS["echo_word"], registry._ALIASES["echo"]


def test_a_new_task_runs_reports_and_plots_from_its_registration(echo_task, tmp_path):
    spec = EvalSpec(tasks=["echo"], lengths=[64], retrieval_lengths=[200], depths=[0.5], max_new_tokens=2)
    output = run_eval(tiny_model("llama"), char_tokenizer(), spec, progress=False, log=lambda *_: None)
    assert output["results"]["none"]["echo_word"]["samples"][0]["answer"] == "alpha"
    assert "echo_word accuracy (mean over depths [0.5])" in markdown_report(output)
    assert [p.name for p in plot_results(output, tmp_path)] == ["echo_word_heatmap.png"]


def test_report_and_plots_take_rows_that_ran_different_tasks(tmp_path):
    """Results merged from several runs: a row without a task is left out of that task's sections."""
    model, tok = tiny_model("llama"), char_tokenizer()
    spec = EvalSpec(tasks=["ppl", "niah_single_1", "vt"], lengths=[64], retrieval_lengths=[1050], depths=[0.5])
    output = run_eval(model, tok, spec, progress=False, log=lambda *_: None)
    full = output["results"]["none"]
    output["results"] = {"ppl only": {"ppl": full["ppl"]}, "all": full}
    report = markdown_report(output)
    assert "| ppl only |" in report.split("niah_single_1 accuracy")[0]  # in the perplexity table
    assert "| ppl only |" not in report.split("niah_single_1 accuracy")[1]  # and nowhere after it
    assert "RULER average over 2 tasks" in report and "| all |" in report
    assert {p.name for p in plot_results(output, tmp_path)} >= {"niah_single_1_heatmap.png"}
