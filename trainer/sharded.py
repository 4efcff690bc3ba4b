"""Sketching a model whose parameters are sharded across ranks (DeepSpeed ZeRO-3).

Under ZeRO stage 3 every parameter lives on the ranks as partitions: outside
a module's forward or backward its `.data` is an empty placeholder (its real
shape is `param.ds_shape`), and DeepSpeed's module hooks all-gather a
module's parameters just before it runs (forward, or backward through it) and
release them right after. Only one module's parameters are whole at a time.

What works on sharded parameters, and what does not:

- The structured projector (`gradmix.trainer.projectors.StructuredProjector`)
  never needs a weight or a weight gradient: a linear layer's sketch is built
  from its input a_t and its output gradient δ_t, an embedding's from the ids
  it looked up and δ_t. `gradmix.trainer.sketch` gets them from forward hooks
  on a normal forward of the model and one `torch.autograd.grad` of Σ_i f(x_i)
  to the hooked modules' outputs. DeepSpeed's own hooks gather each module's
  weights for that forward and again for the backward through it, exactly as
  in a training step; only activation-sized tensors (n, T, features) are kept,
  no weight is held whole beyond the module running, and no weight gradient
  is formed (autograd computes only the gradients on the path to the requested
  outputs; DeepSpeed's gradient reduction hooks never fire). So the memory
  bound is a training step's, without the gradient partitions.
- A `torch.nn.LayerNorm`'s per-example gradients are computed in closed form
  from its captured input and output gradient, without its weights. Other
  normalization layers (RMSNorm, ...) are differentiated per example with
  torch.func on the layer alone. Their parameters are D-sized: they are gathered whole with
  `deepspeed.zero.GatheredParameters` for that computation (`gathered`), and
  the layer is called through its `forward` so that DeepSpeed's hooks (which
  torch.func's functional call would otherwise trigger on swapped-in tensors)
  stay out of it.
- The dense projector takes exact per-sample gradients with torch.func over
  every sketched parameter at once: under ZeRO-3 that would mean gathering
  the whole model on every rank, which is what ZeRO-3 exists to avoid. It is
  refused with a message naming the structured projector.
- Gathers are collectives: every rank must run the same number of sketch
  forwards and backwards, in the same order. A source's draw is split
  ids[rank::world], so ranks may hold a batch fewer: they run
  `lockstep_batches` batches, the missing ones on a repeat of an example whose
  result is dropped. Whether every rank could read a source is agreed before
  any rank sketches it.

FSDP would use the same path: FSDP (and FSDP2's `fully_shard`) likewise
unshards a wrapped module's parameters in its forward and before its backward,
so forward hooks on the inner modules and `torch.autograd.grad` to their
outputs give the same (a, δ) with the same bound. Two differences: the hooks
must sit on the original submodules (FSDP1 with `use_orig_params=True`, or
FSDP2, keeps their names and parameters), and the manifest must be built
before wrapping (FSDP1 flattens parameters). FSDP is not tested here.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the config check below runs without importing torch
    import torch
    from gradmix.trainer.config import SketchingConfig
    from torch import nn


def sketching_problem(sketching: SketchingConfig) -> str:
    """Why these sketch settings cannot run on a ZeRO-3 sharded model ("" if they can)."""
    if sketching.projector != "structured":
        return (
            f"ZeRO stage 3 needs [sketching].projector = \"structured\" (the "
            f"{sketching.projector} projector would gather every parameter on every rank)"
        )
    if sketching.drift_bound:
        return (
            "ZeRO stage 3: [sketching].drift_bound needs every parameter whole on rank 0; "
            "use reanchor_every instead"
        )
    return ""


def is_sharded(param: nn.Parameter) -> bool:
    """Whether a parameter is a DeepSpeed ZeRO-3 partitioned parameter."""
    return hasattr(param, "ds_id")


def sharded(module: nn.Module) -> bool:
    """Whether `module`'s parameters are partitioned by DeepSpeed ZeRO-3."""
    return any(is_sharded(p) for p in module.parameters())


def full_shape(param: torch.Tensor) -> tuple[int, ...]:
    """A parameter's real shape (a ZeRO-3 parameter's `.shape` is its placeholder's)."""
    return tuple(getattr(param, "ds_shape", param.shape))


@contextmanager
def gathered(params: Iterable[nn.Parameter]) -> Iterator[None]:
    """Collective under ZeRO-3: `params` whole on every rank inside the block (read only);
    a no-op for ordinary parameters."""
    params = list(params)
    if not any(is_sharded(p) for p in params):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params):
        yield


def lockstep_batches(total: int, world_size: int, batch_size: int) -> int:
    """Sketch batches of the busiest rank when `total` examples are split
    ids[rank::world_size] and sketched `batch_size` at a time."""
    share = -(-total // world_size)
    return -(-share // batch_size)
