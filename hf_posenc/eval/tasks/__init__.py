"""Evaluation tasks, one module per family; importing this package registers every task.

The built-in families load first, in the order of ``BUILTIN`` (the order of ``list_tasks()``); any other
module placed in this package is imported after them, so a new task is one new file (plus its test):
see docs/eval_tasks.md."""

import importlib
import pkgutil

from .base import (
    EvalContext,
    ProbeTask,
    Task,
    TaskInputs,
    expand_tasks,
    get_task,
    is_task,
    list_groups,
    list_tasks,
    register_task,
    string_match_all,
    string_match_part,
)

BUILTIN = ("ppl", "needles", "ruler_niah", "ruler_vt", "ruler_words", "ruler_qa")
for _name in (*BUILTIN, *sorted(m.name for m in pkgutil.iter_modules(__path__))):
    importlib.import_module(f"{__name__}.{_name}")

__all__ = [
    "BUILTIN",
    "EvalContext",
    "ProbeTask",
    "Task",
    "TaskInputs",
    "expand_tasks",
    "get_task",
    "is_task",
    "list_groups",
    "list_tasks",
    "register_task",
    "string_match_all",
    "string_match_part",
]
