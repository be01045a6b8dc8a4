"""``mtlora-kernels params``: adapter parameter counts from a model config, built on meta."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import transformers

from mtlora_kernels.cli import count_params, main, model_dims


def _llama2_7b(**overrides) -> transformers.LlamaConfig:
    """LLaMA-2-7B's shape, built in code (no download)."""
    fields = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, intermediate_size=11008, vocab_size=32000)
    return transformers.LlamaConfig(**{**fields, **overrides})


def _rows(text: str) -> dict[str, str]:
    """placement -> the rounded count printed in its row."""
    return {m.group(1).strip(): m.group(2)
            for m in re.finditer(r"│ (.+?)\s+│\s+([\d.]+M) │", text)}


def test_llama2_7b_config_prints_the_papers_numbers(tmp_path, capsys):
    """SPEC section 2: 75.5M (HydraLoRA on W_q, W_v), 37.7M (block FFN g=1), 39.8M (g=2)."""
    path = tmp_path / "config.json"
    _llama2_7b().to_json_file(path)
    assert main(["params", "--config", str(path), "--rank", "16", "--experts", "16"]) == 0
    rows = _rows(capsys.readouterr().out)
    assert rows["HydraLoRA on W_q + W_v (component)"] == "75.5M"
    assert rows["mtLoRA block FFN, g=1"] == "37.7M"
    assert rows["mtLoRA block FFN, g=2"] == "39.8M"
    assert rows["mtLoRA block FFN + attention, g=2"] == "79.7M"


def test_fields_alone_and_a_config_directory_agree(tmp_path, capsys):
    _llama2_7b().save_pretrained(tmp_path)  # writes tmp_path/config.json
    main(["params", "--config", str(tmp_path)])
    from_dir = _rows(capsys.readouterr().out)
    main(["params", "--hidden-size", "4096", "--layers", "32", "--rank", "16", "--experts", "16"])
    assert _rows(capsys.readouterr().out) == from_dir


def test_fields_override_the_config(tmp_path, capsys):
    path = tmp_path / "config.json"
    _llama2_7b().to_json_file(path)
    main(["params", "--config", str(path), "--layers", "16"])
    rows = _rows(capsys.readouterr().out)
    assert rows["mtLoRA block FFN, g=1"] == f"{37_748_736 / 2 / 1e6:.1f}M"


@pytest.mark.parametrize("r,N,g", [(16, 16, 2), (1, 1, 1), (8, 10, 4096), (4, 3, 8)])
def test_modules_on_meta_match_the_closed_forms(r, N, g):
    """GQA (8 KV heads: W_v is 4096 -> 1024), rank 1, N = 1 (no router) and g = d."""
    dims = model_dims(_llama2_7b(num_key_value_heads=8).to_dict())
    assert dims == {"hidden_size": 4096, "layers": 32, "q_out": 4096, "v_out": 1024}
    d, L = 4096, 32
    rows = {name: (counted, formula) for name, counted, formula in count_params(dims, r, N, g)}
    for counted, formula in rows.values():
        assert counted == formula
    hydra = L * sum(r * d + N * d_out * r + N * d for d_out in (4096, 1024))
    assert rows["HydraLoRA on W_q + W_v (component)"][0] == hydra
    router = d * N * g if N > 1 else 0
    assert rows[f"mtLoRA block FFN, g={g}"][0] == L * (d * r + N * r * d + router)


def test_a_count_that_disagrees_with_its_closed_form_exits_1(monkeypatch, capsys):
    """The table is printed only where the modules' count and the closed form agree."""
    from mtlora_kernels import cli

    monkeypatch.setattr(cli, "count_params", lambda dims, rank, experts, groups: [
        ("mtLoRA block FFN, g=1", 4096, 4097)])
    assert main(["params", "--hidden-size", "64", "--layers", "2"]) == 1
    captured = capsys.readouterr()
    assert "mtLoRA block FFN, g=1: the modules hold 4,096 parameters but the formula gives " \
           "4,097" in captured.err and "4,096" not in captured.out


def test_counts_do_not_allocate_weights():
    """A 70B-sized model with r = N = 64: ~60 GB of fp32 adapters over the five placements,
    more than this 24 GB machine holds; on the meta device they take no memory."""
    dims = {"hidden_size": 8192, "layers": 80, "q_out": 8192, "v_out": 1024}
    rows = count_params(dims, 64, 64, 8)
    assert all(counted == formula for _, counted, formula in rows)
    assert sum(counted for _, counted, _ in rows) * 4 > 50 * 2**30


