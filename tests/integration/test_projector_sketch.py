"""Projectors and sketches on a tiny GPT-2 (and a tiny Llama): reproducibility,
JL accuracy, structured-vs-dense agreement, the structured sketch's hooks vs
exact per-sample gradients for every entry kind (linear, embedding, tied output
layer, normalization), full parameter coverage, agreement with a plain autograd
loop for both value kinds, the geometric value's link to the token
cross-entropy, and the dense path on a model built by the trainer (pad token
set)."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from gradmix.trainer.config import ModelConfig, TokenizerConfig
from gradmix.trainer.data import TokenizedExample, collate, tokenize
from gradmix.trainer.errors import SketchError
from gradmix.trainer.manifest import build_manifest
from gradmix.trainer.projectors import (
    DenseProjector,
    Projector,
    StructuredProjector,
    build_projector,
)
from gradmix.trainer.setup import build_model, build_tokenizer
from gradmix.trainer.sketch import per_sample_gradients, sketch_examples
from gradmix.trainer.values import (
    VALUE_KINDS,
    completion_loss,
    geometric_log_odds_values,
    log_odds_values,
    logistic_loss,
    values_of,
)
from scipy.stats import spearmanr
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

#: The block-linear parameters both projectors can cover (GPT-2 Conv1D layers).
LINEAR = ("transformer.h.*.attn.c_*", "transformer.h.*.mlp.c_*")


def tiny_model() -> GPT2LMHeadModel:
    """A 2-layer GPT-2 (no dropout), identical on every call."""
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=64,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=1,
        eos_token_id=1,
    )
    cfg._attn_implementation = "eager"
    return GPT2LMHeadModel(cfg)


def tiny_llama() -> LlamaForCausalLM:
    """A 2-layer Llama with an untied lm_head, RMSNorms and an embedding padding_idx (5,
    a token the examples use), identical on every call."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=5,
        bos_token_id=1,
        eos_token_id=1,
    )
    cfg._attn_implementation = "eager"
    return LlamaForCausalLM(cfg)


MODELS = {"gpt2": tiny_model, "llama": tiny_llama}


