"""The shared vocabulary: declared once, and the same as the proto's enums."""

from __future__ import annotations

import ast
from enum import StrEnum
from pathlib import Path

import pytest
from gradmix.proto.v1 import selection_pb2 as pb
from gradmix.vocabulary import (
    VOCABULARY,
    WIRE_UNSPECIFIED,
    Policy,
    Projector,
    SketchDtype,
    TaskState,
    ValueKind,
    choices,
    from_wire,
    parse,
    to_wire,
    wire_prefix,
)

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("server", "client", "store", "trainer", "demo", "bench")
WIRE_ENUMS = [enum for enum in VOCABULARY if enum is not Projector]  # projector is a string field


@pytest.mark.parametrize("enum", WIRE_ENUMS, ids=lambda e: e.__name__)
def test_each_enum_is_the_proto_enum_of_the_same_name(enum: type[StrEnum]) -> None:
    proto = getattr(pb, enum.__name__)
    wire = {n for n in proto.keys() if not n.endswith("_UNSPECIFIED")}  # noqa: SIM118 (not a dict)
    assert wire == {wire_prefix(enum) + member.name for member in enum}
    for member in enum:
        assert from_wire(enum, to_wire(member, proto), proto) is member


def test_unspecified_on_the_wire_keeps_its_first_meaning() -> None:
    assert from_wire(Policy, 0, pb.Policy) is Policy.ENSEMBLE
    assert from_wire(ValueKind, 0, pb.ValueKind) is ValueKind.LOG_ODDS
    assert from_wire(SketchDtype, 0, pb.SketchDtype) is SketchDtype.FLOAT16
    assert WIRE_UNSPECIFIED[Projector] == "dense"
    with pytest.raises(ValueError, match="unspecified"):
        from_wire(TaskState, 0, pb.TaskState)
    with pytest.raises(ValueError, match="unknown Policy number 99"):
        from_wire(Policy, 99, pb.Policy)


def test_parse_names_the_choices() -> None:
    assert parse(Policy, "simplex") is Policy.SIMPLEX
    with pytest.raises(ValueError, match="policy must be one of ensemble, surrogate"):
        parse(Policy, "ensembel")
    assert choices(SketchDtype) == ("float16", "float32")


def _literal_strings(node: ast.AST) -> set[str]:
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        items = node.elts
    elif isinstance(node, ast.Dict):
        items = [*(k for k in node.keys if k is not None), *node.values]
    else:
        return set()
    return {i.value for i in items if isinstance(i, ast.Constant) and isinstance(i.value, str)}


def _second_declarations(path: Path, root: Path = ROOT) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        strings = _literal_strings(node)
        for enum in VOCABULARY:
            if len(strings & set(choices(enum))) >= 2:
                found.append(f"{path.relative_to(root)}:{node.lineno}: {enum.__name__}")
    return found


def test_no_package_declares_the_vocabulary_a_second_time() -> None:
    """A tuple, set or dict literal naming two members of one enum is a second declaration."""
    files = [p for folder in SCANNED for p in sorted((ROOT / folder).rglob("*.py"))]
    assert files
    found = [hit for path in files for hit in _second_declarations(path)]
    assert not found, "import these from gradmix.vocabulary instead:\n" + "\n".join(found)


def test_the_scan_finds_a_second_declaration(tmp_path: Path) -> None:
    """The check above can fail: a module that re-declares policies is caught."""
    module = tmp_path / "policies.py"
    module.write_text('POLICIES = ("ensemble", "surrogate")\n', encoding="utf-8")
    assert [hit.split(": ")[-1] for hit in _second_declarations(module, tmp_path)] == ["Policy"]