# A config dict's sizes take any integer type (numpy, a 0-d tensor: a config built in Python),
# never a bool (JSON true).
@pytest.mark.parametrize("value", [np.int64(2048), torch.tensor(2048)], ids=["np.int64", "tensor"])
def test_model_dims_take_any_integer_type(value):
    dims = model_dims({"hidden_size": value, "num_hidden_layers": value // 64})
    assert dims == {"hidden_size": 2048, "layers": 32, "q_out": 2048, "v_out": 2048}
    assert all(type(v) is int for v in dims.values())


@pytest.mark.parametrize("value", [True, np.True_, torch.tensor(True)],
                         ids=["bool", "np.bool", "bool-tensor"])
@pytest.mark.parametrize("key", ["hidden_size", "num_hidden_layers", "num_attention_heads",
                                 "num_key_value_heads", "head_dim"])
def test_model_dims_refuse_bools(key, value):
    with pytest.raises(TypeError, match=f"{key} must be an integer, got"):
        model_dims({key: value})


def test_bad_config_is_reported(tmp_path, capsys):
    missing = tmp_path / "nope.json"
    assert main(["params", "--config", str(missing)]) == 2
    assert "cannot read --config" in capsys.readouterr().err
    assert main(["params", "--hidden-size", "4096", "--groups", "3"]) == 2
    assert "--groups 3 must divide hidden_size 4096" in capsys.readouterr().err
    # Valid JSON that is not a model config, or sizes of the wrong type: a message, no traceback.
    for text, message in (("[1, 2]", "holds a JSON list, not a model config"),
                          ('{"hidden_size": "4096"}', "hidden_size must be an integer, "
                                                      "got str '4096'"),
                          ('{"hidden_size": true}', "hidden_size must be an integer, "
                                                    "got bool True"),
                          ('{"num_attention_heads": 0}', "num_attention_heads must be >= 1, "
                                                         "got 0")):
        bad = tmp_path / "config.json"
        bad.write_text(text)
        assert main(["params", "--config", str(bad)]) == 2
        assert message in capsys.readouterr().err


def test_multimodal_config_uses_its_text_config():
    cfg = {"model_type": "llava", "text_config": _llama2_7b(hidden_size=2048).to_dict()}
    assert model_dims(json.loads(json.dumps(cfg)))["hidden_size"] == 2048
    cfg["hidden_size"] = None  # a top-level null defers to text_config too
    assert model_dims(json.loads(json.dumps(cfg)))["hidden_size"] == 2048


def test_dual_encoder_config_uses_its_vision_config():
    """CLIP's config.json: the vision tower's sizes (768 wide, 12 layers), not the text tower's
    (512, 6), as attach adapts the vision tower of its image classifier."""
    cfg = {"model_type": "clip",
           "text_config": {"hidden_size": 512, "num_hidden_layers": 6, "num_attention_heads": 8},
           "vision_config": {"hidden_size": 768, "num_hidden_layers": 12,
                             "num_attention_heads": 12}}
    dims = model_dims(json.loads(json.dumps(cfg)))
    assert (dims["hidden_size"], dims["layers"], dims["q_out"]) == (768, 12, 768)


@pytest.mark.parametrize("config,want", [
    (transformers.GPT2Config(n_embd=768, n_layer=12, n_head=12), (768, 12, 768, 768)),
    (transformers.MptConfig(d_model=1024, n_layers=6, n_heads=8), (1024, 6, 1024, 1024)),
    (transformers.GPTNeoConfig(hidden_size=512, num_layers=4, num_heads=8,
                               attention_types=[[["global", "local"], 2]]), (512, 4, 512, 512)),
    (transformers.DistilBertConfig(dim=384, n_layers=3, n_heads=6), (384, 3, 384, 384)),
], ids=["gpt2", "mpt", "gpt_neo", "distilbert"])
def test_sizes_go_by_the_names_each_config_gives_them(config, want):
    """config.json files that name the width and the depth otherwise than LLaMA's (as
    ``to_json_file`` writes them: GPT-2's n_embd / n_layer, MPT's d_model / n_layers, ...)."""
    dims = model_dims(json.loads(config.to_json_string()))
    assert (dims["hidden_size"], dims["layers"], dims["q_out"], dims["v_out"]) == want


def test_bloom_hub_config_names_its_width_n_embed():
    """BLOOM's hub config.json files (bigscience/bloom, bloom-560m, ...) name the width
    ``n_embed``, which transformers' BloomConfig reads as hidden_size; params refused them as
    naming no width."""
    cfg = {"model_type": "bloom", "n_embed": 1024, "n_layer": 24, "num_attention_heads": 16}
    assert transformers.BloomConfig(**cfg).hidden_size == 1024
    dims = model_dims(json.loads(json.dumps(cfg)))
    assert (dims["hidden_size"], dims["layers"], dims["q_out"]) == (1024, 24, 1024)


def test_a_config_without_a_width_or_depth_is_refused(tmp_path, capsys):
    """No LLaMA-2-7B default for a model that is not LLaMA-2-7B; the flags can say instead."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "mystery", "num_attention_heads": 8}))
    assert main(["params", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "names no hidden_size (nor n_embd, n_embed, d_model, dim)" in err
    assert "no num_hidden_layers (nor n_layer, n_layers, num_layers)" in err
    assert main(["params", "--config", str(path), "--hidden-size", "512", "--layers", "2"]) == 0
    assert "d=512, 2 layers" in capsys.readouterr().out
