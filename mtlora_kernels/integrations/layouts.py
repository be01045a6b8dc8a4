"""The layer layouts block-level placement knows (:func:`mtlora_kernels.attach`), by
``config.model_type``: where each transformer layer keeps its token mixer, its FFN and the norms
they read, by attribute name. :mod:`mtlora_kernels.integrations.hf` places the adapters by them.

The supported layers (:data:`SUPPORTED_ARCHITECTURES`, by ``config.model_type``; the table
below names every type, docs/MODELS.md lists them for users) come in four kinds:

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
  and ``layers=`` counts blocks (skipping the selected ones of the other kind); the pure
  state-space stacks (mamba, mamba2, falcon_mamba) are such blocks, a token mixer each and no
  FFN (``ffn`` None): 'attn' and 'both' adapt every block's mixer, 'ffn' is refused;
  and the same layout in vision encoders, on image patches (vit, deit, clip_vision_model,
  siglip_vision_model, ...), and in encoder-decoders, both stacks (T5's kind: t5, mt5, umt5,
  longt5, switch_transformers, pop2piano; mBART's pre-LN layers: mbart, pegasus, nllb-moe, ...:
  :data:`ENCODER_DECODERS`; the decoder's cross-attention gets no adapter), in speech and audio
  models (whisper, speech_to_text and moonshine, encoder-decoders of an encoder and a decoder
  layer class; Whisper-style audio encoders, MusicGen's decoders, AST, the wav2vec 2.0 family's
  stable-LN layers), and in encoders built of BERT's modules (esm, ...: the residual added in
  the module that ends each
  sub-layer, as above);
- parallel (cohere, phi, stablelm with ``use_parallel_residual``, gptj, codegen, falcon, ...):
  one norm feeds both sub-layers, ``z = LN(h)``, ``out = h + Attn(z) + FFN(z)`` plus
  ``adapter(z)`` of each placed adapter; or two norms of the same h (gpt_neox, falcon's
  new_decoder_architecture), ``out = h + Attn(LN1(h)) + FFN(LN2(h))``, each adapter on its
  sub-layer's z;
- a transform after the sub-layer (gemma2/3/4, glm4, olmo2/3, afmoe, ...: a post-norm; granite: its
  ``residual_multiplier`` m; hyperclovax: a post-norm, then m; dinov2, dinov3_vit, beit: a layer
  scale, then stochastic depth; granitemoehybrid: m again; falcon_h1's Mamba mixer: its
  ``ssm_out_multiplier``; deepseek_v4, hy_v4, qwen4_exp_text: a hyper-connection's expansion
  of the output into the residual's streams, by weights the layer computes, which the table
  does not name). SPEC's formula is for pre-LN layers; here the layer applies the
  transform to the sub-layer's output with the adapter's added, ``out = h1 + PostNorm(FFN(z) +
  adapter(z))`` (Granite: ``h1 + m * (FFN(z) + adapter(z))``), not ``h1 + PostNorm(FFN(z)) +
  adapter(z)``: the adapter sits inside the post-norm, where a LoRA on the FFN's own Linear layers
  (PEFT, HydraLoRA's placement) sits too. Where a layer has no norm before the sub-layer (OLMo2/3),
  z is the residual stream (``h1`` for the FFN, ``h`` for attention) itself. What a layer does
  after the FFN's residual add (Gemma 4's per-layer input and ``layer_scalar``, Gemma 3n's AltUp
  correction) takes the adapter's delta as it takes the FFN's output. The table's comments give
  each type's peculiarities (olmo_hybrid's two layer classes, Gemma 4's MoE layers, which refuse
  'ffn' and 'both');
- post-LN encoders (bert, roberta, deberta, distilbert, ...; on speech the wav2vec 2.0 family's
  default layers, sew-d), encoder-decoders (bart, marian, fsmt, ...: both stacks) and decoders
  (openai-gpt, trocr, git): the sub-layer reads the residual stream and the layer normalizes
  the sum, ``a = LN1(h + Attn(h))``, ``out = LN2(a + FFN(a))``;
  the adapter's output joins that sum, ``out = LN2(a + FFN(a) + adapter(a))``, z = a (the
  attention's: z = h), where a LoRA on the sub-layer's own Linear layers would put it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class LayerLayout:
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
    every layer; a value of neither kind is refused. ``ffn_first``: where the FFN is no one
    module but Linear layers loose in the layer, with the activation and dropouts between them
    (OPT's and BART's ``fc1`` ... ``fc2``), its first module, whose input is z; ``ffn`` then
    names its last, whose output the adapter's joins (and which holds the adapter).
    ``ffn`` None (and ``ffn_norm``): the layer has no FFN, it is ONE pre-LN token-mixer
    sub-layer, ``h + mixer(norm(h))`` (Mamba's blocks): 'attn' adapts the mixer, 'both' every
    sub-layer the layer has (the mixer), and 'ffn' is refused, as on a Nemotron-H stack of
    token-mixer blocks only. ``refused_if``: (dotted attribute path, why): a layer whose value
    there is true (a True flag, a positive number) is laid out otherwise than the entry says
    (X-MOD's ``pre_norm``: its norms before the sub-layers; RWKV's ``config.rescale_every``: its
    eval-mode rescaling), and every placement is refused there.
    """

    layer_class: str
    attn: str | tuple[str, ...]
    attn_norm: str | tuple[str, ...] | None
    ffn: str | tuple[str, ...] | None
    ffn_norm: str | tuple[str, ...] | None
    attn_after: str | tuple[str, ...] | None = None
    ffn_after: str | tuple[str, ...] | None = None
    ffn_refused_if: tuple[str, str] | None = None
    attn_residual: str | None = None
    ffn_residual: str | None = None
    residual_normed: bool = False
    sub_layer_by: tuple[str, tuple[str, ...], tuple[str, ...]] | None = None
    ffn_first: str | None = None
    refused_if: tuple[str, str] | None = None


def _pre_ln(layer_class: str, attn_after: str | tuple[str, ...] | None = None,
            ffn_after: str | tuple[str, ...] | None = None, ffn: str = "mlp",
            attn: str | tuple[str, ...] = "self_attn") -> LayerLayout:
    """LLaMA's layout: ``h1 = h + Attn(input_layernorm(h))``,
    ``out = h1 + FFN(post_attention_layernorm(h1))``, the FFN module named ``ffn``."""
    return LayerLayout(layer_class, attn, "input_layernorm", ffn, "post_attention_layernorm",
                       attn_after, ffn_after)


