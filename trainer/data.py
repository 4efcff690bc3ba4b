"""Task data: loading, tokenisation with a completion loss mask, batching.

A task (or the target) is a JSONL file of {"prompt": ..., "completion": ...}
records, scored on the completion and eos, or of chat records
({"messages": [...]}, rendered by the tokenizer's chat template and scored on
the assistant turns); or the same records in a `datasets.save_to_disk`
directory or .json / .parquet files (read through `datasets`, the `hf`
extra). Each is a local path or any fsspec URL (s3://, gs://, file://,
memory://, ...; credentials and endpoints from the environment, e.g. AWS_*
variables or fsspec's FSSPEC_S3_ENDPOINT_URL). Files are read when a task
is first needed, so tasks that only appear later in a mixture cost nothing
until then. Every draw of examples (training batches, sketch samples) is a pure function
of (seed, task, step or anchor, rank), which is what makes a resumed run
continue the same draws.
"""

from __future__ import annotations

import json
import logging
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from gradmix.trainer.errors import DataError
from gradmix.trainer.projectors import derive_seed
from gradmix.vocabulary import TARGET

logger = logging.getLogger("gradmix.trainer")

#: The target is refused when more than this share of its examples would be cut: its
#: loss, what the mixture is chosen for, would be measured on truncated examples.
MAX_TARGET_TRUNCATED = 0.5


class Tokenizer(Protocol):
    """What the trainer needs from a tokenizer."""

    pad_id: int
    eos_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no special tokens)."""
        ...


class CharTokenizer:
    """A character-level tokenizer (nothing to download): pad=0, eos=1, unk=2, then chars.

    Args:
        alphabet: the known characters; others map to unk.
    """

    def __init__(self, alphabet: str = string.printable) -> None:
        chars = list(dict.fromkeys(alphabet))
        self.pad_id, self.eos_id, self.unk_id = 0, 1, 2
        self._ids = {c: i + 3 for i, c in enumerate(chars)}
        self.vocab_size = len(chars) + 3

    def encode(self, text: str) -> list[int]:
        return [self._ids.get(c, self.unk_id) for c in text]

    def unknown(self, text: str) -> set[str]:
        """The characters of `text` outside the alphabet (each encodes as unk)."""
        return {c for c in text if c not in self._ids}


class HFTokenizer:
    """A transformers tokenizer from a local directory (never downloaded)."""

    def __init__(self, path: str) -> None:
        from transformers import AutoTokenizer

        try:
            self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot load tokenizer from {path!r}: {exc}") from exc
        eos = self._tok.eos_token_id
        self.eos_id = int(eos if eos is not None else 0)
        pad = self._tok.pad_token_id
        self.pad_id = int(pad if pad is not None else self.eos_id)
        self.vocab_size = len(self._tok)
        self.transformers = self._tok
        """The transformers tokenizer itself (its chat template renders chat records)."""

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids and the completion loss mask (true on completion tokens and eos)."""

    input_ids: tuple[int, ...]
    loss_mask: tuple[bool, ...]

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.loss_mask):
            raise DataError("input_ids and loss_mask differ in length")
        if not any(self.loss_mask[1:]):
            raise DataError("example has no scored completion token")


@dataclass(frozen=True)
class Batch:
    """Right-padded token ids (B, T) and the completion loss mask (B, T)."""

    input_ids: torch.Tensor
    loss_mask: torch.Tensor

    def to(self, device: torch.device | str) -> Batch:
        """The same batch on `device`."""
        return Batch(self.input_ids.to(device), self.loss_mask.to(device))


def tokenize(
    prompt: str, completion: str, tokenizer: Tokenizer, max_length: int
) -> TokenizedExample:
    """prompt + completion + eos, scored on the completion and eos, cut to `max_length`."""
    p, c = tokenizer.encode(prompt), [*tokenizer.encode(completion), tokenizer.eos_id]
    ids = (p + c)[:max_length]
    mask = ([False] * len(p) + [True] * len(c))[:max_length]
    return TokenizedExample(tuple(ids), tuple(mask))


