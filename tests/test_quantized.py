"""Adapters on a base model quantized by bitsandbytes (QLoRA's setting: 4-bit NF4 / FP4 and
LLM.int8() through transformers' ``BitsAndBytesConfig``), on the CPU: outputs and gradients
against the same adapters on the dequantized model, the frozen base, save / load, the Trainer.

The models train (``.train()``) throughout: bitsandbytes' CPU backend (0.50.2), on a CPU with
AVX512-BF16, repacks a 4-bit layer's weight at its first eval-mode forward whose input needs no
gradient, and from then on computes that layer in bf16 with no gradient through it (README,
Quantized base models)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer's own requirement
bnb = pytest.importorskip("bitsandbytes")

from conftest import rel_err  # noqa: E402
from test_hf import randomize, tiny_model  # noqa: E402
from test_trainer import args, dataset  # noqa: E402
from mtlora_kernels import MTLoRAConfig, attach, load_adapters, save_adapters  # noqa: E402
from mtlora_kernels.integrations.trainer import MTLoRATrainer  # noqa: E402

CONFIG = MTLoRAConfig(r=4, num_experts=3, groups=2, dropout=0.0)
PLACEMENTS = [dict(placement="ffn"), dict(placement="both"),
              dict(target_modules="q_proj,v_proj,down_proj")]
NF4_FP32 = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                bnb_4bit_compute_dtype=torch.float32)


# test_hf's tiny models (width 32, FFN 64, 2 layers); OPT's without dropout (the models train).
FAMILIES = {"llama": {}, "opt": dict(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)}


def tiny(family: str = "llama") -> torch.nn.Module:
    return tiny_model(family, **FAMILIES[family])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The tiny LLaMA, saved for from_pretrained."""
    directory = tmp_path_factory.mktemp("tiny_llama")
    tiny().save_pretrained(directory)
    return directory


def quantized(directory, dtype=torch.float32, **bnb_config) -> torch.nn.Module:
    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, quantization_config=transformers.BitsAndBytesConfig(**bnb_config),
        device_map="cpu", dtype=dtype)
    return model.train()


def dequantized(model: torch.nn.Module, dtype=torch.float32, family: str = "llama"
                ) -> torch.nn.Module:
    """The same model in float: every quantized layer an ``nn.Linear`` holding its weight as
    bitsandbytes dequantizes it (4-bit: the codebook times the block's absmax; int8: the row's
    scale / 127)."""
    ref = tiny(family).to(dtype).train()
    ref.load_state_dict({k: v for k, v in model.state_dict().items()
                         if k in ref.state_dict() and v.is_floating_point()}, strict=False)
    found = 0
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            w = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
        elif isinstance(module, bnb.nn.Linear8bitLt):
            w = module.weight.data.float() * module.weight.SCB.float()[:, None] / 127
        else:
            continue
        ref.get_submodule(name).weight.data.copy_(w)
        found += 1
    assert found == 2 * {"llama": 7, "opt": 6}[family]  # each layer's Linears, not lm_head
    return ref


def adapted_pair(model, placement, dtype=torch.float32, family="llama"):
    """The model and its dequantized twin, with the same random adapters attached."""
    ref = dequantized(model, dtype, family)
    handle, ref_handle = attach(model, CONFIG, **placement), attach(ref, CONFIG, **placement)
    randomize(handle)
    with torch.no_grad():
        for p, ref_p in zip(handle.parameters(), ref_handle.parameters(), strict=True):
            ref_p.copy_(p)
    return handle, ref_handle


def step(model, handle, ids):
    out = model(input_ids=ids, labels=ids)
    (out.loss + handle.aux_loss()).backward()
    return out.logits, [p.grad for p in handle.parameters()]


@pytest.mark.parametrize("family, placement", [
    *(("llama", p) for p in PLACEMENTS), ("opt", dict(placement="ffn"))],
    ids=["ffn", "both", "component", "opt-ffn"])
