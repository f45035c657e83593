import pytest
import torch

from darkknowledge.llm import shift_labels

IGNORE = -100


def test_shift_labels_position_t_predicts_token_t_plus_1():
    ids = torch.tensor([[5, 6, 7, 8]])
    assert shift_labels(ids).tolist() == [[6, 7, 8, IGNORE]]


def test_shift_labels_right_padding_never_counts():
    ids = torch.tensor([[5, 6, 7, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    # Position 2 (the last real token) would predict padding: ignored.
    assert shift_labels(ids, mask).tolist() == [[6, 7, IGNORE, IGNORE, IGNORE]]


def test_shift_labels_left_padding_never_counts():
    ids = torch.tensor([[0, 0, 5, 6, 7]])
    mask = torch.tensor([[0, 0, 1, 1, 1]])
    # The first real token (5) has only padding before it: it is not predicted.
    assert shift_labels(ids, mask).tolist() == [[IGNORE, IGNORE, 6, 7, IGNORE]]


def test_shift_labels_first_completion_token_is_predicted_from_last_prompt_position():
    ids = torch.tensor([[1, 2, 3, 10, 11, 12]])  # prompt 1 2 3, completion 10 11 12
    labels = shift_labels(ids, prompt_lengths=torch.tensor([3]))
    assert labels.tolist() == [[IGNORE, IGNORE, 10, 11, 12, IGNORE]]
    assert labels[0, 2] == 10  # hidden state of the last prompt token (3) predicts 10


@pytest.mark.parametrize("side", ["left", "right"])
def test_shift_labels_prompt_lengths_count_from_first_real_token(side):
    prompt, completion, pad = [1, 2], [10, 11], [0, 0, 0]
    tokens = pad + prompt + completion if side == "left" else prompt + completion + pad
    real = [0] * 3 + [1] * 4 if side == "left" else [1] * 4 + [0] * 3
    labels = shift_labels(
        torch.tensor([tokens]), torch.tensor([real]), prompt_lengths=torch.tensor([2])
    )
    assert sorted(v for v in labels[0].tolist() if v != IGNORE) == [10, 11]
    # Position of the last prompt token predicts the first completion token.
    last_prompt = tokens.index(2)
    assert labels[0, last_prompt] == 10


def test_shift_labels_completion_mask_matches_prompt_lengths():
    ids = torch.tensor([[0, 1, 2, 10, 11], [1, 2, 3, 4, 10]])
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    completion = torch.tensor(
        [[False, False, False, True, True], [False, False, False, False, True]]
    )
    by_mask = shift_labels(ids, mask, completion_mask=completion)
    by_length = shift_labels(ids, mask, prompt_lengths=torch.tensor([2, 4]))
    assert torch.equal(by_mask, by_length)
    assert by_mask.tolist() == [
        [IGNORE, IGNORE, 10, 11, IGNORE],
        [IGNORE, IGNORE, IGNORE, 10, IGNORE],
    ]


def test_shift_labels_keeps_ignore_index_of_hf_style_labels():
    hf_labels = torch.tensor([[IGNORE, IGNORE, 7, 8]])  # unshifted, prompt already masked
    assert shift_labels(hf_labels).tolist() == [[IGNORE, 7, 8, IGNORE]]


def test_shift_labels_rejects_bad_input():
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="not both"):
        shift_labels(
            ids,
            prompt_lengths=torch.tensor([1]),
            completion_mask=torch.ones(1, 3, dtype=torch.bool),
        )
    with pytest.raises(ValueError, match="attention_mask"):
        shift_labels(ids, torch.ones(1, 4))
    with pytest.raises(ValueError, match="prompt_lengths"):
        shift_labels(ids, prompt_lengths=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="input_ids"):
        shift_labels(torch.tensor([1, 2, 3]))


def test_shift_labels_prompt_lengths_without_mask_stay_on_the_batch_device():
    """The prompt mask is built on input_ids' device, not the CPU (meta stands in for a GPU)."""
    ids = torch.zeros(2, 6, dtype=torch.long, device="meta")
    labels = shift_labels(ids, prompt_lengths=torch.tensor([2, 3]))
    assert labels.device.type == "meta" and labels.shape == (2, 6)
    # The same rule on the CPU, values checked by hand.
    cpu = shift_labels(torch.arange(12).view(2, 6), prompt_lengths=torch.tensor([2, 3]))
    assert cpu.tolist() == [[IGNORE, 2, 3, 4, 5, IGNORE], [IGNORE, IGNORE, 9, 10, 11, IGNORE]]
