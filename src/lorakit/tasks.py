"""The task table: one place that says what each task is.

A *task* names what a model is trained to do: ``sequence-classification`` (text -> one label),
``causal-lm`` (prompt -> answer tokens) or ``image-classification`` (image -> one label). Every module that
needs a fact about a task reads it here: PEFT's ``task_type`` written into ``adapter_config.json``, the metric
a report ranks by and its direction, the Hugging Face Auto class that loads the model, and the dataset kinds
(`lorakit.data.KINDS`) a task can train on. ``base`` is the model without a task head: it can be loaded and
inspected, not trained.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError


@dataclass(frozen=True)
class Metric:
    """The metric a task is judged by: its key in an evaluation's metrics and its direction."""

    name: str  # key in `lorakit.evaluate.evaluate`'s result
    higher_is_better: bool

    def better(self, a: float, b: float) -> bool:
        """Whether ``a`` is strictly better than ``b``."""
        return a > b if self.higher_is_better else a < b

    def worse_by(self, a: float, b: float) -> float:
        """How much worse ``a`` is than ``b`` (negative: better)."""
        return b - a if self.higher_is_better else a - b


@dataclass(frozen=True)
class Task:
    """One row of the task table."""

    name: str
    peft_task_type: str | None  # PEFT's ``task_type`` (None: PEFT has no type for it, e.g. image classification)
    metric: Metric  # what reports rank by
    auto_class: str  # transformers Auto class that loads a model for the task
    data_kinds: tuple[str, ...]  # `lorakit.data.KINDS` the task trains on
    classification: bool  # a head with ``num_labels`` outputs, loss over rows (else: loss over answer tokens)


ACCURACY = Metric("accuracy", True)
ANSWER_LOSS = Metric("loss", False)  # mean cross-entropy over answer tokens

#: trainable tasks, by name
TASKS: dict[str, Task] = {
    "sequence-classification": Task("sequence-classification", "SEQ_CLS", ACCURACY,
                                    "AutoModelForSequenceClassification", ("text-classification",), True),
    "causal-lm": Task("causal-lm", "CAUSAL_LM", ANSWER_LOSS, "AutoModelForCausalLM",
                      ("prompt-completion", "chat"), False),
    "image-classification": Task("image-classification", None, ACCURACY, "AutoModelForImageClassification",
                                 ("image-classification",), True),
}
#: the model without a task head (load, inspect, target) — not trainable
BASE = "base"
BASE_AUTO_CLASS = "AutoModel"
#: every task a model can be loaded for: ``base`` and the trainable ones
MODEL_TASKS: tuple[str, ...] = (BASE, *TASKS)


def get_task(name: str) -> Task:
    """The table row of a trainable task; `ConfigError` naming the known tasks otherwise."""
    try:
        return TASKS[name]
    except KeyError:
        raise ConfigError(f"unknown task {name!r} (fix: one of {', '.join(TASKS)})") from None


def primary_metric(task: str) -> Metric:
    """The metric reports rank ``task`` by: accuracy for classification, answer-token loss for causal LMs."""
    return get_task(task).metric


def peft_task_type(task: str) -> str | None:
    """PEFT's ``task_type`` for ``task`` (None for ``base``, image classification and unknown names)."""
    row = TASKS.get(task)
    return row.peft_task_type if row else None


def task_from_peft(task_type: str | None) -> str:
    """The task of an adapter whose config says PEFT ``task_type``; ``base`` when PEFT's type has no task here."""
    for row in TASKS.values():
        if row.peft_task_type is not None and row.peft_task_type == task_type:
            return row.name
    return BASE


def auto_class(task: str) -> str:
    """Name of the transformers Auto class that loads a model for ``task`` (``base``: ``AutoModel``)."""
    return BASE_AUTO_CLASS if task == BASE else get_task(task).auto_class
