"""Adapter-only save/load (safetensors + JSON), safe and all-or-nothing; foreign imports."""

from __future__ import annotations

import copy
import dataclasses
import json
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("transformers")

from conftest import REL_TOL, rel_err  # noqa: E402
from test_hf import fill, head_model, randomize, run, tiny_inputs, tiny_model  # noqa: E402

from mtlora_kernels import MTLoRAConfig, attach, load_adapters, save_adapters  # noqa: E402
from mtlora_kernels.integrations.hf import get_handle  # noqa: E402
from mtlora_kernels.io import (  # noqa: E402
    CONFIG_NAME, WEIGHTS_NAME, AdapterLoadError, import_hydralora, import_official,
    official_config, read_safetensors,
)
from mtlora_kernels.reference import hydralora_reference  # noqa: E402

CFG = MTLoRAConfig(r=4, num_experts=3, groups=2, alpha=8.0, dropout=0.0)


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, snap, x, before):
    assert list(model.state_dict()) == list(snap)
    assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())
    assert torch.equal(run(model, x), before)


@pytest.mark.parametrize("where", [dict(placement="both"), dict(target_modules="q_proj,down_proj")],
                         ids=["block", "component"])
def test_round_trip_gives_identical_outputs(tmp_path, where):
    model = tiny_model("llama")
    handle = attach(model, CFG, **where)
    randomize(handle)
    x = tiny_inputs("llama")
    want = run(model, x)
    save_adapters(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    assert set(load_file(tmp_path / WEIGHTS_NAME)) == set(handle.state_dict())

    fresh = tiny_model("llama")  # same seed: same base weights
    loaded = load_adapters(fresh, tmp_path)
    assert loaded.placement == handle.placement and loaded.config == handle.config
    assert torch.equal(run(fresh, x), want)

    # Loading into adapters that are already attached (a handle) works the same way.
    again = tiny_model("llama")
    h = attach(again, CFG, **where)
    load_adapters(h, tmp_path)
    assert torch.equal(run(again, x), want)


@pytest.mark.parametrize("where", [dict(placement="ffn"), dict(target_modules="v_proj")],
                         ids=["block", "component"])
def test_adapters_loaded_under_inference_mode_reload_and_train_outside_it(tmp_path, where):
    """A server that loads adapters into a fresh model under ``torch.inference_mode()`` gets
    adapters with ordinary parameters: outside it they take other adapters' weights (a swap) and
    train. Created as inference tensors, the swap failed ('Inplace update to inference tensor
    outside InferenceMode') and so did the training step ('Inference tensors cannot be saved for
    backward')."""
    model = tiny_model("llama")
    handle = attach(model, CFG, **where)
    x = tiny_inputs("llama")
    for name, seed in (("first", 2), ("second", 3)):
        randomize(handle, seed)
        save_adapters(handle, tmp_path / name)
    want = run(model, x)  # the second adapters'
    served = tiny_model("llama")  # same seed: same base weights
    with torch.inference_mode():
        loaded = load_adapters(served, tmp_path / "first")
        first = run(served, x)
    load_adapters(loaded, tmp_path / "second")
    out = run(served, x)
    assert torch.equal(out, want) and not torch.equal(first, want)
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loaded.parameters())


@pytest.mark.parametrize("case", ["vit", "llama-lm_head"])
def test_a_model_built_under_inference_mode_takes_adapters_with_a_train_module(tmp_path, case):
    """A server that builds the model and loads adapters saved with a trained head, all under
    ``torch.inference_mode()``: the head's weights are the model's (inference tensors there),
    which take ``requires_grad`` inside inference mode only; the load gives the trained model's
    outputs, its adapters ordinary parameters. (attach switched inference mode off for all its
    work, and failed there, on the head, after freezing the model.)"""
    model, family, where, head = head_model(case)
    randomize(attach(model, CFG, **where, train_modules=head))
    fill(model.get_submodule(head), 20)
    x = tiny_inputs(family)
    want = run(model, x)
    save_adapters(get_handle(model), tmp_path)
    with torch.inference_mode():
        served, *_ = head_model(case)
        loaded = load_adapters(served, tmp_path)
        out = run(served, x)
    assert torch.equal(out, want)
    assert not any(p.is_inference() for a in loaded.adapters.values() for p in a.parameters())


def test_a_train_module_of_inference_tensors_is_refused_outside_inference_mode():
    """A head built under ``torch.inference_mode()`` cannot take requires_grad outside it:
    attach failed there after freezing the model (left frozen, no handle); it is refused first
    now, named, the model untouched."""
    with torch.inference_mode():
        model, family, where, head = head_model("llama-lm_head")
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(ValueError, match=r"train_modules: lm_head's parameters are inference "
                                         r"tensors"):
        attach(model, CFG, **where, train_modules=head)
    assert get_handle(model) is None
    assert [p.requires_grad for p in model.parameters()] == flags


@pytest.mark.parametrize("family,mixer,ffn", [("qwen3_next", "linear_attn", "mlp"),
                                              ("olmo_hybrid", "linear_attn", "mlp"),
                                              ("jamba", "mamba", "feed_forward")])
def test_a_hybrid_models_adapters_go_by_each_layers_token_mixer(tmp_path, family, mixer, ffn):
    """A hybrid stack (layer 0 linear attention or Jamba's Mamba mixer, layer 1 full attention;
    OLMo-Hybrid's and Jamba's, layers of two classes): the attention adapters are named after
    each layer's mixer, save and load by those names (into a bare model and into attached
    adapters), layers=... picks either mixer, and disable() / remove() give the base model
    back."""
    x = tiny_inputs(family)
    model = tiny_model(family)
    before, keys = run(model, x), list(model.state_dict())
    handle = attach(model, CFG, placement="both")
    assert list(handle.adapters) == [f"model.layers.{i}.{sub}.mtlora_adapter"
                                     for i, sub0 in enumerate((mixer, "self_attn"))
                                     for sub in (sub0, ffn)]
    randomize(handle)
    want = run(model, x)
    save_adapters(handle, tmp_path / "both")
    fresh = tiny_model(family)
    loaded = load_adapters(fresh, tmp_path / "both")
    assert list(loaded.adapters) == list(handle.adapters)
    assert torch.equal(run(fresh, x), want)
    with loaded.disabled():
        assert torch.equal(run(fresh, x), before)
    loaded.remove()
    assert torch.equal(run(fresh, x), before) and list(fresh.state_dict()) == keys
    for layers, name in (([0], f"layers.0.{mixer}"), ([-1], "layers.1.self_attn")):
        one = attach(fresh, CFG, placement="attn", layers=layers)
        assert list(one.adapters) == [f"model.{name}.mtlora_adapter"]
        randomize(one)
        out = run(fresh, x)
        save_adapters(one, tmp_path / name)
        again = tiny_model(family)
        load_adapters(attach(again, CFG, placement="attn", layers=layers), tmp_path / name)
        assert torch.equal(run(again, x), out)
        one.remove()


