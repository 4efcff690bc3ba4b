"""Seeded random projections of per-sample gradients to d dimensions.

Every projection matrix here is regenerated on demand from (seed, parameter
name, block index) with a CPU `torch.Generator`, so every process and every
restart produces the same sketch coordinates and the full matrix is never held.

Two projectors behind one interface (`Projector.project`):

`DenseProjector` (the reference). For the flat gradient g ∈ R^p,
g̃ = P g with P ∈ R^{d×p}, entries ±1/√d i.i.d. P is cut into blocks of
`block_size` columns per parameter; block b of parameter `name` is drawn from
the generator seeded by hash(seed, name, b). E[PᵀP] = I, so ⟨g̃, h̃⟩ is an
unbiased estimate of ⟨g, h⟩ with variance (‖g‖²‖h‖² + ⟨g,h⟩² − 2Σᵢgᵢ²hᵢ²)/d.

`StructuredProjector` (fast, TRAK/LoGra style). For the weight W (out×in) of
a linear layer the per-sample gradient is G = Σ_t δ_t a_tᵀ (δ_t: gradient at
the layer output, a_t: layer input, t over tokens). With seeded Rademacher
factors R_out ∈ R^{k_o×out}, R_in ∈ R^{k_i×in} (entries ±1/√k; a side with at
most k = `factor_dim` units uses the identity instead), the layer's factored
projection is

    Z = R_out G R_inᵀ = Σ_t (R_out δ_t)(R_in a_t)ᵀ ∈ R^{k_o×k_i},

computed from δ and a without ever forming G; as a map on vec(G) it is the
Kronecker product R_out ⊗ R_in. Z is then folded into d dimensions by a
seeded CountSketch C (each of the k_o·k_i coordinates goes to one of d
buckets with a random sign), and the layers' results are summed:
g̃ = Σ_l C_l vec(Z_l), plus the dense projection of linear biases
(per-sample bias gradient Σ_t δ_t). E[R_outᵀR_out] = E[R_inᵀR_in] = I and
E[C_lᵀC_m] = I·[l = m], so ⟨g̃, h̃⟩ is again unbiased for ⟨g, h⟩. Its
variance is larger than dense: for rank-one G = u vᵀ, H = x yᵀ the Kronecker
stage gives ⟨R_out u, R_out x⟩⟨R_in v, R_in y⟩, a product of two
independent JL estimates, so its relative error is about
√(1/k_o + 1/k_i) (instead of √(1/d)), and the CountSketch adds a dense-like
(‖z‖²‖z'‖² + ⟨z,z'⟩²)/d term. Sums over many tokens average part of this out.

The same scheme covers the rest of a transformer:

- Embedding tables. For E ∈ R^{V×D} (rows indexed by token ids, or by
  positions for a position embedding) the per-sample gradient is
  G = Σ_t e_{id_t} δ_tᵀ (δ_t: gradient at the embedding output, e_i the i-th
  unit vector), a sum of rank-one terms like a linear layer's with the one-hot
  e_{id_t} as the "output" side. With factors R_V (k_V×V) and R_D (k_D×D),
  Z = R_V G R_Dᵀ = Σ_t R_V[:, id_t] (R_D δ_t)ᵀ: the vocabulary side is a
  column gather of R_V, no V-sized product.
- Tied output layers. When E is also the weight of output linear layers
  (logits = h Eᵀ, as GPT-2's lm_head), that use adds Σ_t δ'_t h_tᵀ (δ'_t at
  the logits, h_t the final hidden state) in the same (V, D) layout, so the
  parameter's per-sample gradient is the sum of both parts. Each part is
  projected with E's own R_V, R_D and CountSketch and the results are added:
  by linearity, the projection of the sum. The vocabulary side of the output
  part is one (n·T, V) @ (V, k_V) product; no V×D matrix is formed.
- Normalization layers (LayerNorm, RMSNorm). Their per-sample gradients are
  D-dimensional (LayerNorm: weight Σ_t δ_t ⊙ x̂_t, bias Σ_t δ_t, x̂_t the
  normalized input) and are projected densely, like linear biases.

Every parameter has its own factors and CountSketch (or dense blocks), seeded
by (seed, name, ...), so the cross terms between parameters have mean zero and
the estimate stays unbiased.
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import ClassVar

import torch
from gradmix.trainer.errors import SketchError
from gradmix.trainer.manifest import Manifest, ParamEntry, build_manifest

#: Columns of P generated at once by the dense projector.
DEFAULT_BLOCK_SIZE = 1 << 15
#: Bytes of generated dense blocks kept in memory (per projector).
DEFAULT_CACHE_BYTES = 256 << 20


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit generator seed from the job seed and a path of names/indices."""
    key = "\x00".join([str(seed), *map(str, parts)]).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def rademacher(seed: int, rows: int, cols: int, *parts: object) -> torch.Tensor:
    """A (rows, cols) float32 CPU matrix of ±1 drawn from hash(seed, *parts)."""
    gen = torch.Generator().manual_seed(derive_seed(seed, *parts))
    signs = torch.randint(0, 2, (rows, cols), generator=gen, dtype=torch.float32)
    return signs.mul_(2.0).sub_(1.0)


