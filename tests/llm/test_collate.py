"""PaddingCollator: ragged examples padded left or right give the labels of each example alone."""

from __future__ import annotations

import lm_reference
import pytest
import torch
from torch.utils.data import DataLoader

from darkknowledge.llm import CausalLMTask, PaddingCollator, shift_labels

IGNORE = -100


def _ragged():
    return [
        {"input_ids": [5, 6, 7, 8, 9], "prompt_lengths": 2},
        {"input_ids": torch.tensor([10, 11, 12]), "prompt_lengths": 1},
        {"input_ids": [13, 14], "prompt_lengths": 0},
    ]


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_collator_pads_each_side_and_keeps_each_examples_targets(side):
    batch = PaddingCollator(pad_token_id=99, padding_side=side)(_ragged())
    if side == "left":
        expected_ids = [[5, 6, 7, 8, 9], [99, 99, 10, 11, 12], [99, 99, 99, 13, 14]]
        expected_mask = [[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 0, 1, 1]]
    else:
        expected_ids = [[5, 6, 7, 8, 9], [10, 11, 12, 99, 99], [13, 14, 99, 99, 99]]
        expected_mask = [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]]
    assert batch["input_ids"].tolist() == expected_ids
    assert batch["attention_mask"].tolist() == expected_mask
    assert batch["prompt_lengths"].tolist() == [2, 1, 0] and set(batch) == {
        "input_ids",
        "attention_mask",
        "prompt_lengths",
    }
    # Targets, by hand: the completion tokens after the prompt, each predicted once.
    labels = shift_labels(
        batch["input_ids"], batch["attention_mask"], prompt_lengths=batch["prompt_lengths"]
    )
    targets = [[v for v in row if v != IGNORE] for row in labels.tolist()]
    assert targets == [[7, 8, 9], [11, 12], [14]]


def test_padding_collator_pads_labels_and_completion_mask_and_rounds_the_length():
    examples = [
        {
            "input_ids": [1, 2, 3],
            "labels": [IGNORE, 2, 3],
            "completion_mask": [False, True, True],
        },
        {"input_ids": [4], "labels": [4], "completion_mask": [True]},
    ]
    batch = PaddingCollator(pad_to_multiple_of=4)(examples)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 0], [4, 0, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 2, 3, IGNORE], [4, IGNORE, IGNORE, IGNORE]]
    assert batch["completion_mask"].dtype == torch.bool
    assert batch["completion_mask"].tolist() == [
        [False, True, True, False],
        [True, False, False, False],
    ]


def test_padding_collator_in_a_dataloader_feeds_causal_lm_task():
    loader = DataLoader(_ragged(), batch_size=3, collate_fn=PaddingCollator(padding_side="left"))
    (batch,) = list(loader)
    assert int(CausalLMTask().count_valid(batch)) == 3 + 2 + 1


def test_padding_collator_left_padded_batch_gives_the_reference_eval_loss(tmp_path, make_gpt2):
    """Unpadded examples, padded by the collator inside a Trainer, give the reference loss of
    the same examples padded by hand."""
    import transformers

    from darkknowledge.hf import DistillationTrainer

    padded = lm_reference.left_padded(4, seed=7)
    ragged = []
    for example in padded:
        real = example["attention_mask"].bool()
        ragged.append(
            {
                "input_ids": example["input_ids"][real].tolist(),
                "labels": example["labels"][real].tolist(),
                "prompt_lengths": int(example["prompt_lengths"]),
            }
        )
    student, teacher = make_gpt2(0), make_gpt2(1, n_embd=24)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_eval_batch_size=4
    )
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        eval_dataset=ragged,
        data_collator=PaddingCollator(padding_side="left"),
        temperature=2.0,
        alpha=0.5,
    )
    metrics = trainer.evaluate()
    with torch.no_grad():
        total, _, hard = lm_reference.reference_parts(
            student, teacher, padded, temperature=2.0, alpha=0.5
        )
    assert metrics["eval_loss"] == pytest.approx(total.item(), rel=1e-5)
    assert metrics["eval_ce"] == pytest.approx(hard.item(), rel=1e-5)


@pytest.mark.parametrize(
    "arguments, examples, message",
    [
        ({"padding_side": "middle"}, None, "padding_side must be 'left' or 'right'"),
        ({"pad_to_multiple_of": 0}, None, "pad_to_multiple_of must be a positive int"),
        ({}, [], "examples must be a non-empty list"),
        ({}, [{"text": "hi"}], "each example must be a mapping with 'input_ids'"),
        ({}, [{"input_ids": [1], "text": "x"}], "keys ['text'] that PaddingCollator"),
        (
            {},
            [{"input_ids": [1]}, {"input_ids": [2], "labels": [2]}],
            "example 1 has keys ['input_ids', 'labels']",
        ),
        ({}, [{"input_ids": [1, 2], "labels": [1]}], "example 0: labels has 1 entries"),
        ({}, [{"input_ids": [[1, 2]]}], "example 0: input_ids must be a 1-D sequence"),
    ],
)
def test_padding_collator_rejects_bad_input_naming_it(arguments, examples, message):
    with pytest.raises((ValueError, TypeError), match=message.replace("[", r"\[")):
        PaddingCollator(**arguments)(examples if examples is not None else [{"input_ids": [1]}])