def test_an_encoder_decoders_adapters_round_trip(tmp_path):
    """T5, both stacks: the adapters (under encoder.block.*.layer.1.DenseReluDense and
    decoder.block.*.layer.2.DenseReluDense, the self-attentions) save and load by their names,
    into a bare model and into attached adapters; layers=[1, 2] (the encoder's last block, the
    decoder's first) saved and loaded likewise."""
    x = tiny_inputs("t5")
    model = tiny_model("t5")
    before = run(model, x)
    for layers in (None, [1, 2]):
        handle = attach(model, CFG, placement="both", layers=layers)
        randomize(handle)
        want = run(model, x)
        save_adapters(handle, tmp_path / str(layers))
        fresh = tiny_model("t5")
        loaded = load_adapters(fresh, tmp_path / str(layers))
        assert list(loaded.adapters) == list(handle.adapters) and loaded.layers == handle.layers
        assert torch.equal(run(fresh, x), want)
        again = tiny_model("t5")
        load_adapters(attach(again, CFG, placement="both", layers=layers),
                      tmp_path / str(layers))
        assert torch.equal(run(again, x), want)
        handle.remove()
        assert torch.equal(run(model, x), before)


def test_nemotron_h_adapters_save_and_load_by_block(tmp_path):
    """Nemotron-H's blocks (Mamba-2, attention, MLP, MoE), one sub-layer each: 'both' puts one
    adapter on every block's mixer, 'ffn' with layers=[0, -1] on block 3 alone (block 0 is
    Mamba), and either saves and loads (into a bare model: attach from the file's placement and
    layers) to the same outputs."""
    x = tiny_inputs("nemotron_h")
    for placement, layers, blocks in (("both", None, [0, 1, 2, 3]), ("ffn", [0, -1], [3])):
        model = tiny_model("nemotron_h")
        handle = attach(model, CFG, placement=placement, layers=layers)
        assert list(handle.adapters) == [f"model.layers.{i}.mixer.mtlora_adapter" for i in blocks]
        randomize(handle)
        want = run(model, x)
        save_adapters(handle, tmp_path / placement)
        fresh = tiny_model("nemotron_h")
        loaded = load_adapters(fresh, tmp_path / placement)
        assert list(loaded.adapters) == list(handle.adapters) and loaded.layers == handle.layers
        assert torch.equal(run(fresh, x), want)


def test_config_mismatch_is_named_and_leaves_the_adapters_alone(tmp_path):
    model = tiny_model("llama")
    randomize(attach(model, CFG))
    save_adapters(model, tmp_path)
    other = tiny_model("llama")
    h = attach(other, MTLoRAConfig(r=4, num_experts=3, groups=1, alpha=8.0))
    randomize(h, seed=5)
    x = tiny_inputs("llama")
    snap, before = snapshot(other), run(other, x)
    with pytest.raises(AdapterLoadError, match="groups: file has 2, the attached adapters have 1"):
        load_adapters(other, tmp_path)
    assert_unchanged(other, snap, x, before)
    h.remove()
    attach(other, CFG, placement="attn")
    with pytest.raises(AdapterLoadError, match="placement: file has 'ffn'"):
        load_adapters(other, tmp_path)


