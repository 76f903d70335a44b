"""The task records (alignsam/tasks.py) agree with the metric code and the data."""
from __future__ import annotations

import pytest
import torch

from alignsam.errors import ConfigError
from alignsam.metrics import task_metrics
from alignsam.tasks import TASKS, task_record


@pytest.mark.parametrize("name", list(TASKS))
def test_every_metric_a_task_shows_is_one_its_collection_computes(name):
    task = TASKS[name]
    metrics = task_metrics(name, task.num_classes)
    if task.semantic:
        maps = torch.zeros(1, 8, 8, dtype=torch.long)
        metrics.update(maps, maps)
    else:
        metrics.update(torch.rand(2, 8, 8), torch.rand(2, 8, 8) > 0.5)
    computed = set(metrics.compute())
    assert set(task.headline) | set(task.shown) <= computed


def test_semantic_tasks_name_their_classes_and_binary_tasks_have_a_text():
    assert TASKS["voc"].num_classes == 21 and TASKS["voc"].class_names[0] == "aeroplane"
    assert TASKS["categories"].num_classes == 1 + len(TASKS["categories"].class_names)
    assert all(t.default_text for t in TASKS.values() if not t.semantic)


def test_an_unknown_task_names_model_task():
    with pytest.raises(ConfigError, match="model.task: unknown task 'mirror'"):
        task_record("mirror")
