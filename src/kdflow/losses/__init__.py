"""Training losses: next-token cross-entropy and the three kinds of knowledge distillation (KD).

Every loss is a small ``torch.nn.Module`` that does its arithmetic in float32 whatever the dtype of
its inputs (student bf16/fp16 activations, float16 cached teacher values), ignores padding, and
returns a scalar. The teacher side never receives a gradient. When nothing is left after masking the
result is ``0.0`` and still attached to the student's graph, so ``loss.backward()`` works on any batch.

* :class:`CELoss` – next-token cross-entropy on the data (the "hard" targets).
* :class:`TopKKDLoss` – response-based KD ("rb") against the teacher top-k cache.
* :class:`SampledTailKDLoss` – forward KL against an exact head plus a sampled tail (an unbiased gradient).
* :class:`FullKDLoss` – KD against the teacher's full distribution, the teacher run online (the reference).
* :class:`FeatureKDLoss` – feature-based KD ("fb") against the teacher hidden-state cache.
* :class:`RelationKDLoss` – relation-based KD ("relb", RKD) against the teacher embedding cache.
* :func:`combine` – the weighted sum of the terms, refusing NaN/inf.

One module a concern: :mod:`.ce` (CE and its targets), :mod:`.gathered` (log-softmax at chosen ids without
the full [N, V] tensors), :mod:`.kd` (top-k KD, with the definitions of its buckets and divergences),
:mod:`.sampled` (head plus sampled tail, and the draws), :mod:`.full` (online, full vocabulary), :mod:`.feature`,
:mod:`.relation`, :mod:`.weighted` (``combine``).

"""

from kdflow.losses.ce import CELoss, ce_targets
from kdflow.losses.feature import FeatureKDLoss
from kdflow.losses.full import FullKDLoss
from kdflow.losses.gathered import gathered_logprobs
from kdflow.losses.kd import LOGPROB_FLOOR, Divergence, MissingMass, TopKKDLoss
from kdflow.losses.relation import RelationKDLoss
from kdflow.losses.sampled import SampledTailKDLoss
from kdflow.losses.weighted import combine

__all__ = [
    "CELoss",
    "ce_targets",
    "FeatureKDLoss",
    "FullKDLoss",
    "gathered_logprobs",
    "LOGPROB_FLOOR",
    "Divergence",
    "MissingMass",
    "TopKKDLoss",
    "RelationKDLoss",
    "SampledTailKDLoss",
    "combine",
]