def test_a_load_that_attaches_restores_the_saved_dtype(tmp_path):
    """Adapters attached in bf16 came back fp32 from a load that attached them: the file now
    records their dtype, which the load restores unless given another; a file without it (saved
    before) loads fp32 as before; adapters attached already keep theirs."""
    model = tiny_model("llama")
    handle = attach(model, CFG, placement="ffn", dtype=torch.bfloat16)
    randomize(handle)
    x = tiny_inputs("llama")
    want = run(model, x)
    saved = {k: v.clone() for k, v in handle.state_dict().items()}
    save_adapters(model, tmp_path)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert meta["dtype"] == "bfloat16"

    def dtypes(h):
        return {p.dtype for p in h.parameters()}

    fresh = tiny_model("llama")
    loaded = load_adapters(fresh, tmp_path)
    assert dtypes(loaded) == {torch.bfloat16}
    assert all(torch.equal(v, saved[k]) for k, v in loaded.state_dict().items())
    assert torch.equal(run(fresh, x), want)
    assert dtypes(load_adapters(tiny_model("llama"), tmp_path, dtype=torch.float16)) \
        == {torch.float16}
    with pytest.raises(ValueError, match="has them attached already"):
        load_adapters(fresh, tmp_path, dtype=torch.float32)
    del meta["dtype"]  # a file saved before the dtype was
    (tmp_path / CONFIG_NAME).write_text(json.dumps(meta))
    old = load_adapters(tiny_model("llama"), tmp_path)
    assert dtypes(old) == {torch.float32}
    assert all(torch.equal(v, saved[k].float()) for k, v in old.state_dict().items())
    meta["dtype"] = "int8"
    (tmp_path / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(AdapterLoadError, match="'dtype' must be one of"):
        load_adapters(tiny_model("llama"), tmp_path)
    # Where the saved dtype is not used, a malformed one is not in the way: adapters attached
    # already, or another dtype given.
    randomize(loaded, seed=3)
    load_adapters(fresh, tmp_path)
    assert dtypes(loaded) == {torch.bfloat16}
    assert all(torch.equal(v, saved[k]) for k, v in loaded.state_dict().items())
    assert dtypes(load_adapters(tiny_model("llama"), tmp_path, dtype=torch.float16)) \
        == {torch.float16}


def test_the_saved_backend_is_not_restored(tmp_path):
    """A backend names the machine that saved (here 'cuda', unavailable on this one); the
    loaded adapters choose their own."""
    model = tiny_model("llama")
    randomize(attach(model, dataclasses.replace(CFG, backend="cuda")))
    save_adapters(model, tmp_path)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["config"]["backend"] == "cuda"
    fresh = tiny_model("llama")
    handle = load_adapters(fresh, tmp_path)
    assert handle.config.backend is None
    run(fresh, tiny_inputs("llama"))


def test_the_same_layers_and_targets_however_named_load(tmp_path):
    x = tiny_inputs("llama")
    for i, (saved, attached) in enumerate([
            (dict(layers=[-1]), dict(layers=[1])),
            (dict(layers=[1, 0]), dict()),  # every layer of the two, named or by None
            (dict(), dict(layers=[-2, -1])),
            (dict(target_modules="q_proj", layers=[0, 1]), dict(target_modules="q_proj")),
            # component-level layers= narrows the targets: the same module named in full
            (dict(target_modules="q_proj", layers=[1]),
             dict(target_modules="model.layers.1.self_attn.q_proj")),
            (dict(target_modules="q_proj,v_proj"), dict(target_modules=["v_proj", "q_proj"]))]):
        model = tiny_model("llama")
        randomize(attach(model, CFG, **saved))
        save_adapters(model, tmp_path / str(i))
        other = tiny_model("llama")
        attach(other, CFG, **attached)
        load_adapters(other, tmp_path / str(i))
        assert torch.equal(run(other, x), run(model, x))
    other = tiny_model("llama")
    attach(other, CFG, layers=[0])
    with pytest.raises(AdapterLoadError, match=r"layers: file has \[1\]"):
        load_adapters(other, tmp_path / "0")
    other = tiny_model("llama")  # other modules: the tensor keys differ
    attach(other, CFG, target_modules="q_proj", layers=[0])
    with pytest.raises(AdapterLoadError, match=r"missing 3 tensors, e\.g\. \['model\.layers\.0\."
                                               r".*; 3 unexpected tensors"):
        load_adapters(other, tmp_path / "4")
    # Nemotron-H's blocks (M*-E): 'ffn' on every block adapts blocks 2 and 3, the same
    # adapters as naming those two (a file of every block was refused as another selection).
    x = tiny_inputs("nemotron_h")
    model = tiny_model("nemotron_h")
    randomize(attach(model, CFG, placement="ffn"))
    save_adapters(model, tmp_path / "blocks")
    other = tiny_model("nemotron_h")
    attach(other, CFG, placement="ffn", layers=[2, 3])
    load_adapters(other, tmp_path / "blocks")
    assert torch.equal(run(other, x), run(model, x))
    other = tiny_model("nemotron_h")
    attach(other, CFG, placement="ffn", layers=[3])
    with pytest.raises(AdapterLoadError, match=r"layers: file has None"):
        load_adapters(other, tmp_path / "blocks")


def test_a_file_whose_layers_are_not_integers_is_a_mismatch(tmp_path):
    """A hand-edited adapter_config.json with layers ["1"] or [0, true]: reported as a mismatch
    (a TypeError traceback before), never read as layer 1."""
    model = tiny_model("llama")
    attach(model, CFG, layers=[0, 1])
    save_adapters(model, tmp_path)
    path = tmp_path / "adapter_config.json"
    meta = json.loads(path.read_text())
    for bad in (["1"], [0, True]):
        path.write_text(json.dumps({**meta, "layers": bad}))
        other = tiny_model("llama")
        attach(other, CFG, layers=[0, 1])
        with pytest.raises(AdapterLoadError, match=r"layers: file has \["):
            load_adapters(other, tmp_path)


def test_layers_of_any_integer_type_are_saved(tmp_path):
    """Layer indices given as numpy integers or a tensor are kept as Python ints (the config
    is JSON), duplicates dropped; a save whose config cannot be written writes no weights."""
    for layers in (np.arange(2), torch.tensor([1, 0, 1])):
        model = tiny_model("llama")
        handle = attach(model, CFG, layers=layers)
        assert handle.layers == [0, 1] and all(type(i) is int for i in handle.layers)
        save_adapters(model, tmp_path / "ok")
        assert json.loads((tmp_path / "ok" / "adapter_config.json").read_text())["layers"] == [0, 1]
        handle.remove()
    handle = attach(model, CFG)
    handle.target_modules = object()  # stands in for any value JSON cannot hold
    with pytest.raises(TypeError, match="not JSON serializable"):
        save_adapters(model, tmp_path / "bad")
    assert not list((tmp_path / "bad").glob("*"))
    with pytest.raises(TypeError, match=r"layers\[0\] must be an integer, got float 0.5"):
        attach(tiny_model("llama"), CFG, layers=[0.5])


def test_a_compiled_model_shares_checkpoints_with_the_plain_one(tmp_path):
    """torch.compile's wrapper names its modules `_orig_mod.…`: adapters attached through it
    were named so, and checkpoints of a compiled and a plain model did not load into each
    other. The adapters are named after the model's own modules, whichever is given."""
    x = tiny_inputs("llama")
    compiled = torch.compile(tiny_model("llama"))
    handle = attach(compiled, CFG)
    randomize(handle)
    assert get_handle(compiled) is handle
    assert not [name for name in handle.adapters if "_orig_mod" in name]
    save_adapters(compiled, tmp_path / "compiled")
    plain = tiny_model("llama")
    load_adapters(plain, tmp_path / "compiled")
    assert torch.equal(run(plain, x), run(compiled._orig_mod, x))
    save_adapters(plain, tmp_path / "plain")
    other = torch.compile(tiny_model("llama"))
    load_adapters(other, tmp_path / "plain")
    assert torch.equal(run(other._orig_mod, x), run(plain, x))


def test_loading_into_a_meta_model_is_refused(tmp_path):
    """Copying into meta parameters does nothing: the weights would be lost without a word."""
    model = tiny_model("llama")
    randomize(attach(model, CFG))
    save_adapters(model, tmp_path)
    with torch.device("meta"):
        fresh = tiny_model("llama")
    with pytest.raises(AdapterLoadError, match="meta device.*materialize"):
        load_adapters(fresh, tmp_path)
    assert get_handle(fresh) is None


def test_shape_mismatch_is_named_and_no_tensor_is_copied(tmp_path):
    model = tiny_model("llama")
    h = attach(model, CFG)
    randomize(h)
    save_adapters(model, tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    # The LAST adapter is wrong, so a loader that copied as it went would have half-loaded.
    key = "model.layers.1.mlp.mtlora_adapter.lora_B"
    tensors[key] = torch.randn(3, 32, 5)
    save_file(tensors, tmp_path / WEIGHTS_NAME)

    fresh = tiny_model("llama")
    x = tiny_inputs("llama")
    snap, before = snapshot(fresh), run(fresh, x)
    with pytest.raises(AdapterLoadError, match=rf"{key}: shape \(3, 32, 5\) in the file, "
                                               rf"\(3, 32, 4\) in the model"):
        load_adapters(fresh, tmp_path)
    assert get_handle(fresh) is None  # the adapters attached for the load were taken off
    assert all(p.requires_grad for p in fresh.parameters())
    assert_unchanged(fresh, snap, x, before)

    h2 = attach(fresh, CFG)
    randomize(h2, seed=7)
    snap, before = snapshot(fresh), run(fresh, x)
    with pytest.raises(AdapterLoadError, match="shape"):
        load_adapters(h2, tmp_path)
    assert_unchanged(fresh, snap, x, before)

    del tensors[key]
    tensors["model.layers.9.mlp.mtlora_adapter.lora_A"] = torch.randn(4, 32)
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    with pytest.raises(AdapterLoadError, match=r"missing 1 tensors.*layers\.1\.mlp.*"
                                               r"1 unexpected tensors.*layers\.9"):
        load_adapters(h2, tmp_path)
    assert_unchanged(fresh, snap, x, before)


def test_truncated_file_is_refused_and_the_model_unchanged(tmp_path):
    model = tiny_model("llama")
    randomize(attach(model, CFG))
    save_adapters(model, tmp_path)
    data = (tmp_path / WEIGHTS_NAME).read_bytes()
    fresh = tiny_model("llama")
    x = tiny_inputs("llama")
    snap, before = snapshot(fresh), run(fresh, x)
    for cut, why in ((len(data) - 64, "truncated"), (40, "truncated"), (5, "not a safetensors")):
        (tmp_path / WEIGHTS_NAME).write_bytes(data[:cut])
        with pytest.raises(AdapterLoadError, match=why):
            load_adapters(fresh, tmp_path)
        assert get_handle(fresh) is None
    assert_unchanged(fresh, snap, x, before)


class _Payload:
    """Unpickling this creates a file: proof that a loader unpickled it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_files_are_refused_without_being_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"lora_A": _Payload(marker)}, protocol=4)
    # Refused by the suffix, not only by the content: a protocol 0 pickle starts like text.
    text_payload = pickle.dumps({"lora_A": _Payload(marker)}, protocol=0)
    for name, data in (("adapter_model.bin", payload), ("adapter.pt", payload),
                       ("x.pkl", text_payload)):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(AdapterLoadError, match="pickle.*arbitrary code"):
            read_safetensors(tmp_path / name)
    # A pickle or torch.save zip under the safetensors name is caught by its content.
    (tmp_path / WEIGHTS_NAME).write_bytes(payload)
    with pytest.raises(AdapterLoadError, match="pickle"):
        read_safetensors(tmp_path / WEIGHTS_NAME)
    torch.save({"a": torch.randn(3)}, tmp_path / WEIGHTS_NAME)
    with pytest.raises(AdapterLoadError, match="pickle"):
        read_safetensors(tmp_path / WEIGHTS_NAME)
    # A directory with only a .bin (what old PEFT saved) names it.
    only_bin = tmp_path / "old"
    only_bin.mkdir()
    (only_bin / "adapter_model.bin").write_bytes(payload)
    with pytest.raises(AdapterLoadError, match="adapter_model.bin is a pickle"):
        import_hydralora(tiny_model("llama"), only_bin, config=CFG, target_modules=["q_proj"])
    assert not marker.exists()


def test_foreign_format_json_is_refused(tmp_path):
    model = tiny_model("llama")
    attach(model, CFG)
    save_adapters(model, tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"r": 8, "lora_alpha": 16}))
    with pytest.raises(AdapterLoadError, match="not an mtlora-kernels adapter config.*import_"):
        load_adapters(tiny_model("llama"), tmp_path)


# --- foreign checkpoints ---------------------------------------------------------------------


def _hydralora_state(handle, prefix="base_model.model."):
    """Our component adapters written with HydraLoRA's key names and PEFT's prefix."""
    out = {}
    for name, a in handle.adapters.items():
        mod = prefix + name.removesuffix(".adapter")
        out[f"{mod}.lora_A.weight"] = a.lora_A.detach().clone()
        out[f"{mod}.lora_route.weight"] = a.lora_route.detach().clone()
        for i in range(a.config.num_experts):
            out[f"{mod}.lora_B{i}.weight"] = a.lora_B[i].detach().clone()
    return out


def test_hydralora_import_computes_hydraloras_layer(tmp_path):
    cfg = MTLoRAConfig(r=4, num_experts=3, groups=1, alpha=8.0, dropout=0.0)
    src = tiny_model("llama", seed=0)
    h = attach(src, cfg, target_modules=["q_proj", "v_proj"])
    randomize(h)
    # Router weights that matter, so a transposed or mis-ordered import would show.
    with torch.no_grad():
        for a in h.adapters.values():
            a.lora_route.mul_(8)
    state = _hydralora_state(h)
    save_file(state, tmp_path / WEIGHTS_NAME)
    (tmp_path / CONFIG_NAME).write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "lora_nums": 3, "lora_dropout": 0.0,
         "target_modules": ["q_proj", "v_proj"]}))

    model = tiny_model("llama", seed=0)
    handle = import_hydralora(model, tmp_path)  # config from its adapter_config.json
    assert handle.config.groups == 1 and handle.target_modules == [  # the checkpoint's modules
        f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]

    # The oracle: the base model with HydraLoRA's published layer (SPEC section 4) on q, v.
    oracle = tiny_model("llama", seed=0)
    for name in handle.adapters:
        mod = name.removesuffix(".adapter")
        A, R = state[f"base_model.model.{mod}.lora_A.weight"], \
            state[f"base_model.model.{mod}.lora_route.weight"]
        B = torch.stack([state[f"base_model.model.{mod}.lora_B{i}.weight"] for i in range(3)])
        oracle.get_submodule(mod).register_forward_hook(
            lambda m, args, out, A=A, B=B, R=R: out + hydralora_reference(
                args[0], A, B, R, scaling=cfg.scaling))
    x = tiny_inputs("llama")
    assert rel_err(run(model, x), run(oracle, x)) <= REL_TOL[torch.float32]
    assert rel_err(run(model, x), run(tiny_model("llama", seed=0), x)) > 1e-3


def test_hydralora_import_mismatch_is_named_and_model_unchanged():
    cfg = MTLoRAConfig(r=4, num_experts=3, groups=1, alpha=8.0)
    src = tiny_model("llama")
    state = _hydralora_state(attach(src, cfg, target_modules=["q_proj"]))
    model = tiny_model("llama")
    x = tiny_inputs("llama")
    snap, before = snapshot(model), run(model, x)
    bad = dict(state)
    bad["base_model.model.model.layers.1.self_attn.q_proj.lora_B2.weight"] = torch.randn(32, 5)
    with pytest.raises(AdapterLoadError, match=r"layers\.1\.self_attn\.q_proj: lora_B2\.weight: "
                                               r"shape \(32, 5\) in the checkpoint, \(32, 4\)"):
        import_hydralora(model, bad, config=cfg, target_modules=["q_proj"])
    with pytest.raises(AdapterLoadError, match=r"layers\.0\.self_attn\.q_proj: lacks "
                                               r"lora_route\.weight"):
        import_hydralora(model, {k: v for k, v in state.items() if "route" not in k},
                         config=cfg, target_modules=["q_proj"])
    with pytest.raises(AdapterLoadError, match="v_proj: no matching checkpoint modules"):
        import_hydralora(model, state, config=cfg, target_modules=["q_proj", "v_proj"])
    # A checkpoint module with no adapter here (its v_proj) is refused, not left out.
    more = {**state, **{k.replace("q_proj", "v_proj"): v for k, v in state.items()}}
    with pytest.raises(AdapterLoadError, match=r"checkpoint modules with no adapter here: "
                                               r"\['base_model\.model\.model\.layers\.0\."
                                               r"self_attn\.v_proj'"):
        import_hydralora(model, more, config=cfg, target_modules=["q_proj"])
    # Names match up to a whole dotted prefix: another model's text_model.layers... is not
    # model.layers...
    tower = {k.replace("base_model.model.model.", "text_model."): v for k, v in state.items()}
    with pytest.raises(AdapterLoadError, match="q_proj: no matching checkpoint modules"):
        import_hydralora(model, tower, config=cfg, target_modules=["q_proj"])
    with pytest.raises(AdapterLoadError, match=r"lora_route\.weight: shape \(3, 32\) in the "
                                               r"checkpoint, \(6, 32\) here"):  # g = 2 wanted
        import_hydralora(model, state, config=CFG, target_modules=["q_proj"])
    assert get_handle(model) is None
    assert_unchanged(model, snap, x, before)


def test_import_into_attached_adapters_of_another_config_is_refused(tmp_path):
    """Importing into adapters already attached: a checkpoint config (given, or in the
    directory) whose alpha differs loads without any shape error and would scale every output
    wrongly, so it is refused, naming the field; the same config loads."""
    cfg = MTLoRAConfig(r=4, num_experts=3, groups=1, alpha=8.0, dropout=0.0)
    state = _hydralora_state(attach(tiny_model("llama"), cfg, target_modules=["q_proj"]))
    save_file(state, tmp_path / WEIGHTS_NAME)
    (tmp_path / CONFIG_NAME).write_text(json.dumps(
        {"r": 4, "lora_alpha": 8, "lora_nums": 3, "target_modules": ["q_proj"]}))
    model = tiny_model("llama")
    handle = attach(model, dataclasses.replace(cfg, alpha=32.0), target_modules=["q_proj"])
    x = tiny_inputs("llama")
    snap, before = snapshot(model), run(model, x)
    for source, kw in ((state, dict(config=cfg)), (tmp_path, {})):
        with pytest.raises(AdapterLoadError, match="alpha: checkpoint has 8.0, the attached "
                                                   "adapters have 32.0"):
            import_hydralora(handle, source, **kw)
    assert_unchanged(model, snap, x, before)
    handle.remove()
    handle = attach(model, cfg, target_modules=["q_proj"])
    assert import_hydralora(handle, tmp_path) is handle


@pytest.mark.parametrize("family", ["mistral", "gemma3"])
def test_official_import_block_level_with_fine_grained_routing(tmp_path, family):
    """gemma3: the multimodal model, whose config keeps the hidden size in text_config (the
    group count read model.config.hidden_size: AttributeError)."""
    cfg = MTLoRAConfig(r=4, num_experts=3, groups=4, alpha=8.0, dropout=0.0)
    src = tiny_model(family)
    h = attach(src, cfg, placement="ffn")
    randomize(h)
    x = tiny_inputs(family)
    want = run(src, x)
    state = {}
    for name, a in h.adapters.items():  # the official keys: <layer>.mlp.block_adapter....
        mod = "base_model.model." + name.removesuffix(".mtlora_adapter") + ".block_adapter"
        state[f"{mod}.lora_A.weight"] = a.lora_A.detach().clone()
        state[f"{mod}.lora_route.weight"] = a.lora_route.detach().clone()
        for i in range(3):
            state[f"{mod}.lora_B.{i}.weight"] = a.lora_B[i].detach().clone()
    save_file(state, tmp_path / WEIGHTS_NAME)
    (tmp_path / CONFIG_NAME).write_text(json.dumps(
        {"r": 4, "lora_alpha": 8, "lora_nums": 3, "lora_dropout": 0.0,
         "enable_block_adapter": True, "block_adapter_type": "ffn",
         "block_adapter_style": "lowrank", "enable_fine_grained_routing": True,
         "routing_group_size": 8}))  # 32 / 8 = 4 groups
    model = tiny_model(family)
    handle = import_official(model, tmp_path)
    assert handle.config.groups == 4 and handle.placement == "ffn"
    assert torch.equal(run(model, x), want)

    # Wrong placement against the checkpoint: named, and the model left alone.
    other = tiny_model(family)
    snap, before = snapshot(other), run(other, x)
    with pytest.raises(AdapterLoadError, match="self_attn: no matching checkpoint modules"):
        import_official(other, tmp_path / WEIGHTS_NAME, config=cfg, placement="attn")
    assert get_handle(other) is None
    assert_unchanged(other, snap, x, before)


@pytest.mark.parametrize("kind", ["hydralora", "official"])
def test_an_import_that_attaches_takes_dtype_as_load_adapters_does(kind):
    """import_hydralora / import_official had no dtype=: the adapters they attached were fp32
    whatever the model or the checkpoint held. They take one now, as load_adapters does: the
    attached adapters hold the source's values cast to it (default fp32, attach's), and adapters
    attached already keep theirs (dtype= refused, the model unchanged)."""
    cfg = MTLoRAConfig(r=4, num_experts=3, groups=2, alpha=8.0, dropout=0.0)
    g = torch.Generator().manual_seed(11)
    state, mods = {}, {}
    for i in (0, 1):  # fresh random bf16 tensors, as a bf16 training run saves them
        mod = f"model.layers.{i}.self_attn.q_proj" if kind == "hydralora" else \
            f"model.layers.{i}.mlp"
        prefix = f"base_model.model.{mod}" + ("" if kind == "hydralora" else ".block_adapter")
        A, R, B = (torch.randn(*shape, generator=g).to(torch.bfloat16)
                   for shape in ((4, 32), (6, 32), (3, 32, 4)))
        state.update({f"{prefix}.lora_A.weight": A, f"{prefix}.lora_route.weight": R})
        state.update({(f"{prefix}.lora_B{e}.weight" if kind == "hydralora" else
                       f"{prefix}.lora_B.{e}.weight"): B[e] for e in range(3)})
        mods[mod + (".adapter" if kind == "hydralora" else ".mtlora_adapter")] = (A, B, R)
    load = {"hydralora": lambda m, **kw: import_hydralora(m, state, config=cfg, **kw),
            "official": lambda m, **kw: import_official(m, state, config=cfg, placement="ffn",
                                                        **kw)}[kind]
    for dtype in (torch.bfloat16, torch.float16, None):
        handle = load(tiny_model("llama").to(torch.bfloat16),
                      **({} if dtype is None else {"dtype": dtype}))
        want = dtype or torch.float32
        assert sorted(handle.adapters) == sorted(mods)
        for name, (A, B, R) in mods.items():
            a = handle.adapters[name]
            for got, src in ((a.lora_A, A), (a.lora_B, B), (a.lora_route, R)):
                assert got.dtype == want and torch.equal(got, src.to(want)), (name, dtype)
    snap = snapshot(handle.model)
    with pytest.raises(ValueError, match=f"is for the adapters import_{kind} attaches"):
        load(handle, dtype=torch.bfloat16)
    assert all(torch.equal(v, snap[k]) for k, v in handle.model.state_dict().items())


OFFICIAL = {"r": 4, "lora_alpha": 8, "lora_nums": 3, "enable_block_adapter": True,
            "block_adapter_type": "ffn", "enable_fine_grained_routing": True,
            "routing_group_size": 8}


@pytest.mark.parametrize("change,message", [
    (dict(lora_alpha=None), "lacks lora_alpha"),
    (dict(r=None), r"lacks block_adapter_rank \(or r\)"),
    (dict(block_adapter_type="mlp"), r"block_adapter_type must be one of \['attention', "
                                     r"'both', 'ffn'\], got 'mlp'"),
    (dict(routing_group_size=12), "routing_group_size 12 must divide the model's hidden_size 32"),
    (dict(routing_group_size=64), "routing_group_size 64 must divide the model's hidden_size 32"),
])
def test_official_config_errors_are_named(change, message):
    """A field missing, unknown or not fitting the model: an AdapterLoadError that names it
    (a bare KeyError, or 32 // 12 = 2 groups of 16 read silently, before)."""
    cfg = {k: v for k, v in {**OFFICIAL, **change}.items() if v is not None}
    with pytest.raises(AdapterLoadError, match=message):
        official_config(cfg, hidden_size=32)
    assert official_config(OFFICIAL, hidden_size=32) == (
        MTLoRAConfig(r=4, num_experts=3, groups=4, alpha=8.0, dropout=0.0), "ffn")


def test_an_interrupted_save_leaves_the_last_files_and_other_ranks_write_nothing(
        tmp_path, monkeypatch):
    """Each file is written beside its place and renamed: a save that fails half-way leaves the
    previous save whole. Under torch.distributed only rank 0 writes."""
    import safetensors.torch

    import mtlora_kernels.io as io

    model = tiny_model("llama")
    handle = attach(model, CFG)
    randomize(handle)
    save_adapters(handle, tmp_path)
    saved = {n: (tmp_path / n).read_bytes() for n in (WEIGHTS_NAME, CONFIG_NAME)}

    def fail_half_way(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    randomize(handle, seed=5)
    monkeypatch.setattr(safetensors.torch, "save_file", fail_half_way)
    with pytest.raises(OSError, match="disk full"):
        save_adapters(handle, tmp_path)
    assert {n: (tmp_path / n).read_bytes() for n in saved} == saved
    monkeypatch.undo()

    monkeypatch.setattr(io, "_distributed_rank", lambda: 1)
    assert save_adapters(handle, tmp_path / "rank1") == tmp_path / "rank1"
    assert not (tmp_path / "rank1").exists()


def test_a_weight_tied_between_two_train_modules_is_one_parameter(tmp_path):
    """embed_tokens and lm_head sharing their weight, both train modules: the handle lists it
    once (what an optimizer gets), and it saves and loads under its first name."""
    model = tiny_model("llama", tie_word_embeddings=True)
    handle = attach(model, CFG, placement="ffn", train_modules=["embed_tokens", "lm_head"])
    randomize(handle)
    with torch.no_grad():
        model.lm_head.weight.add_(torch.randn_like(model.lm_head.weight))
    params = list(handle.parameters())
    assert len({id(p) for p in params}) == len(params)
    assert sum(p is model.lm_head.weight for p in params) == 1
    assert [k for k in handle.state_dict() if "adapter" not in k] == ["model.embed_tokens.weight"]
    x = tiny_inputs("llama")
    want = run(model, x)
    save_adapters(handle, tmp_path)
    fresh = tiny_model("llama", tie_word_embeddings=True)
    load_adapters(fresh, tmp_path)
    assert torch.equal(run(fresh, x), want)


def test_a_removed_handle_is_refused(tmp_path):
    """load_adapters / import into a handle whose adapters were removed returned the handle as
    if loaded, while the model computed its base outputs; now it raises, the model untouched."""
    model = tiny_model("llama")
    randomize(attach(model, CFG))
    save_adapters(model, tmp_path)
    other = tiny_model("llama")
    handle = attach(other, CFG)
    handle.remove()
    for load in (lambda: load_adapters(handle, tmp_path),
                 lambda: import_official(handle, {}), lambda: save_adapters(handle, tmp_path)):
        with pytest.raises(RuntimeError, match="removed"):
            load()
    assert get_handle(other) is None


class _HydraLoRALinear(torch.nn.Module):
    """A base linear plus HydraLoRA's published layer: the oracle of a HydraLoRA model."""

    def __init__(self, base, layer):
        super().__init__()
        self.base, self.layer = base, layer

    def forward(self, x):
        return self.layer(x, residual=self.base(x))


def _hydralora_checkpoint(model, keep, *, groups=1, dtype=torch.bfloat16, seed=4):
    """What HydraLoRA's code would save for its layers on the Linear modules ``keep`` selects
    (PEFT prefix, ``dtype`` tensors), and the oracle: a copy of ``model`` running
    :class:`HydraLoRALayer` (r=4, N=3, alpha=8) with those values."""
    from mtlora_kernels.compat.hydralora import HydraLoRALayer

    oracle, state = copy.deepcopy(model), {}
    g = torch.Generator().manual_seed(seed)
    for name, mod in list(oracle.named_modules()):
        if not (isinstance(mod, torch.nn.Linear) and keep(name)):
            continue
        layer = HydraLoRALayer(mod.in_features, mod.out_features, r=4, num_experts=3,
                               lora_alpha=8.0, lora_dropout=0.0, groups=groups)
        with torch.no_grad():
            for p in layer.parameters():  # routers of weight: a mis-ordered import would show
                p.copy_((torch.randn(p.shape, generator=g) * 3 / p.shape[1] ** 0.5).to(dtype))
        parent, _, child = name.rpartition(".")
        setattr(oracle.get_submodule(parent), child, _HydraLoRALinear(mod, layer))
        state.update({f"base_model.model.{name}.{k}": v.to(dtype).clone()
                      for k, v in layer.state_dict().items()})
    return state, oracle


_LAYER0_QV = [f"model.layers.0.self_attn.{p}" for p in ("q_proj", "v_proj")]
_EVERY_PROJ = [f"model.layers.{i}.{p}" for i in (0, 1) for p in (
    "mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj", "self_attn.o_proj",
    "self_attn.q_proj", "self_attn.v_proj")]


@pytest.mark.parametrize("targets,modules", [
    (r".*layers\.0\.self_attn\.(q|v)_proj", _LAYER0_QV), (["proj"], _EVERY_PROJ)],
    ids=["regex", "bare-suffix"])
def test_hydralora_import_places_adapters_where_the_checkpoint_has_them(tmp_path, targets,
                                                                          modules):
    """PEFT reads a string target_modules as a regex (re.fullmatch) and a list entry as a plain
    suffix ("proj" matches every q_proj ... down_proj, not a dotted name of ours): such
    checkpoints failed to import from their directory. The adapters now go on the modules the
    checkpoint holds, and the model computes HydraLoRA's layer."""
    model = tiny_model("llama")
    state, oracle = _hydralora_checkpoint(model, lambda n: n in modules)
    save_file(state, tmp_path / WEIGHTS_NAME)
    (tmp_path / CONFIG_NAME).write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "lora_nums": 3, "lora_dropout": 0.05,
         "target_modules": targets, "bias": "none", "modules_to_save": None}))
    handle = import_hydralora(model, tmp_path)
    assert sorted(handle.adapters) == [f"{m}.adapter" for m in modules]
    x = tiny_inputs("llama")
    # fp32 both, summed in other orders over up to 14 adapters in series: 1.7e-5 measured.
    assert rel_err(run(model, x), run(oracle, x)) <= 10 * REL_TOL[torch.float32]
    assert rel_err(run(model, x), run(tiny_model("llama"), x)) > 1e-2


