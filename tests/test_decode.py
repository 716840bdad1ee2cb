"""The hand-written decode step's linear layers against peft's (the whole step: tests/test_more.py)."""
import pytest
import torch

import decode
import more
from conftest import nonzero_lora


def lora_layers(policy):
    core = more._core(policy.model)
    return [layer.self_attn.q_proj for layer in core.model.language_model.layers]


@pytest.fixture
def trained_policy(tiny_cfg):
    """A 4-bit tiny policy with a nonzero LoRA (a fresh adapter's B is zero and hides the branch)."""
    policy = more.load_policy(tiny_cfg)
    nonzero_lora(policy)
    policy.model.eval()
    return policy


def test_the_4bit_branch_path_is_peft_to_the_bit(trained_policy):
    """The path a GPU takes: the bitsandbytes layer itself, plus the LoRA branch cast, then added."""
    x = torch.randn(5, 1, lora_layers(trained_policy)[0].in_features, generator=torch.Generator().manual_seed(1))
    for module in lora_layers(trained_policy):
        plain = decode._plain_linear(module)
        gpu_path = decode.Linear(None, None, module.base_layer, module.lora_A["default"].weight,
                                 module.lora_B["default"].weight, module.scaling["default"])
        with torch.no_grad():
            expected = module(x)
            assert torch.equal(gpu_path(x), expected)
            assert torch.allclose(plain(x), expected, atol=1e-5, rtol=1e-5)  # CPU: dequantised once, folded


def test_a_bf16_lora_stays_a_separate_branch_and_matches_peft_to_the_bit():
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(16, 8, bias=True)).to(torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
    module = model.base_model.model[0]
    torch.nn.init.normal_(module.lora_B["default"].weight, std=0.1)
    plain = decode._plain_linear(module)
    assert plain.lora_a is not None  # not folded: W + sBA would be rounded to bf16
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(plain(x), module(x))