def collate(examples: Sequence[TokenizedExample], pad_id: int) -> Batch:
    """Right-pad to the longest example. Causal attention never looks right, so
    padding needs no attention mask: it cannot change any scored position."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.bool)
    for row, e in enumerate(examples):
        ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[row, : len(e.loss_mask)] = torch.tensor(e.loss_mask)
    return Batch(ids, mask)


#: A data file: a local path, or an fsspec URL (has "://").
Location = str | Path


def is_url(location: Location) -> bool:
    """Whether a data location is an fsspec URL rather than a local path."""
    return "://" in str(location)


def read_text(location: Location) -> str:
    """The UTF-8 text of a local file or an fsspec URL.

    Raises:
        OSError: the file cannot be read (missing, no permission, endpoint away).
        ValueError: an fsspec URL of an unknown protocol, or of one whose package
            (e.g. s3fs) is not installed.
    """
    if not is_url(location):
        return Path(location).read_text(encoding="utf-8")
    import fsspec

    try:
        with fsspec.open(str(location), "rt", encoding="utf-8") as f:
            return str(f.read())
    except ImportError as exc:  # e.g. s3:// without s3fs
        raise ValueError(f"{exc}") from exc


def is_data_file(location: Location) -> bool:
    """Whether a local path is a file or a (`save_to_disk`) directory; for an fsspec URL,
    whether it is a file or whether that cannot be told (reading it then reports the
    error)."""
    if not is_url(location):
        return Path(location).is_file() or Path(location).is_dir()
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(str(location))
        return bool(fs.isfile(path))
    except (OSError, ValueError, ImportError):
        return True


def read_jsonl(
    path: Location,
    tokenizer: Tokenizer,
    max_length: int,
    *,
    max_truncated: float = 1.0,
    warn: bool = True,
) -> list[TokenizedExample]:
    """Read and tokenise a JSONL file of {"prompt", "completion"} objects (a local path
    or an fsspec URL).

    Examples longer than `max_length` tokens are cut, and characters the
    character tokenizer does not know become unk; both are counted and, with
    `warn`, logged as one warning per file.

    Raises:
        DataError: unreadable file, bad JSON, missing fields, no examples (names the
            line), or more than `max_truncated` of the examples cut.
    """
    try:
        lines = read_text(path).splitlines()
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    out = []
    truncated, unknown_in, unknown = 0, 0, set[str]()
    find_unknown = getattr(tokenizer, "unknown", None)
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            if isinstance(obj, dict) and "messages" in obj:
                out.append(chat_record(obj["messages"], tokenizer, max_length))
                continue
            prompt, completion = obj["prompt"], obj["completion"]
            if not isinstance(prompt, str) or not isinstance(completion, str):
                raise TypeError("prompt and completion must be strings")
            example = tokenize(prompt, completion, tokenizer, max_length)
        except (ValueError, KeyError, TypeError, DataError) as exc:
            raise DataError(f"{path}:{number}: bad example: {exc}") from exc
        out.append(example)
        full = len(tokenizer.encode(prompt)) + len(tokenizer.encode(completion)) + 1
        truncated += full > max_length
        if find_unknown is not None and (chars := find_unknown(prompt + completion)):
            unknown_in += 1
            unknown |= chars
    if not out:
        raise DataError(f"{path}: no examples")
    if truncated > max_truncated * len(out):
        raise DataError(
            f"{path}: {truncated} of {len(out)} examples are longer than max_length "
            f"{max_length} tokens and would be cut; raise [data].max_length"
        )
    if warn and truncated:
        logger.warning(
            "%s: %d of %d examples are longer than max_length %d tokens and are cut",
            path, truncated, len(out), max_length,
        )
    if warn and unknown_in:
        logger.warning(
            "%s: %d of %d examples have characters outside the tokenizer's alphabet %s; "
            "they all encode as one unknown token (add them to [tokenizer].alphabet)",
            path, unknown_in, len(out), "".join(sorted(unknown))[:40],
        )
    return out


def chat_record(messages: object, tokenizer: Tokenizer, max_length: int) -> TokenizedExample:
    """A {"messages": [...]} record rendered by the tokenizer's chat template and scored
    on the assistant turns (`gradmix.trainer.hf_data.chat_example`), cut to `max_length`.

    Raises:
        DataError: a tokenizer without a transformers chat template, or a bad chat.
    """
    template = getattr(tokenizer, "transformers", None)
    if template is None or not getattr(template, "chat_template", None):
        raise DataError(
            "chat records need a transformers tokenizer with a chat template "
            "([tokenizer] path = a local tokenizer directory)"
        )
    if not isinstance(messages, list):
        raise DataError("messages must be a list of {role, content} turns")
    from gradmix.trainer.hf_data import chat_example
    from gradmix.trainer.mixture_stream import IGNORE

    row = chat_example(messages, template, max_length)
    labels = row["labels"]
    return TokenizedExample(tuple(row["input_ids"]), tuple(t != IGNORE for t in labels))


def read_task(
    location: Location,
    tokenizer: Tokenizer,
    max_length: int,
    *,
    max_truncated: float = 1.0,
    warn: bool = True,
) -> list[TokenizedExample]:
    """A task's examples from a JSONL file (`read_jsonl`: prompt/completion or chat
    records) or, through `datasets` (the `hf` extra), from a `save_to_disk` directory
    or .json / .parquet files of such records; local or by fsspec URL.

    Raises:
        DataError: unreadable, malformed or empty data (or `datasets` missing).
    """
    if str(location).split("?")[0].endswith(".jsonl"):
        return read_jsonl(location, tokenizer, max_length, max_truncated=max_truncated,
                          warn=warn)
    try:
        from gradmix.trainer.hf_data import load_task
    except ImportError as exc:
        raise DataError(f"{location}: reading it needs `datasets` (gradmix[hf])") from exc
    out = []
    for number, record in enumerate(load_task(str(location)), start=1):
        try:
            if "messages" in record:
                out.append(chat_record(record["messages"], tokenizer, max_length))
            else:
                prompt, completion = record["prompt"], record["completion"]
                if not isinstance(prompt, str) or not isinstance(completion, str):
                    raise TypeError("prompt and completion must be strings")
                out.append(tokenize(prompt, completion, tokenizer, max_length))
        except (KeyError, TypeError, DataError) as exc:
            raise DataError(f"{location}: record {number}: bad example: {exc}") from exc
    if not out:
        raise DataError(f"{location}: no examples")
    return out


class TaskPool:
    """Lazily loaded examples of the target and the tasks, and seeded draws from them.

    Args:
        tokenizer: tokenizer for every file.
        max_length: longest example in tokens.
        seed: the training seed every draw derives from.
        paths: known data files (local paths or fsspec URLs) by task name (the target
            under `None`).
        resolve: fallback giving the file of a task not in `paths` (or None).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        max_length: int,
        seed: int,
        paths: Mapping[str | None, Location],
        resolve: Callable[[str], Location | None] | None = None,
    ) -> None:
        self.tokenizer, self.max_length, self.seed = tokenizer, max_length, seed
        self._paths: dict[str | None, Location] = dict(paths)
        self._resolve = resolve
        self._loaded: dict[str | None, list[TokenizedExample]] = {}

    def add(self, task: str, path: Location) -> None:
        """Make a task's file (local path or fsspec URL) known (e.g. from its registration
        metadata)."""
        self._paths.setdefault(task, path)

    def examples(self, task: str | None) -> list[TokenizedExample]:
        """All examples of a task (None: the target), read on first use."""
        if task not in self._loaded:
            path = self._paths.get(task)
            if path is None and task is not None and self._resolve is not None:
                path = self._resolve(task)
            if path is None:
                raise DataError(f"no data file known for task {task!r}")
            limit = MAX_TARGET_TRUNCATED if task is None else 1.0
            self._loaded[task] = read_task(
                path, self.tokenizer, self.max_length, max_truncated=limit
            )
        return self._loaded[task]

    def train_batch(self, task: str, step: int, rank: int, batch_size: int) -> Batch:
        """The training batch of `task` for (step, rank): uniform draw with replacement."""
        pool = self.examples(task)
        gen = torch.Generator().manual_seed(derive_seed(self.seed, "train", task, step, rank))
        picks = torch.randint(0, len(pool), (batch_size,), generator=gen).tolist()
        return collate([pool[i] for i in picks], self.tokenizer.pad_id)

    def sketch_draw(self, task: str | None, anchor: str, count: int) -> list[int]:
        """Example ids (file indices) sketched for a task at an anchor: a seeded draw
        without replacement of min(count, size) examples, the same in every rank.

        The target's draw is the same at every anchor, so the change of its
        loss between anchors (what calibrates the estimate's horizon) is not
        blurred by a change of examples; each task's draw changes with the anchor.
        """
        size = len(self.examples(task))
        key = TARGET if task is None else task
        round_ = "" if task is None else anchor
        gen = torch.Generator().manual_seed(derive_seed(self.seed, "sketch", key, round_))
        return sorted(torch.randperm(size, generator=gen)[: min(count, size)].tolist())