def test_hydralora_layout_with_fine_grained_routing_imports(tmp_path):
    """The official code's component-level checkpoints with fine-grained routing: HydraLoRA's
    keys, router [g*N, d_in]. import_hydralora refused any groups != 1, though the layout is
    ours; now the model computes the grouped HydraLoRA loop. Their adapter_config.json cannot
    say one g (it is out_features / routing_group_size per module): a named error asks for it."""
    model = tiny_model("llama")
    state, oracle = _hydralora_checkpoint(model, lambda n: n.endswith(("q_proj", "o_proj")),
                                          groups=4)
    save_file(state, tmp_path / WEIGHTS_NAME)
    (tmp_path / CONFIG_NAME).write_text(json.dumps(
        {"r": 4, "lora_alpha": 8, "lora_nums": 3, "target_modules": ["q_proj", "o_proj"],
         "enable_fine_grained_routing": True, "routing_group_size": 8}))
    with pytest.raises(AdapterLoadError, match="routing_group_size 8.*config=MTLoRAConfig"):
        import_hydralora(model, tmp_path)
    assert get_handle(model) is None
    import_hydralora(model, tmp_path, config=MTLoRAConfig(r=4, num_experts=3, groups=4,
                                                          alpha=8.0, dropout=0.0))
    x = tiny_inputs("llama")
    assert rel_err(run(model, x), run(oracle, x)) <= REL_TOL[torch.float32]


