"""The task registry: a task is one object that knows how to check and run itself inside
:func:`~hf_posenc.eval.run_eval`, and how to report and plot its results. :class:`ProbeTask` is the base
of every retrieval task (build a prompt for a length, depth and seed; score a generated answer).

Register a task with :func:`register_task` (a class decorator); the runner, the report, the plots and
the CLI find it by name, alias or group (``ruler``)."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from ...errors import InvalidParameterError, did_you_mean
from ..prompts import Probe

if TYPE_CHECKING:
    from torch import nn

    from ..journal import Journal
    from ..runner import EvalSpec

#: a batch of prompts -> their generated continuations
AnswerBatch = Callable[[list[str]], list[str]]


@dataclass(frozen=True)
class TaskInputs:
    """What probes are built from besides the tokenizer: real text for the haystacks (the ``--data``
    source) and a folder or file of QA records (``--qa-data``)."""

    haystack: str = ""
    qa_data: str | None = None


@dataclass
class EvalContext:
    """One :func:`run_eval` as a task sees it. ``label`` and ``backend`` name the scheme being run;
    ``answers(max_new_tokens)`` gives the (journaled) answer function, None to generate directly;
    ``window_nll`` scores perplexity windows (None: the model's forward); ``shared`` holds what a task's
    :meth:`Task.check` prepared for its :meth:`Task.run`."""

    model: nn.Module | None
    tokenizer: Any
    spec: EvalSpec
    texts: list[str]
    inputs: TaskInputs
    journal: Journal | None = None
    weights: str | None = None
    progress: bool = True
    label: str = "none"
    backend: str | None = None
    answers: Callable[[int], AnswerBatch] | None = None
    window_nll: Callable[[Any], Any] | None = None
    shared: dict[str, Any] = field(default_factory=dict)

    @property
    def retrieval_lengths(self) -> list[int]:
        return list(self.spec.retrieval_lengths or self.spec.lengths)

    @property
    def engine_fields(self) -> dict[str, str]:
        """Journal fields naming the engine: none for transformers (the keys journals had before engines)."""
        return {} if self.spec.engine == "transformers" else {"engine": self.spec.engine}

    def for_scheme(
        self,
        label: str,
        backend: str | None,
        answers: Callable[[int], AnswerBatch] | None,
        window_nll: Callable[[Any], Any] | None = None,
    ) -> EvalContext:
        return dataclasses.replace(self, label=label, backend=backend, answers=answers, window_nll=window_nll)


class Task:
    """Base of every task. Subclasses set the class attributes and override :meth:`run` (and
    :meth:`check`, :meth:`report_lines`, :meth:`plot` as they need)."""

    #: registry key (also the key of the task's results), other accepted names, groups it belongs to
    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    groups: ClassVar[tuple[str, ...]] = ()
    #: one line each, for docs and ``--help``: what it asks, how it is scored, what it follows
    summary: ClassVar[str] = ""
    scoring: ClassVar[str] = ""
    source: ClassVar[str] = ""
    #: the engines that run it (``--engine``); vllm needs the task to ask only for answers or window NLLs
    engines: ClassVar[tuple[str, ...]] = ("transformers",)

    def validate(self, spec: EvalSpec) -> None:
        """Refuse a spec this task cannot run, before anything is loaded."""

    def check(self, ctx: EvalContext) -> None:
        """Fail before the first scheme runs (a length too short for the prompt, missing data)."""

    def run(self, ctx: EvalContext) -> Any:
        """The task's JSON-ready result for the scheme ``ctx.label`` (the model is patched with it)."""
        raise NotImplementedError

    def report_lines(self, results: dict[str, Any]) -> list[str]:
        """Markdown lines for ``{scheme: this task's result}``."""
        return []

    def plot(self, results: dict[str, Any], out_dir: Path) -> list[Path]:
        """PNG files written for ``{scheme: this task's result}``."""
        return []


class ProbeTask(Task):
    """A retrieval task: seeded prompts of a token length (with a needle depth when ``has_depth``),
    answered by greedy generation and scored against reference strings."""

    engines = ("transformers", "vllm")
    #: whether probes take a depth (0 = start, 1 = end); a task without one is reported per length only
    has_depth: ClassVar[bool] = True
    #: tokens generated per probe when the user gives no --max-new-tokens
    new_tokens: ClassVar[int] = 12
    #: how far below the requested length a prompt may fall (it never exceeds it)
    tolerance: ClassVar[str] = "short of the length by less than one haystack sentence"

    def make_probe(self, tokenizer, length: int, depth: float | None, seed: int, inputs: TaskInputs) -> Probe:
        """The deterministic probe for (length, depth, seed): same arguments, same prompt."""
        raise NotImplementedError

    def score(self, generated: str, references: Sequence[str]) -> float:
        """The score in [0, 1] of ``generated`` against the probe's references."""
        return string_match_all(generated, references)

    def probe_depths(self, depths: Sequence[float]) -> list[float | None]:
        return list(depths) if self.has_depth else [None]

    def check(self, ctx: EvalContext) -> None:
        cache = ctx.shared.setdefault(f"probes:{self.name}", {})
        length, seed = min(ctx.retrieval_lengths), ctx.spec.seed
        for depth in self.probe_depths(ctx.spec.depths):
            cache[length, depth, seed] = self.make_probe(ctx.tokenizer, length, depth, seed, ctx.inputs)

    def run(self, ctx: EvalContext) -> dict:
        from ..retrieval import run_retrieval

        max_new_tokens = ctx.spec.max_new_tokens or self.new_tokens
        return run_retrieval(
            self.name,
            ctx.model,
            ctx.tokenizer,
            ctx.retrieval_lengths,
            ctx.spec.depths,
            trials=ctx.spec.trials,
            seed=ctx.spec.seed,
            haystack_text=ctx.inputs.haystack,
            qa_data=ctx.inputs.qa_data,
            max_new_tokens=max_new_tokens,
            progress=ctx.progress,
            answer_batch=ctx.answers(max_new_tokens) if ctx.answers is not None else None,
            # vLLM answers all the probes of a task in one batch
            gen_batch_size=ctx.spec.gen_batch_size if ctx.spec.engine == "transformers" else sys.maxsize,
            probe_cache=ctx.shared.setdefault(f"probes:{self.name}", {}),  # built once, asked of every scheme
        ).to_dict()

    def report_lines(self, results: dict[str, Any]) -> list[str]:
        from ..report import accuracy_lines, heatmap_lines

        lines = accuracy_lines(self.name, results, self.scoring)
        for scheme, result in results.items():
            lines += heatmap_lines(self.name, scheme, result)
        return lines

    def plot(self, results: dict[str, Any], out_dir: Path) -> list[Path]:
        from ..report import plot_heatmap

        return plot_heatmap(self.name, results, out_dir)


def string_match_all(generated: str, references: Sequence[str]) -> float:
    """RULER's ``string_match_all``: the fraction of the references found in the output (case-insensitive)."""
    text = generated.lower()
    return sum(r.lower() in text for r in references) / len(references)


def string_match_part(generated: str, references: Sequence[str]) -> float:
    """RULER's ``string_match_part``: 1 if any reference is found in the output (case-insensitive)."""
    text = generated.lower()
    return float(any(r.lower() in text for r in references))


_TASKS: dict[str, Task] = {}
_ALIASES: dict[str, str] = {}
_GROUPS: dict[str, list[str]] = {}

T = TypeVar("T", bound=type[Task])


def register_task(cls: T) -> T:
    """Class decorator: register one instance of ``cls`` under its name, aliases and groups."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    taken = {*_TASKS, *_ALIASES, *_GROUPS}
    for key in (cls.name, *cls.aliases):
        if key in taken:
            raise ValueError(f"task name {key!r} registered twice")
    for group in cls.groups:
        if group in _TASKS or group in _ALIASES or group in (cls.name, *cls.aliases):
            raise ValueError(f"task group {group!r} is also a task name")
    _TASKS[cls.name] = cls()
    for alias in cls.aliases:
        _ALIASES[alias] = cls.name
    for group in cls.groups:
        _GROUPS.setdefault(group, []).append(cls.name)
    return cls


def _unknown(name: str) -> InvalidParameterError:
    return InvalidParameterError(f"Unknown task {name!r}." + did_you_mean(name, [*_TASKS, *_ALIASES, *_GROUPS]))


def get_task(name: str) -> Task:
    """The task registered under ``name`` or an alias of it (did-you-mean error otherwise)."""
    key = _ALIASES.get(name, name)
    if key not in _TASKS:
        raise _unknown(name)
    return _TASKS[key]


def is_task(name: str) -> bool:
    """Whether ``name`` is a registered task name (not an alias)."""
    return name in _TASKS


def list_tasks() -> dict[str, tuple[str, ...]]:
    """Registered task names (in registration order) mapped to their aliases."""
    return {name: type(task).aliases for name, task in _TASKS.items()}


def list_groups() -> dict[str, tuple[str, ...]]:
    """Group names mapped to their tasks (``ruler``: RULER's synthetic tasks)."""
    return {group: tuple(names) for group, names in _GROUPS.items()}


def expand_tasks(names: Sequence[str]) -> list[str]:
    """Task names, aliases and groups -> registered task names, groups expanded, each once, in order."""
    out: list[str] = []
    for name in filter(None, (n.strip() for n in names)):
        members = _GROUPS.get(name) or [get_task(name).name]
        out += [m for m in members if m not in out]
    return out
