"""Sketches of examples: values f(x) and projected per-sample gradients ∇θ f(x).

Two paths, one per projector:

- `DenseProjector`: exact per-sample gradients over the manifest's parameters
  with torch.func (functional_call + vmap(grad_and_value)), then the blocked
  Rademacher projection. Works on any nn.Module, e.g. a DeepSpeed
  `engine.module` under ZeRO 0–2; refused under ZeRO-3, whose partitioned
  parameters it would have to gather whole (`gradmix.trainer.sharded`).
- `StructuredProjector`: one batched forward and a backward of Σ_i f(x_i) to
  the outputs of the modules that use the manifest's parameters only (no
  weight gradients are formed), with forward hooks capturing each module's
  input and output. Examples do not interact in a causal LM without batch
  statistics, so the gradient at row i's outputs is row i's δ; an output
  shared by the whole batch (GPT-2's position embeddings, computed once for
  positions (1, T)) is expanded to the batch in its hook so that its gradient
  stays per row. The projector turns each linear layer's (a, δ) and each
  embedding's (ids, δ) into the sketch without forming per-sample gradients;
  a tied output layer's (h, δ) goes into its embedding weight's projection.
  A `torch.nn.LayerNorm`'s per-example gradients have a closed form
  (weight Σ_t δ_t ⊙ x̂_t, bias Σ_t δ_t); any other normalization layer is
  differentiated per example with torch.func on the module alone, exact for
  any normalization formula (their D-sized gradients are then projected
  densely). Nothing here needs a weight whole outside
  its module's forward and backward, so this path runs unchanged on a model
  sharded by DeepSpeed ZeRO-3 (`gradmix.trainer.sharded` says how).

Both sketch the value of the job's value kind (`gradmix.trainer.values`,
default "log_odds"). Sketching runs the module in eval mode (no dropout) and
never touches `.grad`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from gradmix.trainer.data import Batch, TokenizedExample, collate
from gradmix.trainer.errors import SketchError
from gradmix.trainer.manifest import ParamEntry, is_linear
from gradmix.trainer.projectors import Projector, StructuredProjector
from gradmix.trainer.sharded import gathered, sharded
from gradmix.trainer.values import values_of
from torch import nn
from torch.func import functional_call, grad, grad_and_value, vmap


def model_logits(output: Any) -> torch.Tensor:
    """Logits from a transformers output object or a plain tensor."""
    logits = getattr(output, "logits", output)
    if not isinstance(logits, torch.Tensor):
        raise SketchError(f"model output has no logits: {type(output).__name__}")
    return logits


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Run `module` in eval mode, restoring its training flag after."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def sketch_batch(
    module: nn.Module, projector: Projector, batch: Batch, *, value_kind: str = "log_odds"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sketch one padded batch: the values f(x) of `value_kind` and their projected gradients.

    Returns:
        (grads (n, d) float32, values (n,) float32), on the module's device.
    """
    device = next(module.parameters()).device
    batch = batch.to(device)
    if not isinstance(projector, StructuredProjector) and sharded(module):
        raise SketchError(
            f"the {projector.kind} projector cannot sketch a model sharded by ZeRO-3 (it "
            "would gather every parameter on every rank): use projector = \"structured\""
        )
    with eval_mode(module):
        if isinstance(projector, StructuredProjector):
            return _sketch_factored(module, projector, batch, value_kind)
        return _sketch_per_sample(module, projector, batch, value_kind)