def test_foreign_keys_and_a_config_that_is_no_object_are_named(tmp_path):
    """A PEFT file with modules_to_save or base weights beside the adapters is refused (loading
    only the adapters would drop trained weights) with the way out; an adapter_config.json
    holding a JSON list was an AttributeError / TypeError, now an AdapterLoadError."""
    model = tiny_model("llama")
    state, _ = _hydralora_checkpoint(model, lambda n: n.endswith("q_proj"))
    state["base_model.model.lm_head.weight"] = torch.randn(64, 32)
    with pytest.raises(AdapterLoadError, match=r"lm_head\.weight'\]; the import loads adapters "
                                               r"only: load the other tensors"):
        import_hydralora(model, state, config=CFG)
    del state["base_model.model.lm_head.weight"]
    with pytest.raises(AdapterLoadError, match="hydralora adapter keys: use import_hydralora"):
        import_official(model, state, config=CFG)
    save_file({k: v for k, v in state.items() if "lora_" in k}, tmp_path / WEIGHTS_NAME)
    (tmp_path / CONFIG_NAME).write_text("[1, 2]")
    for load in (load_adapters, import_hydralora):
        with pytest.raises(AdapterLoadError, match="holds a JSON list, not an adapter config"):
            load(model, tmp_path)
    assert get_handle(model) is None


