"""Task data from HF `datasets` and chat records (`gradmix.trainer.hf_data`).

- `load_task` reads JSON lines, parquet and `save_to_disk` directories, and
  names what it cannot read.
- `chat_example` scores exactly the assistant turns' tokens (and the
  template's end-of-turn token), not the user's turns or the role headers.
  The tokenizer is a character-level `PreTrainedTokenizerFast` built here
  with a chat template (nothing downloaded).
- A `Sketcher` given its target and tasks as rows in memory (a chat task
  among them) runs an anchor against the real server and store.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from api_ranks import SKETCHING, tiny_gpt2
from client_support import Served, serve
from gradmix.store import SketchStore
from gradmix.trainer import api
from gradmix.trainer.errors import DataError
from gradmix.trainer.hf_data import as_examples, chat_example, load_task, task_rows

datasets = pytest.importorskip("datasets")
TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<end>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
CHAT = [
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "3+3?"},
    {"role": "assistant", "content": "6"},
]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    yield from serve(tmp_path)


def char_tokenizer() -> Any:
    """A character-level transformers tokenizer with a chat template (ids 0..4 special)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<end>", "<user>", "<assistant>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + list(dict.fromkeys(string.printable)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<end>", unk_token="<unk>"
    )
    fast.add_special_tokens({"additional_special_tokens": ["<user>", "<assistant>"]})
    fast.chat_template = TEMPLATE
    return fast


def text(tok: Any, ids: list[int]) -> str:
    """The characters of token ids (this tokenizer's decode would add spaces)."""
    return "".join(tok.convert_ids_to_tokens(ids))


def test_load_task_reads_json_parquet_and_disk(tmp_path: Path) -> None:
    records = [{"prompt": f"{i}+1=", "completion": str(i + 1)} for i in range(5)]
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    dataset = datasets.Dataset.from_list(records)
    dataset.to_parquet(str(tmp_path / "t.parquet"))
    dataset.save_to_disk(str(tmp_path / "disk"))
    for source in ("t.jsonl", "t.parquet", "disk"):
        loaded = load_task(tmp_path / source)
        assert loaded.to_list() == records, source
    with pytest.raises(DataError, match="not a dataset directory"):
        load_task(tmp_path / "t.csv")
    with pytest.raises(DataError, match="cannot read"):
        load_task(tmp_path / "missing.parquet")


def test_chat_scores_only_the_assistant_turns() -> None:
    tok = char_tokenizer()
    row = chat_example(CHAT, tok, max_length=200)
    scored = text(
        tok, [t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != -100]
    )
    assert scored == "4<end>6<end>"
    assert text(tok, row["input_ids"]) == tok.apply_chat_template(CHAT, tokenize=False)
    assert chat_example(CHAT, tok, max_length=10)["input_ids"] == row["input_ids"][:10]
    with pytest.raises(DataError, match="without an assistant turn"):
        chat_example(CHAT[:1], tok, max_length=200)


def test_task_rows_take_either_record_shape() -> None:
    tok = char_tokenizer()
    rows = task_rows(datasets.Dataset.from_list([{"messages": CHAT}]), tok, 200) + task_rows(
        [{"prompt": "1+1=", "completion": "2"}], tok, 200
    )
    examples = as_examples(rows)
    assert len(examples) == 2
    assert sum(examples[1].loss_mask) == 2  # "2" and eos
    with pytest.raises(DataError, match="needs messages"):
        task_rows([{"text": "x"}], tok, 200)


