"""The per-example value f(x) whose gradient is sketched (DESIGN.md §4).

For an example with completion tokens y_1..y_T (the loss-masked tokens) and
model probabilities p_t of those tokens, two value kinds:

- "log_odds":            f(x) = mean_t logit(p_t),
- "geometric_log_odds":  f(x) = logit(p̄),  p̄ = exp(mean_t log p_t),

with logit(p) = log p − log1p(−p) and p (resp. p̄) clamped to
[1e-6, 1 − 1e-6]. ℓ(f) = softplus(−f) is the loss the server's logistic
regression linearises. For "geometric_log_odds", softplus(−logit(p̄)) =
−log p̄ = mean_t −log p_t, the example's mean token cross-entropy: the
estimate then models the very loss the trainer fine-tunes on (exactly,
inside the clamp). "log_odds" weighs a confidently predicted token's
log-odds (large when p_t → 1) like any other, so on multi-token completions
its loss departs from the cross-entropy. The functions here are pure tensor
functions, so they compose with `torch.func` (vmap, grad).

Token convention used across the trainer: ``loss_mask[b, t]`` is true when
token ``t`` of row ``b`` is a completion token, i.e. one the model is scored
on. It is predicted from the logits at position ``t − 1``, so position 0 is
never scored.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from gradmix.trainer.errors import SketchError
from gradmix.trainer.sharded import full_shape
from gradmix.vocabulary import ValueKind, choices

#: Probability clamp of DESIGN.md §4.
PROB_EPS = 1e-6
_LOG_LO = math.log(PROB_EPS)
_LOG_HI = math.log1p(-PROB_EPS)


def token_log_probs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Log-probability of each next token.

    Args:
        logits: (B, T, V) model outputs.
        input_ids: (B, T) token ids.

    Returns:
        (B, T − 1) float32 tensor: entry t is log p(input_ids[:, t + 1]).
    """
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    return logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)


def log_odds_values(
    logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor
) -> torch.Tensor:
    """f(x) per row: mean log-odds of the completion tokens.

    Args:
        logits: (B, T, V) model outputs.
        input_ids: (B, T) token ids.
        loss_mask: (B, T) bool/0-1, true on completion tokens.

    Returns:
        (B,) float32 values. A row without completion tokens gets 0.
    """
    # Clamping log p is clamping p (log is monotone) and avoids exp/log round trips.
    logp = token_log_probs(logits, input_ids).clamp(_LOG_LO, _LOG_HI)
    log_odds = logp - torch.log1p(-torch.exp(logp))
    mask = loss_mask[:, 1:].to(log_odds.dtype)
    return (log_odds * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)


def geometric_log_odds_values(
    logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor
) -> torch.Tensor:
    """f(x) per row: log-odds of the completion tokens' geometric-mean probability.

    With m = mean_t log p_t = log p̄ (clamped like `log_odds_values`),
    f = m − log(−expm1(m)), and softplus(−f) = −m, the mean token cross-entropy.

    Args:
        logits: (B, T, V) model outputs.
        input_ids: (B, T) token ids.
        loss_mask: (B, T) bool/0-1, true on completion tokens.

    Returns:
        (B,) float32 values. A row without completion tokens gets logit(1 − 1e-6).
    """
    logp = token_log_probs(logits, input_ids)
    mask = loss_mask[:, 1:].to(logp.dtype)
    mean_logp = ((logp * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)).clamp(_LOG_LO, _LOG_HI)
    return mean_logp - torch.log(-torch.expm1(mean_logp))


ValueFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

#: Value kind (the store's and the API's name) → its function.
VALUE_FUNCTIONS: dict[str, ValueFn] = {
    ValueKind.LOG_ODDS: log_odds_values,
    ValueKind.GEOMETRIC_LOG_ODDS: geometric_log_odds_values,
}
VALUE_KINDS = choices(ValueKind)


def values_of(
    kind: str, logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor
) -> torch.Tensor:
    """f(x) per row for value kind `kind` (one of `VALUE_KINDS`).

    Raises:
        SketchError: an unknown kind.
    """
    try:
        fn = VALUE_FUNCTIONS[kind]
    except KeyError:
        raise SketchError(f"unknown value kind {kind!r}; known: {VALUE_KINDS}") from None
    return fn(logits, input_ids, loss_mask)


def completion_loss(
    logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor
) -> torch.Tensor:
    """Mean next-token cross-entropy over all completion tokens of the batch (training loss)."""
    logp = token_log_probs(logits, input_ids)
    mask = loss_mask[:, 1:].to(logp.dtype)
    return -(logp * mask).sum() / mask.sum().clamp_min(1.0)


def logistic_loss(values: torch.Tensor) -> torch.Tensor:
    """ℓ(f) = softplus(−f) = −log σ(f), elementwise: the loss the value linearises."""
    return F.softplus(-values)


def uniform_loss(vocab_size: int) -> float:
    """The loss ℓ(f) = softplus(−f) of a uniform prediction over `vocab_size` tokens, for
    either value kind: −log(1/V) = log V (the clamp caps it at −log `PROB_EPS`).

    With p_t = 1/V for every token, `log_odds` gives f = logit(1/V) = −log(V − 1) and
    `geometric_log_odds` the same (p̄ = 1/V); softplus(log(V − 1)) = log V.
    """
    if vocab_size < 2:
        raise SketchError(f"a vocabulary needs at least 2 tokens, got {vocab_size}")
    return min(math.log(vocab_size), -_LOG_LO)


def untrained_loss(model: torch.nn.Module) -> float:
    """The target loss `model` would have before it learnt anything, `uniform_loss` of its
    vocabulary (the width of its output layer); 0.0 when that cannot be told.

    The server compares an anchor's target loss with it (DeclareAnchor's
    `untrained_loss`): a loss near it means the anchor's model has not learnt yet.
    """
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(vocab, int):
        getter = getattr(model, "get_output_embeddings", None)
        layer = getter() if callable(getter) else None
        weight = getattr(layer, "weight", None)
        shape: tuple[int, ...] = full_shape(weight) if isinstance(weight, torch.Tensor) else ()
        vocab = int(shape[0]) if len(shape) == 2 else None  # ZeRO-3: the whole shape
    return uniform_loss(vocab) if vocab is not None and vocab >= 2 else 0.0