def test_an_imported_checkpoint_reloads_into_adapters_attached_by_target_name(tmp_path):
    """import_hydralora names its targets by the checkpoint's module paths; a save of that
    model was refused by adapters attached with target_modules=["q_proj"] (the same modules)
    because the names differed. Targets are compared by the adapters they make (the tensor
    keys), so it loads, and other modules are still named as missing."""
    cfg = MTLoRAConfig(r=4, num_experts=3, groups=1, alpha=8.0, dropout=0.0)
    model = tiny_model("llama")
    state, oracle = _hydralora_checkpoint(model, lambda n: n.endswith("q_proj"))
    import_hydralora(model, state, config=cfg)
    save_adapters(model, tmp_path)
    other = tiny_model("llama")
    attach(other, cfg, target_modules=["q_proj"])
    load_adapters(other, tmp_path)
    x = tiny_inputs("llama")
    assert torch.equal(run(other, x), run(model, x))
    third = tiny_model("llama")
    attach(third, cfg, target_modules=["k_proj"])
    with pytest.raises(AdapterLoadError, match=r"missing 6 tensors, e\.g\. \['model\.layers\.0"
                                               r"\.self_attn\.k_proj"):
        load_adapters(third, tmp_path)


def test_a_checkpoint_module_that_names_several_modules_here_is_refused():
    """Module names are matched up to a wrapper prefix, so a checkpoint that names its modules
    without their stack (``layers.0.self_attn.q_proj``) matches BART's encoder and decoder
    module alike: both got the same adapter, silently. Refused now, naming both; the full
    names import into the encoder alone."""
    cfg = MTLoRAConfig(r=4, num_experts=3, groups=1, alpha=8.0, dropout=0.0)
    model = tiny_model("bart")
    state, oracle = _hydralora_checkpoint(model, lambda n: ".encoder." in n
                                          and n.endswith("self_attn.q_proj"))
    short = {k.split("encoder.", 1)[1]: v for k, v in state.items()}
    x = tiny_inputs("bart")
    snap, before = snapshot(model), run(model, x)
    for targets in (None, ["q_proj"]):
        with pytest.raises(AdapterLoadError, match=r"checkpoint module layers\.0\.self_attn\."
                                                   r"q_proj matches 2 modules here: \['model\."
                                                   r"decoder\.layers\.0\.self_attn\.q_proj', "
                                                   r"'model\.encoder\.layers\.0"):
            import_hydralora(model, short, config=cfg, target_modules=targets)
    assert get_handle(model) is None
    assert_unchanged(model, snap, x, before)
    handle = import_hydralora(model, state, config=cfg)
    assert all(".encoder." in name for name in handle.adapters)
    assert rel_err(run(model, x), run(oracle, x)) <= REL_TOL[torch.float32]


