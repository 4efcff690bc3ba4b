"""The sketched parameter manifest and its stable hash.

A manifest lists, in module order, every parameter a sketch covers: its name,
shape and how it is projected. Together with the projector's options it fixes
the sketch coordinates, so its hash goes into the job spec (`manifest_hash`)
and sketches made with different settings are never mixed.

Entry kinds (see `gradmix.trainer.projectors` for the math):

- "dense": the flattened gradient, blocked Rademacher projection. Every entry
  of the dense projector; for the structured one, the biases of linear layers
  and the parameters of normalization layers (LayerNorm, RMSNorm, ...).
- "kronecker": the weight of a linear layer (nn.Linear, or GPT-2's `Conv1D`
  stored transposed), projected with Kronecker factors over (out, in).
- "embedding": the weight of an nn.Embedding (num × dim), projected with
  Kronecker factors over (num, dim). When the same parameter object is also
  the weight of output linear layers (`tied`, e.g. GPT-2's lm_head), its
  gradient is the sum of both uses' parts, and both are projected with the
  entry's factors.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field

from gradmix.trainer.errors import SketchError
from gradmix.trainer.sharded import full_shape
from torch import nn

#: How a manifest entry is projected.
ENTRY_KINDS = ("dense", "kronecker", "embedding")


@dataclass(frozen=True, kw_only=True)
class ParamEntry:
    """One sketched parameter.

    Attributes:
        name: the parameter's name in `module.named_parameters()`.
        shape: its shape (whole, also for a ZeRO-3 partitioned parameter).
        kind: "dense" (flattened gradient, blocked Rademacher), "kronecker"
            (weight of a linear layer) or "embedding" (weight of an embedding
            table), the last two projected with Kronecker factors.
        transposed: for "kronecker": the weight is stored (in, out), as in
            transformers' GPT-2 `Conv1D`, instead of nn.Linear's (out, in).
        module: structured only: the module whose forward uses the parameter
            (the linear layer, embedding or normalization layer owning it).
        tied: for "embedding": the output linear layers (weight stored
            (out, in) = (num, dim)) that share the parameter object.
    """

    name: str
    shape: tuple[int, ...]
    kind: str = "dense"
    transposed: bool = False
    module: str = ""
    tied: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ENTRY_KINDS:
            raise SketchError(f"manifest entry {self.name!r}: unknown kind {self.kind!r}")
        if self.kind != "dense" and len(self.shape) != 2:
            raise SketchError(f"{self.kind} entry {self.name!r} must be 2-D, got {self.shape}")
        if self.tied and self.kind != "embedding":
            raise SketchError(f"only embedding entries can be tied, not {self.name!r}")

    @property
    def numel(self) -> int:
        """Number of scalars in the parameter."""
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """The parameters a sketch covers and the projector settings that fix its coordinates.

    Attributes:
        projector: "dense" or "structured".
        entries: sketched parameters in module order.
        options: projector options that change the sketch (e.g. factor_dim).
        excluded: selected parameters the projector cannot sketch (informational).
    """

    projector: str
    entries: tuple[ParamEntry, ...]
    options: tuple[tuple[str, int], ...] = ()
    excluded: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if not self.entries:
            raise SketchError("the parameter manifest is empty: no parameter matched")

    @property
    def names(self) -> list[str]:
        """Parameter names, in manifest order."""
        return [e.name for e in self.entries]

    @property
    def numel(self) -> int:
        """Total number of sketched scalars."""
        return sum(e.numel for e in self.entries)

    def to_json(self) -> str:
        """Canonical JSON of everything that fixes the sketch coordinates."""
        doc = {
            "projector": self.projector,
            "options": [list(o) for o in self.options],
            "entries": [[e.name, list(e.shape), e.kind, e.transposed] for e in self.entries],
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":"))

    def hash(self) -> str:
        """Stable hash (hex, 16 chars) of `to_json()`: the job spec's manifest_hash."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]


def select_parameters(
    module: nn.Module, patterns: Sequence[str] = ("*",)
) -> list[tuple[str, nn.Parameter]]:
    """Trainable parameters whose name matches any fnmatch pattern, in module order.

    Raises:
        SketchError: nothing matched.
    """
    chosen = [
        (name, p)
        for name, p in module.named_parameters()
        if p.requires_grad and any(fnmatch.fnmatchcase(name, pat) for pat in patterns)
    ]
    if not chosen:
        raise SketchError(f"no trainable parameter matches {list(patterns)}")
    return chosen


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, or transformers' GPT-2 `Conv1D` (a linear layer with a transposed weight)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def is_embedding(module: nn.Module) -> bool:
    """An nn.Embedding whose gradient is the plain scatter of its output gradients.

    `max_norm` (renormalizes rows in the forward) and `scale_grad_by_freq`
    (scales by in-batch counts, so examples interact) do not qualify.
    """
    return (
        isinstance(module, nn.Embedding)
        and module.max_norm is None
        and not module.scale_grad_by_freq
    )