@pytest.mark.parametrize("bits", ["nf4-fp32", "int8"])
def test_adapters_on_a_quantized_base_match_the_dequantized_model(saved, tmp_path, family,
                                                                   placement, bits):
    """In training, bitsandbytes' CPU backend dequantizes each layer's weight and multiplies in
    fp32 (NF4 with an fp32 compute dtype: the dequantized model's numbers exactly here; int8:
    to 1e-6, the row scales' rounding): the adapters' outputs and gradients are those of the
    same adapters on the dequantized model. The base stays frozen and gets no gradient. OPT's
    FFN is two loose Linears (fc1, fc2), whose span the block-level adapter hooks."""
    if family != "llama":
        saved = tmp_path
        tiny(family).save_pretrained(saved)
    model = quantized(saved, **(NF4_FP32 if bits == "nf4-fp32" else dict(load_in_8bit=True)))
    handle, ref_handle = adapted_pair(model, placement, family=family)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    logits, grads = step(model, handle, ids)
    ref_logits, ref_grads = step(ref_handle.model, ref_handle, ids)
    tol = 1e-6 if bits == "nf4-fp32" else 1e-5
    assert rel_err(logits, ref_logits) < tol
    for g, ref_g in zip(grads, ref_grads, strict=True):
        assert ref_g.abs().max() > 0 and rel_err(g, ref_g) < tol
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"{a}.{p}" for a in handle.adapters for p in ("lora_A", "lora_B", "lora_route")}
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


def test_qlora_bf16_model_with_bf16_compute(saved):
    """QLoRA's usual setting: the model loaded in bf16, the 4-bit layers (FP4 here) computing in
    bf16, the adapters' parameters fp32 (attach's default) computing in the activations' bf16.
    Outputs and gradients are the bf16 dequantized model's to bf16 rounding; save / load gives
    the same adapters back (their fp32 parameters, bit for bit)."""
    model = quantized(saved, dtype=torch.bfloat16, load_in_4bit=True, bnb_4bit_quant_type="fp4",
                      bnb_4bit_compute_dtype=torch.bfloat16)
    handle, ref_handle = adapted_pair(model, dict(placement="ffn"), torch.bfloat16)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(4))
    logits, grads = step(model, handle, ids)
    ref_logits, ref_grads = step(ref_handle.model, ref_handle, ids)
    assert logits.dtype == torch.bfloat16 and rel_err(logits, ref_logits) < 1e-2
    for p, g, ref_g in zip(handle.parameters(), grads, ref_grads, strict=True):
        assert p.dtype == g.dtype == torch.float32
        assert ref_g.abs().max() > 0 and rel_err(g, ref_g) < 1e-2
    state = {k: v.clone() for k, v in handle.state_dict().items()}
    save_adapters(handle, saved / "adapters")
    handle.remove()
    again = load_adapters(model, saved / "adapters")
    assert again.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in again.state_dict().items())


def test_trainer_trains_adapters_on_a_quantized_base(saved, tmp_path):
    """transformers' Trainer refuses a quantized model without PEFT's adapters on it ("purely
    quantized"): MTLoRATrainer takes one with mtLoRA adapters, trains them and leaves the
    quantized weights as they were; the check's flag does not stay on the model."""
    model = quantized(saved, **NF4_FP32)
    handle = attach(model, CONFIG)
    randomize(handle)
    adapters = [p.detach().clone() for p in handle.parameters()]
    base = {k: v.clone() for k, v in model.state_dict().items() if "mtlora" not in k}
    trainer = MTLoRATrainer(model=model, train_dataset=dataset(4),
                            args=args(tmp_path, max_steps=2, per_device_train_batch_size=2,
                                      learning_rate=0.1))
    assert "_hf_peft_config_loaded" not in vars(model)
    trainer.train()
    assert all(not torch.equal(p, a) for p, a in zip(handle.parameters(), adapters))
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base.items())


def test_trainer_refuses_a_quantization_method_that_does_not_train(saved, tmp_path, monkeypatch):
    """The Trainer's own refusal stays where transformers says the method does not train."""
    model = quantized(saved, **NF4_FP32)
    attach(model, CONFIG)
    monkeypatch.setattr(type(model.hf_quantizer), "is_trainable", property(lambda self: False))
    with pytest.raises(ValueError, match="bitsandbytes, which transformers does not train"):
        MTLoRATrainer(model=model, train_dataset=dataset(2), args=args(tmp_path, max_steps=1))
    assert "_hf_peft_config_loaded" not in vars(model)
