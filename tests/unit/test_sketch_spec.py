"""The sketch spec is defined once (`gradmix.vocabulary.sketch_spec`).

Client, store and server use that one class; the wire carries its fields; a
field left out of a wire message or a stored document keeps the meaning the
first clients gave it, while a spec built in code takes the current defaults.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
from gradmix import client, store
from gradmix.proto.v1 import selection_pb2 as pb
from gradmix.vocabulary import (
    DEFAULT_DTYPE,
    DEFAULT_PROJECTOR,
    DEFAULT_VALUE_KIND,
    WIRE_UNSPECIFIED,
    Projector,
    SketchDtype,
    ValueKind,
)
from gradmix.vocabulary.sketch_spec import (
    FIELDS,
    UNSPECIFIED,
    SketchSpec,
    SketchSpecError,
)

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("server", "client", "store", "trainer", "demo", "bench")
#: Classes that name the spec's fields for a reason of their own, and why.
NOT_A_SECOND_SPEC = {
    # The trainer's `[sketching]` TOML section: settings (with examples per
    # task, batch size, ...) that `gradmix-train` builds its SketchSpec from.
    "trainer/config.py:SketchingConfig",
}


def test_client_and_store_use_the_one_class() -> None:
    assert client.SketchSpec is SketchSpec
    assert store.SketchSpec is SketchSpec
    assert client.SketchSpecError is SketchSpecError is store.SketchSpecError


def test_the_wire_carries_the_spec_fields() -> None:
    assert set(pb.SketchSpec.DESCRIPTOR.fields_by_name) == set(FIELDS)


def test_a_spec_built_in_code_takes_the_current_defaults() -> None:
    spec = SketchSpec(dim=8)
    assert (spec.projector, spec.dtype, spec.value_kind) == (
        DEFAULT_PROJECTOR, DEFAULT_DTYPE, DEFAULT_VALUE_KIND)
    assert spec.seed == 0 and spec.manifest_hash == ""


def test_a_document_without_a_field_means_what_the_first_clients_sent() -> None:
    spec = SketchSpec.from_document({"dim": 8, "seed": 3})
    assert spec.projector == WIRE_UNSPECIFIED[Projector] == "dense"
    assert spec.dtype == WIRE_UNSPECIFIED[SketchDtype] == "float16"
    assert spec.value_kind == WIRE_UNSPECIFIED[ValueKind] == "log_odds"
    assert set(UNSPECIFIED) == set(FIELDS) - {"dim", "seed"}
    # A stored document round-trips whole, whatever the defaults are.
    new = SketchSpec(dim=8, seed=3, projector="structured", manifest_hash="m")
    assert SketchSpec.from_document(new.to_document()) == new
    with pytest.raises(SketchSpecError, match="unknown sketch spec fields"):
        SketchSpec.from_document({"dim": 8, "seed": 3, "rank": 2})
    with pytest.raises(SketchSpecError, match="no dim"):
        SketchSpec.from_document({"seed": 3})


@pytest.mark.parametrize("bad", [
    {"dim": 0}, {"dim": 2**32}, {"dim": True}, {"dim": 4.0},
    {"seed": -1}, {"seed": 2**64}, {"seed": "1"},
    {"projector": "sparse"}, {"dtype": "int8"}, {"value_kind": "mean_probability"},
    {"manifest_hash": None},
])
def test_bad_fields_are_refused_with_the_field_named(bad: dict[str, object]) -> None:
    name = next(iter(bad))
    with pytest.raises(SketchSpecError, match=f"invalid sketch {name}"):
        SketchSpec(**{"dim": 4, **bad})  # type: ignore[arg-type]
    assert SketchSpecError.code_name == "INVALID_ARGUMENT"


def test_numpy_integers_are_taken_as_ints() -> None:
    spec = SketchSpec(dim=np.int64(16), seed=np.uint32(7))  # type: ignore[arg-type]
    assert type(spec.dim) is int and type(spec.seed) is int and spec.to_document()["dim"] == 16


def _spec_like_classes(path: Path, root: Path = ROOT) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.ClassDef):
            continue
        names = {item.target.id for item in node.body
                 if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)}
        if len(names & set(FIELDS)) >= 4:
            found.append(f"{path.relative_to(root)}:{node.name}")
    return found


def test_no_package_declares_the_spec_fields_a_second_time() -> None:
    """A class declaring four or more of the spec's six fields is a second spec.

    (Three would flag the demo's run settings, whose `seed` is the run's.)
    """
    files = [p for folder in SCANNED for p in sorted((ROOT / folder).rglob("*.py"))]
    assert len(files) > 50
    found = {name for path in files for name in _spec_like_classes(path)}
    assert found - NOT_A_SECOND_SPEC == set()


def test_the_scan_finds_a_second_declaration(tmp_path: Path) -> None:
    module = tmp_path / "copy.py"
    module.write_text("class Spec:\n    dim: int\n    seed: int\n    dtype: str\n"
                      "    projector: str = 'dense'\n", encoding="utf-8")
    assert _spec_like_classes(module, tmp_path) == ["copy.py:Spec"]


def test_the_server_answers_a_bad_wire_spec_with_invalid_argument() -> None:
    from gradmix.server.convert import sketch_to_spec
    from gradmix.server.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="invalid sketch dim: 0"):
        sketch_to_spec(pb.SketchSpec(dim=0))
    assert InvalidArgumentError.code_name == SketchSpecError.code_name
    # Enums left unspecified on the wire keep their first meaning.
    assert sketch_to_spec(pb.SketchSpec(dim=4)) == SketchSpec.from_document({"dim": 4, "seed": 0})
