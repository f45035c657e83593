import peft
import pytest
import torch
import transformers

from darkknowledge.llm import last_hidden_states, logit_transform, logits_from_hidden, output_layer


def _batch(vocab_size: int):
    torch.manual_seed(1)
    ids = torch.randint(vocab_size, (2, 6))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding in the second row
    return ids, mask


def test_output_layer_tied_embeddings_is_the_embedding(make_gpt2):
    model = make_gpt2().eval()
    layer = output_layer(model)
    assert layer.weight is model.transformer.wte.weight
    assert (layer.bias, layer.logit_scale, layer.softcap) == (None, 1.0, None)
    ids, mask = _batch(40)
    logits_from_hidden(last_hidden_states(model, ids, mask), layer).sum().backward()
    assert model.transformer.wte.weight.grad.abs().sum() > 0


def test_last_hidden_states_match_full_forward_and_skip_lm_head(make_gpt2):
    model = make_gpt2(tied=False).eval()
    ids, mask = _batch(40)
    calls = []
    model.lm_head.register_forward_hook(lambda module, args, out: calls.append(out.shape))
    hidden = last_hidden_states(model, ids, mask)  # (B, T, H)
    assert hidden.shape == (2, 6, 16)
    assert calls == [(2, 6, 0)]  # the output layer returned no logits
    reference = model(input_ids=ids, attention_mask=mask)
    assert calls[-1] == (2, 6, 40)
    torch.testing.assert_close(logits_from_hidden(hidden, output_layer(model)), reference.logits)
    assert "forward" not in vars(model.lm_head)  # the patch is gone


def test_output_layer_lora_on_lm_head_is_merged_differentiably(make_gpt2):
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["lm_head"], lora_dropout=0.0, init_lora_weights=False
    )
    model = peft.get_peft_model(make_gpt2(tied=False), config).eval()
    ids, mask = _batch(40)
    layer = output_layer(model)
    logits = logits_from_hidden(last_hidden_states(model, ids, mask), layer)
    torch.testing.assert_close(logits, model(input_ids=ids, attention_mask=mask).logits)
    head = model.get_base_model().lm_head
    expected = (
        head.base_layer.weight
        + head.scaling["default"] * head.lora_B["default"].weight @ head.lora_A["default"].weight
    )
    torch.testing.assert_close(layer.weight, expected)
    logits.square().sum().backward()
    assert head.lora_A["default"].weight.grad.abs().sum() > 0
    assert head.lora_B["default"].weight.grad.abs().sum() > 0
    assert head.base_layer.weight.grad is None  # frozen by PEFT


def test_output_layer_disabled_adapter_is_the_base_weight(make_gpt2):
    config = peft.LoraConfig(
        r=2, target_modules=["lm_head"], lora_dropout=0.0, init_lora_weights=False
    )
    model = peft.get_peft_model(make_gpt2(tied=False), config)
    with model.disable_adapter():
        assert output_layer(model).weight is model.get_base_model().lm_head.base_layer.weight


def _tiny(config_class, **extra):
    torch.manual_seed(0)
    config = config_class(
        vocab_size=48,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=32,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **extra,
    )
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize(
    ("config_class", "extra", "expected"),
    [
        (transformers.Gemma2Config, {"final_logit_softcapping": 0.5}, (1.0, 0.5)),
        (transformers.CohereConfig, {"logit_scale": 0.25}, (0.25, None)),
        (transformers.GraniteConfig, {"logits_scaling": 4.0}, (0.25, None)),
    ],
)
def test_output_layer_softcap_and_scale_match_the_model_logits(config_class, extra, expected):
    model = _tiny(config_class, **extra)
    layer = output_layer(model)
    assert (layer.logit_scale, layer.softcap) == expected
    ids, mask = _batch(48)
    with torch.no_grad():
        logits = logits_from_hidden(last_hidden_states(model, ids, mask), layer)
        reference = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(logits, reference.float())
    if layer.softcap is not None:  # a small cap really bites: the logits are bounded by it
        assert reference.abs().max() < 0.5


def test_logit_transform_reads_config_attributes_not_names():
    config = transformers.GPT2Config(n_embd=8, n_layer=1, n_head=2)
    assert logit_transform(config) == (1.0, None)
    config.final_logit_softcapping = 30.0  # any model with this attribute gets a softcap
    assert logit_transform(config) == (1.0, 30.0)


def test_output_layer_rejects_non_language_models():
    with pytest.raises(TypeError, match="get_output_embeddings"):
        output_layer(torch.nn.Linear(3, 3))


def test_last_hidden_states_rejects_a_model_without_output_layer(make_gpt2):
    backbone = make_gpt2().transformer  # GPT2Model: no LM head
    with pytest.raises(ValueError, match="no output layer"):
        last_hidden_states(backbone, torch.zeros(1, 3, dtype=torch.long))


def test_last_hidden_states_keeps_an_accelerate_hook_on_the_output_layer(make_gpt2):
    """device_map / offloading put Accelerate hooks on the instance's forward: they survive."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    class CountCalls(ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            CountCalls.calls += 1
            return args, kwargs

    model = make_gpt2(0)
    add_hook_to_module(model.lm_head, CountCalls())
    hooked_forward = model.lm_head.forward
    ids = torch.randint(1, 40, (2, 5))
    hidden = last_hidden_states(model, ids)
    assert CountCalls.calls == 0  # the output layer was skipped during the capture
    assert model.lm_head.forward is hooked_forward and hasattr(model.lm_head, "_hf_hook")
    logits = model(input_ids=ids).logits
    assert CountCalls.calls == 1  # ... and hooked again afterwards
    torch.testing.assert_close(logits, model.lm_head(hidden))
    # A plain head gets no instance attribute left behind.
    plain = make_gpt2(0)
    last_hidden_states(plain, ids)
    assert "forward" not in plain.lm_head.__dict__
