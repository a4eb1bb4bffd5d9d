"""The task table: one row per task, the facts other modules read from it."""

import pytest

from lorakit.errors import ConfigError
from lorakit.tasks import MODEL_TASKS, TASKS, auto_class, get_task, peft_task_type, primary_metric, task_from_peft


def test_table_matches_peft_and_transformers():
    import peft
    import transformers

    for task in TASKS.values():
        assert hasattr(transformers, task.auto_class)
        if task.peft_task_type is not None:  # PEFT knows the type and maps it to a model class
            assert task.peft_task_type in peft.TaskType.__members__
            assert task_from_peft(task.peft_task_type) == task.name
    assert MODEL_TASKS[0] == "base" and set(MODEL_TASKS[1:]) == set(TASKS)
    assert auto_class("base") == "AutoModel"
    assert peft_task_type("image-classification") is None and peft_task_type("base") is None
    assert task_from_peft(None) == task_from_peft("TOKEN_CLS") == "base"


def test_primary_metric_direction():
    accuracy, loss = primary_metric("sequence-classification"), primary_metric("causal-lm")
    assert (accuracy.name, accuracy.higher_is_better) == ("accuracy", True)
    assert (loss.name, loss.higher_is_better) == ("loss", False)
    assert accuracy.better(0.9, 0.8) and not accuracy.better(0.8, 0.9)
    assert loss.better(1.0, 2.0) and loss.worse_by(2.0, 1.5) == 0.5 and accuracy.worse_by(0.7, 0.8) == pytest.approx(0.1)


def test_unknown_task_names_the_known_ones():
    with pytest.raises(ConfigError, match="unknown task 'text-generation'.*causal-lm"):
        get_task("text-generation")


def test_data_kinds_cover_the_loader():
    from lorakit.data import KINDS

    covered = [kind for task in TASKS.values() for kind in task.data_kinds]
    assert sorted(covered) == sorted(KINDS)