# --- train modules (attach(..., train_modules=...)) ----------------------------------------------


@pytest.mark.parametrize("case", ["vit", "llama-lm_head"])
def test_train_modules_save_and_load_with_the_adapters(tmp_path, case):
    """The head's trained values go beside the adapters' (under their model names, version 2,
    the config listing them) and come back: into a bare model (attached with the saved
    train_modules), into adapters attached with them, and not into adapters without them (named,
    the model unchanged); remove() then gives the fresh model's own head back."""
    model, family, where, head = head_model(case)
    handle = attach(model, CFG, **where, train_modules=head)
    randomize(handle)
    fill(model.get_submodule(head), 20)  # "trained": neither the fresh model's head nor zeros
    x = tiny_inputs(family)
    want = run(model, x)
    save_adapters(handle, tmp_path)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert meta["train_modules"] == [head] and meta["format_version"] == 2
    saved = load_file(tmp_path / WEIGHTS_NAME)
    head_keys = {f"{head}.{k}" for k in model.get_submodule(head).state_dict()}
    assert set(saved) == set(handle.state_dict()) and head_keys <= set(saved)
    assert all(torch.equal(saved[k], model.state_dict()[k]) for k in head_keys)

    fresh, *_ = head_model(case)
    before, snap = run(fresh, x), snapshot(fresh)
    loaded = load_adapters(fresh, tmp_path)
    assert loaded.train_modules == [head]
    assert all(p.requires_grad for p in fresh.get_submodule(head).parameters())
    assert torch.equal(run(fresh, x), want)
    loaded.remove()
    assert_unchanged(fresh, snap, x, before)

    again, *_ = head_model(case)
    load_adapters(attach(again, CFG, **where, train_modules=[head]), tmp_path)
    assert torch.equal(run(again, x), want)

    other, *_ = head_model(case)
    randomize(attach(other, CFG, **where), seed=5)
    snap, before = snapshot(other), run(other, x)
    with pytest.raises(AdapterLoadError, match=rf"train_modules: file has \['{head}'\], the "
                                               rf"attached adapters have None"):
        load_adapters(other, tmp_path)
    assert_unchanged(other, snap, x, before)