def examples(n: int, seed: int = 0) -> list[TokenizedExample]:
    """n random examples of 8–23 tokens, the second half scored."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(8, 24, (1,), generator=gen))
        ids = torch.randint(3, 64, (length,), generator=gen).tolist()
        cut = length // 2
        out.append(TokenizedExample(tuple(ids), tuple([False] * cut + [True] * (length - cut))))
    return out


def _gram(x: torch.Tensor) -> np.ndarray:
    return (x.double() @ x.double().T).numpy()


def _flat_grads(
    model: torch.nn.Module, names: list[str], exs: list[TokenizedExample]
) -> torch.Tensor:
    grads, _ = per_sample_gradients(model, names, collate(exs, pad_id=0))
    return torch.cat([grads[n].reshape(len(exs), -1) for n in names], dim=1)


def test_same_seed_same_sketch_in_another_process(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, r"{Path(__file__).parent}")
        import numpy as np
        from test_projector_sketch import examples, tiny_model
        from gradmix.trainer.projectors import build_projector
        from gradmix.trainer.sketch import sketch_examples
        model = tiny_model()
        for kind in ("dense", "structured"):
            proj = build_projector(model, kind=kind, dim=48, seed=7)
            g, v = sketch_examples(model, proj, examples(5), batch_size=3)
            np.save(r"{tmp_path}/" + kind + ".npy", g.numpy())
            open(r"{tmp_path}/" + kind + ".hash", "w").write(proj.manifest.hash())
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    model = tiny_model()
    for kind in ("dense", "structured"):
        proj = build_projector(model, kind=kind, dim=48, seed=7)
        g, _ = sketch_examples(model, proj, examples(5), batch_size=2)
        other = np.load(tmp_path / f"{kind}.npy")
        np.testing.assert_allclose(g.numpy(), other, rtol=1e-5, atol=1e-6)
        assert (tmp_path / f"{kind}.hash").read_text() == proj.manifest.hash()
        seed8 = build_projector(model, kind=kind, dim=48, seed=8)
        g8, _ = sketch_examples(model, seed8, examples(5))
        assert not np.allclose(g8.numpy(), other), "another seed must give another projection"


def test_dense_preserves_inner_products_within_jl_tolerance() -> None:
    # Stated tolerance: ⟨Pg, Ph⟩ has standard deviation ≤ √(2/d)·‖g‖‖h‖ for
    # Rademacher P (d rows); every pair must be within 5 standard deviations.
    model, dim = tiny_model(), 2048
    exs = examples(8)
    proj = build_projector(model, kind="dense", dim=dim, seed=1)
    exact = _flat_grads(model, proj.manifest.names, exs)
    sketch, _ = sketch_examples(model, proj, exs, batch_size=4)
    true, est = _gram(exact), _gram(sketch)
    norms = np.sqrt(np.diag(true))
    bound = 5 * np.sqrt(2 / dim) * np.outer(norms, norms)
    assert np.all(np.abs(est - true) <= bound)


@pytest.mark.parametrize(
    ("patterns", "factor_dim", "dim"),
    [(LINEAR, None, 512), (LINEAR, 8, 512), (("*",), None, 1024)],
    ids=["linear", "linear-k8", "all"],
)
def test_structured_agrees_with_dense_on_inner_product_ranks(
    patterns: tuple[str, ...], factor_dim: int | None, dim: int
) -> None:
    # Stated tolerance: over 16 examples (136 pairs incl. norms), the Spearman
    # rank correlation of the sketched inner products with the exact ones is
    # ≥ 0.9 for dense and ≥ 0.8 for structured, and structured vs dense ≥ 0.8.
    # factor_dim=8 forces random Kronecker factors on every layer of the tiny model.
    # "all" adds the tied wte/lm_head, wpe and the LayerNorms; there dense needs
    # d=1024 to clear 0.9 with a margin (it is 0.90 at d=512).
    model, exs = tiny_model(), examples(16, seed=3)
    structured = build_projector(
        model, kind="structured", dim=dim, seed=2, patterns=patterns, factor_dim=factor_dim
    )
    dense = build_projector(model, kind="dense", dim=dim, seed=2, patterns=patterns)
    assert structured.manifest.names == dense.manifest.names
    upper = np.triu_indices(len(exs))
    true = _gram(_flat_grads(model, dense.manifest.names, exs))[upper]
    s = _gram(sketch_examples(model, structured, exs, batch_size=8)[0])[upper]
    d = _gram(sketch_examples(model, dense, exs, batch_size=8)[0])[upper]
    assert spearmanr(d, true).statistic >= 0.9
    assert spearmanr(s, true).statistic >= 0.8
    assert spearmanr(s, d).statistic >= 0.8


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_structured_manifest_covers_every_parameter(arch: str) -> None:
    model = MODELS[arch]()
    structured = build_manifest(model, projector="structured")
    assert structured.excluded == ()
    assert structured.names == build_manifest(model, projector="dense").names
    kinds = {e.name: e for e in structured.entries}
    if arch == "gpt2":  # lm_head.weight is wte.weight: one entry, both uses
        assert model.lm_head.weight is model.transformer.wte.weight
        assert kinds["transformer.wte.weight"].kind == "embedding"
        assert kinds["transformer.wte.weight"].tied == ("lm_head",)
        assert kinds["transformer.wpe.weight"].kind == "embedding"
        assert kinds["transformer.ln_f.bias"].kind == "dense"
    else:
        assert kinds["model.embed_tokens.weight"].kind == "embedding"
        assert kinds["model.embed_tokens.weight"].tied == ()
        assert kinds["lm_head.weight"].kind == "kronecker"
        assert kinds["model.norm.weight"].kind == "dense"


@pytest.mark.parametrize("factor_dim", [4, 64])
@pytest.mark.parametrize("arch", sorted(MODELS))
def test_factored_structured_sketch_is_the_projection_of_exact_gradients(
    arch: str, factor_dim: int
) -> None:
    """The hooks' sketch equals `project()` of torch.func per-sample gradients, entry by
    entry: linear weights and biases, embeddings (token, position, padding_idx),
    the tied wte/lm_head sum, and normalization weights and biases. factor_dim=4
    makes every Kronecker factor random; 64 makes them all the identity."""
    model, exs = MODELS[arch](), examples(5, seed=6)
    proj = build_projector(model, kind="structured", dim=64, seed=3, factor_dim=factor_dim)
    assert isinstance(proj, StructuredProjector)
    sketched, _ = sketch_examples(model, proj, exs, batch_size=5)
    grads, _ = per_sample_gradients(model, proj.manifest.names, collate(exs, pad_id=0))
    scale = float(sketched.abs().max())
    for entry in proj.manifest.entries:  # one entry at a time: a wrong one cannot hide
        alone = build_projector(
            model, kind="structured", dim=64, seed=3, factor_dim=factor_dim, patterns=(entry.name,)
        )
        part, _ = sketch_examples(model, alone, exs, batch_size=5)
        explicit = alone.project({entry.name: grads[entry.name]})
        torch.testing.assert_close(part, explicit, rtol=1e-4, atol=1e-5 * scale, msg=entry.name)
    torch.testing.assert_close(sketched, proj.project(grads), rtol=1e-4, atol=1e-5 * scale)


def _grad(p: torch.Tensor) -> torch.Tensor:
    assert p.grad is not None
    return p.grad.clone()


def _assert_matches_autograd_loop(
    model: torch.nn.Module,
    proj: Projector,
    exs: list[TokenizedExample],
    value_kind: str,
    sketched: tuple[torch.Tensor, torch.Tensor],
) -> None:
    """Each example's sketch is the projection of its own autograd gradient of f."""
    grads, values = sketched
    params = dict(model.named_parameters())
    for i, ex in enumerate(exs):
        model.zero_grad()
        ids = torch.tensor([ex.input_ids])
        logits = model(input_ids=ids).logits
        f = values_of(value_kind, logits, ids, torch.tensor([ex.loss_mask]))[0]
        f.backward()
        explicit = proj.project({n: _grad(params[n])[None] for n in proj.manifest.names})
        torch.testing.assert_close(grads[i], explicit[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(values[i], f.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("value_kind", VALUE_KINDS)
@pytest.mark.parametrize("kind", ["dense", "structured"])
def test_sketch_matches_a_plain_autograd_loop(kind: str, value_kind: str) -> None:
    model, exs = tiny_model(), examples(5, seed=4)
    proj: Projector = build_projector(model, kind=kind, dim=32, seed=5, factor_dim=None)
    if kind == "structured":  # small factors so the Kronecker path is really random
        proj = build_projector(model, kind=kind, dim=32, seed=5, factor_dim=4)
    sketched = sketch_examples(model, proj, exs, batch_size=3, value_kind=value_kind)
    _assert_matches_autograd_loop(model, proj, exs, value_kind, sketched)


def test_geometric_value_models_the_token_cross_entropy() -> None:
    """softplus(−f) of "geometric_log_odds" is each example's mean token cross-entropy
    (to float32 rounding, 1e-5), the loss the trainer trains on; "log_odds" is not."""
    model, exs = tiny_model(), examples(6, seed=2)
    batch = collate(exs, pad_id=0)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids).logits
    geometric = geometric_log_odds_values(logits, batch.input_ids, batch.loss_mask)
    per_token = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), batch.input_ids[:, 1:], reduction="none"
    )
    scored = batch.loss_mask[:, 1:].float()
    mean_ce = (per_token * scored).sum(-1) / scored.sum(-1)
    torch.testing.assert_close(logistic_loss(geometric), mean_ce, rtol=1e-5, atol=1e-5)
    one = collate(exs[:1], pad_id=0)  # one example: its CE is completion_loss
    with torch.no_grad():
        one_logits = model(input_ids=one.input_ids).logits
    torch.testing.assert_close(
        logistic_loss(values_of("geometric_log_odds", one_logits, one.input_ids, one.loss_mask)),
        completion_loss(one_logits, one.input_ids, one.loss_mask)[None],
        rtol=1e-5,
        atol=1e-5,
    )
    # One confident token (p = 0.99) and one hopeless one (p = 0.01): their log-odds
    # cancel, so "log_odds" sees a coin flip (0.693) where the cross-entropy is 2.31.
    ids, mask = torch.tensor([[0, 1, 1]]), torch.tensor([[False, True, True]])
    probs = torch.tensor([[[0.0, 0.99, 0.01], [0.0, 0.01, 0.99]]]) + 1e-12
    two = torch.cat([probs.log(), torch.zeros(1, 1, 3)], dim=1)
    cross_entropy = -(math.log(0.99) + math.log(0.01)) / 2
    assert float(logistic_loss(geometric_log_odds_values(two, ids, mask))) == pytest.approx(
        cross_entropy, rel=1e-5
    )
    assert float(logistic_loss(log_odds_values(two, ids, mask))) == pytest.approx(
        math.log(2), rel=1e-5
    )