def test_sketcher_sketches_rows_given_in_memory(served: Served, tmp_path: Path) -> None:
    tok = char_tokenizer()
    chats = [
        [{"role": "user", "content": f"{i}+{i}?"}, {"role": "assistant", "content": str(2 * i)}]
        for i in range(8)
    ]
    target = task_rows(
        [{"prompt": f"{i}+{i}=", "completion": str(2 * i)} for i in range(8)], tok, 24
    )
    model = tiny_gpt2()
    model.resize_token_embeddings(len(tok))
    sketcher = api.Sketcher(
        job="rows",
        server=served.address,
        store=str(served.store),
        model=model,
        tokenizer=tok,
        target=as_examples(target),
        tasks={"chat": as_examples(task_rows([{"messages": c} for c in chats], tok, 24))},
        output_dir=tmp_path / "out",
        sketching=SKETCHING,
        steps=10,
        learning_rate=1e-3,
    )
    sketcher.setup_job()
    state = sketcher.sketch_point(0)
    sketcher.close()
    assert state.complete and sorted(state.sketched) == ["chat", "target"]
    store = SketchStore.open(str(served.store))
    assert len(store.read_rows("rows", state.name, "chat")[0]) == SKETCHING.examples_per_task
    assert [t.metadata for t in served.client.list_tasks("rows")] == [{"path": "in-process:chat"}]


def test_task_files_of_every_format_are_read_and_sketched(
    served: Served, tmp_path: Path
) -> None:
    """The anchor code `gradmix-train` runs (`TaskPool`, through a `Sketcher` given file
    paths) reads a parquet file, a `save_to_disk` directory and JSON lines of chat
    records, each into the examples `hf_data` makes of the same records."""
    from gradmix.trainer.data import read_task

    tok = char_tokenizer()
    plain = [{"prompt": f"{i}+{i}=", "completion": str(2 * i)} for i in range(8)]
    chats = [
        {"messages": [{"role": "user", "content": f"{i}*2?"},
                      {"role": "assistant", "content": str(2 * i)}]}
        for i in range(8)
    ]
    (tmp_path / "target.jsonl").write_text("\n".join(json.dumps(r) for r in plain) + "\n")
    datasets.Dataset.from_list(plain).to_parquet(str(tmp_path / "plain.parquet"))
    datasets.Dataset.from_list(chats).save_to_disk(str(tmp_path / "chat-disk"))
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in chats) + "\n")
    files = {"plain": "plain.parquet", "disk": "chat-disk", "chat": "chat.jsonl"}
    adapted = api.as_tokenizer(tok)
    for name, records in (("plain", plain), ("disk", chats), ("chat", chats)):
        expected = list(as_examples(task_rows(records, tok, 24)))
        assert read_task(tmp_path / files[name], adapted, 24) == expected, name
    with pytest.raises(DataError, match="chat template"):
        read_task(tmp_path / "chat.jsonl", api.as_tokenizer(_no_template(tok)), 24)

    model = tiny_gpt2()
    model.resize_token_embeddings(len(tok))
    sketcher = api.Sketcher(
        job="files",
        server=served.address,
        store=str(served.store),
        model=model,
        tokenizer=tok,
        target=tmp_path / "target.jsonl",
        tasks={name: tmp_path / f for name, f in files.items()},
        output_dir=tmp_path / "out",
        sketching=SKETCHING,
        steps=10,
        learning_rate=1e-3,
        max_length=24,
    )
    sketcher.setup_job()
    state = sketcher.sketch_point(0)
    sketcher.close()
    assert state.complete and sorted(state.sketched) == ["chat", "disk", "plain", "target"]


def _no_template(tok: Any) -> Any:
    """The same tokenizer without a chat template."""
    import copy

    bare = copy.deepcopy(tok)
    bare.chat_template = None
    return bare


def test_stream_draws_rows_from_hf_datasets() -> None:
    """A `MixtureStream` over `datasets.Dataset`s of rows: the dynamic counterpart of
    `interleave_datasets(probabilities=...)`."""
    from gradmix.trainer.mixture_stream import MixtureStream

    tok = char_tokenizer()
    tasks = {
        name: datasets.Dataset.from_list(
            task_rows([{"prompt": f"{name}{i}=", "completion": str(i)} for i in range(6)], tok, 32)
        )
        for name in ("x", "y")
    }
    stream = MixtureStream(tasks, seed=0, mixture={"x": 1.0})
    stream.update({"y": 1.0}, at_draw=5)
    drawn = [text(tok, row["input_ids"])[0] for row, _ in zip(stream, range(10), strict=False)]
    assert drawn == ["x"] * 5 + ["y"] * 5
