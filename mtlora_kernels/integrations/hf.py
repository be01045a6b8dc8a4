"""Attach mtLoRA adapters to a Hugging Face ``transformers`` model in one call, and take them off.

Block-level (``placement='ffn' | 'attn' | 'both'``, SPEC section 2): one
:class:`~mtlora_kernels.nn.MTLoRAAdapter` per transformer layer, in parallel with the whole
sub-layer::

    h1 = h + Attn(LN1(h));  z = LN2(h1);  out = h1 + FFN(z) + adapter(z)      # 'ffn'
    out = h + Attn(LN1(h)) + adapter(LN1(h))  (then the FFN as usual)         # 'attn'

The adapter is registered as a child ``mtlora_adapter`` of the sub-layer module (the FFN, ``mlp``
or Granite-MoE's ``block_sparse_moe`` or MPT's ``ffn``, or the attention module: ``self_attn``,
GPT-2's ``attn``, in a hybrid stack the token mixer each layer has, ``self_attn``, ``linear_attn``,
``mamba`` or ``conv``, Nemotron-H's ``mixer``; the official code's ``block_adapter`` sits in the
same place) and runs from ONE forward hook on that module. In most supported layers the sub-layer's
first argument (positional or by keyword) is its z, and the only other activation it gets is
BLOOM's and MPT's residual, which those modules add to their output themselves: the hook's input
*is* z. The hook passes the sub-layer's output to the fused op as its residual (no extra pass over
[T, d]). In BERT's layer (kind 4 below) the module that ends the sub-layer adds the residual
stream, which is z there, itself and normalizes the sum: the adapter sits on that module, and ONE
forward pre-hook replaces its residual argument z by ``z + adapter(z)`` (z the fused op's
residual). Pre-LN encoders built of BERT's modules (ESM's layout: esm, xlm-roberta-xl,
roberta-prelayernorm, megatron-bert) add the residual r in the same module, with no norm after,
and z is LN(r): the same pre-hook applies the sub-layer's norm module to r again and passes
``r + adapter(LN(r))``. One hook with no state kept between hooks is what makes this safe under
gradient checkpointing (the recompute re-runs the same hook) and under torch.compile (dynamo
inlines it).

The supported layers (:data:`SUPPORTED_ARCHITECTURES`, by ``config.model_type``; the table
below names every type, README lists them for users) come in four kinds:

- pre-LN, SPEC's formula above, exactly: LLaMA's layout under many names (llama, mistral, qwen2,
  qwen3, gemma, gpt2's ln_1 / attn / ln_2 / mlp, bloom, mpt, the encoder modernbert, ...), with
  an MoE block as the FFN in every layer or in some (mixtral, qwen3_moe, deepseek_v3, glm4_moe,
  llama4_text, ...: the adapter in parallel with the whole block), and
  hybrid stacks, linear attention (a Gated DeltaNet, Kimi's delta attention) in some layers and
  full attention in the others (qwen3_next, qwen3_5_text, kimi_linear, ...), or a state-space or
  convolution mixer in some layers (jamba, bamba, lfm2, recurrent_gemma, ...: Mamba, a short
  convolution, Griffin's recurrent block): either mixer is called once on ``LN1(h)`` and added to
  the residual, so 'attn' puts the adapter in parallel with the layer's mixer, whichever it is;
  or stacks whose every layer is ONE such sub-layer, ``h + Sub(LN(h))``, a token mixer or an
  FFN by its block type (nemotron_h: Mamba-2, attention, an MLP or an MoE block as ``mixer``):
  'attn' adapts the token-mixer blocks, 'ffn' the FFN blocks, 'both' every block, z = LN(h),
  and ``layers=`` counts blocks (skipping the selected ones of the other kind);
  and the same layout in vision encoders, on image patches (vit, deit, clip_vision_model,
  siglip_vision_model, ...), and in encoder-decoders of T5's kind, both stacks (t5, mt5, umt5,
  longt5, switch_transformers, pop2piano: :data:`ENCODER_DECODERS`; the decoder's
  cross-attention gets no adapter), and in encoders built of BERT's modules (esm, ...: the
  residual added in the module that ends each sub-layer, as above);
- parallel (cohere, phi, stablelm with ``use_parallel_residual``, gptj, codegen, falcon, ...):
  one norm feeds both sub-layers, ``z = LN(h)``, ``out = h + Attn(z) + FFN(z)`` plus
  ``adapter(z)`` of each placed adapter; or two norms of the same h (gpt_neox, falcon's
  new_decoder_architecture), ``out = h + Attn(LN1(h)) + FFN(LN2(h))``, each adapter on its
  sub-layer's z;
- a transform after the sub-layer (gemma2/3/4, glm4, olmo2/3, afmoe, ...: a post-norm; granite: its
  ``residual_multiplier`` m; hyperclovax: a post-norm, then m; dinov2, dinov3_vit, beit: a layer
  scale, then stochastic depth; granitemoehybrid: m again; falcon_h1's Mamba mixer: its
  ``ssm_out_multiplier``). SPEC's formula is for pre-LN layers; here the layer applies the
  transform to the sub-layer's output with the adapter's added, ``out = h1 + PostNorm(FFN(z) +
  adapter(z))`` (Granite: ``h1 + m * (FFN(z) + adapter(z))``), not ``h1 + PostNorm(FFN(z)) +
  adapter(z)``: the adapter sits inside the post-norm, where a LoRA on the FFN's own Linear layers
  (PEFT, HydraLoRA's placement) sits too. Where a layer has no norm before the sub-layer (OLMo2/3),
  z is the residual stream (``h1`` for the FFN, ``h`` for attention) itself. What a layer does
  after the FFN's residual add (Gemma 4's per-layer input and ``layer_scalar``, Gemma 3n's AltUp
  correction) takes the adapter's delta as it takes the FFN's output. The table's comments give
  each type's peculiarities (olmo_hybrid's two layer classes, Gemma 4's MoE layers, which refuse
  'ffn' and 'both');
- post-LN encoders (bert, roberta, deberta, distilbert, ...): the sub-layer reads the residual
  stream and the layer normalizes the sum, ``a = LN1(h + Attn(h))``, ``out = LN2(a + FFN(a))``;
  the adapter's output joins that sum, ``out = LN2(a + FFN(a) + adapter(a))``, z = a (the
  attention's: z = h), where a LoRA on the sub-layer's own Linear layers would put it.

Multimodal models go by their language model: where ``config.model_type`` is not in the table
and ``config.text_config.model_type`` is (gemma3, gemma4, llava, mistral3, qwen2_vl,
qwen2_5_vl, qwen3_vl, qwen3_vl_moe, qwen3_5, qwen3_5_moe, tested; nemotron_h_omni, its
language model tested on text; others built the same way, a vision tower beside
``AutoModel.from_config(text_config)``: llama4, tried once; gemma3n, whose vision tower needs
timm, not tried), that entry is used: its layer class names the language
model's layers, which the vision tower (SigLIP, CLIP, Pixtral, Qwen-VL's and Gemma 4's blocks)
does not contain, and ``text_config.hidden_size`` is the adapters' width. As a guard, layers of
the class found in more than one place (a vision tower built of them, extra prediction layers)
are refused, except an encoder-decoder's encoder and decoder stacks. A dual encoder
(:data:`DUAL_ENCODERS`: clip, siglip, ...) goes by its ``vision_config``'s entry instead: its
image classifier (``CLIPForImageClassification``) holds the vision tower alone and gets adapters
there; the dual encoder itself (``CLIPModel``), a text tower of the same layer class beside it,
is refused by that guard (attach to its ``vision_model``).

Component-level (``target_modules=['q_proj', 'v_proj']``, HydraLoRA's placement): each named
``nn.Linear`` (or transformers' ``Conv1D``, GPT-2's) is replaced by
:class:`~mtlora_kernels.nn.MTLoRALinear` wrapping it. This works on any model with such modules.

The base model is frozen, but for the modules named by ``train_modules`` (a task head), which
train in full beside the adapters. :meth:`MTLoRAHandle.disable` / :meth:`~MTLoRAHandle.enable`
switch the adapters off and on by their ``enabled`` flag, with modules and hooks left in place
(so the adapters move with the model, and torch.compile, which does not guard on hooks, sees the
switch); :meth:`MTLoRAHandle.remove` restores the original modules, hooks, ``requires_grad``
flags and train modules' values, so the model computes exactly what it did before. Nothing
here imports ``transformers``: models are recognised by ``model.config.model_type`` (or its
``text_config``'s, a dual encoder's ``vision_config``'s) and layer class names.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass, replace
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from mtlora_kernels._checks import as_int
from mtlora_kernels.losses import auxiliary_loss
from mtlora_kernels.nn import MTLoRAAdapter, MTLoRAConfig, MTLoRALinear
from mtlora_kernels.nn.adapter import linear_widths

BLOCK_PLACEMENTS = ("ffn", "attn", "both")
ADAPTER_ATTR = "mtlora_adapter"


@dataclass(frozen=True)
class _Family:
    """Where the pieces of one transformer layer live, by attribute name.

    ``attn``: the token mixer; a tuple names alternatives, the first the layer has (a hybrid
    stack's ``self_attn`` in its full-attention layers, ``linear_attn`` in its linear-attention
    ones: the adapter goes on the one each layer has, and is named after it). ``ffn``: the FFN,
    a tuple likewise (T5's ``layer.2.DenseReluDense`` in a decoder block, ``layer.1.…`` in an
    encoder block). Either may be a dotted path to a module inside the layer (BERT's
    ``attention.output``).
    ``attn_norm`` / ``ffn_norm``: the norm whose output the sub-layer is called on (a dotted path
    too: BERT's FFN reads ``attention.output.LayerNorm``'s output); a tuple names alternatives,
    the first the layer has (StableLM); None where the layer has no norm there and the sub-layer
    reads the residual stream itself (OLMo2, BERT's attention). ``attn_residual`` /
    ``ffn_residual``: where the module ``attn`` / ``ffn`` names is not the sub-layer but the
    module that ends it, projecting the sub-layer's hidden output, adding the residual stream it
    gets as an argument and applying the post-LN (BERT's ``BertSelfOutput`` and ``BertOutput``),
    that argument's name (``input_tensor``): the residual stream is z there, and the adapter's
    output is added to it before the post-LN. ``residual_normed``: such a module ends a pre-LN
    sub-layer instead (ESM's layout: it projects and adds the residual, no norm after), the
    residual it gets is the stream the sub-layer's norm (``attn_norm`` / ``ffn_norm``) reads, and
    z is that norm's output: the hook applies the norm to the residual argument again.
    ``attn_after`` / ``ffn_after``: what the layer applies to the sub-layer's output before
    adding it to the residual (a post-norm, a dropout, Granite's ``residual_multiplier``, a layer
    scale), so to the sub-layer's output plus the adapter's; a tuple names several, applied in
    that order, all of them there (HyperCLOVA X: a post-norm, then the multiplier).
    ``ffn_refused_if``: (attribute, why): a layer that has the attribute has no one module for
    its FFN, and 'ffn' / 'both' are refused there (Gemma 4's MoE layers). ``sub_layer_by``:
    (attribute, token-mixer values, FFN values): each layer is ONE pre-LN sub-layer, a token
    mixer or an FFN by the value of its attribute (Nemotron-H's ``block_type``), ``attn`` and
    ``ffn`` the same module: 'attn' adapts the token-mixer layers, 'ffn' the FFN layers, 'both'
    every layer; a value of neither kind is refused.
    """

    layer_class: str
    attn: str | tuple[str, ...]
    attn_norm: str | tuple[str, ...] | None
    ffn: str | tuple[str, ...]
    ffn_norm: str | tuple[str, ...] | None
    attn_after: str | tuple[str, ...] | None = None
    ffn_after: str | tuple[str, ...] | None = None
    ffn_refused_if: tuple[str, str] | None = None
    attn_residual: str | None = None
    ffn_residual: str | None = None
    residual_normed: bool = False
    sub_layer_by: tuple[str, tuple[str, ...], tuple[str, ...]] | None = None


def _names(names: str | tuple[str, ...] | None) -> tuple[str, ...]:
    """A table field as a tuple of attribute names (none for None)."""
    return () if names is None else (names,) if isinstance(names, str) else tuple(names)


def _attribute(layer: nn.Module, path: str):
    """``layer``'s attribute at the dotted ``path`` (None: there is none)."""
    for name in path.split("."):
        layer = getattr(layer, name, None)
    return layer


def _holds(layer: nn.Module, family: _Family, kind: str) -> bool:
    """Whether ``layer`` holds the sub-layer ``kind`` ('attn' or 'ffn'): every layer does but
    one of a family with ``sub_layer_by``, which holds the kind its attribute's value names."""
    if family.sub_layer_by is None:
        return True
    attr, mixers, ffns = family.sub_layer_by
    return getattr(layer, attr, None) in (mixers if kind == "attn" else ffns)


def _module_named(layer: nn.Module, names: str | tuple[str, ...]) -> str | None:
    """Of alternative names (dotted paths), the first that is a module of ``layer`` (None: none
    is)."""
    return next((n for n in _names(names) if isinstance(_attribute(layer, n), nn.Module)), None)


def _pre_ln(layer_class: str, attn_after: str | tuple[str, ...] | None = None,
            ffn_after: str | tuple[str, ...] | None = None, ffn: str = "mlp",
            attn: str | tuple[str, ...] = "self_attn") -> _Family:
    """LLaMA's layout: ``h1 = h + Attn(input_layernorm(h))``,
    ``out = h1 + FFN(post_attention_layernorm(h1))``, the FFN module named ``ffn``."""
    return _Family(layer_class, attn, "input_layernorm", ffn, "post_attention_layernorm",
                   attn_after, ffn_after)


def _parallel(layer_class: str, after: str | None = None) -> _Family:
    """One norm feeds both: ``h + Attn(z) + FFN(z)`` with ``z = input_layernorm(h)``."""
    return _Family(layer_class, "self_attn", "input_layernorm", "mlp", "input_layernorm",
                   after, after)


def _post_norm(layer_class: str, attn_norm: str | None, ffn_norm: str | None,
               attn_after: str, ffn_after: str) -> _Family:
    """A norm after each sub-layer: ``h1 + PostNorm(FFN(z))``."""
    return _Family(layer_class, "self_attn", attn_norm, "mlp", ffn_norm, attn_after, ffn_after)


def _post_ln(layer_class: str) -> _Family:
    """BERT's layout: ``a = LN1(h + Attn(h))``, ``out = LN2(a + FFN(a))``, each sub-layer ended
    by a module (``attention.output``, ``output``) that projects, adds the residual it gets as
    ``input_tensor`` and normalizes."""
    return _Family(layer_class, "attention.output", None, "output", "attention.output.LayerNorm",
                   attn_residual="input_tensor", ffn_residual="input_tensor")


def _pre_ln_output(layer_class: str, attn_norm: str, ffn_norm: str,
                   attn_residual: str = "input_tensor") -> _Family:
    """ESM's layout: pre-LN, ``a = h + Attn(attn_norm(h))``, ``out = a + FFN(ffn_norm(a))``, in
    BERT's modules: each sub-layer ended by a module (``attention.output``, ``output``) that
    projects and adds the residual it gets (``input_tensor``, the attention's ``attn_residual``),
    with no norm after; z is the norm applied to that residual (``residual_normed``)."""
    return _Family(layer_class, "attention.output", attn_norm, "output", ffn_norm,
                   attn_residual=attn_residual, ffn_residual="input_tensor",
                   residual_normed=True)


def _t5(layer_class: str, ffn: str = "DenseReluDense",
        attn: tuple[str, ...] = ("SelfAttention",)) -> _Family:
    """T5's block: ``layer.0`` the self-attention's wrapper, the FFN's last (``layer.2`` in a
    decoder block, after the cross-attention's; ``layer.1`` in an encoder block), each with its
    ``layer_norm`` and the sub-layer (``attn``'s alternatives, ``ffn``) called on its output."""
    return _Family(layer_class, tuple(f"layer.0.{a}" for a in attn), "layer.0.layer_norm",
                   (f"layer.2.{ffn}", f"layer.1.{ffn}"),
                   ("layer.2.layer_norm", "layer.1.layer_norm"))


#: The token mixers of a hybrid stack: full attention or a linear attention (Gated DeltaNet).
_HYBRID = ("self_attn", "linear_attn")
_GEMMA2 = ("input_layernorm", "pre_feedforward_layernorm", "post_attention_layernorm",
           "post_feedforward_layernorm")
_OLMO2 = (None, None, "post_attention_layernorm", "post_feedforward_layernorm")

#: model_type (a multimodal model's: its text_config's) -> layer layout. The hook takes the
#: adapter's input z from the sub-layer's own input and adds the adapter's output to the
#: sub-layer's output (kind 4: to the residual argument z of the module that ends the sub-layer);
#: the names here are only checked to exist (a transformers version that lays
#: a layer out differently gets an error) and tell the tests which norm's output z must be. A
#: tuple of families: a stack of layers of several classes, one family each (OLMo-Hybrid). Four
#: kinds of layer:
SUPPORTED_ARCHITECTURES: dict[str, _Family | tuple[_Family, ...]] = {
    # 1. Pre-LN, LLaMA's layout (its layer code under other names in transformers 5):
    #    out = h1 + FFN(z) + adapter(z), z = LN2(h1), as SPEC section 2 writes it.
    **{t: _pre_ln(c) for t, c in (
        ("llama", "LlamaDecoderLayer"), ("mistral", "MistralDecoderLayer"),
        # EXAONE 3/3.5 and InternLM3 checkpoints load into transformers' LLaMA model.
        ("exaone", "LlamaDecoderLayer"), ("internlm3", "LlamaDecoderLayer"),
        ("ministral", "MinistralDecoderLayer"), ("ministral3", "Ministral3DecoderLayer"),
        ("qwen2", "Qwen2DecoderLayer"), ("qwen3", "Qwen3DecoderLayer"),
        ("gemma", "GemmaDecoderLayer"), ("olmo", "OlmoDecoderLayer"),
        # StarCoder2's residual dropout is inside its sub-layer modules: it drops FFN(z), not the
        # adapter's output (Phi-3's, below, drops both).
        ("starcoder2", "Starcoder2DecoderLayer"), ("smollm3", "SmolLM3DecoderLayer"),
        ("helium", "HeliumDecoderLayer"), ("arcee", "ArceeDecoderLayer"),
        ("seed_oss", "SeedOssDecoderLayer"), ("glm", "GlmDecoderLayer"),
        ("ernie4_5", "Ernie4_5DecoderLayer"), ("hunyuan_v1_dense", "HunYuanDenseV1DecoderLayer"),
        # BitNet's extra norms (attn_sub_norm, ffn_sub_norm) are inside its sub-layer modules.
        ("bitnet", "BitNetDecoderLayer"), ("nemotron", "NemotronDecoderLayer"),
        # MoE: the adapter runs in parallel with the whole MoE block (router, experts and any
        # shared expert). gpt_oss's block returns (output, router_scores): the hook adds to
        # output. Mixtral's and MiniMax-M2's router_jitter_noise and PhiMoE's input_jitter_noise
        # (> 0, in training) scale the block's input in place, so its adapter then sees the
        # jittered z too.
        ("mixtral", "MixtralDecoderLayer"), ("qwen2_moe", "Qwen2MoeDecoderLayer"),
        ("qwen3_moe", "Qwen3MoeDecoderLayer"), ("olmoe", "OlmoeDecoderLayer"),
        ("gpt_oss", "GptOssDecoderLayer"), ("minimax_m2", "MiniMaxM2DecoderLayer"),
        ("phimoe", "PhimoeDecoderLayer"), ("solar_open", "SolarOpenDecoderLayer"),
        ("hunyuan_v1_moe", "HunYuanMoEV1DecoderLayer"),
        # A dense FFN in some layers (first_k_dense_replace, mlp_layer_types, ERNIE's
        # moe_layer_* fields) and an MoE block in the others, both as ``mlp``.
        ("deepseek_v2", "DeepseekV2DecoderLayer"), ("deepseek_v3", "DeepseekV3DecoderLayer"),
        ("glm4_moe", "Glm4MoeDecoderLayer"), ("glm4_moe_lite", "Glm4MoeLiteDecoderLayer"),
        ("dots1", "Dots1DecoderLayer"), ("exaone_moe", "ExaoneMoeDecoderLayer"),
        ("ernie4_5_moe", "Ernie4_5_MoeDecoderLayer"),
        ("mimo_v2_flash", "MiMoV2FlashDecoderLayer"),
        # More of LLaMA's layer code: DiffLlama's differential attention (two softmaxes, one V
        # split in two) is inside its self_attn, called once on input_layernorm(h); Youtu's is
        # DeepSeek's MLA; Jais2 has LayerNorms.
        ("diffllama", "DiffLlamaDecoderLayer"), ("youtu", "YoutuDecoderLayer"),
        ("cwm", "CwmDecoderLayer"), ("nanochat", "NanoChatDecoderLayer"),
        ("jais2", "Jais2DecoderLayer"),
        # EuroBERT, an encoder: LLaMA's layer (RMSNorms, RoPE), attending both ways.
        ("eurobert", "EuroBertDecoderLayer"),
        # ... with an MoE block in some layers (mlp_layer_types, first_k_dense_replace) or all
        # (Mellum's default), as ``mlp``. DeepSeek-V3.2's sparse-attention indexer is inside
        # its self_attn.
        ("mellum", "MellumDecoderLayer"), ("laguna", "LagunaDecoderLayer"),
        ("minicpm5_moe", "MiniCPM5MoeDecoderLayer"), ("deepseek_v32", "DeepseekV32DecoderLayer"),
        ("mistral4", "Mistral4DecoderLayer"),
        # The language models of Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Qwen3-VL-MoE (their own
        # model_types, the text_config's of the multimodal models; below the table): LLaMA's
        # layer. M-RoPE changes only the position embeddings the attention gets, and Qwen3-VL's
        # deepstack adds visual features to the residual stream between layers, not inside one.
        ("qwen2_vl_text", "Qwen2VLDecoderLayer"), ("qwen2_5_vl_text", "Qwen2_5_VLDecoderLayer"),
        ("qwen3_vl_text", "Qwen3VLTextDecoderLayer"),
        ("qwen3_vl_moe_text", "Qwen3VLMoeTextDecoderLayer"))},
    # GPT-NeoX-Japanese: LLaMA's layout, the attention ``attention``, returning (output, weights,
    # bias): the hook adds to the output, the layer adds the bias (last layer only) after.
    "gpt_neox_japanese": _Family("GPTNeoXJapaneseLayer", "attention", "input_layernorm", "mlp",
                                 "post_attention_layernorm"),
    # Hybrid token mixers: linear attention (a Gated DeltaNet, ``linear_attn``) in some layers
    # (config.layer_types), full attention (``self_attn``) in the others, either called once on
    # input_layernorm(h) and added to the residual: 'attn' puts the adapter in parallel with the
    # layer's mixer, whichever it is (its name in the adapter's). Qwen3-Next: an MoE block as
    # ``mlp`` but in mlp_only_layers; Qwen3.5-MoE, LARA-mini: in every layer. Qwen3.5 and
    # Qwen3.5-MoE: their language models' types.
    **{t: _pre_ln(c, attn=_HYBRID) for t, c in (
        ("qwen3_next", "Qwen3NextDecoderLayer"), ("qwen3_5_text", "Qwen3_5DecoderLayer"),
        ("qwen3_5_moe_text", "Qwen3_5MoeDecoderLayer"), ("lara_mini", "LaraMiniDecoderLayer"))},
    # Kimi Linear and Ling's hybrid (bailing_hybrid): ``self_attn`` is the one or the other, by
    # layer_types: Kimi Delta Attention or MLA; a dense FFN or an MoE block by mlp_layer_types.
    "kimi_linear": _pre_ln("KimiLinearDecoderLayer"),
    "bailing_hybrid": _pre_ln("BailingHybridDecoderLayer"),
    # Hybrid stacks with a state-space or convolution mixer in some layers (config.layer_types)
    # and attention in the others, either called once on the first norm's output and added to
    # the residual: 'attn' puts the adapter beside the mixer the layer has, named after it, as
    # in the linear-attention hybrids above. Jamba: two layer classes, a Mamba mixer (``mamba``)
    # or ``self_attn``; the FFN ``feed_forward``, an MoE block in some layers
    # (expert_layer_period / _offset). Bamba: one class holding ``mamba`` or ``self_attn``.
    "jamba": (_Family("JambaMambaDecoderLayer", "mamba", "input_layernorm", "feed_forward",
                      "pre_ff_layernorm"),
              _Family("JambaAttentionDecoderLayer", "self_attn", "input_layernorm",
                      "feed_forward", "pre_ff_layernorm")),
    "bamba": _Family("BambaDecoderLayer", ("self_attn", "mamba"), "input_layernorm",
                     "feed_forward", "pre_ff_layernorm"),
    # LFM2: a short gated convolution (``conv``) or ``self_attn`` on operator_norm(h), the FFN
    # ``feed_forward`` on ffn_norm(h1); LFM2-MoE's an MoE block from layer num_dense_layers on.
    **{t: _Family(c, ("self_attn", "conv"), "operator_norm", "feed_forward", "ffn_norm")
       for t, c in (("lfm2", "Lfm2DecoderLayer"), ("lfm2_moe", "Lfm2MoeDecoderLayer"))},
    # RecurrentGemma (Griffin): the mixer is ``temporal_block`` in every layer, an RG-LRU
    # recurrent block or local attention by layers_block_type, returning (output, cache).
    "recurrent_gemma": _Family("RecurrentGemmaDecoderLayer", "temporal_block",
                               "temporal_pre_norm", "mlp_block", "channel_pre_norm"),
    # Falcon-H1: ``mamba`` and ``self_attn`` side by side in every layer, on z = LN1(h), h1 = h +
    # ssm_out_multiplier * Mamba(z) + attention_out_multiplier * Attn(attention_in_multiplier *
    # z). 'attn' puts the adapter beside the Mamba mixer, the one called on z itself; the layer
    # scales its output plus the adapter's by ssm_out_multiplier (a transform, as Granite's).
    "falcon_h1": _Family("FalconH1DecoderLayer", "mamba", "input_layernorm", "feed_forward",
                         "pre_ff_layernorm", attn_after="ssm_out_multiplier"),
    # Nemotron-H: each block is ONE pre-LN sub-layer, h + mixer(norm(h)), its ``mixer`` by its
    # block_type (config.layers_block_type; hybrid_override_pattern's M, *, -, E): Mamba-2
    # ('linear_attention') or attention ('full_attention'), the token mixers, which 'attn'
    # adapts, or an MLP ('mlp') or MoE block ('moe', its shared expert inside), the FFNs, which
    # 'ffn' adapts; 'both' adapts every block. layers=... counts blocks (num_hidden_layers), and
    # skips the selected blocks of the other kind (attach refuses a selection with none of it).
    "nemotron_h": _Family("NemotronHBlock", "mixer", "norm", "mixer", "norm", sub_layer_by=(
        "block_type", ("linear_attention", "full_attention"), ("mlp", "moe"))),
    # Llama 4's language model: the FFN is ``feed_forward``, an MoE block in moe_layers. The block
    # returns (output flattened to [B*S, d], router_logits) and the layer views the output back:
    # the hook adds the adapter's output in the block's shape.
    "llama4_text": _pre_ln("Llama4TextDecoderLayer", ffn="feed_forward"),
    # GPT-2's layer and its kin: LLaMA's layout under the names ln_1, attn, ln_2, mlp (GPT-2's
    # Linear layers are transformers' Conv1D; the residual dropouts are inside attn and mlp, as
    # StarCoder2's: they drop Attn(z) and FFN(z), not the adapter's output). GPTBigCode's
    # multi-query attention and GPT-Neo's local attention (every other layer) are inside attn.
    # With add_cross_attention (GPT-2, GPTBigCode) the layer has a ``crossattention`` on its own
    # norm between the two: 'attn' adapts the self-attention (attn) only, 'ffn' reads ln_2 after
    # the cross-attention's residual add, as the mlp does.
    **{t: _Family(c, "attn", "ln_1", "mlp", "ln_2") for t, c in (
        ("gpt2", "GPT2Block"), ("gpt_bigcode", "GPTBigCodeBlock"), ("gpt_neo", "GPTNeoBlock"))},
    # BLOOM and MPT: the sub-layer module is called on (z, residual) and adds the residual itself,
    # residual + dropout(Sub(z)), so the hook's adapter(z) joins that sum: residual + Sub(z) +
    # adapter(z). BLOOM with apply_residual_connection_post_layernorm takes z as the residual
    # (z + Sub(z) + adapter(z): the adapter still beside the sub-layer). MPT's attention dropout
    # is in the layer (resid_attn_dropout, on Attn(z) + adapter(z), as Phi-3's); its FFN is
    # ``ffn``.
    "bloom": _Family("BloomBlock", "self_attention", "input_layernorm", "mlp",
                     "post_attention_layernorm"),
    "mpt": _Family("MptBlock", "attn", "norm_1", "ffn", "norm_2", "resid_attn_dropout"),
    # ModernBERT, an encoder: layer 0's attn_norm is nn.Identity (the embeddings end in a norm),
    # so its z is the layer's input; sliding-window and global attention are both ``attn``.
    "modernbert": _Family("ModernBertEncoderLayer", "attn", "attn_norm", "mlp", "mlp_norm"),
    # Apertus: LLaMA's layout with the norms named for their sub-layers.
    "apertus": _Family("ApertusDecoderLayer", "self_attn", "attention_layernorm", "mlp",
                       "feedforward_layernorm"),
    # VaultGemma: LLaMA's layout, its FFN's norm named pre_feedforward_layernorm (Gemma 2's
    # name, without Gemma 2's post-norms).
    "vaultgemma": _Family("VaultGemmaDecoderLayer", "self_attn", "input_layernorm", "mlp",
                          "pre_feedforward_layernorm"),
    # JetMoE: the attention (a mixture of attention heads) is ``self_attention`` and returns
    # (output, weights, router_logits): the hook adds to the output; the FFN is an MoE block.
    "jetmoe": _Family("JetMoeDecoderLayer", "self_attention", "input_layernorm", "mlp",
                      "post_attention_layernorm"),
    # Phi-3's residual dropouts apply to FFN(z) + adapter(z) together (ViT's too, below).
    "phi3": _pre_ln("Phi3DecoderLayer", "resid_attn_dropout", "resid_mlp_dropout"),
    # Persimmon: a dropout after the FFN only (none after the attention).
    "persimmon": _pre_ln("PersimmonDecoderLayer", ffn_after="dropout"),
    # Vision encoders, on image patches. Their attention returns (output, weights): the hook
    # adds to the output. ViT's layer and its copies (DeiT, ViT-MSN, ViT-MAE, I-JEPA): the
    # attention is ``attention``, a residual dropout after each sub-layer (on Attn(z) +
    # adapter(z), as Phi-3's). ViT-MAE's pre-training model has a decoder of the same layer
    # class, which _find_layers refuses (ViTMAEModel is fine).
    **{t: _Family(c, "attention", "layernorm_before", "mlp", "layernorm_after", "dropout",
                  "dropout") for t, c in (
        ("vit", "ViTLayer"), ("deit", "DeiTLayer"), ("vit_msn", "ViTMSNLayer"),
        ("vit_mae", "ViTMAELayer"), ("ijepa", "IJepaLayer"))},
    # CLIP's layer: the vision towers of CLIP, MetaCLIP 2, SigLIP, SigLIP 2 and MLCD (MLCD's
    # attention gets rotary position embeddings as another keyword). Their text towers are built
    # of the same class: a dual encoder (CLIPModel) holds two stacks and is refused; its image
    # classifier holds the vision tower alone (DUAL_ENCODERS, below the table).
    **{t: _Family(c, "self_attn", "layer_norm1", "mlp", "layer_norm2") for t, c in (
        ("clip_vision_model", "CLIPEncoderLayer"),
        ("metaclip_2_vision_model", "MetaClip2EncoderLayer"),
        ("siglip_vision_model", "SiglipEncoderLayer"),
        ("siglip2_vision_model", "Siglip2EncoderLayer"),
        ("mlcd_vision_model", "MLCDEncoderLayer"))},
    # AIMv2's vision encoder: RMSNorms, the FFN named ``ffn``.
    "aimv2_vision_model": _Family("Aimv2EncoderLayer", "attention", "rms_norm1", "ffn",
                                  "rms_norm2"),
    # Encoder-decoders of T5's kind (ENCODER_DECODERS, below the table: an encoder's and a
    # decoder's stack of the one block class). The block's ``layer`` is a ModuleList of sub-layer
    # wrappers, each h + dropout(Sub(layer_norm(h))): ``layer.0`` the self-attention
    # (``SelfAttention``), in a decoder block ``layer.1`` the cross-attention, then the FFN's
    # (``DenseReluDense``: ``layer.1`` in an encoder block, ``layer.2`` in a decoder's; of the
    # alternatives, the first the block has: a decoder's ``layer.1`` is the cross-attention's,
    # whose ``layer_norm`` is not the FFN's). The cross-attention gets no adapter. The wrappers'
    # dropouts act on Sub(z) + adapter(z) together (identity in eval). Flan-T5's gated FFN is
    # ``DenseReluDense`` too; UMT5 has a relative bias in every layer; LongT5's encoder attention
    # is local or transient-global (``LocalSelfAttention``, ``TransientGlobalSelfAttention``);
    # Switch Transformers' FFN is ``mlp``, an MoE block in every other layer.
    **{t: _t5(c) for t, c in (
        ("t5", "T5Block"), ("mt5", "MT5Block"), ("umt5", "UMT5Block"),
        ("pop2piano", "Pop2PianoBlock"))},
    "longt5": _t5("LongT5Block", attn=("SelfAttention", "LocalSelfAttention",
                                       "TransientGlobalSelfAttention")),
    "switch_transformers": _t5("SwitchTransformersBlock", ffn="mlp"),
    # 2. Parallel attention and FFN on one norm: out = h + Attn(z) + FFN(z) [+ adapters(z)],
    #    z = LN(h), the same z for both adapters. StableLM is parallel with use_parallel_residual
    #    (its post_attention_layernorm is then None) and LLaMA-like otherwise.
    "cohere": _parallel("CohereDecoderLayer"),
    "cohere2": _parallel("Cohere2DecoderLayer"),
    # Cohere2-MoE: dense FFN or MoE block by mlp_layer_types, both as ``mlp``.
    "cohere2_moe": _parallel("Cohere2MoeDecoderLayer"),
    "phi": _parallel("PhiDecoderLayer", "resid_dropout"),
    "stablelm": _Family("StableLmDecoderLayer", "self_attn", "input_layernorm", "mlp",
                        ("post_attention_layernorm", "input_layernorm"), None, "dropout"),
    # GPT-J and CodeGen: attn and mlp both on ln_1's output (attn by keyword, hidden_states=).
    **{t: _Family(c, "attn", "ln_1", "mlp", "ln_1") for t, c in (
        ("gptj", "GPTJBlock"), ("codegen", "CodeGenBlock"))},
    # Parallel on two norms: out = h + Attn(LN1(h)) + FFN(LN2(h)), z = LN1(h) for the attention,
    # LN2(h) for the FFN. GPT-NeoX with use_parallel_residual (its default; without it, LLaMA's
    # layout on the same two norms); its attention is ``attention``, returning (output,
    # weights), and a residual dropout after each sub-layer acts on its output plus the adapter's.
    "gpt_neox": _Family("GPTNeoXLayer", "attention", "input_layernorm", "mlp",
                        "post_attention_layernorm", "post_attention_dropout", "post_mlp_dropout"),
    # Falcon, by its config: parallel_attn (the default) on one norm (input_layernorm), with
    # new_decoder_architecture on two (ln_attn, ln_mlp; num_ln_in_parallel_attn=1: one again),
    # without parallel_attn LLaMA's layout. The layer builds only the norms its variant uses:
    # of the alternatives, the first it has is the one its sub-layer reads. Its dropouts are
    # functional, on the sub-layers' summed outputs, adapters' included.
    "falcon": _Family("FalconDecoderLayer", "self_attention", ("ln_attn", "input_layernorm"),
                      "mlp", ("ln_mlp", "post_attention_layernorm", "input_layernorm")),
    # 3. A transform after the sub-layer, which the layer applies to FFN(z) + adapter(z)
    #    together: out = h1 + PostNorm(FFN(z) + adapter(z)) (Granite: h1 + m * (FFN(z) +
    #    adapter(z)), m its residual_multiplier). The adapter sits inside the post-norm, where a
    #    LoRA on the FFN's own Linear layers (PEFT, HydraLoRA's placement) sits too. OLMo2/3,
    #    FlexOlmo and Exaone4 have no norm before the sub-layer: z is the residual stream h1
    #    itself.
    "gemma2": _post_norm("Gemma2DecoderLayer", *_GEMMA2),
    "gemma3_text": _post_norm("Gemma3DecoderLayer", *_GEMMA2),
    "glm4": _post_norm("Glm4DecoderLayer", "input_layernorm", "post_attention_layernorm",
                       "post_self_attn_layernorm", "post_mlp_layernorm"),
    # AFMoE: Gemma 2's four norms under other names; a dense FFN in the first num_dense_layers
    # layers, an MoE block (shared and routed experts) in the others, both as ``mlp``.
    "afmoe": _post_norm("AfmoeDecoderLayer", "input_layernorm", "pre_mlp_layernorm",
                        "post_attention_layernorm", "post_mlp_layernorm"),
    "olmo2": _post_norm("Olmo2DecoderLayer", *_OLMO2),
    "olmo3": _post_norm("Olmo3DecoderLayer", *_OLMO2),
    "flex_olmo": _post_norm("FlexOlmoDecoderLayer", *_OLMO2),  # OLMo2's layer, an MoE block
    "exaone4": _post_norm("Exaone4DecoderLayer", *_OLMO2),
    "granite": _pre_ln("GraniteDecoderLayer", "residual_multiplier", "residual_multiplier"),
    # Granite's MoE layers: the FFN is block_sparse_moe. GraniteMoeShared adds its shared_mlp(z)
    # beside the block, then scales the sum: h1 + m * (MoE(z) + adapter(z) + shared_mlp(z)).
    "granitemoe": _pre_ln("GraniteMoeDecoderLayer", "residual_multiplier",
                          "residual_multiplier", ffn="block_sparse_moe"),
    "granitemoeshared": _pre_ln("GraniteMoeSharedDecoderLayer", "residual_multiplier",
                                "residual_multiplier", ffn="block_sparse_moe"),
    # Granite 4's hybrid: Granite-MoE-Shared's layer, the mixer ``mamba`` or ``self_attn``. Its
    # dense variant (num_local_experts=0) has no block_sparse_moe, shared_mlp alone: the adapter
    # goes beside shared_mlp in both, h1 + m * (MoE(z) + shared_mlp(z) + adapter(z)), the same
    # sum as beside the MoE block.
    "granitemoehybrid": _Family("GraniteMoeHybridDecoderLayer", ("self_attn", "mamba"),
                                "input_layernorm", "shared_mlp", "post_attention_layernorm",
                                "residual_multiplier", "residual_multiplier"),
    # MiniCPM3 scales each sub-layer's output by residual_scale = scale_depth / sqrt(layers).
    "minicpm3": _pre_ln("MiniCPM3DecoderLayer", "residual_scale", "residual_scale"),
    # HyperCLOVA X: two transforms after each sub-layer, in this order: a post-norm (nn.Identity
    # without use_post_norm), then residual_multiplier: h1 + m * PostNorm(FFN(z) + adapter(z)).
    "hyperclovax": _pre_ln("HyperCLOVAXDecoderLayer", ("post_norm1", "residual_multiplier"),
                           ("post_norm2", "residual_multiplier")),
    # Gemma 4's language model: Gemma 2's layer. After the FFN's residual add it goes on: the
    # per-layer-input block adds a function of that sum h2 = h1 + PostNorm(FFN(z) + adapter(z))
    # (hidden_size_per_layer_input) and layer_scalar scales the layer's output, so the adapter's
    # delta flows through them as the FFN's own output does. KV sharing is inside self_attn.
    # MoE layers (enable_moe_block) are refused for 'ffn' / 'both' ('attn' as in the dense ones).
    "gemma4_text": replace(_post_norm("Gemma4TextDecoderLayer", *_GEMMA2), ffn_refused_if=(
        "experts", "Gemma 4's MoE layers run their experts beside the mlp on another norm of the "
                   "residual and add them between the mlp's two post-norms, so no one module is "
                   "the FFN")),
    # Gemma 3n's language model: Gemma 2's layer on AltUp's active stream p (the layer's input
    # is a stack of streams): z = input_layernorm(p), a = p + PostNorm(Attn(z)), LAuReL's branch
    # added and the sum scaled, h1 = (a + laurel(z)) / sqrt(2), then h1 + PostNorm(FFN(z2) +
    # adapter(z2)), z2 = pre_feedforward_layernorm(h1). AltUp's correction of the streams and
    # the per-layer input act on that sum afterwards, on the adapter's delta as on the FFN's
    # output (as Gemma 4's per-layer input does).
    "gemma3n_text": _post_norm("Gemma3nTextDecoderLayer", *_GEMMA2),
    # DINOv2 (also with registers) and DINOv3: a layer scale (a learned per-channel factor,
    # layerscale_value at init), then stochastic depth (drop_path: nn.Identity at
    # drop_path_rate 0, identity in eval) after each sub-layer: h1 + drop_path(layer_scale2(
    # FFN(z) + adapter(z))). DINOv3's attention gets RoPE's position embeddings as a keyword.
    **{t: _Family(c, "attention", "norm1", "mlp", "norm2", ("layer_scale1", "drop_path"),
                  ("layer_scale2", "drop_path")) for t, c in (
        ("dinov2", "Dinov2Layer"), ("dinov2_with_registers", "Dinov2WithRegistersLayer"),
        ("dinov3_vit", "DINOv3ViTLayer"))},
    # BEiT: a residual dropout, the layer scale (lambda_1 / lambda_2, parameters; the number 1.0
    # without layer_scale_init_value), then drop_path. Data2Vec-Vision's layer, BEiT's otherwise,
    # splits its FFN in two modules (intermediate, output) and is not supported.
    "beit": _Family("BeitLayer", "attention", "layernorm_before", "mlp", "layernorm_after",
                    ("dropout", "lambda_1", "drop_path"), ("dropout", "lambda_2", "drop_path")),
    # OLMo-Hybrid: one stack of two layer classes (by layer_types): the attention layers are
    # OLMo2's (no norm before a sub-layer, post-norms after), the linear-attention layers
    # LLaMA's (their post_attention_layernorm is the FFN's norm).
    "olmo_hybrid": (_post_norm("OlmoHybridAttentionDecoderLayer", *_OLMO2),
                    _Family("OlmoHybridLinearAttentionDecoderLayer", "linear_attn",
                            "input_layernorm", "mlp", "post_attention_layernorm")),
    # 4. Post-LN encoders, BERT's layout: out = LN2(a + FFN(a) + adapter(a)), a = LN1(h +
    #    Attn(h) + adapter(h)): z is the residual stream (h, a), the adapter's output joins the
    #    sub-layer's before the post-LN, where a LoRA on the sub-layer's own Linear layers sits.
    #    BERT's layer ends each sub-layer with a module (attention.output, output) that projects
    #    the sub-layer's hidden output, adds the residual stream it gets as input_tensor and
    #    applies the post-LN: a pre-hook there adds adapter(z) to input_tensor (z). A BERT decoder's
    #    cross-attention (add_cross_attention) gets no adapter; the FFN's z is then its output.
    #    DeBERTa's disentangled attention is inside attention.self; its query_states (z_steps > 1,
    #    the last layer run again on them) are the residual and so that run's z. More of BERT's
    #    layer code: ConvBERT's span-based convolution heads are inside attention.self; RemBERT
    #    projects its narrower embeddings to hidden_size before the layers; LayoutLM's boxes,
    #    MarkupLM's XPaths and RoCBERT's pronunciation and shape ids enter in the embeddings;
    #    LUKE's entity tokens (entity_ids, where given) join the word tokens in one stream through
    #    each sub-layer, so they get the adapters too.
    **{t: _post_ln(c) for t, c in (
        ("bert", "BertLayer"), ("roberta", "RobertaLayer"), ("xlm-roberta", "XLMRobertaLayer"),
        ("camembert", "CamembertLayer"), ("electra", "ElectraLayer"), ("ernie", "ErnieLayer"),
        ("data2vec-text", "Data2VecTextLayer"), ("deberta", "DebertaLayer"),
        ("deberta-v2", "DebertaV2Layer"), ("rembert", "RemBertLayer"),
        ("splinter", "SplinterLayer"), ("layoutlm", "LayoutLMLayer"),
        ("markuplm", "MarkupLMLayer"), ("roc_bert", "RoCBertLayer"), ("luke", "LukeLayer"),
        ("convbert", "ConvBertLayer"), ("bert-generation", "BertGenerationLayer"))},
    # MPNet: the attention module adds the residual and normalizes around ``attention.attn`` (q,
    # k, v and o), hooked as LLaMA's attention (the module's dropout acts on Attn(h) + adapter(h)
    # together); its FFN is BERT's.
    "mpnet": _Family("MPNetLayer", "attention.attn", None, "output", "attention.LayerNorm",
                     ffn_residual="input_tensor"),
    # DistilBERT: each sub-layer one module, its residual add and post-LN in the layer: hooked as
    # LLaMA's (the FFN's own dropout acts on FFN(a) alone, before the hook adds adapter(a)).
    "distilbert": _Family("TransformerBlock", "attention", None, "ffn", "sa_layer_norm"),
    # NomicBERT and Jina Embeddings v3: DistilBERT's shape (self_attn and mlp, the residual adds
    # and post-LNs in the layer) with a residual dropout after each sub-layer, which acts on
    # Attn(h) + adapter(h) together (identity in eval), as ViT's.
    **{t: _Family(c, "self_attn", None, "mlp", "post_attention_layernorm",
                  "post_attention_dropout", "post_mlp_dropout") for t, c in (
        ("nomic_bert", "NomicBertLayer"), ("jina_embeddings_v3", "JinaEmbeddingsV3Layer"))},
    # Pre-LN encoders in BERT's modules (ESM's layout): a = h + Attn(LN1(h)), out = a + FFN(LN2(a))
    # (kind 1's formula), but the residual add is inside the module that ends each sub-layer
    # (attention.output, output: dense, dropout, + the residual argument; no norm after), and
    # the norms are elsewhere (inside ``attention``, in the layer, RoBERTa-PreLayerNorm's FFN norm
    # inside ``intermediate``): no one module gets z and adds to the residual. The pre-hook on the
    # output module takes its residual argument r (the stream the norm reads) and passes r +
    # adapter(norm(r)), the norm applied again, z = LN(r) (residual_normed): out = a + FFN(z) +
    # adapter(z). The adapter's output skips the module's dropout, as in BERT's layout. A
    # decoder's cross-attention (add_cross_attention) gets no adapter; the FFN's norm then reads
    # its output, and so does the hook. Megatron-BERT's attention output names its residual
    # argument ``residual``.
    **{t: _pre_ln_output(*f) for t, f in (
        ("esm", ("EsmLayer", "attention.LayerNorm", "LayerNorm")),
        ("xlm-roberta-xl", ("XLMRobertaXLLayer", "attention.self_attn_layer_norm", "LayerNorm")),
        ("roberta-prelayernorm", ("RobertaPreLayerNormLayer", "attention.LayerNorm",
                                  "intermediate.LayerNorm")),
        ("megatron-bert", ("MegatronBertLayer", "attention.ln", "ln", "residual")))},
}

#: Dual encoders (CLIP's and SigLIP's kind), whose model_type is not in the table: block-level
#: placement goes by their ``vision_config``'s entry. Their image classifiers
#: (``CLIPForImageClassification``, what ``AutoModelForImageClassification`` builds) hold the
#: vision tower alone and get adapters there, as wide as the vision tower; the dual encoders
#: themselves (``CLIPModel``) hold a text tower of the same layer class too, and
#: :func:`_find_layers` refuses them (attach to their ``vision_model`` instead).
DUAL_ENCODERS = ("clip", "metaclip_2", "siglip", "siglip2")

#: Encoder-decoders (T5's kind), whose layers sit in two stacks: an encoder's and a decoder's (of
#: one layer class, or of one family each). :func:`_find_layers` accepts those two, and only
#: those: paths equal up to a part ``encoder`` in the first (in module order) and ``decoder`` in
#: the second (``encoder.block`` / ``decoder.block``; ``transformer.encoder.block`` / ...), and
#: ``layers=`` counts the encoder's layers, then the decoder's. An encoder alone
#: (``T5EncoderModel``, or ``model.encoder`` attached by itself) is one stack, as any other
#: model's.
ENCODER_DECODERS = ("t5", "mt5", "umt5", "longt5", "switch_transformers", "pop2piano")


def _model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def sub_config_name(model_type: str | None) -> str:
    """Which sub-config of a config whose own type is not in the table names the layers
    block-level placement adapts: a dual encoder's ``vision_config``, else ``text_config``."""
    return "vision_config" if model_type in DUAL_ENCODERS else "text_config"


def _layers_config(config):
    """The config of the layers block-level placement adapts: ``config`` where its model_type
    is in the table; for a dual encoder (:data:`DUAL_ENCODERS`) whose ``vision_config``'s is, that
    vision_config; for a multimodal model whose own type is not in the table, and whose
    ``text_config``'s is (LLaVA, Mistral 3, Gemma 3, Qwen-VL: a vision tower beside a language
    model built from text_config), that text_config; else None."""
    mtype = getattr(config, "model_type", None)
    if mtype in SUPPORTED_ARCHITECTURES:
        return config
    sub = getattr(config, sub_config_name(mtype), None)
    return sub if getattr(sub, "model_type", None) in SUPPORTED_ARCHITECTURES else None


def _family_of(model: nn.Module) -> tuple[_Family, ...] | None:
    """The table's families for ``model`` (one per layer class of its stack), or None."""
    config = _layers_config(getattr(model, "config", None))
    if config is None:
        return None
    entry = SUPPORTED_ARCHITECTURES[config.model_type]
    return entry if isinstance(entry, tuple) else (entry,)


def _type_named(model: nn.Module) -> str:
    """The model's type as an error message names it (with its text_config's, where used)."""
    mtype = _model_type(model)
    config = _layers_config(getattr(model, "config", None))
    if config is None or config.model_type == mtype:
        return f"model_type {mtype!r}"
    return f"model_type {mtype!r} ({sub_config_name(mtype)}: {config.model_type!r})"


def hidden_size_of(model: nn.Module) -> int:
    """The width of the model's layers: ``hidden_size`` of the config :func:`_layers_config`
    picks (a multimodal model's text_config: its language model's width, where LLaVA's and
    Qwen-VL's configs have none of their own and Qwen-VL's vision_config has another; a dual
    encoder's vision_config: its vision tower's width, not its text tower's); of an
    unsupported model, ``config.hidden_size``, or its ``text_config``'s where it has none."""
    config = _layers_config(model.config) or model.config
    if getattr(config, "hidden_size", None) is None and hasattr(config, "text_config"):
        config = config.text_config
    return config.hidden_size


def _is_layer(module: nn.Module, class_name: str) -> bool:
    # By name through the MRO: no transformers import, and subclasses (FSDP's) still match.
    return any(cls.__name__ == class_name for cls in type(module).__mro__)


def _find_layers(model: nn.Module, families: tuple[_Family, ...]
                 ) -> list[tuple[str, nn.Module, _Family]]:
    """The model's layers of the families' classes, in order, each with its family."""
    layers = []
    for n, m in model.named_modules():
        family = next((f for f in families if _is_layer(m, f.layer_class)), None)
        if family is not None:
            layers.append((n, m, family))
    classes = " or ".join(f.layer_class for f in families)
    if not layers:
        raise ValueError(f"{_type_named(model)} but no {classes} module found in "
                         f"{type(model).__name__}")
    # One stack of layers: layers of that class anywhere else (a vision tower built of them,
    # extra prediction layers) would get adapters too, and shift the indices layers=... counts.
    # An encoder-decoder's two stacks are the exception (ENCODER_DECODERS).
    order = list(dict.fromkeys(n.rpartition(".")[0] for n, _, _ in layers))  # module order
    stacks = sorted(order)
    two = (_layers_config(model.config).model_type in ENCODER_DECODERS
           and _encoder_then_decoder(order))
    if len(stacks) > 1 and not two:
        raise ValueError(
            f"{classes} modules in {len(stacks)} places ({', '.join(stacks)}) of "
            f"{type(model).__name__}; block-level placement adapts one stack of layers. Attach "
            f"to the submodule that holds the stack you mean (a dual encoder's vision_model), "
            f"or use component-level placement (target_modules=[...]) instead.")
    # Every name the family gives must be there (of a tuple of alternatives, one; of the
    # transforms after a sub-layer, each): a module, or after a sub-layer a number or a tensor
    # too (Granite's multiplier, BEiT's layer-scale parameter). None, no norm there, is not
    # looked up.
    for name, layer, family in layers:
        kinds = {n: nn.Module
                 for n in (family.attn, family.attn_norm, family.ffn, family.ffn_norm)}
        kinds.update({n: (nn.Module, Tensor, int, float)
                      for n in _names(family.attn_after) + _names(family.ffn_after)})
        kinds.pop(None, None)
        absent = [n for n, kind in kinds.items()
                  if not any(isinstance(_attribute(layer, a), kind) for a in _names(n))]
        # A residual argument must be a parameter of the module's forward, by that name.
        for sub, arg in ((family.attn, family.attn_residual), (family.ffn, family.ffn_residual)):
            host = _attribute(layer, _module_named(layer, sub) or "")
            if arg is not None and host is not None and _argument_index(host, arg) is None:
                absent.append(f"{_module_named(layer, sub)}({arg}=)")
        # A layer that is one sub-layer: its attribute must name a kind the family knows.
        if family.sub_layer_by is not None and not any(
                _holds(layer, family, kind) for kind in ("attn", "ffn")):
            attr, mixers, ffns = family.sub_layer_by
            absent.append(attr if not hasattr(layer, attr) else
                          f"{attr} one of {[*mixers, *ffns]} (it has {getattr(layer, attr)!r})")
        if absent:
            raise ValueError(
                f"{name} ({type(layer).__name__}) lacks {absent}, which mtLoRA's block-level "
                f"placement expects there; this transformers version lays the layer out "
                f"differently. Use component-level placement (target_modules=[...]) instead.")
    return layers


def _encoder_then_decoder(stacks: list[str]) -> bool:
    """Whether ``stacks`` (paths, in module order) are an encoder-decoder's two: equal up to a
    part ``encoder`` in the first and ``decoder`` in the second (``encoder.block``,
    ``decoder.block``)."""
    if len(stacks) != 2:
        return False
    first, second = (path.split(".") for path in stacks)
    if "encoder" not in first:
        return False
    i = first.index("encoder")
    return (len(first) == len(second) and second[i] == "decoder"
            and first[:i] + first[i + 1:] == second[:i] + second[i + 1:])


def _layer_indices(n: int, wanted: Sequence[int]) -> list[int]:
    """``wanted`` (negative counting from the end) as sorted, distinct indices into n layers,
    Python ints whatever integer type they came as (numpy, 0-d tensors: saved as JSON)."""
    wanted = [as_int(index, f"layers[{j}]") for j, index in enumerate(wanted)]
    bad = [i for i in wanted if not -n <= i < n]
    if bad:
        raise ValueError(f"layers: indices {bad} out of range for a model with {n} layers")
    return sorted({i % n for i in wanted})


def normalized_layers(model: nn.Module, layers: Sequence[int] | None) -> list[int] | None:
    """``layers`` as sorted non-negative indices, None (every layer) included, so that two
    ways of naming the same layers compare equal; as given on an unsupported architecture."""
    families = _family_of(model)
    if families is None:
        return None if layers is None else list(layers)
    n = len(_find_layers(model, families))
    return list(range(n)) if layers is None else _layer_indices(n, layers)


def _plus_adapter(module: nn.Module, z: Tensor, out: Tensor) -> Tensor:
    """``out + adapter(z)`` in one pass (``out`` the fused op's residual), by ``module``'s
    adapter. An ``out`` of another shape than z, as many elements (Llama 4's MoE block: [B*S, d],
    which its layer views back), gets the adapter's output in its own shape."""
    adapter = getattr(module, ADAPTER_ATTR)
    if out.shape == z.shape:
        return adapter(z, residual=out)
    return adapter(z, residual=out.reshape(z.shape)).reshape(out.shape)


def _block_hook(module: nn.Module, args: tuple, kwargs: dict, output):
    """``output + adapter(z)`` with z the sub-layer's own input: its first argument, positional
    or by keyword (``hidden_states=``, or the name its forward gives it: DistilBERT's attention
    gets ``query=`` in transformers 4)."""
    if args:
        z = args[0]
    elif "hidden_states" in kwargs:
        z = kwargs["hidden_states"]
    else:
        first = next(iter(inspect.signature(module.forward).parameters), None)
        if first not in kwargs:
            raise RuntimeError(
                f"the mtLoRA adapter on {type(module).__name__} found no input: the layer called "
                f"it with keywords {sorted(kwargs)}, neither a positional argument nor "
                f"hidden_states= nor {first}=; this transformers version calls the sub-layer "
                f"otherwise than block-level placement expects. Use component-level placement "
                f"(target_modules=[...]) instead.")
        z = kwargs[first]
    # attention returns (attn_output, attn_weights), some MoE blocks (output, router_logits)
    out = output[0] if isinstance(output, tuple) else output
    y = _plus_adapter(module, z, out)
    return (y, *output[1:]) if isinstance(output, tuple) else y


def _normed(layer: nn.Module, family: _Family, norm: str | tuple[str, ...] | None
            ) -> nn.Module | None:
    """The norm module a residual hook applies to its residual argument (``residual_normed``:
    the sub-layer's, of alternatives the first the layer has), else None."""
    if not family.residual_normed:
        return None
    return layer.get_submodule(_module_named(layer, norm))


def _argument_index(module: nn.Module, arg: str) -> int | None:
    """The position of parameter ``arg`` of ``module``'s forward (None: it has none)."""
    params = list(inspect.signature(module.forward).parameters)
    return params.index(arg) if arg in params else None


def _residual_hook(module: nn.Module, args: tuple, kwargs: dict, *, arg: str, index: int,
                   norm: nn.Module | None = None):
    """A forward pre-hook on a module that adds the residual stream r it gets as argument ``arg``
    (positional at ``index``, or by keyword) to the sub-layer's output, then applies the post-LN
    (BERT's output modules): r is z there and becomes ``z + adapter(z)``, so the module computes
    ``LN(Sub(..) + z + adapter(z))``. With ``norm`` (a pre-LN sub-layer ended by such a module,
    no post-LN after the add: ESM's layout), z is ``norm(r)``, the sub-layer's input computed
    again by the same module on the same tensor (one norm more per adapted sub-layer; the norm
    is frozen base model, so only the adapter trains), and r becomes ``r + adapter(norm(r))``:
    the module computes ``Sub(norm(r)) + r + adapter(norm(r))``. Either way the adapter's
    output does not go through the module's dropout, which acts on the projection alone
    (identity in eval; StarCoder2's is the same)."""
    positional = len(args) > index
    r = args[index] if positional else kwargs[arg]
    if norm is not None and not getattr(module, ADAPTER_ATTR).enabled:
        return None  # disabled: the module's arguments as they are, no norm computed for nothing
    y = _plus_adapter(module, r if norm is None else norm(r), r)
    if positional:
        return (*args[:index], y, *args[index + 1:]), kwargs
    return args, {**kwargs, arg: y}


class MTLoRAHandle:
    """What :func:`attach` returns: the adapters it added and the way to take them off.

    Attributes: ``model``, ``config`` (:class:`MTLoRAConfig`), ``placement`` ('ffn' | 'attn' |
    'both' | 'component'), ``target_modules`` (component-level), ``layers`` (indices or None),
    ``train_modules`` (names as given, or None), ``adapters`` (dict: module path ->
    :class:`MTLoRAAdapter`; the paths prefix the adapters' keys in ``model.state_dict()``).

    What trains is the adapters and the train modules: :meth:`parameters`,
    :meth:`named_parameters`, :meth:`num_parameters` and :meth:`state_dict` cover both (the
    adapters first). The auxiliary losses (:meth:`aux_loss`) are the adapters' alone.
    """

    def __init__(self, model: nn.Module, config: MTLoRAConfig, placement: str,
                 target_modules: list[str] | None, layers: list[int] | None,
                 train_modules: list[str] | None = None) -> None:
        self.model = model
        self.config = config
        self.placement = placement
        self.target_modules = target_modules
        self.layers = layers
        self.train_modules = train_modules
        self.adapters: dict[str, MTLoRAAdapter] = {}
        self._train_paths: list[str] = []  # the modules train_modules selected
        # their parameters' and buffers' values at attach (path -> name -> copy), for remove()
        self._originals: dict[str, dict[str, Tensor]] = {}
        self._hosts: list[nn.Module] = []  # block: the sub-layers that carry an adapter
        self._hooks: list = []
        self._swaps: list[tuple[nn.Module, str, nn.Linear]] = []  # component: parent, name, base
        self._requires_grad: dict[str, bool] = {}  # by name: to_empty / FSDP2 swap the objects
        self._removed = False

    # --- queries -------------------------------------------------------------------------

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(name, parameter) of the adapters, then of the train modules, named as in
        ``model.named_parameters()`` (e.g. to give the head its own learning rate)."""
        for name, tensor in self._tensors(buffers=False).items():
            yield name, tensor

    def parameters(self) -> Iterator[nn.Parameter]:
        """The adapters' parameters, then the train modules' (what an optimizer should get)."""
        for _, p in self.named_parameters():
            yield p

    def num_parameters(self) -> int:
        """Parameters of :meth:`parameters`: ``d*r + N*r*d + d*N*g`` per block adapter (no router
        when N = 1), plus the train modules'."""
        return sum(p.numel() for p in self.parameters())

    def num_trainable_parameters(self) -> int:
        """Parameters of the whole model with ``requires_grad`` (the adapters, base frozen)."""
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def state_dict(self) -> dict[str, Tensor]:
        """The adapters' tensors and the train modules' (their ``state_dict()``: parameters and
        persistent buffers), keyed as in ``model.state_dict()``; no other base weight."""
        return {k: v.detach() for k, v in self._tensors().items()}

    def _tensors(self, buffers: bool = True) -> dict[str, Tensor]:
        """The live tensors of :meth:`state_dict` (``buffers=False``: the parameters alone), a
        tensor shared by two train modules (tied weights) once. Looked up by name each time:
        to_empty / FSDP2 swap the objects."""
        out = {f"{name}.{k}": p for name, a in self.adapters.items()
               for k, p in a.named_parameters()}
        seen: set[int] = set()
        for path in self._train_paths:
            module = self.model.get_submodule(path)
            items = (module.state_dict(keep_vars=True).items() if buffers
                     else module.named_parameters())
            for k, t in items:
                if id(t) not in seen:
                    seen.add(id(t))
                    out[f"{path}.{k}"] = t
        return out

    def aux_loss(self, **kwargs) -> Tensor:
        """:func:`mtlora_kernels.losses.auxiliary_loss` of the model (balance + spectral terms of
        the last forward; keyword arguments go to it).

        The balance term raises if that forward's routing weights carry no graph while
        gradients are on (reentrant checkpointing runs the forward under no_grad; see
        :meth:`MTLoRAAdapter.balance_loss`), or if the adapters were disabled.
        """
        self._check_live()
        if not self.enabled:
            raise RuntimeError("the adapters are disabled: the last forward computed no routing "
                               "and adds nothing to the model; enable() them first")
        return auxiliary_loss(self.model, **kwargs)

    @property
    def enabled(self) -> bool:
        """Whether the adapters are in the forward path (their ``enabled`` flags)."""
        return all(a.enabled for a in self.adapters.values())

    def __repr__(self) -> str:
        where = (f"component {self.target_modules}" if self.placement == "component"
                 else self.placement)
        train = f", train {self._train_paths}" if self._train_paths else ""
        return (f"MTLoRAHandle({type(self.model).__name__}, {where}{train}, "
                f"{len(self.adapters)} adapters, {self.num_parameters():,} parameters, "
                f"enabled={self.enabled})")

    # --- switching -----------------------------------------------------------------------

    def enable(self) -> None:
        """Put the adapters in the forward path (the state right after :func:`attach`)."""
        self._switch(True)

    def disable(self) -> None:
        """Take the adapters out of the forward path: the model computes its base outputs.

        Each adapter's ``enabled`` flag goes False; modules, hooks and parameters stay where
        they are (``model.parameters()`` still lists the adapters, ``model.to(...)`` still
        moves them), and a compiled model recompiles for the new state. Do not switch while a
        DDP/FSDP wrapper is training (its set of used parameters changes).

        The train modules are not touched: they are part of the model, not adapters, so a
        disabled model computes the base model with its trained head (their values and
        ``requires_grad`` stay); only :meth:`remove` gives their original values back.
        """
        self._switch(False)

    def _switch(self, on: bool) -> None:
        self._check_live()
        for adapter in self.adapters.values():
            adapter.enabled = on

    @contextlib.contextmanager
    def disabled(self):
        """``with handle.disabled(): base_out = model(x)``."""
        was = self.enabled
        self.disable()
        try:
            yield self
        finally:
            if was:
                self.enable()

    def remove(self) -> nn.Module:
        """Take the adapters off for good: modules, hooks and ``requires_grad`` flags are as
        they were before :func:`attach`, and the train modules' parameters and buffers hold
        their values of then again (from the copy attach kept; a model attached on the meta
        device had none to keep). Returns the model."""
        self._check_live()
        self.disable()
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for parent, name, base in self._swaps:
            setattr(parent, name, base)
        for host in self._hosts:
            delattr(host, ADAPTER_ATTR)
        with torch.no_grad():
            for path, originals in self._originals.items():
                module = self.model.get_submodule(path)
                live = {**dict(module.named_parameters()), **dict(module.named_buffers())}
                for k, value in originals.items():
                    if not value.is_meta:
                        live[k].copy_(value)
        self._originals.clear()
        params = dict(self.model.named_parameters())  # the names of before attach() again
        for name, flag in self._requires_grad.items():
            if name in params:
                params[name].requires_grad_(flag)
        del self.model._mtlora_handle
        self._removed = True
        return self.model

    def _check_live(self) -> None:
        if self._removed:
            raise RuntimeError("these adapters were removed; attach() again to add new ones")


def unwrapped(model: nn.Module) -> nn.Module:
    """The model inside ``torch.compile``'s wrapper, else ``model``: the adapters are named
    after the model's own modules (the wrapper's names start with ``_orig_mod.``, which would
    reach checkpoint keys and keep a compiled and a plain model from sharing checkpoints)."""
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else model


def get_handle(model: nn.Module) -> MTLoRAHandle | None:
    """The handle of the adapters attached to ``model`` (compiled or not), or None."""
    return getattr(unwrapped(model), "_mtlora_handle", None)


def _parse_targets(target_modules, field: str = "target_modules",
                   example: str = "['q_proj', 'v_proj']") -> list[str]:
    if isinstance(target_modules, str):
        target_modules = target_modules.split(",")
    targets = [t.strip() for t in target_modules if t.strip()]
    if not targets:
        raise ValueError(f"{field} is empty; give module names such as {example}")
    return targets


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def train_module_paths(model: nn.Module, names: list[str]) -> list[str]:
    """The paths of the modules ``names`` select, matched as ``target_modules`` are (a name
    matches a module whose dotted path ends with it), in model order, outermost only (a module
    inside another selected one trains with it). Every name must match, every module selected
    must have parameters."""
    found = [n for n, _ in model.named_modules() if n and any(_matches(n, t) for t in names)]
    missing = [t for t in names if not any(_matches(n, t) for n in found)]
    if missing:
        named = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                        if n and not n.rsplit(".", 1)[-1].isdigit()
                        and next(m.parameters(), None) is not None})
        raise ValueError(f"train_modules {missing} match no module of {type(model).__name__}; "
                         f"its modules with parameters are named {named}")
    outer = [n for n in found if not any(n.startswith(o + ".") for o in found)]
    empty = [n for n in outer if next(model.get_submodule(n).parameters(), None) is None]
    if empty:
        raise ValueError(f"train_modules: {empty} have no parameters to train")
    return outer


def _check_train_modules(model: nn.Module, names: list[str], adapted: list[str],
                         adapters: list[str]) -> list[str]:
    """The train modules' paths (:func:`train_module_paths`), none of them an ``adapted``
    module (a target Linear, a sub-layer that gets a block-level adapter), holding one, or
    sharing a parameter with one (tied weights), and no name one of the ``adapters`` to be."""
    own = [t for t in names if any(_matches(a, t) for a in adapters)]
    if own:
        raise ValueError(f"train_modules {own} name the mtLoRA adapters, which train anyway; "
                         f"name the modules that should train beside them (a task head)")
    paths = train_module_paths(model, names)
    for path in paths:
        ids = {id(p) for p in model.get_submodule(path).parameters()}
        for host in adapted:
            if path == host or host.startswith(path + "."):
                what = "gets" if path == host else f"holds {host}, which gets"
                raise ValueError(f"train_modules: {path} {what} an adapter; a module that trains "
                                 f"must lie outside the adapted ones (the adapters train anyway)")
            if any(id(p) in ids for p in model.get_submodule(host).parameters()):
                raise ValueError(f"train_modules: {path} shares a parameter with {host} (tied "
                                 f"weights), which gets an adapter and must stay frozen")
    return paths


def attach(
    model: nn.Module,
    config: MTLoRAConfig | None = None,
    *,
    placement: str | None = None,
    target_modules: Sequence[str] | str | None = None,
    layers: Sequence[int] | None = None,
    train_modules: Sequence[str] | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> MTLoRAHandle:
    """Add mtLoRA adapters to ``model`` in place, freeze everything else, return the handle.

    Args:
        model: a transformers model. Block-level placement supports the model types in
            :data:`SUPPORTED_ARCHITECTURES` (LLaMA-like, MoE, hybrid linear attention or SSM /
            full attention, parallel and post-norm decoders, ModernBERT, ViT-style vision
            encoders, BERT-style post-LN encoders, ESM-style pre-LN encoders, T5-style
            encoder-decoders; see the module docstring), multimodal models whose
            ``text_config`` has one of them (their language model's layers), and the image
            classifiers of :data:`DUAL_ENCODERS` (their vision tower's layers); any model with
            the named ``nn.Linear`` (or ``Conv1D``) modules works component-level.
        config: the adapters' hyper-parameters (default :class:`MTLoRAConfig`()).
        placement: 'ffn' (default; the official setting), 'attn' or 'both': block-level.
        target_modules: module names (``['q_proj', 'v_proj']`` or ``'q_proj,v_proj'``; a name
            matches a module whose dotted path ends with it): component-level instead. Exclusive
            with ``placement``.
        layers: indices of the transformer layers to adapt (default all; negative counts from
            the end; the handle records them sorted and non-negative). An encoder-decoder's
            (:data:`ENCODER_DECODERS`) count the encoder's layers, then the decoder's. Where each
            layer is one sub-layer (Nemotron-H's blocks), blocks are counted, and a selected
            block of the other kind than ``placement``'s is skipped; a selection with none of it
            is refused.
        train_modules: modules that train in full beside the adapters, a task head
            (``'classifier'``, ``'score'``, ``'lm_head'``): named as ``target_modules`` are,
            matched in the whole model (``layers`` does not restrict them), none of them adapted
            or holding an adapted module. Their parameters get ``requires_grad=True`` and join
            the handle's :meth:`~MTLoRAHandle.parameters` and
            :meth:`~MTLoRAHandle.state_dict` (so :func:`~mtlora_kernels.io.save_adapters` saves
            them); a weight tied to another module's (``lm_head`` to the embeddings) trains with
            it. For :meth:`~MTLoRAHandle.remove` attach keeps a copy of their parameters and
            buffers, on their device: memory as large as the modules (an ``lm_head`` of a large
            vocabulary: vocabulary x width).
        dtype: the adapters' parameter dtype (fp32 master weights by default; the forward casts
            them to the activations' dtype).

    Everything is checked before the model is touched: on an error the model is unchanged.
    """
    model = unwrapped(model)
    if get_handle(model) is not None:
        raise RuntimeError(f"{type(model).__name__} already has mtLoRA adapters attached; call "
                           f"remove() on its handle first")
    cfg = config or MTLoRAConfig()
    if not isinstance(cfg, MTLoRAConfig):
        raise TypeError(f"config must be an MTLoRAConfig, got {type(cfg).__name__}")
    if target_modules is not None and placement is not None:
        raise ValueError(f"give either placement={placement!r} (block-level) or target_modules "
                         f"(component-level), not both")
    train = (None if train_modules is None
             else _parse_targets(train_modules, "train_modules", "'classifier'"))
    families = _family_of(model)
    supported = (", ".join(sorted(SUPPORTED_ARCHITECTURES))
                 + ", multimodal models whose text_config has one of these types, and the "
                 + "image classifiers of the dual encoders " + ", ".join(DUAL_ENCODERS))
    chosen = None
    if layers is not None:
        if len(layers) == 0:
            raise ValueError("layers=[] selects no layer; pass None for every layer")
        if families is None:
            raise ValueError(f"layers=... needs a supported architecture ({supported}); "
                             f"{type(model).__name__} has {_type_named(model)}")
        every = _find_layers(model, families)
        layers = _layer_indices(len(every), layers)
        chosen = [every[i] for i in layers]

    if target_modules is not None:
        targets = _parse_targets(target_modules)
        scope = [name for name, _, _ in chosen] if chosen is not None else None

        def in_scope(name: str) -> bool:  # inside the layers=... chosen, when given
            return scope is None or any(name.startswith(s + ".") for s in scope)

        found: list[tuple[str, nn.Module]] = []
        for name, module in model.named_modules():
            if not any(_matches(name, t) for t in targets) or not in_scope(name):
                continue
            widths = linear_widths(module)
            if widths is None:
                raise TypeError(f"target {name} is a {type(module).__name__}; component-level "
                                f"mtLoRA wraps nn.Linear (and transformers' Conv1D) modules only")
            owner = model.get_submodule(name.rpartition(".")[0])
            if isinstance(owner, nn.MultiheadAttention):
                raise TypeError(f"target {name} belongs to an nn.MultiheadAttention, which reads "
                                f"its weight instead of calling it: an adapter there would "
                                f"never run")
            if widths[1] % cfg.groups:
                raise ValueError(f"groups={cfg.groups} must divide {name}'s output width "
                                 f"{widths[1]}")
            found.append((name, module))
        missing = [t for t in targets if not any(_matches(n, t) for n, _ in found)]
        if missing:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                             if linear_widths(m) is not None and in_scope(n)})
            where = (type(model).__name__ if scope is None
                     else f"layers {layers} of {type(model).__name__}")
            raise ValueError(f"target_modules {missing} match no nn.Linear (or Conv1D) in "
                             f"{where}; the Linear modules there are named {linear}")
        train_paths = [] if train is None else _check_train_modules(
            model, train, [n for n, _ in found], [f"{n}.adapter" for n, _ in found])
        handle = MTLoRAHandle(model, cfg, "component", targets, layers, train)
        _freeze(handle, train_paths)
        for name, linear in found:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            wrapper = MTLoRALinear(linear, cfg).train(linear.training)
            wrapper.adapter.to(dtype=dtype)
            handle._swaps.append((parent, child, linear))
            handle.adapters[f"{name}.adapter"] = wrapper.adapter
            setattr(parent, child, wrapper)
    else:
        placement = placement or "ffn"
        if placement not in BLOCK_PLACEMENTS:
            raise ValueError(f"placement must be one of {BLOCK_PLACEMENTS} (block-level), or "
                             f"pass target_modules=[...] for component-level; got {placement!r}")
        if families is None:
            raise NotImplementedError(
                f"block-level mtLoRA supports model types {supported}; {type(model).__name__} "
                f"has {_type_named(model)}. Component-level placement (target_modules=[...]) "
                f"works on any model with nn.Linear (or Conv1D) modules.")
        if chosen is None:
            chosen = _find_layers(model, families)
        d = hidden_size_of(model)
        if d % cfg.groups:
            raise ValueError(f"groups={cfg.groups} must divide hidden_size={d}")
        kinds = {"ffn": ["ffn"], "attn": ["attn"], "both": ["attn", "ffn"]}[placement]
        for layer_name, layer, fam in chosen:
            if "ffn" in kinds and fam.ffn_refused_if and hasattr(layer, fam.ffn_refused_if[0]):
                raise NotImplementedError(
                    f"placement={placement!r}: {layer_name} ({type(layer).__name__}) has "
                    f"{fam.ffn_refused_if[0]!r}: {fam.ffn_refused_if[1]}. Use placement='attn' "
                    f"or component-level placement (target_modules=[...]).")
        # The sub-layers that get an adapter: of a field's alternatives, the first the layer has;
        # in a layer that is one sub-layer (sub_layer_by), the one it is.
        # Each with its residual argument (kind 4) and the norm the hook applies to it (ESM's
        # layout: residual_normed).
        hosts = [(layer_name, layer, *((_module_named(layer, fam.ffn), fam.ffn_residual,
                                        _normed(layer, fam, fam.ffn_norm))
                                       if kind == "ffn" else
                                       (_module_named(layer, fam.attn), fam.attn_residual,
                                        _normed(layer, fam, fam.attn_norm))))
                 for layer_name, layer, fam in chosen for kind in kinds
                 if _holds(layer, fam, kind)]
        if not hosts:  # layers=... selected only blocks of the other kind (or the model has none)
            every = _find_layers(model, families)
            attr, mixers, ffns = chosen[0][2].sub_layer_by  # every chosen layer has one
            what = {"ffn": "FFN", "attn": "token-mixer"}[placement]
            have = [i for i, (_, m, f) in enumerate(every) if _holds(m, f, placement)]
            picked = (f"{type(model).__name__} has none" if layers is None else
                      f"layers {layers} select none: " + ", ".join(
                          f"{n} is {getattr(m, attr)!r}" for n, m, _ in chosen))
            raise ValueError(
                f"placement={placement!r} adapts the {what} blocks ({attr} one of "
                f"{list(ffns if placement == 'ffn' else mixers)}), and {picked}. The {what} "
                f"blocks are layers {have}; placement='both' adapts every block.")
        train_paths = [] if train is None else _check_train_modules(
            model, train, [f"{n}.{sub}" for n, _, sub, _, _ in hosts],
            [f"{n}.{sub}.{ADAPTER_ATTR}" for n, _, sub, _, _ in hosts])
        handle = MTLoRAHandle(model, cfg, placement, None, layers, train)
        _freeze(handle, train_paths)
        for layer_name, layer, sub, residual, norm in hosts:
            host = layer.get_submodule(sub)
            ref = next(host.parameters(), None)
            adapter = MTLoRAAdapter(d, d, cfg).to(
                device=ref.device if ref is not None else None, dtype=dtype)
            adapter.train(host.training)
            host.add_module(ADAPTER_ATTR, adapter)
            handle._hooks.append(
                host.register_forward_hook(_block_hook, with_kwargs=True) if residual is None
                else host.register_forward_pre_hook(functools.partial(
                    _residual_hook, arg=residual, index=_argument_index(host, residual),
                    norm=norm), with_kwargs=True))
            handle._hosts.append(host)
            handle.adapters[f"{layer_name}.{sub}.{ADAPTER_ATTR}"] = adapter
    model._mtlora_handle = handle  # the adapters start enabled
    return handle


def _freeze(handle: MTLoRAHandle, train_paths: list[str]) -> None:
    """Freeze the model but the train modules, whose tensors are copied for remove()."""
    model = handle.model
    handle._requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    model.requires_grad_(False)
    for path in train_paths:
        module = model.get_submodule(path)
        handle._originals[path] = {k: t.detach().clone() for k, t in
                                   [*module.named_parameters(), *module.named_buffers()]}
        module.requires_grad_(True)
    handle._train_paths = list(train_paths)


__all__ = ["attach", "get_handle", "MTLoRAHandle", "train_module_paths",
           "SUPPORTED_ARCHITECTURES", "DUAL_ENCODERS", "ENCODER_DECODERS", "BLOCK_PLACEMENTS"]