def sketch_examples(
    module: nn.Module,
    projector: Projector,
    examples: Sequence[TokenizedExample],
    *,
    batch_size: int = 8,
    pad_id: int = 0,
    value_kind: str = "log_odds",
    min_batches: int = 0,
    filler: TokenizedExample | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sketch examples in batches of `batch_size` (values of `value_kind`).

    Batches are cut from the examples in order of length (a batch is padded to
    its longest example, and padding costs as much as tokens do); the rows come
    back in the order of `examples`.

    Args:
        min_batches: run at least this many batches, the extra ones on `filler`
            (default: the first example) with their results dropped: under ZeRO-3
            every rank must run as many forwards and backwards as the busiest.

    Returns:
        (grads (n, d) float32, values (n,) float32), on the CPU.
    """
    if batch_size <= 0:
        raise SketchError(f"batch_size must be > 0, got {batch_size}")
    grads, values = [], []
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    for start in range(0, len(order), batch_size):
        batch = collate([examples[i] for i in order[start : start + batch_size]], pad_id)
        g, v = sketch_batch(module, projector, batch, value_kind=value_kind)
        grads.append(g.cpu())
        values.append(v.detach().float().cpu())
    extra = min_batches - len(grads)
    if extra > 0:
        filler = filler or (examples[0] if examples else None)
        if filler is None:
            raise SketchError("min_batches needs an example to run: pass filler")
        for _ in range(extra):
            sketch_batch(module, projector, collate([filler], pad_id), value_kind=value_kind)
    if not grads:
        return torch.zeros(0, projector.dim), torch.zeros(0)
    back = torch.empty(len(order), dtype=torch.long)
    back[torch.tensor(order)] = torch.arange(len(order))
    return torch.cat(grads)[back], torch.cat(values)[back]


def per_sample_gradients(
    module: nn.Module, names: Sequence[str], batch: Batch, *, value_kind: str = "log_odds"
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Exact per-sample gradients of f over the named parameters (torch.func).

    The module is called without an attention mask: for right padding under
    causal attention no scored position sees a pad, so none is needed, and any
    mask makes transformers inspect its values (SDPA's `fast_all(mask)`), which
    vmap cannot run. Without a mask transformers' padding warning would read
    `pad_token_id in input_ids` instead, so the config's `pad_token_id` is hidden
    while the gradients are taken (see `_padding_check_off`).

    Returns:
        ({name: (n, *shape)}, values (n,)).
    """
    wanted = set(names)
    params = {n: p.detach() for n, p in module.named_parameters() if n in wanted}
    if len(params) != len(wanted):
        raise SketchError(f"unknown parameters: {sorted(wanted - set(params))[:3]}")
    rest = {n: p.detach() for n, p in module.named_parameters() if n not in wanted}
    rest.update(dict(module.named_buffers()))

    def value(p: dict[str, torch.Tensor], ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = functional_call(module, {**rest, **p}, args=(), kwargs={"input_ids": ids[None]})
        return values_of(value_kind, model_logits(out), ids[None], mask[None])[0]

    with _padding_check_off(module):
        grads, values = vmap(grad_and_value(value), in_dims=(None, 0, 0))(
            params, batch.input_ids, batch.loss_mask
        )
    return grads, values


@contextmanager
def _padding_check_off(module: nn.Module) -> Iterator[None]:
    """Hides `config.pad_token_id` so transformers skips its padding warning.

    That check (`pad_token_id in input_ids`) is data-dependent control flow,
    which vmap cannot run; it only ever warns, and the loss mask already keeps
    pads out of f.
    """
    config = getattr(module, "config", None)
    pad = getattr(config, "pad_token_id", None)
    if pad is None:
        yield
        return
    config.pad_token_id = None  # type: ignore[union-attr]
    try:
        yield
    finally:
        config.pad_token_id = pad  # type: ignore[union-attr]


def _sketch_per_sample(
    module: nn.Module, projector: Projector, batch: Batch, value_kind: str
) -> tuple[torch.Tensor, torch.Tensor]:
    grads, values = per_sample_gradients(
        module, projector.manifest.names, batch, value_kind=value_kind
    )
    return projector.project(grads), values.float()


def _sketch_factored(
    module: nn.Module, projector: StructuredProjector, batch: Batch, value_kind: str
) -> tuple[torch.Tensor, torch.Tensor]:
    n = batch.input_ids.shape[0]
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = [
        module.get_submodule(name).register_forward_hook(_capture(captured, name, n))
        for name in _hooked_modules(projector)
    ]
    try:
        with torch.enable_grad():
            ids = batch.input_ids
            logits = model_logits(module(input_ids=ids, attention_mask=torch.ones_like(ids)))
            values = values_of(value_kind, logits, batch.input_ids, batch.loss_mask)
            outputs = [y for _, y in captured.values()]
            deltas = torch.autograd.grad(values.sum(), outputs, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    seen = {
        name: (x, torch.zeros_like(y) if d is None else d.detach())
        for (name, (x, y)), d in zip(captured.items(), deltas, strict=True)
    }
    out = torch.zeros(n, projector.dim, dtype=torch.float32, device=logits.device)
    for entry in projector.manifest.entries:  # a module the forward never ran adds nothing
        if entry.module in seen:
            _project_use(module, projector, entry, seen[entry.module], out)
        for tied in (m for m in entry.tied if m in seen):
            hidden, d_logits = seen[tied]
            projector.project_layer(entry.name, _tokens(hidden, n), _tokens(d_logits, n), out)
    return out, values.detach().float()


def _hooked_modules(projector: StructuredProjector) -> list[str]:
    """Names of the modules whose inputs and output gradients the sketch needs."""
    names: dict[str, None] = {}
    for e in projector.manifest.entries:
        names.update(dict.fromkeys((e.module, *e.tied)))
    return list(names)


def _project_use(
    module: nn.Module,
    projector: StructuredProjector,
    entry: ParamEntry,
    input_and_delta: tuple[torch.Tensor, torch.Tensor],
    out: torch.Tensor,
) -> None:
    """Add to `out` the projection of an entry's gradient through its owning module,
    from that module's captured input and output gradient."""
    n = out.shape[0]
    owner = module.get_submodule(entry.module)
    x, delta = input_and_delta
    if entry.kind == "kronecker":
        projector.project_layer(entry.name, _tokens(x, n), _tokens(delta, n), out)
    elif entry.kind == "embedding":
        ids = x.reshape(n, -1)
        projector.project_embedding(entry.name, ids, _embedding_grads(owner, ids, delta), out)
    elif is_linear(owner):
        projector.project_bias(entry.name, _tokens(delta, n), out)
    else:
        attr = entry.name.rsplit(".", 1)[-1]
        grads = _norm_grads(owner, attr, _tokens(x, n), _tokens(delta, n))
        projector.project_dense(entry.name, grads, out)


def _tokens(t: torch.Tensor, n: int) -> torch.Tensor:
    """(n, ..., features) → (n, tokens, features)."""
    return t.reshape(n, -1, t.shape[-1])


def _embedding_grads(owner: nn.Module, ids: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """(n, T, D) output gradients of an embedding, zeroed where it looked up padding_idx
    (nn.Embedding gives that row no gradient)."""
    delta = _tokens(delta, ids.shape[0])
    padding_idx = getattr(owner, "padding_idx", None)
    if padding_idx is None:
        return delta
    return delta.masked_fill((ids == padding_idx).unsqueeze(-1), 0.0)


def _norm_grads(owner: nn.Module, attr: str, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Per-example gradients (n, *shape) of parameter `attr` of a normalization layer.

    For example i it is ∇_p Σ_t ⟨norm_p(x_it), δ_it⟩. A `torch.nn.LayerNorm` over
    the last dimension has it in closed form (`_layer_norm_grads`); any other
    normalization is differentiated with torch.func on the module alone, from
    its captured inputs x (n, T, D) and output gradients δ. There the module's
    own parameters are gathered whole under ZeRO-3 (D-sized), and it is called
    through `forward`, so no module hook (DeepSpeed's) sees the swapped-in
    tensors.
    """
    if type(owner) is nn.LayerNorm and len(owner.normalized_shape) == 1:
        return _layer_norm_grads(owner, attr, x, delta)
    bare = _Unhooked(owner)
    own = dict(owner.named_parameters(recurse=False))
    with gathered(own.values()):
        fixed = {f"layer.{k}": p.detach() for k, p in own.items() if k != attr}

        def contribution(
            p: torch.Tensor, x_i: torch.Tensor, delta_i: torch.Tensor
        ) -> torch.Tensor:
            y = functional_call(bare, {**fixed, f"layer.{attr}": p}, (x_i,))
            total: torch.Tensor = (y.float() * delta_i.float()).sum()
            return total

        grads: torch.Tensor = vmap(grad(contribution), in_dims=(None, 0, 0))(
            own[attr].detach(), x, delta)
        return grads


def _layer_norm_grads(
    owner: nn.LayerNorm, attr: str, x: torch.Tensor, delta: torch.Tensor
) -> torch.Tensor:
    """Per-example gradients of a LayerNorm's `weight` (Σ_t δ_t ⊙ x̂_t, x̂ the
    normalized input) or `bias` (Σ_t δ_t), in float32; the layer's own weights are
    not needed, so nothing is gathered under ZeRO-3."""
    if attr == "bias":
        return delta.float().sum(1)
    normalized = torch.nn.functional.layer_norm(x.float(), owner.normalized_shape, eps=owner.eps)
    return (normalized * delta.float()).sum(1)


class _Unhooked(nn.Module):
    """Calls a module's `forward` directly, past the hooks on the module itself."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> Any:
        return self.layer.forward(x)


def _capture(store: dict[str, tuple[torch.Tensor, torch.Tensor]], name: str, n: int) -> Any:
    """A forward hook storing (input, output) of module `name` for a batch of n rows.

    An output with batch size 1 in a batch of n > 1 is shared by all rows: it is
    expanded to n rows (same values) so that its gradient is per row.
    """

    def hook(_mod: nn.Module, args: tuple[Any, ...], output: Any) -> torch.Tensor:
        if name in store:
            raise SketchError(f"module {name!r} ran twice in one forward: cannot sketch it")
        if len(args) != 1 or not isinstance(output, torch.Tensor):
            raise SketchError(f"module {name!r} must map one tensor to one tensor")
        x, y = args[0], output
        if n > 1 and y.shape[0] == 1:
            x, y = x.expand(n, *x.shape[1:]), y.expand(n, *y.shape[1:])
        store[name] = (x.detach(), y)
        return y

    return hook
