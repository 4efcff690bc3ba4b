"""Task data from Hugging Face `datasets` and chat records, as training rows.

A *row* is what the Trainer trains on and `MixtureStream` draws:
`{"input_ids": [...], "labels": [...]}` with labels -100 where the token is
not scored. Records become rows by their shape:

- `{"prompt": ..., "completion": ...}`: prompt + completion + eos, scored on
  the completion and eos (`completion_example`, as `gradmix-train` scores);
- `{"messages": [{"role": ..., "content": ...}, ...]}`: rendered with the
  tokenizer's chat template, scored on the assistant turns only
  (`chat_example`).

`load_task` reads a task's records from a local `save_to_disk` directory or
from JSON-lines / JSON / parquet files (a path or any fsspec URL, read by
`datasets`). `as_examples` views rows as the trainer's `TokenizedExample`s,
so the same rows are what a `Sketcher` sketches.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, overload

from gradmix.trainer.data import TokenizedExample
from gradmix.trainer.errors import DataError
from gradmix.trainer.mixture_stream import IGNORE, completion_example

#: File suffixes `load_task` reads, by the `datasets` builder that reads them.
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def load_task(path: str | Path, **storage_options: Any) -> Any:
    """A task's records as a `datasets.Dataset`.

    Args:
        path: a `Dataset.save_to_disk` directory, or a .jsonl / .json / .parquet file
            (a local path or an fsspec URL such as s3://bucket/task.parquet).
        storage_options: passed to fsspec for remote URLs.

    Raises:
        DataError: an unknown suffix, or a file or directory `datasets` cannot read.
    """
    import datasets

    text = str(path)
    try:
        if "://" not in text and Path(text).is_dir():
            loaded = datasets.load_from_disk(text)
            if isinstance(loaded, datasets.DatasetDict):
                raise DataError(f"{text}: a DatasetDict; give one split's directory")
            return loaded
        builder = BUILDERS.get(Path(text.split("?")[0]).suffix)
        if builder is None:
            raise DataError(f"{text}: not a dataset directory nor one of {sorted(BUILDERS)}")
        options = {"storage_options": storage_options} if storage_options else {}
        return datasets.load_dataset(builder, data_files=text, split="train", **options)
    except (OSError, ValueError, datasets.exceptions.DatasetGenerationError) as exc:
        raise DataError(f"cannot read task data {text}: {exc}") from exc


def chat_example(
    messages: Sequence[Mapping[str, str]], tokenizer: Any, max_length: int
) -> dict[str, list[int]]:
    """A chat as a row, scored on the assistant turns.

    Each assistant turn's tokens are those the template adds between the
    conversation before it (with the generation prompt) and the conversation
    through it, so the role header is not scored and whatever the template
    closes a turn with (an end-of-turn token) is.

    Args:
        messages: {"role", "content"} turns.
        tokenizer: a transformers tokenizer with a chat template.
        max_length: longest row in tokens (cut at the end).

    Raises:
        DataError: no assistant turn, or a template whose renderings of successive
            prefixes do not extend one another.
    """

    def ids(turns: Sequence[Mapping[str, str]], prompt: bool) -> list[int]:
        rendered = tokenizer.apply_chat_template(
            list(turns), tokenize=True, add_generation_prompt=prompt, return_dict=False
        )
        return list(rendered)

    full = ids(messages, prompt=False)
    scored = [False] * len(full)
    for i, turn in enumerate(messages):
        if turn.get("role") != "assistant":
            continue
        start, through = ids(messages[:i], prompt=True), ids(messages[: i + 1], prompt=False)
        if full[: len(through)] != through or through[: len(start)] != start:
            raise DataError("the chat template does not render turns as growing prefixes")
        scored[len(start) : len(through)] = [True] * (len(through) - len(start))
    if not any(scored):
        raise DataError("a chat without an assistant turn has nothing to score")
    full, scored = full[:max_length], scored[:max_length]
    return {
        "input_ids": full,
        "labels": [t if s else IGNORE for t, s in zip(full, scored, strict=True)],
    }


def record_row(record: Mapping[str, Any], tokenizer: Any, max_length: int) -> dict[str, list[int]]:
    """One record ({"messages"} or {"prompt", "completion"}) as a row.

    Args:
        record: the record.
        tokenizer: a transformers tokenizer (chat records need its chat template) or,
            for prompt/completion records, a gradmix `Tokenizer`.
        max_length: longest row in tokens.

    Raises:
        DataError: a record of neither shape.
    """
    if "messages" in record:
        return chat_example(record["messages"], tokenizer, max_length)
    if isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
        from gradmix.trainer.api import as_tokenizer

        return completion_example(
            record["prompt"], record["completion"], as_tokenizer(tokenizer), max_length
        )
    raise DataError(f"a record needs messages, or prompt and completion: keys {sorted(record)}")


def task_rows(records: Any, tokenizer: Any, max_length: int) -> list[dict[str, list[int]]]:
    """Every record of a task (a `datasets.Dataset` or any iterable of dicts) as rows."""
    return [record_row(r, tokenizer, max_length) for r in records]


class _Examples(Sequence[TokenizedExample]):
    """Rows seen as `TokenizedExample`s (converted on access)."""

    def __init__(self, rows: Sequence[Mapping[str, Any]]) -> None:
        self._rows = rows

    def __len__(self) -> int:
        return len(self._rows)

    @overload
    def __getitem__(self, index: int) -> TokenizedExample: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[TokenizedExample]: ...

    def __getitem__(self, index: int | slice) -> TokenizedExample | Sequence[TokenizedExample]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        row = self._rows[index]
        labels = list(row["labels"])
        return TokenizedExample(tuple(row["input_ids"]), tuple(label != IGNORE for label in labels))


def as_examples(rows: Sequence[Mapping[str, Any]]) -> Sequence[TokenizedExample]:
    """Rows (`input_ids`, `labels`) as the `TokenizedExample`s a `Sketcher` sketches."""
    return _Examples(rows)