def default_factor_dim(dim: int) -> int:
    """Default k of the structured projector: 4⌈√d⌉, at least 64 (so k² ≥ 16·d).

    The Kronecker stage's relative error is about √(1/k_o + 1/k_i): at
    2⌈√d⌉ (34 for d = 256) that is ≈ 0.24, against 1/√d for the dense
    projector, and `python bench/fidelity.py` (structured vs dense) showed
    the cost in the estimate's skill; 4⌈√d⌉ halves the variance, and a side
    of at most k units is projected exactly.
    """
    return max(64, 4 * math.isqrt(dim - 1) + 4)


class Projector(ABC):
    """Projects per-sample gradients of the manifest's parameters to `dim` dimensions.

    Args:
        manifest: the parameters covered (and the projector's options).
        dim: projection dimension d (> 0).
        seed: projection seed (>= 0).
    """

    kind: ClassVar[str]

    def __init__(self, manifest: Manifest, *, dim: int, seed: int) -> None:
        if dim <= 0:
            raise SketchError(f"projection dim must be > 0, got {dim}")
        if seed < 0:
            raise SketchError(f"projection seed must be >= 0, got {seed}")
        if manifest.projector != self.kind:
            raise SketchError(f"manifest is for {manifest.projector!r}, not {self.kind!r}")
        self.manifest = manifest
        self.dim = dim
        self.seed = seed
        self._dense = _DenseBlocks(dim, seed, DEFAULT_BLOCK_SIZE, DEFAULT_CACHE_BYTES)

    @abstractmethod
    def project(self, grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Project explicit per-sample gradients.

        Args:
            grads: for every manifest entry, its (n, *shape) per-sample gradient.

        Returns:
            (n, dim) float32 projections.
        """

    def _check(self, grads: Mapping[str, torch.Tensor]) -> int:
        missing = [n for n in self.manifest.names if n not in grads]
        if missing:
            raise SketchError(f"gradients missing for {missing[:3]} (and {len(missing)} total)")
        return int(grads[self.manifest.names[0]].shape[0])


class DenseProjector(Projector):
    """Blocked Rademacher projection of the flat gradient (the reference)."""

    kind = "dense"

    def __init__(
        self,
        manifest: Manifest,
        *,
        dim: int,
        seed: int,
        block_size: int = DEFAULT_BLOCK_SIZE,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        super().__init__(manifest, dim=dim, seed=seed)
        self._dense = _DenseBlocks(dim, seed, block_size, cache_bytes)

    def project(self, grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
        n = self._check(grads)
        first = grads[self.manifest.names[0]]
        out = torch.zeros(n, self.dim, dtype=torch.float32, device=first.device)
        for entry in self.manifest.entries:
            self._dense.accumulate(out, entry.name, grads[entry.name].reshape(n, -1))
        return out


class StructuredProjector(Projector):
    """Per-weight Kronecker projection folded by CountSketch (see module docstring).

    Args:
        manifest: a "structured" manifest (kronecker linear weights, embedding
            tables, dense biases and normalization parameters).
        dim: projection dimension d.
        seed: projection seed.
    """

    kind = "structured"

    def __init__(self, manifest: Manifest, *, dim: int, seed: int) -> None:
        super().__init__(manifest, dim=dim, seed=seed)
        options = dict(manifest.options)
        self.factor_dim = int(options.get("factor_dim", default_factor_dim(dim)))
        if self.factor_dim <= 0:
            raise SketchError(f"factor_dim must be > 0, got {self.factor_dim}")
        self._entries = {e.name: e for e in manifest.entries}
        self._factors: dict[tuple[str, str], _Factors] = {}

    def project(self, grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Explicit form: applies R_out G R_inᵀ to full gradients (reference and tests)."""
        n = self._check(grads)
        first = grads[self.manifest.names[0]]
        out = torch.zeros(n, self.dim, dtype=torch.float32, device=first.device)
        for entry in self.manifest.entries:
            g = grads[entry.name].float()
            if entry.kind == "dense":
                self._dense.accumulate(out, entry.name, g.reshape(n, -1))
                continue
            g = g.transpose(1, 2) if entry.transposed else g  # (n, out, in) or (n, V, D)
            f = self._layer_factors(entry, g.device)
            z = f.apply_out(g.transpose(1, 2)).transpose(1, 2)  # R_out G: (n, k_o, in)
            z = f.apply_in(z)  # (R_out G) R_inᵀ: (n, k_o, k_i)
            f.fold(out, z.reshape(n, -1))
        return out

    def project_layer(
        self, name: str, inputs: torch.Tensor, output_grads: torch.Tensor, out: torch.Tensor
    ) -> None:
        """Add the projection of a linear weight's per-sample gradient to `out`.

        Also the output-layer part of a tied embedding weight (same factors).

        Args:
            name: the weight's manifest name.
            inputs: (n, T, in) layer inputs a_t.
            output_grads: (n, T, out) gradients δ_t of Σ f at the layer output.
            out: (n, dim) float32 accumulator.
        """
        f = self._layer_factors(self._entries[name], out.device)
        ra = f.apply_in(inputs.float())  # (n, T, k_i)
        rd = f.apply_out(output_grads.float())  # (n, T, k_o)
        z = torch.bmm(rd.transpose(1, 2), ra)  # Σ_t rd_t ra_tᵀ: (n, k_o, k_i)
        f.fold(out, z.reshape(z.shape[0], -1))

    def project_embedding(
        self, name: str, ids: torch.Tensor, output_grads: torch.Tensor, out: torch.Tensor
    ) -> None:
        """Add the projection of an embedding weight's per-sample gradient to `out`.

        Args:
            name: the weight's manifest name.
            ids: (n, T) row indices looked up (token ids or positions).
            output_grads: (n, T, D) gradients δ_t of Σ f at the embedding output
                (zero where a row gets no gradient, e.g. at padding_idx).
            out: (n, dim) float32 accumulator.
        """
        f = self._layer_factors(self._entries[name], out.device)
        rv = f.gather_out(ids)  # (n, T, k_V)
        rd = f.apply_in(output_grads.float())  # (n, T, k_D)
        z = torch.bmm(rv.transpose(1, 2), rd)  # (n, k_V, k_D)
        f.fold(out, z.reshape(z.shape[0], -1))

    def project_bias(self, name: str, output_grads: torch.Tensor, out: torch.Tensor) -> None:
        """Add the projection of a linear bias's per-sample gradient Σ_t δ_t to `out`."""
        self._dense.accumulate(out, name, output_grads.float().sum(1))

    def project_dense(self, name: str, grads: torch.Tensor, out: torch.Tensor) -> None:
        """Add the dense projection of an explicit (n, *shape) per-sample gradient to `out`."""
        self._dense.accumulate(out, name, grads.reshape(grads.shape[0], -1))

    def _layer_factors(self, entry: ParamEntry, device: torch.device) -> _Factors:
        key = (entry.name, str(device))
        if key not in self._factors:
            rows, cols = entry.shape
            n_out, n_in = (cols, rows) if entry.transposed else (rows, cols)
            self._factors[key] = _Factors.make(
                self.seed, entry.name, n_out, n_in, self.factor_dim, self.dim, device
            )
        return self._factors[key]


class _Factors:
    """R_out, R_in and the CountSketch of one 2-D weight (small, cached).

    For an embedding weight (V, D), "out" is the vocabulary side V and "in" the
    embedding side D.
    """

    def __init__(
        self,
        n_out: int,
        r_out: torch.Tensor | None,
        r_in: torch.Tensor | None,
        buckets: torch.Tensor,
        signs: torch.Tensor,
    ) -> None:
        self.n_out = n_out
        self.r_out, self.r_in, self.buckets, self.signs = r_out, r_in, buckets, signs

    @classmethod
    def make(
        cls, seed: int, name: str, n_out: int, n_in: int, k: int, dim: int, device: torch.device
    ) -> _Factors:
        def factor(side: str, units: int) -> torch.Tensor | None:
            if units <= k:
                return None  # identity: exact, no variance
            return (rademacher(seed, k, units, name, side) / math.sqrt(k)).to(device)

        k_out, k_in = min(k, n_out), min(k, n_in)
        gen = torch.Generator().manual_seed(derive_seed(seed, name, "countsketch"))
        buckets = torch.randint(0, dim, (k_out * k_in,), generator=gen)
        signs = torch.randint(0, 2, (k_out * k_in,), generator=gen, dtype=torch.float32) * 2 - 1
        return cls(
            n_out, factor("out", n_out), factor("in", n_in), buckets.to(device), signs.to(device)
        )

    def apply_out(self, x: torch.Tensor) -> torch.Tensor:
        """(..., out) → (..., k_o)."""
        return x if self.r_out is None else x @ self.r_out.T

    def gather_out(self, ids: torch.Tensor) -> torch.Tensor:
        """(...) indices i → (..., k_o) columns R_out[:, i] (R_out e_i without the one-hot)."""
        if self.r_out is None:
            return torch.nn.functional.one_hot(ids, self.n_out).float()
        return self.r_out.T[ids]

    def apply_in(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) → (..., k_i)."""
        return x if self.r_in is None else x @ self.r_in.T

    def fold(self, out: torch.Tensor, z: torch.Tensor) -> None:
        """out += C z: CountSketch of (n, k_o·k_i) into (n, dim)."""
        out.index_add_(1, self.buckets, z * self.signs)


class _DenseBlocks:
    """Blocked ±1/√d columns of P, regenerated from (seed, name, block), partly cached."""

    def __init__(self, dim: int, seed: int, block_size: int, cache_bytes: int) -> None:
        if block_size <= 0:
            raise SketchError(f"block_size must be > 0, got {block_size}")
        self.dim, self.seed, self.block_size = dim, seed, block_size
        self._cache_left = cache_bytes
        self._cache: dict[tuple[str, int, str], torch.Tensor] = {}

    def block(self, name: str, index: int, cols: int, device: torch.device) -> torch.Tensor:
        """Block `index` of parameter `name`: (cols, dim), scaled by 1/√d."""
        key = (name, index, str(device))
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        p = rademacher(self.seed, self.dim, cols, name, index).T.contiguous()
        p = p.mul_(1.0 / math.sqrt(self.dim)).to(device)
        size = p.numel() * p.element_size()
        if size <= self._cache_left:
            self._cache[key] = p
            self._cache_left -= size
        return p

    def accumulate(self, out: torch.Tensor, name: str, flat: torch.Tensor) -> None:
        """out += flat @ P_nameᵀ for a (n, p) flat per-sample gradient."""
        flat = flat.float()
        for index, start in enumerate(range(0, flat.shape[1], self.block_size)):
            chunk = flat[:, start : start + self.block_size]
            out.addmm_(chunk, self.block(name, index, chunk.shape[1], flat.device))


def make_projector(manifest: Manifest, *, dim: int, seed: int) -> Projector:
    """The projector a manifest was built for."""
    if manifest.projector == "dense":
        return DenseProjector(manifest, dim=dim, seed=seed)
    if manifest.projector == "structured":
        return StructuredProjector(manifest, dim=dim, seed=seed)
    raise SketchError(f"unknown projector {manifest.projector!r}")


def build_projector(
    module: torch.nn.Module,
    *,
    kind: str,
    dim: int,
    seed: int,
    patterns: tuple[str, ...] = ("*",),
    factor_dim: int | None = None,
) -> Projector:
    """Build the manifest of `module`'s selected parameters and its projector.

    Args:
        module: the model (for DeepSpeed: `engine.module`).
        kind: "dense" or "structured".
        dim: projection dimension d.
        seed: projection seed.
        patterns: fnmatch patterns over parameter names (default: all trainable).
        factor_dim: structured only: k of the Kronecker factors (default
            `default_factor_dim(dim)`: 4⌈√d⌉, at least 64).
    """
    options: tuple[tuple[str, int], ...] = ()
    if kind == "structured":
        options = (("factor_dim", factor_dim or default_factor_dim(dim)),)
    manifest = build_manifest(module, projector=kind, patterns=patterns, options=options)
    return make_projector(manifest, dim=dim, seed=seed)
