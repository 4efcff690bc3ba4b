"""The sanity check a re-estimate passes before its mixture is published.

Every re-estimate predicts the target loss its mixture leads to, L̂, next to
the anchor's own target loss L̂(∅). Training for one anchor interval moves
the target loss by a fraction of it; an estimate that claims far more is a
sign that the linearisation does not hold at this anchor, not a discovery.
The typical case is an anchor taken on a (nearly) untrained model: its
gradients are large and uninformative, and a ridge step along them "predicts"
that any mixture drives the loss to almost nothing (L̂(∅) = 2.76,
L̂ = 0.027 on a randomly initialised model). Publishing such an estimate
would swing the mixture on noise.

`implausible` names what is wrong with an estimate ("" when nothing is): a
non-finite loss; an anchor whose own loss L̂(∅) is at least `untrained_fraction`
of the untrained level the trainer declared with it (`untrained_loss`, the
cross-entropy of a uniform prediction, log V for a vocabulary of V tokens: a
model that has not learnt yet); or an L̂ more than `max_ratio` times below
(or above) L̂(∅). The untrained check needs the trainer to say the level (an
older trainer does not: then only the ratio bound applies); the ratio bound
needs nothing but misses an untrained anchor whose estimate happens to stay
within it.
A ratio rather than a difference: a well-trained model's small loss may well
halve in an interval (0.031 -> 0.015 on planted data), an untrained one's
does not fall a hundredfold. The server
then keeps the previous mixture in force, logs the two losses and counts the
estimate (`gradmix_implausible_estimates_total`).
"""

from __future__ import annotations

import math

#: L̂ or L̂(∅) is NaN or infinite.
NON_FINITE = "non_finite"
#: L̂ is more than the allowed factor below or above L̂(∅).
LOSS_CHANGE = "loss_change"
#: L̂(∅) is near the untrained level: the anchor was taken on a model that has not learnt.
UNTRAINED = "untrained"
#: Every reason, in the order they are checked.
REASONS = (NON_FINITE, UNTRAINED, LOSS_CHANGE)


def implausible(anchor_loss: float, estimated_loss: float, max_ratio: float,
                untrained_loss: float = 0.0, untrained_fraction: float = 0.0) -> str:
    """Why an estimate is implausible, or "" if it is not.

    Args:
        anchor_loss: L̂(∅), the anchor's own target loss.
        estimated_loss: L̂ of the mixture's weights.
        max_ratio: the largest factor (> 1) between L̂ and L̂(∅), either way,
            accepted; 0 accepts any finite estimate.
        untrained_loss: the anchor's declared untrained level (0: not given).
        untrained_fraction: L̂(∅) ≥ this × `untrained_loss` is untrained (0: no check).
    """
    if not (math.isfinite(anchor_loss) and math.isfinite(estimated_loss)):
        return NON_FINITE
    if untrained_loss > 0 and untrained_fraction > 0 \
            and anchor_loss >= untrained_fraction * untrained_loss:
        return UNTRAINED
    if max_ratio > 0 and (estimated_loss * max_ratio < anchor_loss
                          or anchor_loss * max_ratio < estimated_loss):
        return LOSS_CHANGE
    return ""