def is_norm(module: nn.Module) -> bool:
    """A normalization layer: a leaf module named "...Norm" with 1-D parameters only.

    Covers nn.LayerNorm, nn.RMSNorm and transformers' RMSNorm variants
    (LlamaRMSNorm, T5LayerNorm, ...). The sketch differentiates the module
    itself per example, so the exact normalization formula does not matter.
    """
    params = list(module.parameters(recurse=False))
    return (
        type(module).__name__.endswith("Norm")
        and next(module.children(), None) is None
        and bool(params)
        and all(len(full_shape(p)) == 1 for p in params)
    )


@dataclass(frozen=True)
class _Use:
    """One module attribute that holds a parameter."""

    name: str
    module: nn.Module
    attr: str


def _parameter_uses(module: nn.Module) -> dict[int, list[_Use]]:
    """id(parameter) → every (module name, module, attribute) holding it, shared modules
    listed once per name."""
    uses: dict[int, list[_Use]] = {}
    for mod_name, mod in module.named_modules(remove_duplicate=False):
        for attr, p in mod.named_parameters(recurse=False):
            uses.setdefault(id(p), []).append(_Use(mod_name, mod, attr))
    return uses


def _single_use_entry(name: str, shape: tuple[int, ...], use: _Use) -> ParamEntry | None:
    """The structured entry of a parameter held by one module, or None if unsupported."""
    mod = use.module
    if is_linear(mod) and use.attr == "weight":
        transposed = not isinstance(mod, nn.Linear)
        return ParamEntry(
            name=name, shape=shape, kind="kronecker", transposed=transposed, module=use.name
        )
    if (is_linear(mod) and use.attr == "bias") or is_norm(mod):
        return ParamEntry(name=name, shape=shape, kind="dense", module=use.name)
    if is_embedding(mod) and use.attr == "weight":
        return ParamEntry(name=name, shape=shape, kind="embedding", module=use.name)
    return None


def _tied_entry(name: str, shape: tuple[int, ...], uses: list[_Use]) -> ParamEntry | None:
    """An embedding weight that is also the (out, in) weight of output linear layers.

    Anything else shared between modules (or one module registered under
    several names) is unsupported: a hook per use must see each use once.
    """
    if len({id(u.module) for u in uses}) != len(uses):
        return None
    embeddings = [u for u in uses if is_embedding(u.module) and u.attr == "weight"]
    outputs = [u for u in uses if isinstance(u.module, nn.Linear) and u.attr == "weight"]
    if len(embeddings) != 1 or len(outputs) != len(uses) - 1:
        return None
    return ParamEntry(
        name=name,
        shape=shape,
        kind="embedding",
        module=embeddings[0].name,
        tied=tuple(u.name for u in outputs),
    )


def build_manifest(
    module: nn.Module,
    *,
    projector: str,
    patterns: Sequence[str] = ("*",),
    options: Sequence[tuple[str, int]] = (),
) -> Manifest:
    """The manifest of `module`'s parameters matching `patterns` for a projector kind.

    "dense" covers every selected parameter. "structured" covers the selected
    weights (kronecker) and biases (dense) of linear layers, embedding tables
    (embedding, with the output layers tied to them), and normalization-layer
    parameters (dense); any other selected parameter is listed in `excluded`.

    Raises:
        SketchError: unknown projector, or no parameter left to sketch.
    """
    selected = select_parameters(module, patterns)
    if projector == "dense":
        entries = [ParamEntry(name=n, shape=full_shape(p)) for n, p in selected]
        return Manifest(projector=projector, entries=tuple(entries), options=tuple(options))
    if projector != "structured":
        raise SketchError(f"unknown projector {projector!r} (expected 'dense' or 'structured')")
    uses = _parameter_uses(module)
    structured, excluded = [], []
    for name, p in selected:
        shape, held = full_shape(p), uses[id(p)]
        entry = (
            _single_use_entry(name, shape, held[0])
            if len(held) == 1
            else _tied_entry(name, shape, held)
        )
        if entry is None:
            excluded.append(name)
        else:
            structured.append(entry)
    if not structured:
        raise SketchError(f"no sketchable parameter matches {list(patterns)} (structured)")
    return Manifest(
        projector=projector,
        entries=tuple(structured),
        options=tuple(options),
        excluded=tuple(excluded),
    )
