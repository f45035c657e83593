"""The chunk engine: every vocabulary-scale objective as a per-chunk objective over token rows.

An **objective** is a callable ``objective(chunk: Chunk) -> ChunkResult``. For one chunk of ``n``
rows it receives (:class:`Chunk`):

- ``chunk.student``: the student's rows, :class:`HeadRows` (hidden states ``(n, H)`` and an
  output layer) or :class:`LogitRows` (logits ``(n, V)``). ``student.logits(factor, out=buf)``
  writes ``factor · z`` (``z = scale · (h Wᵀ + b)``, before any softcap) into a buffer the
  objective owns; ``student.pre_logits()`` and ``student.finish(pre)`` give the same logits
  differentiably (with the softcap), for objectives that go through autograd;
- ``chunk.teacher``: the matching rows of the teacher side given to :func:`run_chunks`:
  :class:`HeadTeacher` (hidden states + output layer) and :class:`LogitsTeacher` (full logits)
  give rows with the same ``logits``/``pre_logits``/``finish``; :class:`SparseTeacher` gives
  :class:`SparseRows` (``ids``, ``values``, ``kept``, each ``(n, k)``); None for no teacher;
- ``chunk.labels`` ``(n,)``, ``chunk.valid`` ``(n,)`` bool (or None), ``chunk.safe_labels()``;
- ``chunk.normalizer``: what the chunk's sums are divided by (the global count of valid rows
  for a mean, 1 for a sum), so that the chunks' parts add up to the loss;
- ``chunk.rows``: the chunk's slice of the flattened rows, for per-row data the objective holds;
  ``chunk.need_logits_grad``.

It returns (:class:`ChunkResult`) the chunk's ``parts = (total, soft, hard)`` and
``logits_grad``, the gradient of ``total`` with respect to ``z``, optionally as ``logits_grad ·
row_scale`` with an ``(n, 1)`` ``row_scale`` that the engine folds into the small side of its
products. :func:`run_chunks` walks the chunks and turns each gradient into hidden-state, weight
and bias gradients (:class:`HeadStudent`) or a logits gradient (:class:`LogitsStudent`), so the
``(tokens, vocab)`` logits never exist; :func:`sweep` wraps a run in one autograd node, and
:func:`run_fused_linear` does both for a student given as hidden states and an output layer.

Objectives here: :class:`ForwardKL` (forward KL + cross-entropy in closed form, and the
cross-entropy alone), :class:`SparseKD` (sparse teacher targets), :class:`SampledReverseKL`
(reverse KL estimated from the student's samples; teacher side :class:`TokenLogProbs`). ``kd_loss`` through autograd
is ``darkknowledge.losses.kd_chunks.AutogradKD`` (outside this package: it calls ``kd_loss``,
which itself runs on this engine). docs/fused-loss.md, "Adding an objective", has an example.
"""

from .call import KDCall, SoftScale, resolve_soft_scale
from .chunker import (
    Chunk,
    ChunkedOutput,
    ChunkResult,
    Objective,
    ObjectiveFactory,
    run_chunks,
    run_fused_linear,
    sweep,
)
from .forward_kl import Buffers, ForwardKL, ForwardKLGradient
from .sampled_kl import SampledReverseKL, TokenLogProb, TokenLogProbs
from .sides import (
    Head,
    HeadRows,
    HeadStudent,
    HeadTeacher,
    LogitRows,
    LogitsStudent,
    LogitsTeacher,
    SparseRows,
    SparseTeacher,
)
from .sparse import SparseKD

__all__ = [
    "Buffers",
    "Chunk",
    "ChunkResult",
    "ChunkedOutput",
    "ForwardKL",
    "ForwardKLGradient",
    "Head",
    "HeadRows",
    "HeadStudent",
    "HeadTeacher",
    "KDCall",
    "LogitRows",
    "LogitsStudent",
    "LogitsTeacher",
    "Objective",
    "ObjectiveFactory",
    "SampledReverseKL",
    "SoftScale",
    "SparseKD",
    "SparseRows",
    "SparseTeacher",
    "TokenLogProb",
    "TokenLogProbs",
    "resolve_soft_scale",
    "run_chunks",
    "run_fused_linear",
    "sweep",
]