def test_a_bad_train_module_tensor_is_named_and_nothing_is_copied(tmp_path):
    """The head's tensors get the adapters' checks, all before the first copy: a wrong shape or
    a missing one is named, and neither the adapters (copied first) nor the head change."""
    model, family, where, head = head_model("vit")
    randomize(attach(model, CFG, **where, train_modules=head))
    save_adapters(model, tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    x = tiny_inputs(family)
    for change, message in (
            (lambda t: t.__setitem__("classifier.weight", torch.randn(5, 32)),
             r"classifier\.weight: shape \(5, 32\) in the file, \(3, 32\) in the model"),
            (lambda t: t.pop("classifier.bias"),
             r"missing 1 tensors, e\.g\. \['classifier\.bias'\]"),
            (lambda t: t.__setitem__("classifier.bias", torch.arange(3)),
             r"classifier\.bias: dtype torch\.int64 is not floating")):
        broken = dict(tensors)
        change(broken)
        save_file(broken, tmp_path / WEIGHTS_NAME)
        fresh, *_ = head_model("vit")
        snap, before = snapshot(fresh), run(fresh, x)
        with pytest.raises(AdapterLoadError, match=message):
            load_adapters(fresh, tmp_path)
        assert get_handle(fresh) is None and all(p.requires_grad for p in fresh.parameters())
        assert_unchanged(fresh, snap, x, before)
        h = attach(fresh, CFG, **where, train_modules=head)
        randomize(h, seed=7)
        fill(fresh.classifier, 30)
        snap, before = snapshot(fresh), run(fresh, x)
        with pytest.raises(AdapterLoadError, match=message):
            load_adapters(h, tmp_path)
        assert_unchanged(fresh, snap, x, before)


def test_a_file_without_train_modules_is_version_1_and_old_files_load(tmp_path):
    """A save without train modules writes format_version 1 (readable by releases before them);
    a version-1 config without the field (as they wrote it) loads, a version beyond this
    release's and a malformed field are refused."""
    model = tiny_model("llama")
    randomize(attach(model, CFG, target_modules="q_proj"))
    x = tiny_inputs("llama")
    want = run(model, x)
    save_adapters(model, tmp_path)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert meta["format_version"] == 1 and meta["train_modules"] is None
    del meta["train_modules"]
    (tmp_path / CONFIG_NAME).write_text(json.dumps(meta))
    fresh = tiny_model("llama")
    handle = load_adapters(fresh, tmp_path)
    assert handle.train_modules is None and torch.equal(run(fresh, x), want)
    again = tiny_model("llama")
    load_adapters(attach(again, CFG, target_modules="q_proj"), tmp_path)
    assert torch.equal(run(again, x), want)
    for field, value, message in (
            ("format_version", 3, "format_version 3; this mtlora_kernels reads up to 2"),
            ("train_modules", "lm_head", "'train_modules' must be a non-empty list of module "
                                         "names or null")):
        (tmp_path / CONFIG_NAME).write_text(json.dumps({**meta, field: value}))
        other = tiny_model("llama")
        with pytest.raises(AdapterLoadError, match=message):
            load_adapters(other, tmp_path)
        assert get_handle(other) is None


def test_a_train_modules_buffers_are_saved_loaded_and_restored(tmp_path):
    """A train module with buffers (BatchNorm's running statistics, moved by two training
    forwards, and its int64 num_batches_tracked, checked against its own dtype): saved and
    loaded with its parameters; remove() restores them with the parameters."""
    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8),
                                    torch.nn.BatchNorm1d(8))
        fill(model[2], 3)
        return model.eval()

    model = build()
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    before, snap = model(x), snapshot(model)
    handle = attach(model, CFG, target_modules="0", train_modules="2")
    # The parameters (what an optimizer gets) hold no buffer; the state dict holds them.
    assert list(dict(handle.named_parameters())) == [
        "0.adapter.lora_A", "0.adapter.lora_B", "0.adapter.lora_route", "2.weight", "2.bias"]
    randomize(handle)
    model.train()
    model(x), model(x)
    model.eval()
    want = model(x)
    save_adapters(handle, tmp_path)
    saved = load_file(tmp_path / WEIGHTS_NAME)
    assert saved["2.num_batches_tracked"].dtype == torch.int64
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(saved[f"2.{key}"], getattr(model[2], key))
        assert not torch.equal(saved[f"2.{key}"], snap[f"2.{key}"])
    fresh = build()
    load_adapters(fresh, tmp_path)
    assert torch.equal(fresh(x), want)
    handle.remove()
    assert list(model.state_dict()) == list(snap)
    assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())
    assert torch.equal(model(x), before)



@pytest.mark.parametrize("where", [dict(placement="both"), dict(target_modules="q_proj,down_proj")],
                         ids=["block", "component"])
def test_save_pretrained_with_adapters_attached_loads_only_into_the_same_adapters(tmp_path, where):
    """README's account of save_pretrained with adapters attached: the file (the Trainer's
    checkpoints write the same) loads strictly into a model with the same adapters attached;
    from_pretrained into a plain model reports the adapters' keys unexpected and, component-
    level, the wrapped Linears' weights missing (initialised afresh); save_adapters plus the
    base model saved after remove() give the adapted model back through from_pretrained."""
    model = tiny_model("llama")
    handle = attach(model, CFG, **where)
    randomize(handle)
    x = tiny_inputs("llama")
    want = run(model, x)
    model.save_pretrained(tmp_path / "whole")
    again = tiny_model("llama", seed=5)
    attach(again, CFG, **where)
    again.load_state_dict(load_file(tmp_path / "whole" / "model.safetensors"), strict=True)
    assert torch.equal(run(again, x), want)
    _, info = type(model).from_pretrained(tmp_path / "whole", output_loading_info=True)
    assert set(info["unexpected_keys"]) >= set(handle.state_dict())
    wrapped = {f"{n.removesuffix('.adapter')}.weight" for n in handle.adapters}
    assert set(info["missing_keys"]) == (wrapped if "target_modules" in where else set())

    save_adapters(handle, tmp_path / "adapters")
    handle.remove()
    model.save_pretrained(tmp_path / "base")
    loaded = type(model).from_pretrained(tmp_path / "base").eval()
    load_adapters(loaded, tmp_path / "adapters")
    assert torch.equal(run(loaded, x), want)