def test_geometric_value_is_finite_at_the_clamp() -> None:
    """Near-certain and hopeless completions stay finite (p̄ clamped to [1e-6, 1 − 1e-6],
    like the log-odds value's p), with finite gradients."""
    ids = torch.tensor([[0, 1, 2, 3]])
    mask = torch.tensor([[False, True, True, True]])
    for scale, expected_loss in ((1e4, -math.log1p(-1e-6)), (-1e4, -math.log(1e-6))):
        logits = torch.zeros(1, 4, 8)
        logits[0, torch.arange(3), ids[0, 1:]] = scale
        logits.requires_grad_(True)
        f = geometric_log_odds_values(logits, ids, mask)
        f.sum().backward()
        assert logits.grad is not None and torch.isfinite(logits.grad).all()
        assert float(logistic_loss(f.detach())) == pytest.approx(expected_loss, rel=1e-3)
    with pytest.raises(SketchError, match="unknown value kind"):
        values_of("mean_probability", torch.zeros(1, 4, 8), ids, mask)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_dense_sketch_on_a_trainer_built_model_with_a_pad_token(attention: str) -> None:
    """The trainer's build_model sets pad_token_id; transformers then checks for pads
    with a data-dependent test when no attention mask is given, and SDPA inspects a
    given mask's values: vmap can run neither. The dense sketch must work on such a
    model, on padded batches, with either attention implementation."""
    tokenizer = build_tokenizer(TokenizerConfig(kind="char", alphabet="0123456789+= "))
    torch.manual_seed(0)
    config = {"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 2, "n_positions": 32}
    config.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # the loop runs in train mode
    model = build_model(ModelConfig(config=config, attn_implementation=attention), tokenizer)
    assert model.config.pad_token_id is not None
    exs = [tokenize(p, c, tokenizer, 32) for p, c in (("1+2=", "3"), ("12+20=", "32"))]
    assert collate(exs, tokenizer.pad_id).input_ids[0, -1] == tokenizer.pad_id  # padded
    proj = build_projector(model, kind="dense", dim=16, seed=1)
    for value_kind in VALUE_KINDS:
        sketched = sketch_examples(
            model, proj, exs, batch_size=2, pad_id=tokenizer.pad_id, value_kind=value_kind
        )
        _assert_matches_autograd_loop(model, proj, exs, value_kind, sketched)


def test_manifest_hash_tracks_what_changes_the_sketch() -> None:
    model = tiny_model()
    dense = build_manifest(model, projector="dense")
    assert dense.hash() == build_manifest(model, projector="dense").hash()
    assert dense.hash() != build_manifest(model, projector="dense", patterns=LINEAR).hash()
    s8 = build_projector(model, kind="structured", dim=64, seed=0, factor_dim=8).manifest
    s9 = build_projector(model, kind="structured", dim=64, seed=0, factor_dim=9).manifest
    assert s8.hash() != s9.hash() != dense.hash()
    linear = build_projector(
        model, kind="structured", dim=64, seed=0, factor_dim=8, patterns=LINEAR
    )
    assert linear.manifest.hash() != s8.hash()
    assert {e.kind for e in s8.entries} == {"dense", "kronecker", "embedding"}


def test_bad_settings_are_typed_errors() -> None:
    model = tiny_model()
    with pytest.raises(SketchError, match="no trainable parameter"):
        build_manifest(model, projector="dense", patterns=("nope.*",))
    with pytest.raises(SketchError, match="unknown projector"):
        build_manifest(model, projector="sparse")
    manifest = build_manifest(model, projector="dense")
    with pytest.raises(SketchError, match="dim"):
        DenseProjector(manifest, dim=0, seed=0)
    with pytest.raises(SketchError, match="not 'structured'"):
        StructuredProjector(manifest, dim=8, seed=0)


@pytest.mark.parametrize("kind", ["dense", "structured"])
def test_rows_come_back_in_the_examples_order_whatever_the_batching(kind: str) -> None:
    """Batches are cut in order of length (less padding); each row is still its own
    example's, the same as sketched alone."""
    model, exs = tiny_model(), examples(7, seed=9)
    assert len({len(e.input_ids) for e in exs}) > 3  # lengths differ: the order matters
    proj = build_projector(model, kind=kind, dim=32, seed=1)
    batched, values = sketch_examples(model, proj, exs, batch_size=3)
    alone = [sketch_examples(model, proj, [e], batch_size=1) for e in exs]
    torch.testing.assert_close(batched, torch.cat([g for g, _ in alone]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(values, torch.cat([v for _, v in alone]), rtol=1e-5, atol=1e-6)
