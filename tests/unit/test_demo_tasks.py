"""The demo's built-in tasks: correct arithmetic, known corruptions, determinism."""

from __future__ import annotations

import json

import pytest
from gradmix.demo import tasks as demo_tasks
from gradmix.demo.tasks import TARGET, TASKS, DemoTask, DemoTaskError, generate


def _answer(example: demo_tasks.Example) -> int:
    return int(example.completion.rsplit(";", 1)[1])


def _operands(example: demo_tasks.Example) -> tuple[int, int]:
    a, b = example.prompt.rstrip("=").split("+")
    return int(a), int(b)


def test_worked_sum_writes_column_sums_then_the_answer() -> None:
    assert demo_tasks.worked_sum(172, 459) == "11;13;6;631"
    assert demo_tasks.worked_sum(12, 39) == "11;5;51"
    assert demo_tasks.worked_sum(999, 1) == "10;10;10;1000"


@pytest.mark.parametrize("name", ["add3", "add3-extra", "add2", "add4", "add-mixed"])
def test_correct_tasks_add_up_and_every_column_is_right(name: str) -> None:
    task = TARGET if name == TARGET.name else TASKS[name]
    for example in generate(task, 300, seed=3):
        a, b = _operands(example)
        assert _answer(example) == a + b
        columns = [int(c) for c in example.completion.split(";")[:-1]]
        xs, ys = str(a)[::-1], str(b)[::-1]
        carry = 0
        for x, y, column in zip(xs, ys, columns, strict=True):
            assert column == int(x) + int(y) + carry
            carry = column // 10


def test_harmful_tasks_are_wrong_in_their_stated_way() -> None:
    off = generate(TASKS["add3-off-by-one"], 200, seed=1)
    assert all(_answer(e) == sum(_operands(e)) + 1 for e in off)
    no_carry = generate(TASKS["add3-no-carry"], 200, seed=1)
    for e in no_carry:
        a, b = _operands(e)
        expected = int(
            "".join(str((int(x) + int(y)) % 10) for x, y in zip(str(a), str(b), strict=True))
        )
        assert _answer(e) == expected
    random_labels = generate(TASKS["add3-random-labels"], 200, seed=1)
    right = [demo_tasks.worked_sum(*_operands(e)) for e in random_labels]
    assert sum(e.completion == r for e, r in zip(random_labels, right, strict=True)) == 0
    assert all(len(e.completion) == len(r) for e, r in zip(random_labels, right, strict=True))
    noisy = generate(TASKS["add3-noisy"], 200, seed=1)
    changed = [
        sum(c != r for c, r in zip(e.completion, demo_tasks.worked_sum(*_operands(e)), strict=True))
        / len(e.completion)
        for e in noisy
    ]
    assert 0.25 < sum(changed) / len(changed) < 0.6  # half replaced, some by the same char


def test_generation_is_deterministic_per_seed_and_task() -> None:
    task = TASKS["add3-noisy"]
    assert generate(task, 50, seed=7) == generate(task, 50, seed=7)
    assert generate(task, 50, seed=7) != generate(task, 50, seed=8)
    assert generate(TASKS["add2"], 5, seed=7) != generate(TASKS["add4"], 5, seed=7)


def test_every_character_is_in_the_vocabulary() -> None:
    chars: set[str] = set()
    for task in [TARGET, *TASKS.values()]:
        for e in generate(task, 200, seed=0):
            chars |= set(e.prompt + e.completion)
    assert chars <= set(demo_tasks.VOCABULARY)


def test_registry_has_each_kind_and_two_late_tasks() -> None:
    labels = {task.label for task in TASKS.values()}
    assert labels == {"helpful", "neutral", "harmful"}
    late = demo_tasks.late_tasks()
    assert sorted(TASKS[n].label for n in late) == ["harmful", "helpful"]
    assert set(demo_tasks.initial_tasks()).isdisjoint(late)


def test_write_tasks_writes_jsonl_of_prompt_completion(tmp_path) -> None:  # type: ignore[no-untyped-def]
    files = demo_tasks.write_tasks(tmp_path / "tasks", count=20, target_count=8, seed=0)
    target_lines = files.target.read_text().splitlines()
    assert len(target_lines) == 8
    assert set(files.tasks) == set(TASKS)
    for path in files.tasks.values():
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(rows) == 20
        assert all(set(r) == {"prompt", "completion"} for r in rows)


def test_bad_task_definitions_are_rejected() -> None:
    with pytest.raises(DemoTaskError):
        DemoTask(name="x", label="useful", description="", make_example=TARGET.make_example)
    with pytest.raises(DemoTaskError):
        DemoTask(name="a/b", label="helpful", description="", make_example=TARGET.make_example)
    with pytest.raises(DemoTaskError):
        generate(TARGET, 0, seed=0)
