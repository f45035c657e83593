"""Which vocabulary a teacher and a student share, and refusing two that do not match.

Distillation compares ``p`` and ``q`` token id by token id, so both models must read one
tokenizer. Their output layers may still differ in size: a model's vocabulary is often padded
to a multiple of a power of two for speed (GPT-2's 50257 tokens in a 50304-row layer), and the
extra rows are never a target. :func:`shared_vocab_size` tells the two cases apart:

- both sizes equal: nothing to cut (``None``);
- ``vocab_size`` given: cut both layers to it (the tokenizer's size, checked to fit both);
- tokenizers given (either ``tokenizer.get_vocab()``-style mappings ``token -> id``, or objects
  with ``get_vocab``): every id the two share must stand for the same token, and both layers
  are cut to the tokenizers' shared size;
- otherwise the larger size must be a *padding* of the smaller: the smaller rounded up to a
  multiple of 2^k (k = 3 … 11), adding at most 1/16 more rows (50257 -> 50304, 151936 ->
  152064); both layers are then cut to the smaller size.

Anything else is a real tokenizer mismatch, refused with a ``ValueError`` that says so.

>>> shared_vocab_size(50257, 50304)
50257
>>> shared_vocab_size(50304, 50304) is None
True
>>> shared_vocab_size(32000, 50257)
Traceback (most recent call last):
...
ValueError: the student's output layer has 32000 rows and the teacher's 50257: ...
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

_PADDING_MULTIPLES = tuple(2**k for k in range(3, 12))  # 8 ... 2048


def is_padding(smaller: int, larger: int) -> bool:
    """Whether ``larger`` is ``smaller`` rounded up to a multiple of 2^k (k = 3 … 11), adding
    at most ``smaller / 16`` rows.

    >>> is_padding(50257, 50304), is_padding(151936, 152064), is_padding(256, 512)
    (True, True, False)
    """
    if not 0 < smaller < larger or (larger - smaller) * 16 > smaller:
        return False
    return any(-(-smaller // multiple) * multiple == larger for multiple in _PADDING_MULTIPLES)


def shared_vocab_size(
    student_rows: int,
    teacher_rows: int,
    *,
    vocab_size: int | None = None,
    student_tokenizer: Any = None,
    teacher_tokenizer: Any = None,
) -> int | None:
    """The number of rows both output layers are cut to, or None when nothing is cut.

    Args:
        student_rows, teacher_rows: rows ``V`` of the two output layers ``(V, H)``.
        vocab_size: the shared vocabulary, when known (the tokenizer's size).
        student_tokenizer, teacher_tokenizer: the two tokenizers (or their ``get_vocab()``
            mappings); given together, their ids are compared.
    """
    for name, rows in (("student_rows", student_rows), ("teacher_rows", teacher_rows)):
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {rows!r}")
    smaller = min(student_rows, teacher_rows)
    if vocab_size is not None:
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
            raise TypeError(f"vocab_size must be an int or None, got {type(vocab_size).__name__}")
        if not 1 <= vocab_size <= smaller:
            raise ValueError(
                f"vocab_size must be in [1, {smaller}] (the smaller output layer: student "
                f"{student_rows} rows, teacher {teacher_rows}), got vocab_size={vocab_size}"
            )
        return vocab_size
    if (student_tokenizer is None) != (teacher_tokenizer is None):
        raise ValueError(
            "give both student_tokenizer and teacher_tokenizer (their ids are compared), or neither"
        )
    if student_tokenizer is not None:
        size = _compare_tokenizers(student_tokenizer, teacher_tokenizer)
        if size > smaller:
            raise ValueError(
                f"the tokenizers have {size} tokens, more than the smaller output layer's {smaller} "
                f"rows (student {student_rows}, teacher {teacher_rows}); these are not their models"
            )
        return None if size == student_rows == teacher_rows else size
    if student_rows == teacher_rows:
        return None
    if is_padding(smaller, max(student_rows, teacher_rows)):
        return smaller
    raise ValueError(
        f"the student's output layer has {student_rows} rows and the teacher's {teacher_rows}: "
        "not one vocabulary, nor one padded to a multiple of a power of two (e.g. 50257 -> "
        "50304), so the models look like they use different tokenizers. Distillation compares "
        "the distributions token id by token id and needs one tokenizer; if they do share one, "
        "pass vocab_size=<its size> (or both tokenizers, to have their ids compared)"
    )


def _compare_tokenizers(student: Any, teacher: Any) -> int:
    """The shared size (ids below it) of two tokenizers whose common ids stand for the same
    tokens."""
    student_ids, teacher_ids = _id_to_token(student, "student"), _id_to_token(teacher, "teacher")
    size = min(max(student_ids, default=-1), max(teacher_ids, default=-1)) + 1
    for token_id in range(size):
        if student_ids.get(token_id) != teacher_ids.get(token_id):
            raise ValueError(
                f"the tokenizers disagree: token id {token_id} is "
                f"{student_ids.get(token_id)!r} for the student and "
                f"{teacher_ids.get(token_id)!r} for the teacher; distillation needs one "
                "tokenizer (the distributions are compared token id by token id)"
            )
    return size


def _id_to_token(tokenizer: Any, side: str) -> dict[int, str]:
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else tokenizer
    if not isinstance(vocab, Mapping):
        raise TypeError(
            f"{side}_tokenizer must be a tokenizer (with get_vocab()) or a mapping token -> id, "
            f"got {type(tokenizer).__name__}"
        )
    return {int(token_id): token for token, token_id in vocab.items()}
