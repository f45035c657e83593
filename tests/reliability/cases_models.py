"""Teacher and student models that do not fit together: vocabularies, output shapes, weights.

The padded-vocabulary case (one output layer with extra rows, token ids the same) is not an
error: it is cut automatically, and ``test_vocabularies.py`` checks the loss against a float64
reference. Only real mismatches are here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from catalogue import Case, dk, write

sys.path.insert(0, str(Path(__file__).parents[1] / "llm"))
from tiny_models import tiny_gpt2

from darkknowledge.llm import CausalLMTask, shared_vocab_size
from darkknowledge.losses import DistillationLoss


def gpt2(vocab_size: int, seed: int = 0):
    return tiny_gpt2(seed, n_embd=8, vocab_size=vocab_size)


def batch(vocab_size: int = 250) -> dict:
    ids = torch.arange(12).reshape(2, 6) * 19 % vocab_size
    return {"input_ids": ids}


def task_loss(student_vocab: int, teacher_vocab: int, **task_options):
    """One step of the fused loss of CausalLMTask on two tiny GPT-2s."""

    def run(folder):
        student, teacher = gpt2(student_vocab), gpt2(teacher_vocab, seed=1)
        task = CausalLMTask(chunk_size=4, **task_options)
        with torch.no_grad():
            teacher_outputs = task.teacher_outputs(teacher, batch())
        loss_fn = DistillationLoss(temperature=2.0, alpha=0.5)
        return task.compute_loss(student, batch(), teacher_outputs, loss_fn=loss_fn)

    return run


def trainer(student_vocab: int, teacher_vocab: int, **options):
    """A DistillationTrainer built on two tiny GPT-2s (refused at construction)."""

    def run(folder):
        import transformers

        from darkknowledge.hf import DistillationTrainer

        args = transformers.TrainingArguments(
            output_dir=str(folder / "out"), use_cpu=True, report_to=[], max_steps=1
        )
        return DistillationTrainer(
            model=gpt2(student_vocab), teacher_model=gpt2(teacher_vocab, seed=1), args=args,
            train_dataset=[batch()], **options,
        )  # fmt: skip

    return run


class Tokenizer:
    """The one method of a tokenizer that the vocabulary check reads."""

    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens

    def get_vocab(self) -> dict[str, int]:
        return {token: index for index, token in enumerate(self.tokens)}


BYTES = [f"<{i}>" for i in range(250)]
SWAPPED = [*BYTES[:7], BYTES[8], BYTES[7], *BYTES[9:]]  # ids 7 and 8 exchanged


def checkpoint_of_other_shape(folder):
    """A classifier teacher whose checkpoint has 32 hidden units, the config asks for 16."""
    from safetensors.torch import save_file

    from darkknowledge.models import build_model

    other = build_model("mlp", in_features=64, num_classes=10, hidden=(32,))
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, "teacher.safetensors")
    config = "student: {hidden: [8]}\nteacher: {hidden: [16], checkpoint: teacher.safetensors}\n"
    return dk("distill", write("config.yaml", config))


MODEL_CASES: list[Case] = [
    Case("models", "teacher and student output layers of 300 and 256 rows (not a padding)",
         "CausalLMTask", task_loss(256, 300), "vocab_size"),
    Case("models", "vocab_size larger than the smaller output layer",
         "CausalLMTask(vocab_size=)", task_loss(250, 256, vocab_size=300), "vocab_size"),
    Case("models", "teacher and student output layers of 300 and 256 rows (not a padding)",
         "DistillationTrainer", trainer(256, 300), "vocab_size"),
    Case("models", "tokenizers whose ids disagree (ids 7 and 8 swapped)", "DistillationTrainer",
         trainer(250, 256, processing_class=Tokenizer(BYTES), teacher_tokenizer=Tokenizer(SWAPPED)),
         "token id 7"),
    Case("models", "tokenizers whose ids disagree (ids 7 and 8 swapped)", "shared_vocab_size",
         lambda f: shared_vocab_size(250, 250, student_tokenizer=Tokenizer(BYTES),
                                     teacher_tokenizer=Tokenizer(SWAPPED)), "token id 7"),
    Case("models", "a tokenizer larger than the output layers", "shared_vocab_size",
         lambda f: shared_vocab_size(200, 256, student_tokenizer=Tokenizer(BYTES),
                                     teacher_tokenizer=Tokenizer(BYTES)), "200"),
    Case("models", "a teacher checkpoint of another shape", "dk distill",
         checkpoint_of_other_shape, "teacher.checkpoint"),
]  # fmt: skip