def _parallel(layer_class: str, after: str | None = None) -> LayerLayout:
    """One norm feeds both: ``h + Attn(z) + FFN(z)`` with ``z = input_layernorm(h)``."""
    return LayerLayout(layer_class, "self_attn", "input_layernorm", "mlp", "input_layernorm",
                       after, after)


def _post_norm(layer_class: str, attn_norm: str | None, ffn_norm: str | None,
               attn_after: str, ffn_after: str) -> LayerLayout:
    """A norm after each sub-layer: ``h1 + PostNorm(FFN(z))``."""
    return LayerLayout(layer_class, "self_attn", attn_norm, "mlp", ffn_norm, attn_after, ffn_after)


def _post_ln(layer_class: str) -> LayerLayout:
    """BERT's layout: ``a = LN1(h + Attn(h))``, ``out = LN2(a + FFN(a))``, each sub-layer ended
    by a module (``attention.output``, ``output``) that projects, adds the residual it gets as
    ``input_tensor`` and normalizes."""
    return LayerLayout(layer_class, "attention.output", None, "output",
                       "attention.output.LayerNorm", attn_residual="input_tensor",
                       ffn_residual="input_tensor")


def _pre_ln_output(layer_class: str, attn_norm: str, ffn_norm: str,
                   attn_residual: str = "input_tensor") -> LayerLayout:
    """ESM's layout: pre-LN, ``a = h + Attn(attn_norm(h))``, ``out = a + FFN(ffn_norm(a))``, in
    BERT's modules: each sub-layer ended by a module (``attention.output``, ``output``) that
    projects and adds the residual it gets (``input_tensor``, the attention's ``attn_residual``),
    with no norm after; z is the norm applied to that residual (``residual_normed``)."""
    return LayerLayout(layer_class, "attention.output", attn_norm, "output", ffn_norm,
                       attn_residual=attn_residual, ffn_residual="input_tensor",
                       residual_normed=True)


def _t5(layer_class: str, ffn: str = "DenseReluDense",
        attn: tuple[str, ...] = ("SelfAttention",)) -> LayerLayout:
    """T5's block: ``layer.0`` the self-attention's wrapper, the FFN's last (``layer.2`` in a
    decoder block, after the cross-attention's; ``layer.1`` in an encoder block), each with its
    ``layer_norm`` and the sub-layer (``attn``'s alternatives, ``ffn``) called on its output."""
    return LayerLayout(layer_class, tuple(f"layer.0.{a}" for a in attn), "layer.0.layer_norm",
                       (f"layer.2.{ffn}", f"layer.1.{ffn}"),
                       ("layer.2.layer_norm", "layer.1.layer_norm"))


def _loose_ffn(layer_class: str, attn_norm: str | None = "self_attn_layer_norm",
               ffn_norm: str = "final_layer_norm") -> LayerLayout:
    """OPT's and BART's layer names: ``self_attn``, then an FFN of loose Linear layers, ``fc1``
    ... ``fc2`` (``ffn_first``). The norms pre-LN by default (OPT's, mBART's, Whisper's, each
    before its sub-layer); ``attn_norm`` None for a post-LN layer, whose attention reads the
    layer's input h and whose FFN reads ``ffn_norm``'s output, the norm before it."""
    return LayerLayout(layer_class, "self_attn", attn_norm, "fc2", ffn_norm, ffn_first="fc1")


def _bart(prefix: str, pre_ln: bool) -> tuple[LayerLayout, LayerLayout]:
    """BART's layers, ``{prefix}EncoderLayer`` and ``{prefix}DecoderLayer`` (an encoder-decoder's
    two stacks): ``self_attn`` with its ``self_attn_layer_norm``, in the decoder layer the
    cross-attention (``encoder_attn``, no adapter) with its ``encoder_attn_layer_norm``, then an
    FFN of loose Linear layers, ``fc1`` ... ``fc2`` (``ffn_first``), with its
    ``final_layer_norm``. Pre-LN (mBART's): each norm before its sub-layer. Post-LN (BART's):
    each norm after its sub-layer's residual add, so the attention reads the layer's input h
    (no norm before it) and the FFN the output of the norm before it: the self-attention's in
    the encoder layer, the cross-attention's in the decoder layer."""
    if pre_ln:
        return tuple(_loose_ffn(f"{prefix}{stack}Layer") for stack in ("Encoder", "Decoder"))
    return tuple(_loose_ffn(f"{prefix}{stack}Layer", None, norm)
                 for stack, norm in (("Encoder", "self_attn_layer_norm"),
                                     ("Decoder", "encoder_attn_layer_norm")))


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
SUPPORTED_ARCHITECTURES: dict[str, LayerLayout | tuple[LayerLayout, ...]] = {
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
    "gpt_neox_japanese": LayerLayout("GPTNeoXJapaneseLayer", "attention", "input_layernorm", "mlp",
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
    "jamba": (LayerLayout("JambaMambaDecoderLayer", "mamba", "input_layernorm", "feed_forward",
                          "pre_ff_layernorm"),
              LayerLayout("JambaAttentionDecoderLayer", "self_attn", "input_layernorm",
                          "feed_forward", "pre_ff_layernorm")),
    "bamba": LayerLayout("BambaDecoderLayer", ("self_attn", "mamba"), "input_layernorm",
                         "feed_forward", "pre_ff_layernorm"),
    # LFM2: a short gated convolution (``conv``) or ``self_attn`` on operator_norm(h), the FFN
    # ``feed_forward`` on ffn_norm(h1); LFM2-MoE's an MoE block from layer num_dense_layers on.
    **{t: LayerLayout(c, ("self_attn", "conv"), "operator_norm", "feed_forward", "ffn_norm")
       for t, c in (("lfm2", "Lfm2DecoderLayer"), ("lfm2_moe", "Lfm2MoeDecoderLayer"))},
    # RecurrentGemma (Griffin): the mixer is ``temporal_block`` in every layer, an RG-LRU
    # recurrent block or local attention by layers_block_type, returning (output, cache).
    "recurrent_gemma": LayerLayout("RecurrentGemmaDecoderLayer", "temporal_block",
                                   "temporal_pre_norm", "mlp_block", "channel_pre_norm"),
    # Falcon-H1: ``mamba`` and ``self_attn`` side by side in every layer, on z = LN1(h), h1 = h +
    # ssm_out_multiplier * Mamba(z) + attention_out_multiplier * Attn(attention_in_multiplier *
    # z). 'attn' puts the adapter beside the Mamba mixer, the one called on z itself; the layer
    # scales its output plus the adapter's by ssm_out_multiplier (a transform, as Granite's).
    "falcon_h1": LayerLayout("FalconH1DecoderLayer", "mamba", "input_layernorm", "feed_forward",
                             "pre_ff_layernorm", attn_after="ssm_out_multiplier"),
    # Nemotron-H: each block is ONE pre-LN sub-layer, h + mixer(norm(h)), its ``mixer`` by its
    # block_type (config.layers_block_type; hybrid_override_pattern's M, *, -, E): Mamba-2
    # ('linear_attention') or attention ('full_attention'), the token mixers, which 'attn'
    # adapts, or an MLP ('mlp') or MoE block ('moe', its shared expert inside), the FFNs, which
    # 'ffn' adapts; 'both' adapts every block. layers=... counts blocks (num_hidden_layers), and
    # skips the selected blocks of the other kind (attach refuses a selection with none of it).
    "nemotron_h": LayerLayout("NemotronHBlock", "mixer", "norm", "mixer", "norm", sub_layer_by=(
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
    **{t: LayerLayout(c, "attn", "ln_1", "mlp", "ln_2") for t, c in (
        ("gpt2", "GPT2Block"), ("gpt_bigcode", "GPTBigCodeBlock"), ("gpt_neo", "GPTNeoBlock"))},
    # BLOOM and MPT: the sub-layer module is called on (z, residual) and adds the residual itself,
    # residual + dropout(Sub(z)), so the hook's adapter(z) joins that sum: residual + Sub(z) +
    # adapter(z). BLOOM with apply_residual_connection_post_layernorm takes z as the residual
    # (z + Sub(z) + adapter(z): the adapter still beside the sub-layer). MPT's attention dropout
    # is in the layer (resid_attn_dropout, on Attn(z) + adapter(z), as Phi-3's); its FFN is
    # ``ffn``.
    "bloom": LayerLayout("BloomBlock", "self_attention", "input_layernorm", "mlp",
                         "post_attention_layernorm"),
    "mpt": LayerLayout("MptBlock", "attn", "norm_1", "ffn", "norm_2", "resid_attn_dropout"),
    # OPT, XGLM and BioGPT: LLaMA's layout, but no one module is the FFN: fc1, the activation,
    # a dropout and fc2 sit loose in the layer (ffn_first). z is fc1's input, the adapter hangs
    # on fc2 and its output joins fc2's, so the layer's residual dropout acts on both (as
    # Phi-3's). OPT with do_layer_norm_before=False (OPT-350m) is post-LN, BART's layout below:
    # out = final_layer_norm(h1 + FFN(z) + adapter(z)), z = h1 = self_attn_layer_norm(h +
    # Attn(h)); the hooks take z where the sub-layer gets it either way, the norms named here
    # are the pre-LN variant's. XGLM's cross-attention (add_cross_attention) gets no adapter.
    **{t: _loose_ffn(c) for t, c in (
        ("opt", "OPTDecoderLayer"), ("xglm", "XGLMDecoderLayer"),
        ("biogpt", "BioGptDecoderLayer"))},
    # ModernBERT, an encoder: layer 0's attn_norm is nn.Identity (the embeddings end in a norm),
    # so its z is the layer's input; sliding-window and global attention are both ``attn``.
    "modernbert": LayerLayout("ModernBertEncoderLayer", "attn", "attn_norm", "mlp", "mlp_norm"),
    # Apertus: LLaMA's layout with the norms named for their sub-layers.
    "apertus": LayerLayout("ApertusDecoderLayer", "self_attn", "attention_layernorm", "mlp",
                           "feedforward_layernorm"),
    # VaultGemma: LLaMA's layout, its FFN's norm named pre_feedforward_layernorm (Gemma 2's
    # name, without Gemma 2's post-norms).
    "vaultgemma": LayerLayout("VaultGemmaDecoderLayer", "self_attn", "input_layernorm", "mlp",
                              "pre_feedforward_layernorm"),
    # JetMoE: the attention (a mixture of attention heads) is ``self_attention`` and returns
    # (output, weights, router_logits): the hook adds to the output; the FFN is an MoE block.
    "jetmoe": LayerLayout("JetMoeDecoderLayer", "self_attention", "input_layernorm", "mlp",
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
    **{t: LayerLayout(c, "attention", "layernorm_before", "mlp", "layernorm_after", "dropout",
                      "dropout") for t, c in (
        ("vit", "ViTLayer"), ("deit", "DeiTLayer"), ("vit_msn", "ViTMSNLayer"),
        ("vit_mae", "ViTMAELayer"), ("ijepa", "IJepaLayer"))},
    # CLIP's layer: the vision towers of CLIP, MetaCLIP 2, SigLIP, SigLIP 2 and MLCD (MLCD's
    # attention gets rotary position embeddings as another keyword). Their text towers are built
    # of the same class: a dual encoder (CLIPModel) holds two stacks and is refused; its image
    # classifier holds the vision tower alone (DUAL_ENCODERS, below the table).
    **{t: LayerLayout(c, "self_attn", "layer_norm1", "mlp", "layer_norm2") for t, c in (
        ("clip_vision_model", "CLIPEncoderLayer"),
        ("metaclip_2_vision_model", "MetaClip2EncoderLayer"),
        ("siglip_vision_model", "SiglipEncoderLayer"),
        ("siglip2_vision_model", "Siglip2EncoderLayer"),
        ("mlcd_vision_model", "MLCDEncoderLayer"))},
    # AIMv2's vision encoder: RMSNorms, the FFN named ``ffn``.
    "aimv2_vision_model": LayerLayout("Aimv2EncoderLayer", "attention", "rms_norm1", "ffn",
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
    "stablelm": LayerLayout("StableLmDecoderLayer", "self_attn", "input_layernorm", "mlp",
                            ("post_attention_layernorm", "input_layernorm"), None, "dropout"),
    # GPT-J and CodeGen: attn and mlp both on ln_1's output (attn by keyword, hidden_states=).
    **{t: LayerLayout(c, "attn", "ln_1", "mlp", "ln_1") for t, c in (
        ("gptj", "GPTJBlock"), ("codegen", "CodeGenBlock"))},
    # Parallel on two norms: out = h + Attn(LN1(h)) + FFN(LN2(h)), z = LN1(h) for the attention,
    # LN2(h) for the FFN. GPT-NeoX with use_parallel_residual (its default; without it, LLaMA's
    # layout on the same two norms); its attention is ``attention``, returning (output,
    # weights), and a residual dropout after each sub-layer acts on its output plus the adapter's.
    "gpt_neox": LayerLayout("GPTNeoXLayer", "attention", "input_layernorm", "mlp",
                            "post_attention_layernorm", "post_attention_dropout",
                            "post_mlp_dropout"),
    # Falcon, by its config: parallel_attn (the default) on one norm (input_layernorm), with
    # new_decoder_architecture on two (ln_attn, ln_mlp; num_ln_in_parallel_attn=1: one again),
    # without parallel_attn LLaMA's layout. The layer builds only the norms its variant uses:
    # of the alternatives, the first it has is the one its sub-layer reads. Its dropouts are
    # functional, on the sub-layers' summed outputs, adapters' included.
    "falcon": LayerLayout("FalconDecoderLayer", "self_attention", ("ln_attn", "input_layernorm"),
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
    "granitemoehybrid": LayerLayout("GraniteMoeHybridDecoderLayer", ("self_attn", "mamba"),
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
    **{t: LayerLayout(c, "attention", "norm1", "mlp", "norm2", ("layer_scale1", "drop_path"),
                      ("layer_scale2", "drop_path")) for t, c in (
        ("dinov2", "Dinov2Layer"), ("dinov2_with_registers", "Dinov2WithRegistersLayer"),
        ("dinov3_vit", "DINOv3ViTLayer"))},
    # BEiT: a residual dropout, the layer scale (lambda_1 / lambda_2, parameters; the number 1.0
    # without layer_scale_init_value), then drop_path. Data2Vec-Vision's layer, BEiT's otherwise,
    # splits its FFN in two modules (intermediate, output) and is not supported.
    "beit": LayerLayout("BeitLayer", "attention", "layernorm_before", "mlp", "layernorm_after",
                        ("dropout", "lambda_1", "drop_path"), ("dropout", "lambda_2", "drop_path")),
    # T5Gemma, an encoder-decoder (ENCODER_DECODERS): Gemma 2's layer in each stack, a post-norm
    # and then a dropout after each sub-layer; the decoder layer's cross_attn (on its own two
    # norms) gets no adapter. The two stacks may differ in width (each layer keeps its stack's
    # config): each adapter is as wide as its layer.
    "t5gemma": tuple(LayerLayout(c, "self_attn", "pre_self_attn_layernorm", "mlp",
                                 "pre_feedforward_layernorm",
                                 ("post_self_attn_layernorm", "dropout"),
                                 ("post_feedforward_layernorm", "dropout"))
                     for c in ("T5GemmaEncoderLayer", "T5GemmaDecoderLayer")),
    # OLMo-Hybrid: one stack of two layer classes (by layer_types): the attention layers are
    # OLMo2's (no norm before a sub-layer, post-norms after), the linear-attention layers
    # LLaMA's (their post_attention_layernorm is the FFN's norm).
    "olmo_hybrid": (_post_norm("OlmoHybridAttentionDecoderLayer", *_OLMO2),
                    LayerLayout("OlmoHybridLinearAttentionDecoderLayer", "linear_attn",
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
    "mpnet": LayerLayout("MPNetLayer", "attention.attn", None, "output", "attention.LayerNorm",
                         ffn_residual="input_tensor"),
    # DistilBERT: each sub-layer one module, its residual add and post-LN in the layer: hooked as
    # LLaMA's (the FFN's own dropout acts on FFN(a) alone, before the hook adds adapter(a)).
    "distilbert": LayerLayout("TransformerBlock", "attention", None, "ffn", "sa_layer_norm"),
    # NomicBERT and Jina Embeddings v3: DistilBERT's shape (self_attn and mlp, the residual adds
    # and post-LNs in the layer) with a residual dropout after each sub-layer, which acts on
    # Attn(h) + adapter(h) together (identity in eval), as ViT's.
    **{t: LayerLayout(c, "self_attn", None, "mlp", "post_attention_layernorm",
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
    # More text and document encoders (transformers 5.25). BERT's layer code (kind 4, _post_ln)
    # under other token mixers: RoFormer's rotary attention (its embeddings projected to
    # hidden_size before the layers, as RemBERT's); BigBird's block-sparse attention (or full,
    # by attention_type; the model pads the tokens to whole blocks, and the padding goes through
    # the adapters too); Longformer's sliding-window and global attention (padding to whole
    # windows, likewise); YOSO's, Nystromformer's and MRA's approximate attention; TAPAS's
    # table structure, VisualBERT's visual embeddings and LayoutLMv3's boxes enter in the
    # embeddings (LayoutLMv3's image patches, where given, join the text tokens in one stream
    # and get the adapters too; its relative position biases are computed once for the stack
    # and passed to each attention). The text towers of ALIGN, AltCLIP (XLM-R's layer),
    # Chinese-CLIP, CLAP and BLIP: their models (AlignTextModel, ...) have these types; a dual
    # encoder whose text_config has one (AlignModel, ChineseCLIPModel, ...) and whose vision or
    # audio tower is of another class gets adapters on its text tower (the multimodal rule).
    # BLIP's text model is a decoder with cross-attention to the image (no adapter there).
    **{t: _post_ln(c) for t, c in (
        ("roformer", "RoFormerLayer"), ("big_bird", "BigBirdLayer"),
        ("longformer", "LongformerLayer"), ("yoso", "YosoLayer"),
        ("nystromformer", "NystromformerLayer"), ("mra", "MraLayer"), ("tapas", "TapasLayer"),
        ("visual_bert", "VisualBertLayer"), ("layoutlmv3", "LayoutLMv3Layer"),
        ("align_text_model", "AlignTextLayer"), ("altclip_text_model", "AltRobertaLayer"),
        ("chinese_clip_text_model", "ChineseCLIPTextLayer"),
        ("clap_text_model", "ClapTextLayer"), ("blip_text_model", "BlipTextLayer"),
        # DPR's question, context and reader encoders each hold one BertModel.
        ("dpr", "BertLayer"))},
    # FNet: BERT's layer with a parameter-free Fourier transform as its token mixer (the real
    # part of a 2-D FFT over tokens and channels), ended by fourier.output, which adds the
    # residual input_tensor and normalizes: LN(h + FFT(h) + adapter(h)); its FFN is BERT's.
    "fnet": LayerLayout("FNetLayer", "fourier.output", None, "output", "fourier.output.LayerNorm",
                        attn_residual="input_tensor", ffn_residual="input_tensor"),
    # GTE (Alibaba's new architecture): NomicBERT's shape, a gated FFN.
    "gte": LayerLayout("GteLayer", "self_attn", None, "mlp", "post_attention_layernorm",
                       "post_attention_dropout", "post_mlp_dropout"),
    # UltraBERT: LLaMA's pre-LN layer (RMSNorms, RoPE) in an encoder, as EuroBERT's.
    "ultrabert": _pre_ln("UltrabertDecoderLayer"),
    # CLIP's text tower (CLIPTextModel): CLIP's layer, causal attention.
    "clip_text_model": LayerLayout("CLIPEncoderLayer", "self_attn", "layer_norm1", "mlp",
                                   "layer_norm2"),
    # X-MOD: XLM-R's layer whose FFN output module, after the residual add, runs a per-language
    # bottleneck adapter (by lang_ids; on the post-LN's output, adapter_reuse_layer_norm, its
    # default) before the layer's post-LN: out = LN(LangAdapter(a + FFN(a) + adapter(a))). The
    # hook adds adapter(a) to the module's residual input_tensor, so the sum the FFN forms holds
    # it before the language adapter and the LNs act, as they act on FFN(a) (a LoRA on the
    # FFN's dense would be there too). The attention's post-LN (attention.output.LayerNorm) is
    # applied by ``attention`` after its output module: LN(h + Attn(h) + adapter(h)). With
    # pre_norm (False by default) both norms run before the sub-layers instead: refused.
    "xmod": replace(_post_ln("XmodLayer"), refused_if=(
        "pre_norm", "X-MOD's pre-norm variant normalizes before each sub-layer (ESM's layout, "
                    "with the language adapter after the FFN's residual add), not after, as the "
                    "table's post-LN entry for xmod places the adapters")),
    # Speech and audio models. Whisper's and Speech2Text's layers, Qwen2-Audio's and Voxtral's
    # audio encoders (Whisper's encoder layer) and MusicGen's decoders: pre-LN, LLaMA's layout
    # under BART's names, the FFN fc1 ... fc2 loose in the layer (ffn_first, as OPT's); the
    # residual dropouts after the self-attention and fc2 are functional in the layer, so they act
    # on the adapters' outputs too (identity in eval). Whisper, Speech2Text and Moonshine are
    # encoder-decoders (ENCODER_DECODERS), an encoder layer class and a decoder one (a family
    # each); the decoder layer's cross-attention (``encoder_attn``, on its own norm between
    # h1 = h + Attn(z) and the FFN's norm) gets no adapter, and the FFN's z is final_layer_norm's
    # output after it. Whisper's encoder alone (WhisperForAudioClassification, model.encoder) and
    # its decoder alone (WhisperForCausalLM) are one stack. MusicGen's decoder (musicgen_decoder,
    # MusicgenForCausalLM; the text-conditioned model is a composite, attach to its ``decoder``)
    # has the cross-attention too, run where encoder_hidden_states are given; MusicGen-Melody's
    # decoder has none. Moonshine: LLaMA's layout, its decoder's cross-attention norm named
    # post_attention_layernorm and its FFN's final_layernorm.
    **{t: tuple(_loose_ffn(c) for c in cs) for t, cs in (
        ("whisper", ("WhisperEncoderLayer", "WhisperDecoderLayer")),
        ("speech_to_text", ("Speech2TextEncoderLayer", "Speech2TextDecoderLayer")),
        ("qwen2_audio_encoder", ("Qwen2AudioEncoderLayer",)),
        ("voxtral_encoder", ("VoxtralEncoderLayer",)),
        ("musicgen_decoder", ("MusicgenDecoderLayer",)),
        ("musicgen_melody_decoder", ("MusicgenMelodyDecoderLayer",)))},
    "moonshine": (_pre_ln("MoonshineEncoderLayer"),
                  LayerLayout("MoonshineDecoderLayer", "self_attn", "input_layernorm", "mlp",
                              "final_layernorm")),
    # wav2vec 2.0's encoder layer and its copies (HuBERT, WavLM, Data2Vec-Audio, SEW,
    # UniSpeech, UniSpeech-SAT), on the convolutional feature encoder's frames, two classes by
    # config.do_stable_layer_norm (a family each; a model holds the one): post-LN (the default),
    # DistilBERT's shape with a residual dropout after the attention, a = layer_norm(h +
    # dropout(Attn(h) + adapter(h))), out = final_layer_norm(a + FFN(a) + adapter(a)), z the
    # residual stream; or pre-LN ("StableLayerNorm"), LLaMA's layout on layer_norm and
    # final_layer_norm, the same dropout after the attention. The FFN is ``feed_forward``, its
    # own dropout inside (on FFN(z) alone). WavLM's attention returns (output, weights,
    # position bias) and computes its gated relative position bias from z inside. An MMS
    # language adapter (adapter_attn_dim, pre-LN layers) adds adapter_layer(h2) after the FFN's
    # residual add h2, so it takes the mtLoRA adapter's delta as it takes the FFN's output.
    # Data2Vec-Audio and SEW have the post-LN class only (SEW's encoder pools the frames before
    # the layers and upsamples after).
    **{t: (LayerLayout(f"{p}EncoderLayer", "attention", None, "feed_forward", "layer_norm",
                       "dropout"),
           LayerLayout(f"{p}EncoderLayerStableLayerNorm", "attention", "layer_norm",
                       "feed_forward", "final_layer_norm", "dropout"))[:n] for t, p, n in (
        ("wav2vec2", "Wav2Vec2", 2), ("hubert", "Hubert", 2), ("wavlm", "WavLM", 2),
        ("unispeech", "UniSpeech", 2), ("unispeech-sat", "UniSpeechSat", 2),
        ("data2vec-audio", "Data2VecAudio", 1), ("sew", "SEW", 1))},
    # SEW-D: DeBERTa-v2's layer (BERT's modules, kind 4 above) on SEW's pooled frames.
    "sew-d": _post_ln("SEWDLayer"),
    # The Audio Spectrogram Transformer: ViT's layer on spectrogram patches, its residual dropout
    # ``dropout`` (one module after both sub-layers).
    "audio-spectrogram-transformer": LayerLayout("ASTLayer", "attention", "layernorm_before",
                                                 "mlp", "layernorm_after", "dropout", "dropout"),
    # BART's lineage of encoder-decoders (ENCODER_DECODERS): an encoder's stack and a decoder's, of
    # two layer classes (_bart: one family each), at model.encoder.layers and model.decoder.layers;
    # the FFN is fc1 ... fc2 loose in the layer (ffn_first, as OPT's), the layer's residual dropout
    # after fc2 acting on FFN(z) + adapter(z) together (identity in eval). The decoder's
    # cross-attention gets no adapter; without encoder_hidden_states (BartForCausalLM, the decoder
    # alone, one stack) the layer skips it and the hooks take the FFN's z where fc1 gets it, the
    # self-attention's norm's output (post-LN) or final_layer_norm's (pre-LN). Post-LN, BART's (kind
    # 4's formula): out = LN(h1 + FFN(z) + adapter(z)), z = h1 the residual stream, the attention's
    # z the layer's input h; Marian, BlenderbotSmall, PLBart, MVP (its prompts, use_prompt, would
    # enter the attention's keys and values inside self_attn; transformers 5.25's MvpModel hands
    # use_prompt to its encoder and decoder as their embed_tokens argument, so that they build
    # none), LED (Longformer's local and global attention inside self_attn, on the stream padded to
    # the attention window) and FSMT (layer classes EncoderLayer and DecoderLayer; its attention
    # gets z as query=, and its stream is time-first) too.
    **{t: _bart(c, pre_ln=False) for t, c in (
        ("bart", "Bart"), ("marian", "Marian"), ("blenderbot-small", "BlenderbotSmall"),
        ("plbart", "PLBart"), ("mvp", "Mvp"), ("led", "LED"), ("fsmt", ""))},
    # Pre-LN, mBART's (kind 1): out = h1 + FFN(z) + adapter(z), z = final_layer_norm(h1);
    # Pegasus, Blenderbot, M2M-100 and BigBird-Pegasus (its encoder's block-sparse attention,
    # or the full attention it falls back to on short inputs, inside self_attn) too.
    **{t: _bart(c, pre_ln=True) for t, c in (
        ("mbart", "MBart"), ("pegasus", "Pegasus"), ("blenderbot", "Blenderbot"),
        ("m2m_100", "M2M100"), ("bigbird_pegasus", "BigBirdPegasus"))},
    # NLLB-MoE: mBART's pre-LN layers, the FFN one module, ``ffn`` (fc1 ... fc2 inside it), on
    # ff_layer_norm, dense or an MoE block (router and experts) by encoder_sparse_step /
    # decoder_sparse_step; the cross-attention is ``cross_attention``. A dropout module after
    # each sub-layer (attn_dropout, ff_dropout) acts on Sub(z) + adapter(z) together.
    "nllb-moe": tuple(LayerLayout(f"NllbMoe{stack}Layer", "self_attn", "self_attn_layer_norm",
                                  "ffn", "ff_layer_norm", "attn_dropout", "ff_dropout")
                      for stack in ("Encoder", "Decoder")),
    # --- Older and non-transformer decoders (state-space, RNN-like, GPT-1, CTRL, ...) ---
    # Pure state-space stacks: each block is ONE pre-LN token mixer, h + mixer(norm(h)), no FFN
    # (``ffn`` None): 'attn' puts the adapter beside the mixer on z = norm(h), 'both' too (every
    # sub-layer the blocks have), 'ffn' is refused, as on a Nemotron-H stack of mixer blocks
    # only. With residual_in_fp32 the block adds Mixer(z) + adapter(z) to an fp32 residual.
    **{t: LayerLayout(c, "mixer", "norm", None, None) for t, c in (
        ("mamba", "MambaBlock"), ("mamba2", "Mamba2Block"),
        ("falcon_mamba", "FalconMambaBlock"))},
    # RWKV (v4): LLaMA's layout on ln1 / ln2 (block 0 applies pre_ln to its input first), the
    # time mix ``attention`` and the channel mix ``feed_forward`` each returning (output, state);
    # both shift in the previous token's z (from the state when decoding), which the adapter,
    # per token, does not read. In eval mode with config.rescale_every > 0 the model halves the
    # residual stream every rescale_every blocks and divides the two sub-layers' output weights
    # to match; the adapter's output would not be, and would weigh 2**(i // rescale_every) times
    # more in block i than in training: refused unless rescale_every is 0.
    "rwkv": LayerLayout("RwkvBlock", "attention", "ln1", "feed_forward", "ln2", refused_if=(
        "config.rescale_every", "in eval mode RWKV halves the residual stream every "
        "rescale_every blocks and divides the sub-layers' output weights to match, which an "
        "adapter's output would escape. Set model.config.rescale_every = 0 right after loading "
        "(before the model's first forward in eval mode, which rescales the weights in place)")),
    # xLSTM (transformers' own mLSTM blocks, without the xlstm package): LLaMA's layout, the
    # mLSTM layer returning (output, state) on norm_mlstm(h), the FFN on norm_ffn(h1).
    "xlstm": LayerLayout("xLSTMBlock", "mlstm_layer", "norm_mlstm", "ffn", "norm_ffn"),
    # GPT-1 (openai-gpt): post-LN, DistilBERT's shape: n = ln_1(h + Attn(h)), out = ln_2(n +
    # FFN(n)); its attention returns a list [output, ...]. The residual dropouts are inside
    # attn and mlp (on Attn(h), FFN(n), not the adapter's output).
    "openai-gpt": LayerLayout("Block", "attn", None, "mlp", "ln_1"),
    # CTRL: LLaMA's layout, the attention called on (z, z, z), a residual dropout after each
    # sub-layer (on Sub(z) + adapter(z), as Phi-3's). Its FFN is an nn.Sequential, which would
    # run a child adapter as one more stage: the adapter hangs on its last Linear (``ffn.2``),
    # z from its first's input (``ffn.0``, ffn_first), as OPT's.
    "ctrl": LayerLayout("EncoderLayer", "multi_head_attention", "layernorm1", "ffn.2",
                        "layernorm2", "dropout1", "dropout2", ffn_first="ffn.0"),
    # CPM-Ant: LLaMA's layout, each sub-layer wrapped in a block with its norm, the residual add
    # and (dropout_p > 0) a dropout on Sub(z) + adapter(z). The prompt tokens the model puts
    # before the input go through the layers, and the adapters, too.
    "cpmant": LayerLayout("CpmAntTransformerBlock", "self_att.self_attention",
                          "self_att.layernorm_before_attention", "ffn.ffn",
                          "ffn.layernorm_before_ffn"),
    # TrOCR's decoder (TrOCRForCausalLM; attach to a VisionEncoderDecoderModel's ``decoder``):
    # post-LN, BART's layout, out = final_layer_norm(h1 + FFN(z) + adapter(z)), z = h1, the
    # attention's z the layer's input; the FFN loose fc1 ... fc2 (ffn_first). The norm named is
    # the FFN's without cross-attention (with encoder states, z is encoder_attn_layer_norm's
    # output: the hooks take z where fc1 gets it either way); the cross-attention gets none.
    "trocr": _loose_ffn("TrOCRDecoderLayer", None, "self_attn_layer_norm"),
    # GIT: BERT's layer (kind 4); the image tokens, projected from its CLIP-like vision tower
    # (another layer class, no adapters), are prepended to the text's and share each layer.
    "git": _post_ln("GitLayer"),
    # transformers 5.25's decoder-only additions (dec5), by what each layer's code computes.
    # Kind 1, LLaMA's layout. IQuest-Coder loads into LLaMA's model, Sarvam-MLA into DeepSeek-V3's,
    # Sarvam-MoE and Param2-MoE into GLM-4-MoE's. A dense FFN in some layers and an MoE block in
    # the others, both as ``mlp`` (mlp_layer_types, mlp_only_layers): GLM-MoE-DSA, HY-V3,
    # A.X-K1, A.X-K2, Flint, dots3-note's language model; GLM-MoE-DSA's attention returns
    # (output, weights, top-k indices) and its layer (output, indices): the hook adds to the
    # output. A.X-K2's input_layernorm (and its MoE layers' post_attention_layernorm) is a gated
    # RMSNorm, y * sigmoid(g(y)), y = RMSNorm(h): one module, whose output is z.
    **{t: _pre_ln(c) for t, c in (
        ("iquestcoder", "LlamaDecoderLayer"), ("sarvam_mla", "DeepseekV3DecoderLayer"),
        ("sarvam_moe", "Glm4MoeDecoderLayer"), ("param2moe", "Glm4MoeDecoderLayer"),
        ("glm_moe_dsa", "GlmMoeDsaDecoderLayer"), ("hy_v3", "HYV3DecoderLayer"),
        ("axk1", "AXK1DecoderLayer"), ("axk2", "AXK2DecoderLayer"),
        ("flint", "FlintDecoderLayer"), ("dots3_note_text", "Dots3NoteTextDecoderLayer"),
        # Doge: the residual scaled by a learned vector (input_residual * h + Attn(z)), not the
        # sub-layer's output; its residual dropout is functional, on Attn(z) + adapter(z)
        # together; with is_moe its FFN is a CDMoE block returning (output, router_logits).
        ("doge", "DogeDecoderLayer"))},
    # Emu3's language model (Emu3ForCausalLM; Emu3's multimodal model by its text_config): a
    # dropout module after each sub-layer, on FFN(z) + adapter(z) together (Phi-3's).
    "emu3_text_model": _pre_ln("Emu3DecoderLayer", "dropout", "dropout"),
    # Apertus 1.5's language model: Apertus's norm names.
    "apertus1p5_text": LayerLayout("Apertus1p5TextDecoderLayer", "self_attn",
                                   "attention_layernorm", "mlp", "feedforward_layernorm"),
    # ModernBERT-Decoder: ModernBERT's layer (layer 0's attn_norm nn.Identity), causal.
    "modernbert-decoder": LayerLayout("ModernBertDecoderLayer", "attn", "attn_norm", "mlp",
                                      "mlp_norm"),
    # Kind 2: Cohere Compass's language model, Cohere's parallel layer on one LayerNorm.
    "cohere_compass_text": _parallel("CohereCompassDecoderLayer"),
    # Kind 3, a transform after the sub-layer. Granite-SWA: Granite's layer with sliding-window
    # attention; Granite-MoE-SWA: Granite-MoE-Shared's (shared_mlp beside the block, or none).
    "granite_swa": _pre_ln("GraniteSWADecoderLayer", "residual_multiplier", "residual_multiplier"),
    "granitemoe_swa": _pre_ln("GraniteMoeSWADecoderLayer", "residual_multiplier",
                              "residual_multiplier", ffn="block_sparse_moe"),
    # MiniMax(-Text-01): the residual is the normed stream, z = input_layernorm(h), h1 = alpha *
    # z + beta * (Attn(z) + adapter(z)), out = alpha2 * z2 + beta2 * (MoE(z2) + adapter(z2)),
    # z2 = post_attention_layernorm(h1); the betas (the attention's by its kind, full or
    # linear) are the transforms. Hybrid: ``self_attn`` is lightning (linear) attention in the
    # linear_attention layers, softmax attention in the others; the MoE block in every layer.
    "minimax": _pre_ln("MiniMaxDecoderLayer", "attn_beta_factor", "mlp_beta_factor"),
    # Kolibri 1 and 1.1: GLM-4's four norms (a post-norm after each sub-layer); an MoE block with
    # shared experts as ``mlp`` (1.1: a dense FFN in mlp_only_layers). Kolibri 1.1's attention
    # (indexed or sliding, keys and values shared across layers, rounded to NVFP4) returns
    # (output, weights, index pool): the hook adds to the output.
    **{t: _post_norm(c, "input_layernorm", "post_attention_layernorm",
                     "post_self_attn_layernorm", "post_mlp_layernorm") for t, c in (
        ("kolibri1", "Kolibri1DecoderLayer"), ("kolibri1_1", "Kolibri1_1DecoderLayer"))},
    # LFM3: LFM2's hybrid layer (a short convolution ``conv`` or ``self_attn`` on operator_norm)
    # with sandwich norms after each sub-layer (nn.Identity without use_sandwich_norm).
    "lfm3": LayerLayout("Lfm3DecoderLayer", ("self_attn", "conv"), "operator_norm",
                        "feed_forward", "ffn_norm", "post_operator_norm", "post_ffn_norm"),
    # Gemma 2's four norms, and the layer goes on after the post-norm as Gemma 4's does: Dory
    # (nGPT's kind: parameter-free L2 norms, the residual stream itself normalized) moves
    # toward the post-normed output at a learned per-channel rate, h + rate * (PostNorm(FFN(z)
    # + adapter(z)) - h); Ergo mixes it into the residual by a learned gate,
    # sigmoid(w) * PostNorm(...) + g(w) * h; Beam adds it with depth-scaled weights.
    # A dense FFN or an MoE block by mlp_layer_types (Ergo, Beam).
    **{t: _post_norm(c, *_GEMMA2) for t, c in (
        ("dory", "DoryDecoderLayer"), ("ergo", "ErgoDecoderLayer"), ("beam", "BeamDecoderLayer"))},
    # Inkling's language model: LLaMA's layout with a short causal convolution after each
    # sub-layer (x + conv(x), depthwise, over the tokens: attn_sconv, mlp_sconv), which mixes
    # the adapter's output across neighbouring tokens as it does the sub-layer's; a dense FFN or
    # an MoE block by mlp_layer_types.
    "inkling_text": _pre_ln("InklingDecoderLayer", "attn_sconv", "mlp_sconv"),
    # ZAYA: each sub-layer's output, the adapter's added, shifted and scaled per channel by a
    # module that adds the (likewise scaled) residual, (Sub(z) + adapter(z) + b) * s + (h + b')
    # * s'; the transform the delta sees is that scale s. The MoE block (every layer) takes the
    # previous layer's router state too and returns (output, router state): the hook adds to
    # the output.
    "zaya": _pre_ln("ZayaDecoderLayer", "post_attention_residual_scale.hidden_states_scale",
                    "post_mlp_residual_scale.hidden_states_scale"),
    # Hyper-connected layers, a transform the table cannot name (so none is named): the residual
    # is hc_mult streams, each sub-layer called once on z, a norm of the streams collapsed by
    # weights computed from them (DeepSeek-V4, HY-V4: input_layernorm / post_attention_layernorm
    # of attn_hc's / ffn_hc's output; Qwen4-Exp: the first output of attn_hyper_connection /
    # mlp_hyper_connection, which normalize inside), and its output, the adapter's added,
    # expanded back into the streams by per-stream weights from the same computation:
    # out = mix(h) + w * (FFN(z) + adapter(z)) per stream (DeepSeek-V4's mix is Sinkhorn's
    # doubly stochastic matrix, HY-V4's the identity, Qwen4-Exp's a gated copy). DeepSeek-V4:
    # MoE blocks in every layer (hash-routed by the token ids in the first ones, taken as
    # input_ids=), compressed sparse attention; HY-V4: a dense FFN or an MoE block by
    # mlp_layer_types, MLA with an indexer, its layer returning (output, top-k indices);
    # Qwen4-Exp's language model: a Gated DeltaNet or full attention by layer_types (as
    # Qwen3-Next's), an MoE block in every layer, its per-layer n-gram embeddings (PLE) added to
    # the streams before the layer's first hyper-connection.
    **{t: _pre_ln(c) for t, c in (
        ("deepseek_v4", "DeepseekV4DecoderLayer"), ("hy_v4", "HYV4DecoderLayer"))},
    "qwen4_exp_text": LayerLayout("Qwen4ExpTextDecoderLayer", _HYBRID, "attn_hyper_connection",
                                  "mlp", "mlp_hyper_connection"),
}

#: Dual encoders (CLIP's and SigLIP's kind), whose model_type is not in the table: block-level
#: placement goes by their ``vision_config``'s entry. Their image classifiers
#: (``CLIPForImageClassification``, what ``AutoModelForImageClassification`` builds) hold the
#: vision tower alone and get adapters there, as wide as the vision tower; the dual encoders
#: themselves (``CLIPModel``) hold a text tower of the same layer class too, and
#: :func:`_find_layers` refuses them (attach to their ``vision_model`` instead).
DUAL_ENCODERS = ("clip", "metaclip_2", "siglip", "siglip2")

#: Encoder-decoders (T5's kind, BART's lineage, Whisper's), whose layers sit in two stacks: an
#: encoder's and a decoder's (of one layer class, T5's blocks, or of one family each, BART's
#: ``BartEncoderLayer`` and ``BartDecoderLayer``). :func:`_find_layers` accepts those two, and only
#: those: paths equal up to a part ``encoder`` in the first (in module order) and ``decoder`` in the
#: second (``encoder.block`` / ``decoder.block``; ``transformer.encoder.block`` / ...;
#: ``model.encoder.layers`` / ``model.decoder.layers``), and ``layers=`` counts the encoder's
#: layers, then the decoder's. An encoder alone (``T5EncoderModel``, or ``model.encoder`` attached
#: by itself), or a decoder alone (``BartForCausalLM``), is one stack, as any other model's.
ENCODER_DECODERS = ("t5", "mt5", "umt5", "longt5", "switch_transformers", "pop2piano", "t5gemma",
                    "whisper", "speech_to_text", "moonshine",
                    "bart", "marian", "blenderbot-small", "plbart", "mvp", "led", "fsmt",
                    "mbart", "pegasus", "blenderbot", "m2m_100", "bigbird_pegasus", "nllb-moe")


__all__ = ["LayerLayout", "SUPPORTED_ARCHITECTURES", "DUAL_ENCODERS", "ENCODER_DECODERS"]
