"""attach() on tiny random transformers models of every supported family (no downloads).

The oracle is written the way SPEC section 2 states the placement, independently of attach()'s
one-hook design: a hook on the norm captures z (where a layer has no norm before the sub-layer,
hooks on the layer capture the residual stream), a hook on the sub-layer adds
``mix_reference(z, ...)`` (component-level: ``base(x) + mix_reference(x, ...)``) on a copy of
the model taken before attaching.
"""

from __future__ import annotations

import copy
import functools
import re
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from conftest import REL_TOL, assert_close_to_reference, rel_err  # noqa: E402
from mtlora_kernels import MTLoRAConfig, attach  # noqa: E402
from mtlora_kernels.integrations.hf import (  # noqa: E402
    ADAPTER_ATTR, DUAL_ENCODERS, ENCODER_DECODERS, SUPPORTED_ARCHITECTURES, _argument_index,
    _block_hook, _residual_hook, get_handle, normalized_layers)
from mtlora_kernels.losses import SpectralRegularizer, balance_loss  # noqa: E402
from mtlora_kernels.reference import balance_loss_reference, mix_reference  # noqa: E402

TOL = REL_TOL[torch.float32]
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


# Config fields beyond SMALL: tiny MoE blocks (4 experts, 2 per token), Granite's multiplier
# away from 1 (so that a test sees it), StableLM's parallel layout.
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=16)
# Multi-head latent attention (DeepSeek's, MiniCPM3's): tiny low-rank projections.
MLA = dict(kv_lora_rank=16, q_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
           v_head_dim=8, num_key_value_heads=4)
# Hybrid stacks: a Gated DeltaNet (or Kimi's delta attention) in layer 0, full attention in
# layer 1; tiny linear-attention heads.
HYBRID_LAYERS = dict(layer_types=["linear_attention", "full_attention"])
GATED_DELTA = dict(linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
                   linear_num_value_heads=4)
MAMBA = dict(mamba_d_state=8, mamba_d_conv=4, mamba_expand=2)
MAMBA2 = dict(MAMBA, mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=1, mamba_chunk_size=4)
GEMMA_PER_LAYER = dict(hidden_size_per_layer_input=8, vocab_size_per_layer_input=64)
# Speech and audio encoder-decoders: BART's names for the sizes, token ids inside the vocabulary.
_BART_SIZES = dict(d_model=32, encoder_attention_heads=4, decoder_attention_heads=4,
                   encoder_ffn_dim=64, decoder_ffn_dim=64)
_DECODING = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
EXTRA = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(MOE, num_experts=4, shared_expert_intermediate_size=32),
    "qwen3_moe": dict(MOE, num_experts=4),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2),
    "granite": dict(residual_multiplier=0.5),
    "stablelm": dict(use_parallel_residual=True),
    "stablelm-sequential": dict(use_parallel_residual=False),
    "gpt_neox-sequential": dict(use_parallel_residual=False),
    # Falcon's variants whose z differ: parallel on one norm (its default), LLaMA's layout,
    # parallel on two norms (ln_attn, ln_mlp).
    "falcon": dict(ffn_hidden_size=64),
    "falcon-sequential": dict(ffn_hidden_size=64, parallel_attn=False),
    "falcon-two_norms": dict(ffn_hidden_size=64, new_decoder_architecture=True, num_kv_heads=2),
    # MoE models that build a dense FFN in some layers: layer 0 dense, layer 1 MoE.
    "deepseek_v2": dict(**MOE, **MLA, n_routed_experts=4, n_shared_experts=1,
                        first_k_dense_replace=1),
    "deepseek_v3": dict(**MOE, **MLA, n_routed_experts=4, n_shared_experts=1,
                        first_k_dense_replace=1, n_group=2, topk_group=1),
    "glm4_moe": dict(MOE, n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1),
    "glm4_moe_lite": dict(**MOE, **MLA, n_routed_experts=4, n_shared_experts=1,
                          mlp_layer_types=["dense", "sparse"]),
    "dots1": dict(MOE, n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1),
    "exaone_moe": dict(MOE, num_experts=4, num_shared_experts=1,
                       mlp_layer_types=["dense", "sparse"]),
    "ernie4_5_moe": dict(moe_num_experts=4, moe_k=2, moe_intermediate_size=16,
                         moe_num_shared_experts=1, moe_layer_start_index=1),
    "mimo_v2_flash": dict(MOE, n_routed_experts=4, v_head_dim=8,
                          mlp_layer_types=["dense", "sparse"]),
    "cohere2_moe": dict(num_experts=4, num_experts_per_tok=2, num_shared_experts=1,
                        mlp_layer_types=["dense", "sparse"], prefix_dense_intermediate_size=64),
    # MoE in every layer.
    "minimax_m2": dict(num_local_experts=4, num_experts_per_tok=2),
    "phimoe": dict(num_local_experts=4, num_experts_per_tok=2),
    "solar_open": dict(MOE, n_routed_experts=4, n_shared_experts=1),
    "hunyuan_v1_moe": dict(num_experts=4, moe_topk=2),
    "flex_olmo": dict(num_experts=4, num_experts_per_tok=2),
    "granitemoe": dict(num_local_experts=4, num_experts_per_tok=2, residual_multiplier=0.5),
    "granitemoeshared": dict(num_local_experts=4, num_experts_per_tok=2, residual_multiplier=0.5,
                             shared_intermediate_size=16),
    # residual_scale = scale_depth / sqrt(2 layers) = 0.5
    "minicpm3": dict(**MLA, scale_depth=0.5 * 2 ** 0.5),
    "jetmoe": dict(num_local_experts=4, num_experts_per_tok=2, kv_channels=8),
    "youtu": dict(MLA),
    "mellum": dict(MOE, num_experts=4, mlp_layer_types=["dense", "sparse"]),
    "laguna": dict(MOE, num_experts=4, shared_expert_intermediate_size=16,
                   mlp_layer_types=["dense", "sparse"]),
    "minicpm5_moe": dict(MOE, n_routed_experts=4, n_shared_experts=1,
                         mlp_layer_types=["dense", "sparse"]),
    # DeepSeek-V3.2's indexer keeps 4 of the 7 keys: its sparse attention takes effect.
    "deepseek_v32": dict(**MOE, **MLA, n_routed_experts=4, n_shared_experts=1, n_group=2,
                         topk_group=1, mlp_layer_types=["dense", "sparse"], index_topk=4,
                         index_head_dim=16, index_n_heads=2),
    # Mistral 4 ropes qk_rope_head_dim of head_dim = qk_nope_head_dim + qk_rope_head_dim.
    "mistral4": dict(**MOE, **MLA, n_routed_experts=4, n_shared_experts=1,
                     first_k_dense_replace=1, head_dim=16),
    # Hybrid token mixers (HYBRID below): layer 0 linear attention, layer 1 full attention.
    "qwen3_next": dict(HYBRID_LAYERS, **GATED_DELTA, **MOE, num_experts=4,
                       shared_expert_intermediate_size=16, mlp_only_layers=[0]),
    "lara_mini": dict(HYBRID_LAYERS, **GATED_DELTA, **MOE, num_experts=4,
                      shared_expert_intermediate_size=16),
    "olmo_hybrid": dict(HYBRID_LAYERS, **GATED_DELTA),
    "qwen3_5": dict(HYBRID_LAYERS, **GATED_DELTA),
    "qwen3_5_moe": dict(HYBRID_LAYERS, **GATED_DELTA, **MOE, num_experts=4,
                        shared_expert_intermediate_size=16),
    "kimi_linear": dict(HYBRID_LAYERS, **MOE, **MLA, num_local_experts=4,
                        mlp_layer_types=["dense", "sparse"], linear_head_dim=8,
                        linear_num_heads=4),
    "bailing_hybrid": dict(HYBRID_LAYERS, **MOE, **MLA, num_local_experts=4, n_group=2,
                           topk_group=1, mlp_layer_types=["dense", "sparse"]),
    # Hybrid stacks with a state-space or convolution mixer (SSM_HYBRID below): layer 0 that
    # mixer, layer 1 attention; tiny Mamba mixers (Mamba-2's: 4 heads of 16); Jamba's and
    # LFM2-MoE's layer 1 MoE. Falcon-H1: its multipliers away from 1 (so that a test sees them).
    "jamba": dict(MAMBA, use_mamba_kernels=False, mamba_dt_rank=4, attn_layer_period=2,
                  attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
                  num_experts=4, num_experts_per_tok=2),
    "bamba": dict(MAMBA2, attn_layer_indices=[1]),
    "granitemoehybrid": dict(**MAMBA2, **HYBRID_LAYERS, num_local_experts=4,
                             num_experts_per_tok=2, shared_intermediate_size=16,
                             residual_multiplier=0.5),
    "granitemoehybrid-dense": dict(**MAMBA2, **HYBRID_LAYERS, num_local_experts=0,
                                   shared_intermediate_size=16, residual_multiplier=0.5),
    "lfm2": dict(layer_types=["conv", "full_attention"], block_auto_adjust_ff_dim=False),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"], num_dense_layers=1, num_experts=4,
                     num_experts_per_tok=2, moe_intermediate_size=16),
    "recurrent_gemma": dict(block_types=["recurrent", "attention"], lru_width=32,
                            attention_window_size=8, conv1d_width=4),
    "falcon_h1": dict(MAMBA2, mamba_d_ssm=64, attention_in_multiplier=0.7,
                      ssm_out_multiplier=0.5, attention_out_multiplier=0.8),
    # Nemotron-H: four blocks, one of each kind (Mamba-2, attention, MLP, MoE), by the pattern
    # its checkpoints' configs give; tiny Mamba-2 heads and experts.
    "nemotron_h": dict(hybrid_override_pattern="M*-E", mamba_num_heads=4, mamba_head_dim=16,
                       n_groups=1, ssm_state_size=8, chunk_size=4, n_routed_experts=4,
                       num_experts_per_tok=2, moe_intermediate_size=16,
                       moe_shared_expert_intermediate_size=16),
    # Llama 4: layer 1 MoE (intermediate_size is its experts', intermediate_size_mlp the dense).
    "llama4_text": dict(num_local_experts=4, num_experts_per_tok=1, moe_layers=[1],
                        intermediate_size=16, intermediate_size_mlp=64),
    "hyperclovax": dict(use_post_norm=True, residual_multiplier=0.5),
    # Gemma 4 and 3n with their per-layer inputs (8 wide); 3n's KV sharing off (it needs more
    # layers than two), Gemma 4's is off by default.
    "gemma4_text": dict(GEMMA_PER_LAYER, layer_types=["sliding_attention", "full_attention"]),
    "gemma4": dict(GEMMA_PER_LAYER, layer_types=["sliding_attention", "full_attention"]),
    "gemma3n_text": dict(GEMMA_PER_LAYER, layer_types=["sliding_attention", "full_attention"],
                         laurel_rank=4, num_kv_shared_layers=0),
    # Vision encoders: layer scales away from 1 (so that a test sees them; BEiT's default is
    # 0.1), stochastic depth on (a DropPath module where drop_path_rate 0 builds nn.Identity;
    # identity in eval), registers, BEiT's relative position bias; ViT-MAE keeps 2 of 4 patches.
    "dinov2": dict(layerscale_value=0.5, drop_path_rate=0.1),
    "dinov2_with_registers": dict(layerscale_value=0.5, drop_path_rate=0.1,
                                  num_register_tokens=2),
    "dinov3_vit": dict(layerscale_value=0.5, drop_path_rate=0.1, num_register_tokens=2),
    "beit": dict(layer_scale_init_value=0.5, drop_path_rate=0.1, use_relative_position_bias=True),
    "vit_mae": dict(mask_ratio=0.5),
    "siglip2_vision_model": dict(num_patches=4),  # 2x2 patches of 8x8 (SigLIP 2 has no image_size)
    "siglip2": dict(num_patches=4),
    # GPT-Neo: global attention in layer 0, local in layer 1; GPT-J's and CodeGen's rotary
    # dimensions within head_dim 8; ModernBERT's layer 1 attends in a window of 2 on each side;
    # AFMoE's layer 0 dense, layer 1 MoE.
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]], window_size=2),
    "gptj": dict(rotary_dim=4),
    "codegen": dict(rotary_dim=4),
    "modernbert": dict(local_attention=4, cls_token_id=1, sep_token_id=2),
    "afmoe": dict(MOE, num_experts=4, num_shared_experts=1, num_dense_layers=1),
    # OPT and XGLM: a tiny FFN (their defaults are 3072 and 4096 wide); OPT-350m's post-LN
    # variant (POST_LN_OPT below).
    "opt": dict(ffn_dim=64),
    "opt-post_ln": dict(ffn_dim=64, do_layer_norm_before=False),
    "xglm": dict(ffn_dim=64),
    # Post-LN encoders: DeBERTa's disentangled (relative) attention on; DistilBERT's FFN width.
    "deberta": dict(relative_attention=True, pos_att_type=["c2p", "p2c"]),
    "deberta-v2": dict(relative_attention=True, pos_att_type=["c2p", "p2c"], position_buckets=8),
    "distilbert": dict(hidden_dim=64),
    # LUKE's entity embeddings and RoCBERT's pronunciation and shape embeddings small (their
    # defaults hold 128M and 13M parameters).
    "luke": dict(entity_vocab_size=16, entity_emb_size=16),
    "roc_bert": dict(pronunciation_vocab_size=16, pronunciation_embed_dim=8, shape_vocab_size=16,
                     shape_embed_dim=8),
    # ESM-2's rotary position embeddings (ESM-1b's absolute ones are the default).
    "esm": dict(position_embedding_type="rotary", pad_token_id=1),
    # Encoder-decoders (SEQ2SEQ below): Flan-T5's gated-GELU FFN; LongT5's transient-global
    # encoder attention (its default is local), blocks of 2 tokens; Switch Transformers: layer 1
    # of each stack an MoE block of 4 experts, layer 0 dense.
    "t5-gated": dict(feed_forward_proj="gated-gelu"),
    "longt5-tglobal": dict(encoder_attention_type="transient-global", global_block_size=2,
                           local_radius=2),
    "switch_transformers": dict(num_experts=4, expert_capacity=8, num_sparse_encoder_layers=1,
                                num_sparse_decoder_layers=1),
    # More text and document encoders (POST_LN, LLAMA_LIKE): BigBird's block-sparse
    # attention in blocks of 2 with one random block (its 16 tokens, SEQ_LEN, are enough for it:
    # fewer, and the model falls back to full attention); Longformer's windows of 4 (the model
    # pads 7 tokens to 8); Nystromformer's 4 landmarks over 8 tokens (its approximation on: at
    # num_landmarks == tokens it computes full attention); LayoutLMv3's box embeddings and
    # patches (4 of 8x8 in a 16x16 image) sized to the width; AltCLIP's projection small;
    # X-MOD with two languages (tiny_inputs gives each sequence another).
    "big_bird": dict(attention_type="block_sparse", block_size=2, num_random_blocks=1),
    "longformer": dict(attention_window=4),
    "nystromformer": dict(num_landmarks=4, segment_means_seq_len=8),
    "layoutlmv3": dict(coordinate_size=6, shape_size=4, input_size=16, patch_size=8,
                       max_2d_position_embeddings=64),
    "altclip_text_model": dict(project_dim=16),
    "xmod": dict(languages=["en_XX", "de_DE"]),
    # Speech and audio models (AUDIO below): 32 wide, 4 heads, FFNs 64 wide, tiny inputs. Whisper,
    # Qwen2-Audio's and Voxtral's encoders: 8 mel bins, 16 frames (two convolutions, the second of
    # stride 2: 8 positions); Whisper's token suppression off (its defaults are ids of the real
    # vocabulary). Speech2Text: 8 features a frame, two subsampling convolutions 16 channels wide.
    # The wav2vec 2.0 family: a two-layer convolutional feature encoder 8 channels wide (kernels 8
    # and 4, strides 4 and 2: 160 samples make 18 frames), a small convolutional position
    # embedding; "-stable": do_stable_layer_norm, the pre-LN layer class. MusicGen's decoders: two
    # codebooks. AST: 8x8 spectrograms in 4x4 patches.
    **dict.fromkeys(["whisper", "whisper-classifier"], dict(
        _BART_SIZES, vocab_size=64, num_mel_bins=8, max_source_positions=8,
        max_target_positions=32, suppress_tokens=None, begin_suppress_tokens=None,
        classifier_proj_size=16, **_DECODING)),
    "speech_to_text": dict(_BART_SIZES, vocab_size=64, input_feat_per_channel=8, input_channels=1,
                           conv_channels=16, conv_kernel_sizes=(3, 3), max_source_positions=32,
                           max_target_positions=32, **_DECODING),
    "moonshine": dict(vocab_size=64, hidden_size=32, intermediate_size=64,
                      encoder_num_attention_heads=4, decoder_num_attention_heads=4,
                      max_position_embeddings=32, **_DECODING),
    "qwen2_audio_encoder": dict(d_model=32, encoder_attention_heads=4, encoder_ffn_dim=64,
                                num_mel_bins=8, max_source_positions=8),
    "voxtral_encoder": dict(hidden_size=32, num_attention_heads=4, intermediate_size=64,
                            num_mel_bins=8, max_source_positions=8),
    **dict.fromkeys(["musicgen_decoder", "musicgen_melody_decoder"], dict(
        hidden_size=32, num_attention_heads=4, ffn_dim=64, num_codebooks=2, vocab_size=64,
        max_position_embeddings=32, pad_token_id=0, bos_token_id=1)),
    **{f: dict(SMALL, vocab_size=16, conv_dim=(8, 8), conv_kernel=(8, 4), conv_stride=(4, 2),
               num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2,
               **(dict(do_stable_layer_norm=True) if f.endswith("-stable") else {}),
               **(dict(conv_pos_kernel_size=3) if f == "data2vec-audio" else {}))
       for f in ["wav2vec2", "wav2vec2-stable", "hubert", "hubert-stable", "wavlm", "wavlm-stable",
                 "unispeech", "unispeech-stable", "unispeech-sat", "unispeech-sat-stable",
                 "data2vec-audio", "sew", "sew-d"]},
    "audio-spectrogram-transformer": dict(SMALL, patch_size=4, frequency_stride=4, time_stride=4,
                                          max_length=8, num_mel_bins=8),
    # BART's lineage (BART_SEQ2SEQ below): LED's local attention window 4 tokens wide (the model
    # pads the source to 8), its positions few; BigBird-Pegasus' full attention (its block-sparse
    # default falls back to it on inputs this short, with a warning), and its block-sparse attention
    # in blocks of 2 (tiny_inputs: a longer source); FSMT's source vocabulary and languages;
    # NLLB-MoE: layer 1 of each stack an MoE block of 4 experts, layer 0 dense.
    "led": dict(attention_window=4, max_encoder_position_embeddings=32,
                max_decoder_position_embeddings=32),
    "bigbird_pegasus": dict(attention_type="original_full"),
    "bigbird_pegasus-block_sparse": dict(attention_type="block_sparse", block_size=2,
                                         num_random_blocks=1),
    "fsmt": dict(src_vocab_size=64, langs=["en", "de"]),
    "mvp-prompt": dict(use_prompt=True, prompt_length=3, prompt_mid_dim=16),
    "nllb-moe": dict(num_experts=4, expert_capacity=8, encoder_sparse_step=2,
                     decoder_sparse_step=2),
    # Older and non-transformer decoders: tiny state-space mixers (Mamba-2's: 4 heads of 16); RWKV
    # without its eval-mode rescaling (which attach refuses) and without its state in a plain
    # forward (its default in eval: the state's in-place updates leave transformers' own model
    # unable to backpropagate there; generate asks for it); xLSTM's q/k and v widths already
    # multiples of its rounding (its cache assumes so); tiny FFNs where the defaults are wide;
    # CPM-Ant's 2 prompt tokens (it uses prompt type 2, segment type 2); GIT's vision tower tiny
    # (unused by the text-only inputs).
    "mamba": dict(state_size=8, conv_kernel=4, expand=2),
    "mamba2": dict(state_size=8, conv_kernel=4, expand=2, num_heads=4, head_dim=16, n_groups=1,
                   chunk_size=4),
    "falcon_mamba": dict(state_size=8, conv_kernel=4, expand=2),
    "rwkv": dict(attention_hidden_size=32, rescale_every=0, use_cache=False),
    "xlstm": dict(hidden_size=64, qk_dim_factor=1.0, num_heads=4, ffn_round_up_to_multiple_of=16),
    "openai-gpt": dict(n_embd=32, n_layer=2, n_head=4, n_positions=32),
    "ctrl": dict(n_embd=32, n_layer=2, n_head=4, dff=64, n_positions=32),
    "cpmant": dict(num_attention_heads=4, dim_head=8, dim_ff=64, prompt_length=2, prompt_types=3,
                   segment_types=3, position_bias_num_buckets=32,
                   position_bias_max_distance=64),
    "trocr": dict(d_model=32, decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=64),
    "git": dict(vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, image_size=16, patch_size=8)),
    # transformers 5.25's decoder-only additions: layer 0 dense, layer 1 MoE where the
    # type mixes them; hybrids with one layer of each mixer.
    "sarvam_mla": dict(**MOE, **MLA, n_routed_experts=4, n_shared_experts=1,
                       first_k_dense_replace=1, n_group=2, topk_group=1),
    "sarvam_moe": dict(MOE, n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1),
    "param2moe": dict(MOE, n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1),
    "glm_moe_dsa": dict(**MOE, **MLA, n_routed_experts=4, n_shared_experts=1, n_group=2,
                        topk_group=1, mlp_layer_types=["dense", "sparse"], index_topk=4,
                        index_head_dim=16, index_n_heads=2),
    "hy_v3": dict(MOE, num_experts=4, num_shared_experts=1, mlp_layer_types=["dense", "sparse"]),
    "axk1": dict(**MOE, **MLA, n_routed_experts=4, n_shared_experts=1, n_group=2, topk_group=1,
                 mlp_layer_types=["dense", "sparse"]),
    "axk2": dict(**MOE, **MLA, n_routed_experts=4, n_shared_experts=1, n_group=2, topk_group=1,
                 mlp_layer_types=["dense", "sparse"], index_topk=4, index_head_dim=16,
                 index_n_heads=2, gated_norm_rank=4),
    "flint": dict(MOE, num_experts=4, shared_expert_intermediate_size=16, mlp_only_layers=[0]),
    "dots3_note_text": dict(**MOE, **MLA, n_routed_experts=4, n_shared_experts=1, n_group=2,
                            topk_group=1, mlp_layer_types=["dense", "sparse"], index_topk=4,
                            index_head_dim=16, index_n_heads=2),
    # Doge: eager attention (SDPA, given its float dynamic mask, takes another kernel once an
    # input needs grad, which moves the outputs by an ulp); its CDMoE's experts a 4x4 grid.
    "doge": dict(is_moe=False, attn_implementation="eager"),
    "doge-moe": dict(is_moe=True, num_experts=16, num_experts_per_tok=2,
                     attn_implementation="eager"),
    "emu3_text_model": dict(pad_token_id=0),
    "modernbert-decoder": dict(pad_token_id=0, local_attention=4),
    # Kind 3: Granite's multiplier, MiniMax's beta factors away from 1 (so that a test
    # sees them); MiniMax: layer 0 lightning (linear) attention, layer 1 full attention.
    "granite_swa": dict(residual_multiplier=0.5),
    "granitemoe_swa": dict(num_local_experts=4, num_experts_per_tok=2, residual_multiplier=0.5,
                           shared_intermediate_size=16),
    "minimax": dict(num_local_experts=4, num_experts_per_tok=2, block_size=4,
                    layer_types=["linear_attention", "full_attention"],
                    linear_attn_alpha_factor=0.9, linear_attn_beta_factor=0.5,
                    full_attn_alpha_factor=1.1, full_attn_beta_factor=0.7, mlp_alpha_factor=0.8,
                    mlp_beta_factor=0.6),
    "kolibri1": dict(MOE, num_experts=4, shared_expert_intermediate_size=16),
    # Kolibri 1.1 rounds keys and values to NVFP4 in blocks of 16: heads of 16.
    "kolibri1_1": dict(MOE, num_experts=4, shared_expert_intermediate_size=16,
                       mlp_only_layers=[0], mlp_only_intermediate_size=64,
                       num_attention_heads=2, head_dim=16, num_key_value_heads=1,
                       layer_types=["sliding_attention", "indexed_attention"], sliding_window=4,
                       index_num_heads=2, index_topk=4, index_pool_size=16, index_compression=4,
                       index_num_local_tokens=2, index_num_sink_tokens=1),
    "lfm3": dict(layer_types=["conv", "full_attention"]),
    "beam": dict(MOE, num_experts=4, mlp_layer_types=["dense", "sparse"], n_group=2,
                 topk_group=1),
    "ergo": dict(MOE, num_experts=4, shared_intermediate_size=16,
                 mlp_layer_types=["dense", "sparse"], first_dense_intermediate_size=64),
    "inkling_text": dict(MOE, n_routed_experts=4, n_shared_experts=1,
                         mlp_layer_types=["dense", "sparse"]),
    "zaya": dict(num_experts=4, num_experts_per_tok=1, moe_intermediate_size=16),
    # Hyper-connected layers (HYPER_CONNECTED): DeepSeek-V4's and HY-V4's 2 streams;
    # DeepSeek-V4: layer 0 hash-routed, layer 1 top-k routed, compressed attention in both;
    # HY-V4: layer 0 dense, layer 1 MoE.
    "deepseek_v4": dict(MOE, n_routed_experts=4, n_shared_experts=1, num_key_value_heads=1,
                        head_dim=16, q_lora_rank=16, o_groups=2, o_lora_rank=16, hc_mult=2,
                        hc_sinkhorn_iters=3, sliding_window=4, index_n_heads=2,
                        index_head_dim=16, index_topk=2, partial_rotary_factor=0.5,
                        layer_types=["heavily_compressed_attention",
                                     "compressed_sparse_attention"],
                        compress_rates={"compressed_sparse_attention": 2,
                                        "heavily_compressed_attention": 4},
                        mlp_layer_types=["hash_moe", "moe"]),
    "hy_v4": dict(**MOE, **MLA, n_routed_experts=4, n_shared_experts=1, hc_mult=2,
                  index_topk=4, index_head_dim=16, index_n_heads=2, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2),
    # Qwen4-Exp's language model: 2 streams; a Gated DeltaNet in layer 0, full attention in
    # layer 1; its per-layer n-gram embeddings (PLE) small, in layer 0 alone (1-based ids).
    "qwen4_exp_text": dict(HYBRID_LAYERS, **GATED_DELTA, **MOE, num_experts=4,
                           shared_expert_intermediate_size=16, hc_count=2, hc_lowrank=8,
                           ple_layer_ids=[1], ple_embed_dim=8, ngram_vocab_size_base=64,
                           heads_per_ngram=2, split_ngram_parts=2,
                           make_ngram_vocab_size_divisible_by=8, indexer_n_heads=2,
                           indexer_kv_heads=1, indexer_head_dim=8, indexer_budget=4,
                           indexer_compress_ratio=2),
    # Dory: one layer run once, one looped twice, one run once (its default sections are 8
    # layers each, more than a tiny model's).
    "dory": dict(num_hidden_layers=3, n_input_layers=1, n_recurrent_layers=1, n_output_layers=1,
                 n_recurrent_loops=2),
    "cohere_compass_text": dict(
        layer_types=["sliding_attention", "full_attention"], sliding_window=4,
        rope_parameters={t: dict(rope_type="default", rope_theta=10000.0)
                         for t in ("sliding_attention", "full_attention")}),
}


def _away_from_init(model: nn.Module, names: tuple[str, ...], scale: float, shift: float) -> None:
    """Parameters whose init leaves a transform an identity (ZAYA's residual scales, ones) or near
    one (Inkling's short convolutions, x + conv(x) with tiny weights): ``shift + scale * N(0,
    1)``, drawn from a fixed seed, so that a test sees the transform."""
    g = torch.Generator().manual_seed(5)
    for n, p in model.named_parameters():
        if n.endswith(names):
            p.copy_(shift + scale * torch.randn(p.shape, generator=g))


# Set away from their init values after building (tiny_model), so that a test sees them.
AWAY_FROM_INIT = {
    "zaya": lambda m: _away_from_init(m, ("hidden_states_scale",), 0.3, 0.5),
    **dict.fromkeys(["inkling_text", "inkling_mm_model"],
                    lambda m: _away_from_init(m, ("sconv.conv1d.weight",), 0.5, 0.0)),
}
# Types whose config derives head_dim (a read-only property there).
DERIVED_HEAD_DIM = {"falcon"}
# Types transformers' AutoModelForCausalLM does not map (it builds Mistral 4 inside Mistral 3).
CAUSAL_LM = {"mistral4": "Mistral4ForCausalLM", "emu3_text_model": "Emu3ForCausalLM"}
# Encoder-decoders: tiny_model builds their conditional-generation model from these fields
# (T5's names; ``layers`` blocks in each stack), tiny_inputs feeds decoder_input_ids too.
SEQ2SEQ = ["t5", "t5-gated", "mt5", "umt5", "longt5", "longt5-tglobal", "switch_transformers",
           "pop2piano", "t5gemma"]
# T5Gemma (Gemma 2's layer in each stack, post-norms: kind 3): a 32-wide encoder, a 16-wide
# decoder. The others are T5's block (kind 1).
POST_NORM_SEQ2SEQ = ["t5gemma"]
T5_BLOCKS = [f for f in SEQ2SEQ if f not in POST_NORM_SEQ2SEQ]
_T5GEMMA_STACK = dict(intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=8, vocab_size=64, max_position_embeddings=32)
_SEQ2SEQ_FIELDS = dict(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_heads=4,
                       decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
# Encoder-decoders of BART's lineage (two layer classes, an FFN of loose fc1 ... fc2): tiny_model
# builds their conditional-generation model from these fields (BART's names; ``layers`` layers
# in each stack), tiny_inputs feeds decoder_input_ids too. Post-LN (BART's) and pre-LN
# (mBART's) layers; BART_DECODER: the decoder alone (a causal LM, one stack; tiny_inputs: token
# ids).
BART_POST_LN = ["bart", "marian", "blenderbot-small", "plbart", "mvp", "mvp-prompt", "led",
                "fsmt"]
BART_PRE_LN = ["mbart", "pegasus", "blenderbot", "m2m_100", "bigbird_pegasus",
               "bigbird_pegasus-block_sparse", "nllb-moe"]
BART_SEQ2SEQ = BART_POST_LN + BART_PRE_LN
BART_DECODER = {"bart-causal": "BartForCausalLM"}
_BART_FIELDS = dict(vocab_size=64, d_model=32, encoder_attention_heads=4,
                    decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                    max_position_embeddings=32, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                    decoder_start_token_id=2, forced_eos_token_id=None)
# Text encoders: model_type -> the model class tiny_model builds (its last hidden states).
ENCODERS = {"modernbert": "ModernBertModel", "eurobert": "EuroBertModel"}
# More encoders whose model class tiny_model builds by name (AutoModel maps no class to the text
# towers' types).
MORE_ENCODERS = {"ultrabert": "UltrabertModel", "clip_text_model": "CLIPTextModel",
                 "align_text_model": "AlignTextModel", "altclip_text_model": "AltCLIPTextModel",
                 "chinese_clip_text_model": "ChineseCLIPTextModel",
                 "clap_text_model": "ClapTextModel", "blip_text_model": "BlipTextModel"}
# Speech and audio models: family -> (the model class tiny_model builds, its config's fields that
# count layers: an encoder-decoder's two, ``layers`` each; the other fields EXTRA's); the
# inputs tiny_inputs gives them (AUDIO_INPUTS: input_features, input_values or a decoder's
# codebook ids; the encoder-decoders, AUDIO_SEQ2SEQ, decoder_input_ids too).
_NUM = ("num_hidden_layers",)
AUDIO = {
    "whisper": ("WhisperForConditionalGeneration", ("encoder_layers", "decoder_layers")),
    "whisper-classifier": ("WhisperForAudioClassification", ("encoder_layers", "decoder_layers")),
    "speech_to_text": ("Speech2TextForConditionalGeneration", ("encoder_layers",
                                                               "decoder_layers")),
    "moonshine": ("MoonshineForConditionalGeneration", ("encoder_num_hidden_layers",
                                                        "decoder_num_hidden_layers")),
    "qwen2_audio_encoder": ("Qwen2AudioEncoder", ("encoder_layers",)),
    "voxtral_encoder": ("VoxtralEncoder", _NUM),
    "musicgen_decoder": ("MusicgenForCausalLM", _NUM),
    "musicgen_melody_decoder": ("MusicgenMelodyForCausalLM", _NUM),
    **{f: ("AutoModel", _NUM) for f in [
        "wav2vec2", "wav2vec2-stable", "hubert", "hubert-stable", "wavlm", "wavlm-stable",
        "unispeech", "unispeech-stable", "unispeech-sat", "unispeech-sat-stable", "data2vec-audio",
        "sew", "sew-d"]},
    "audio-spectrogram-transformer": ("ASTModel", _NUM),
}
AUDIO_SEQ2SEQ = ["whisper", "speech_to_text", "moonshine"]
# The wav2vec 2.0 family's default layer class is post-LN (kind 4), DistilBERT's shape; the
# others (the "-stable" variants' class, MusicGen's decoders with loose fc1 ... fc2, ...) are
# pre-LN (kind 1).
AUDIO_POST_LN = ["wav2vec2", "hubert", "wavlm", "unispeech", "unispeech-sat", "data2vec-audio",
                 "sew", "sew-d"]
AUDIO_PRE_LN = [f for f in AUDIO if f not in AUDIO_POST_LN]
# family -> (input name, shape): Whisper's log-mel features [batch, mel bins, frames], Speech2Text's
# [batch, frames, features], raw audio [batch, samples], MusicGen's codebook ids [batch x
# codebooks, tokens], AST's spectrogram [batch, frames, mel bins].
AUDIO_INPUTS = {
    **dict.fromkeys(["whisper", "whisper-classifier", "qwen2_audio_encoder", "voxtral_encoder"],
                    ("input_features", (2, 8, 16))),
    "speech_to_text": ("input_features", (2, 16, 8)),
    "moonshine": ("input_values", (2, 2000)),
    **dict.fromkeys(["musicgen_decoder", "musicgen_melody_decoder"], ("input_ids", (4, 7))),
    **{f: ("input_values", (2, 160)) for f, (c, _) in AUDIO.items() if c == "AutoModel"},
    "audio-spectrogram-transformer": ("input_values", (2, 8, 8)),
}

# Vision encoders: model_type -> the model class tiny_model builds (SMALL's fields, 16x16 images
# of 8x8 patches). The dual encoders (DUAL): their image classifiers, which hold the vision tower
# alone (the dual encoder itself, a text tower of the same layer class beside it, is refused).
VISION_CLASSES = {
    "vit": "ViTModel", "deit": "DeiTModel", "vit_msn": "ViTMSNModel", "vit_mae": "ViTMAEModel",
    "ijepa": "IJepaModel", "dinov2": "Dinov2Model",
    "dinov2_with_registers": "Dinov2WithRegistersModel", "dinov3_vit": "DINOv3ViTModel",
    "beit": "BeitModel", "aimv2_vision_model": "Aimv2VisionModel",
    "clip_vision_model": "CLIPVisionModel", "metaclip_2_vision_model": "MetaClip2VisionModel",
    "siglip_vision_model": "SiglipVisionModel", "siglip2_vision_model": "Siglip2VisionModel",
    "mlcd_vision_model": "MLCDVisionModel",
    "clip": "CLIPForImageClassification", "metaclip_2": "MetaClip2ForImageClassification",
    "siglip": "SiglipForImageClassification", "siglip2": "Siglip2ForImageClassification"}
# Dual encoders -> their vision_config's model_type, the table's entry attach uses.
DUAL = {"clip": "clip_vision_model", "metaclip_2": "metaclip_2_vision_model",
        "siglip": "siglip_vision_model", "siglip2": "siglip2_vision_model"}

# Multimodal models (model_type -> their text_config's model_type, the table's entry attach
# uses): a tiny vision tower beside a tiny language model of the text config below. Their
# vision configs (16 wide, one layer, 16x16 or 32x32 images), and Qwen-VL's M-RoPE sections
# for head_dim 8 (the default sections are for head_dim 128).
MULTIMODAL = {"gemma3": "gemma3_text", "llava": "llama", "mistral3": "mistral",
              "qwen2_vl": "qwen2_vl_text", "qwen2_5_vl": "qwen2_5_vl_text",
              "qwen3_vl": "qwen3_vl_text", "qwen3_vl_moe": "qwen3_vl_moe_text",
              "qwen3_5": "qwen3_5_text", "qwen3_5_moe": "qwen3_5_moe_text",
              "gemma4": "gemma4_text",
              "fuyu": "persimmon",  # no vision layers: image patches enter by one Linear
              "qwen4_exp": "qwen4_exp_text", "lfm3_vl": "lfm3", "emu3": "emu3_text_model",
              "dots3_note": "dots3_note_text", "apertus1p5": "apertus1p5_text",
              "cohere_compass": "cohere_compass_text", "inkling_mm_model": "inkling_text"}
# Emu3's image tokenizer, a VQ-VAE: 32 channels in two stages (16x16 images: 8x8 codes, 8 of
# them, each a text token id beside the ones tiny_inputs draws).
_EMU3_VQ = dict(codebook_size=8, embed_dim=4, latent_channels=4, base_channels=32,
                channel_multiplier=[1, 1], num_res_blocks=1, attn_resolutions=[],
                temporal_downsample_factor=2, hidden_size=32, num_attention_heads=1)
_EMU3_VOCABULARY = {**{f"<|visual token {i:06d}|>": 40 + i for i in range(8)},
                    "<image>": 60, "<|extra_200|>": 61}
# Apertus 1.5's: an image tokenizer of the same kind (8 codes: ids 40..47) and a WavTokenizer
# audio encoder (8 codes: ids 48..55), tiny.
_APERTUS1P5_TOKENIZERS = dict(
    vision_config=dict(codebook_size=8, embed_dim=4, latent_channels=4, base_channels=32,
                       channel_multiplier=[1, 1], num_res_blocks=1, attn_resolutions=[],
                       resolution=16),
    audio_config=dict(model_type="wavtokenizer_encoder", num_filters=4, upsampling_ratios=[2, 2],
                      hidden_size=16, codebook_size=8, codebook_dim=16, num_lstm_layers=1),
    image_token_offset=40, audio_token_offset=48, image_token_id=60, audio_token_id=61)
_VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
               image_size=16, patch_size=8)
_QWEN_VISION = dict(depth=1, embed_dim=16, hidden_size=16, num_heads=2, intermediate_size=32,
                    out_hidden_size=32, patch_size=4, temporal_patch_size=2,
                    spatial_merge_size=2, window_size=8, fullatt_block_indexes=[0],
                    num_position_embeddings=16, deepstack_visual_indexes=[0])
# Qwen3.5's vision tower: Qwen3-VL's without deepstack (nor Qwen2.5-VL's windows).
_QWEN3_5_VISION = {k: v for k, v in _QWEN_VISION.items() if k not in (
    "window_size", "fullatt_block_indexes", "deepstack_visual_indexes")}
# Gemma 4's: 4x4 patches, pooled 2x2.
_GEMMA4_VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, head_dim=8, patch_size=4,
                      pooling_kernel_size=2, position_embedding_size=16)
_QWEN_TOKENS = dict(image_token_id=60, video_token_id=61, vision_start_token_id=62,
                    vision_end_token_id=63)  # beside the ids tiny_inputs draws (0..59)


def _mrope(interleaved: bool) -> dict:
    """M-RoPE sections for head_dim 8; Qwen3-VL's interleaved (a field Qwen2-VL's config does
    not know, and warns about)."""
    rope = dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 1, 1])
    return dict(rope_parameters=dict(rope, mrope_interleaved=True) if interleaved else rope)


def multimodal_config(family: str, text: dict):
    """The config of the tiny multimodal model ``family`` around the text config ``text``."""
    if family == "gemma3":  # the image token past the text ids
        return transformers.Gemma3Config(text_config=text, mm_tokens_per_image=4,
                                         image_token_id=64, vision_config=_VISION)
    if family == "llava":
        return transformers.LlavaConfig(
            text_config=dict(text, model_type="llama"), image_token_id=63,
            vision_config=dict(_VISION, model_type="clip_vision_model", projection_dim=16))
    if family == "mistral3":  # 32x32: 4 tokens after the 2x2 patch merger
        return transformers.Mistral3Config(
            text_config=dict(text, model_type="mistral"), image_token_id=63,
            vision_config=dict(_VISION, model_type="pixtral", head_dim=8, image_size=32))
    if family == "gemma4":  # no audio tower; its model swaps the image tokens for pad_token_id
        return transformers.Gemma4Config(
            text_config=dict(text, model_type="gemma4_text", pad_token_id=0), audio_config=None,
            vision_config=_GEMMA4_VISION, image_token_id=64, video_token_id=65, boi_token_id=66,
            eoi_token_id=67, audio_token_id=None, boa_token_id=None, eoa_token_index=None)
    if family == "fuyu":  # 8x8 patches, the image token past the text ids
        return transformers.FuyuConfig(text_config=dict(text, model_type="persimmon"),
                                       image_size=16, patch_size=8, image_token_id=63)
    if family == "qwen3_vl_moe":  # layer 0 dense, layer 1 MoE
        text = dict(text, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                    mlp_only_layers=[0])
    if family == "dots3_note":  # one dense vision layer of 4x4 patches; a tiny audio tower too
        return transformers.Dots3NoteConfig(
            text_config=dict(text, model_type="dots3_note_text", **EXTRA["dots3_note_text"]),
            vision_config=dict(_VISION, patch_size=4, mlp_layer_types=["dense"],
                               adapter_in_dim=16, adapter_out_dim=32),
            audio_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                              num_attention_heads=2, downsample_hidden_size=8, feature_size=16,
                              adapter_input_size=16, adapter_out_dim=32),
            image_token_id=60, video_token_id=61, audio_token_id=62)
    if family == "inkling_mm_model":  # an MLP of 2x2 patches of 2 frames: 3 layers, each
        # folding one factor of 2 (with fewer, transformers plans the folds with scipy)
        return transformers.InklingConfig(
            text_config=dict(text, model_type="inkling_text", **EXTRA["inkling_text"]),
            vision_config=dict(patch_size=2, temporal_patch_size=2, num_hidden_layers=3),
            audio_config=dict(n_mel_bins=4, mel_vocab_size=8), image_token_id=60,
            audio_token_id=61, image_bos_token_id=62, audio_bos_token_id=63)
    if family == "cohere_compass":  # Qwen3-VL's vision tower; M-RoPE sections per layer type
        rope = dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 1, 1])
        return transformers.CohereCompassConfig(
            text_config=dict(text, model_type="cohere_compass_text",
                             **dict(EXTRA["cohere_compass_text"], rope_parameters={
                                 t: rope for t in ("sliding_attention", "full_attention")})),
            vision_config=_QWEN_VISION, **_QWEN_TOKENS)
    if family == "apertus1p5":
        return transformers.Apertus1p5Config(
            text_config=dict(text, model_type="apertus1p5_text"), **_APERTUS1P5_TOKENIZERS)
    if family == "emu3":
        return transformers.Emu3Config(
            text_config=dict(text, model_type="emu3_text_model", **EXTRA["emu3_text_model"]),
            vq_config=_EMU3_VQ, vocabulary_map=_EMU3_VOCABULARY)
    if family == "lfm3_vl":  # Qwen-VL's 4x4 patches of 2 frames: one short-convolution layer
        return transformers.Lfm3VlConfig(
            text_config=dict(text, model_type="lfm3", **EXTRA["lfm3"]), projector_hidden_size=32,
            vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=2, patch_size=4),
            **_QWEN_TOKENS)
    if family == "qwen4_exp":  # its language model: EXTRA's tiny hyper-connected hybrid
        text = dict(text, **EXTRA["qwen4_exp_text"])
    interleaved = family.startswith(("qwen3", "qwen4"))
    vision = _QWEN3_5_VISION if family.startswith(("qwen3_5", "qwen4")) else _QWEN_VISION
    return transformers.AutoConfig.for_model(
        family, text_config=dict(text, **_mrope(interleaved)), vision_config=vision,
        **_QWEN_TOKENS)


def vision_config(family: str, layers: int = 2, text: dict | None = None, **config):
    """The config of ``family``'s tiny vision model (VISION_CLASSES): SMALL's fields, 16x16
    images of 8x8 patches, EXTRA's and ``config``'s fields over them; a dual encoder's with them
    as its vision_config, ``text`` its text_config (default the config class's, wider: unused by
    its image classifier)."""
    fields = {**SMALL, "num_hidden_layers": layers, "image_size": 16, "patch_size": 8,
              **EXTRA.get(family, {}), **config}
    if family in DUAL:
        fields = dict(vision_config=fields, **({} if text is None else dict(text_config=text)))
    return transformers.AutoConfig.for_model(family, **fields)


def model_type(family: str) -> str:
    """The model_type of a tested ``family``: the name itself, or a variant's before its last '-'
    ('stablelm-sequential': StableLM without use_parallel_residual, EXTRA's fields); a table type
    with a '-' of its own (xlm-roberta, deberta-v2) is a name itself."""
    base, dash, _ = family.rpartition("-")
    return base if dash and family not in SUPPORTED_ARCHITECTURES else family


def tiny_model(family: str, seed: int = 0, layers: int = 2, **config) -> nn.Module:
    """A tiny random model of ``family`` (a model_type, or a variant of one: :func:`model_type`),
    built from a config (``config``: fields over EXTRA's): no download."""
    torch.manual_seed(seed)
    small = {**SMALL, "num_hidden_layers": layers}
    if family in AUDIO:
        cls, counts = AUDIO[family]
        cfg = transformers.AutoConfig.for_model(
            model_type(family), **{**EXTRA[family], **dict.fromkeys(counts, layers), **config})
        if cls == "AutoModel":
            return transformers.AutoModel.from_config(cfg).eval()
        return getattr(transformers, cls)(cfg).eval()
    if family in VISION_CLASSES:
        cfg = vision_config(family, layers, **config)
        return getattr(transformers, VISION_CLASSES[family])(cfg).eval()
    # head_dim fixed (Qwen3's and Gemma's default to 128 / 256); token ids inside the vocabulary
    # (LLaMA's defaults: its tiny model stays the one the other test files were written with).
    text = {**small, "vocab_size": 64, "num_key_value_heads": 2, "max_position_embeddings": 32,
            "head_dim": small["hidden_size"] // small["num_attention_heads"],
            "pad_token_id": None, "bos_token_id": 1, "eos_token_id": 2, **EXTRA.get(family, {}),
            **config}
    if model_type(family) in DERIVED_HEAD_DIM:
        del text["head_dim"]
    if family == "t5gemma":
        cfg = transformers.T5GemmaConfig(
            encoder=dict(_T5GEMMA_STACK, hidden_size=32, num_hidden_layers=layers),
            decoder=dict(_T5GEMMA_STACK, hidden_size=16, num_hidden_layers=layers), **config)
        return transformers.T5GemmaForConditionalGeneration(cfg).eval()
    if family in SEQ2SEQ:
        cfg = transformers.AutoConfig.for_model(
            model_type(family), **_SEQ2SEQ_FIELDS, num_layers=layers, num_decoder_layers=layers,
            **EXTRA.get(family, {}), **config)
        if family == "pop2piano":  # not in AutoModelForSeq2SeqLM's map
            return transformers.Pop2PianoForConditionalGeneration(cfg).eval()
        return transformers.AutoModelForSeq2SeqLM.from_config(cfg).eval()
    if family in BART_SEQ2SEQ or family in BART_DECODER:
        cfg = transformers.AutoConfig.for_model(
            model_type(family), **_BART_FIELDS, encoder_layers=layers, decoder_layers=layers,
            **EXTRA.get(family, {}), **config)
        if family in BART_DECODER:
            return getattr(transformers, BART_DECODER[family])(cfg).eval()
        return transformers.AutoModelForSeq2SeqLM.from_config(cfg).eval()
    if family in MULTIMODAL:
        model = transformers.AutoModelForImageTextToText.from_config(
            multimodal_config(family, text))
        if family in AWAY_FROM_INIT:
            with torch.no_grad():
                AWAY_FROM_INIT[family](model)
        return model.eval()
    if family in POST_LN + PRE_LN_OUTPUT + LANG_ADAPTER:  # encoders: BertModel, ...
        cfg = transformers.AutoConfig.for_model(family, **small, vocab_size=64,
                                                max_position_embeddings=32,
                                                **EXTRA.get(family, {}), **config)
        if family in MORE_ENCODERS:
            return getattr(transformers, MORE_ENCODERS[family])(cfg).eval()
        return transformers.AutoModel.from_config(cfg).eval()
    cfg = transformers.AutoConfig.for_model(model_type(family), **text)
    if family in CAUSAL_LM or family in ENCODERS or family in MORE_ENCODERS:
        classes = {**CAUSAL_LM, **ENCODERS, **MORE_ENCODERS}
        model = getattr(transformers, classes[family])(cfg).eval()
    else:
        model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    if family in AWAY_FROM_INIT:
        with torch.no_grad():
            AWAY_FROM_INIT[family](model)
    return model


def distinct_norms(model: nn.Module, seed: int = 4) -> nn.Module:
    """``model`` with random values added to every norm's weight and bias. At init each norm
    scales by ones (Gemma's: 1 + zeros) and shifts by zeros, so two norms of the same input agree
    (GPT-NeoX's LN1(h) and LN2(h), a post-attention and a post-FFN norm of one sum) and an oracle
    test could not tell which of them a table entry names."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if "norm" in type(m).__name__.lower():
                for p in (getattr(m, "weight", None), getattr(m, "bias", None)):
                    if isinstance(p, nn.Parameter):
                        p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model


def entry_of(model: nn.Module) -> tuple:
    """The table's families for ``model``: the entry of its model_type, or (a dual encoder) its
    vision_config's, or (a multimodal model) its text_config's, as the module docstring states
    the rule; a tuple either way (OLMo-Hybrid's has two)."""
    config = model.config
    if config.model_type in DUAL:
        config = config.vision_config
    elif config.model_type not in SUPPORTED_ARCHITECTURES:
        config = config.text_config
    entry = SUPPORTED_ARCHITECTURES[config.model_type]
    return entry if isinstance(entry, tuple) else (entry,)


def family_of(model: nn.Module, layer: nn.Module):
    """The table's family of ``layer`` in ``model`` (of :func:`entry_of`'s, the one of the
    layer's class)."""
    classes = {c.__name__ for c in type(layer).__mro__}
    [family] = [f for f in entry_of(model) if f.layer_class in classes]
    return family


def stack_of(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's layers of its entry's classes, (name, module) in order."""
    classes = {f.layer_class for f in entry_of(model)}
    return [(n, m) for n, m in model.named_modules() if type(m).__name__ in classes]


def names(field) -> tuple:
    """A table field as a tuple of names (a tuple already: alternatives or, after a sub-layer,
    transforms in order)."""
    return () if field is None else (field,) if isinstance(field, str) else tuple(field)


def first_present(layer: nn.Module, field) -> str:
    """Of a table field's alternatives (dotted paths: T5's ``layer.2.DenseReluDense``, then
    ``layer.1.…``; a hybrid stack's ``self_attn`` / ``linear_attn``), the first that is a module
    of ``layer``."""
    return next(n for n in names(field) if submodule(layer, n) is not None)


def mixer_classes(model: nn.Module) -> list[str]:
    """The class name of the token mixer each decoder layer has (of the table's alternatives,
    the first the layer has)."""
    return [type(layer.get_submodule(first_present(layer, family_of(model, layer).attn))).__name__
            for layer in decoder_layers(model)]


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's decoder layers: its own, or its language model's."""
    inner = model.model
    return list(getattr(inner, "language_model", inner).layers)


def tiny_inputs(family: str, seed: int = 1) -> torch.Tensor | dict:
    """Token ids [2, 7]; for a vision model (VISION_CLASSES) its keyword inputs, two images; for
    an encoder-decoder (SEQ2SEQ, BART_SEQ2SEQ) input_ids and decoder_input_ids."""
    g = torch.Generator().manual_seed(seed)
    if family in AUDIO:
        name, shape = AUDIO_INPUTS[family]
        x = {name: torch.randint(0, 64, shape, generator=g) if name == "input_ids"
             else torch.randn(shape, generator=g)}
        if family in AUDIO_SEQ2SEQ:
            x["decoder_input_ids"] = torch.randint(0, 64, (2, 5), generator=g)
        return x
    if family in SEQ2SEQ + BART_SEQ2SEQ:  # 7 source tokens, 5 target tokens
        # (BigBird-Pegasus' block-sparse attention: 20, past the (5 + 2 random) blocks of 2 it
        # needs)
        source = 20 if family.endswith("block_sparse") else 7
        x = dict(input_ids=torch.randint(0, 64, (2, source), generator=g),
                 decoder_input_ids=torch.randint(0, 64, (2, 5), generator=g))
        if family == "led":  # global attention on each source's first token (Longformer's)
            x["global_attention_mask"] = (torch.arange(source) == 0).long().expand(2, source)
        return x
    if family.startswith("siglip2"):  # SigLIP 2 takes flattened patches (4 of 8x8) and a grid
        return dict(pixel_values=torch.randn(2, 4, 3 * 8 * 8, generator=g),
                    pixel_attention_mask=torch.ones(2, 4, dtype=torch.long),
                    spatial_shapes=torch.tensor([[2, 2], [2, 2]]))
    if family in VISION_CLASSES:
        images = dict(pixel_values=torch.randn(2, 3, 16, 16, generator=g))
        if family == "vit_mae":  # the noise that picks the patches MAE keeps, else random
            images["noise"] = torch.rand(2, 4, generator=g)
        return images
    if family == "layoutlmv3":  # boxes (x0 <= x1, y0 <= y1) and a 16x16 image of 4 patches
        corners = torch.randint(0, 64, (2, 7, 2, 2), generator=g).sort(dim=2).values
        return dict(input_ids=torch.randint(0, 64, (2, 7), generator=g),
                    bbox=corners.transpose(2, 3).reshape(2, 7, 4),
                    pixel_values=torch.randn(2, 3, 16, 16, generator=g))
    if family == "xmod":  # one sequence in each language
        return dict(input_ids=torch.randint(0, 64, (2, 7), generator=g),
                    lang_ids=torch.tensor([0, 1]))
    return torch.randint(0, 64, (2, SEQ_LEN.get(family, 7)), generator=g)


def run(model, x) -> torch.Tensor:
    """The model's last hidden states (or logits; DPR's encoders: the pooled embedding) on ``x``,
    token ids or keyword inputs."""
    out = model(**x) if isinstance(x, dict) else model(x)
    for field in ("last_hidden_state", "logits"):
        if hasattr(out, field):
            return getattr(out, field)
    return out.pooler_output


def loss_of(out: torch.Tensor) -> torch.Tensor:
    """A loss with a gradient everywhere (ViT's final LayerNorm makes ``out.square().mean()``
    constant, so its gradient would be ~1e-8 noise)."""
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    return (out * w).sum()


def taken_grads(handle) -> list[torch.Tensor]:
    """The adapters' gradients, taken off their parameters (None again) for the next backward."""
    grads = [p.grad for p in handle.parameters()]
    for p in handle.parameters():
        p.grad = None
    return grads


def randomize(handle, seed: int = 2) -> None:
    """Fresh random values in every adapter parameter: B starts at zero, and A and the router
    are redrawn too, so that a model attached after the same torch.manual_seed does not
    already hold them (a load that skipped them would go unnoticed)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in handle.adapters.values():
            a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=g) * 0.5)
            for p in (a.lora_A, a.lora_route):
                if p is not None:
                    p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)


def submodule(layer: nn.Module, path: str) -> nn.Module | None:
    """``layer``'s module at the dotted ``path`` (the table's names may be paths: BERT's
    ``attention.output``), or None."""
    try:
        return layer.get_submodule(path)
    except AttributeError:
        return None


def attribute(layer: nn.Module, path: str):
    """``layer``'s attribute at the dotted ``path``, a module, a parameter or a number (a table
    transform after a sub-layer: ZAYA's ``post_mlp_residual_scale.hidden_states_scale``)."""
    for name in path.split("."):
        layer = getattr(layer, name)
    return layer


def layer_and_sub(model: nn.Module, adapter_name: str) -> tuple[str, str]:
    """(the layer's name, the sub-layer's path in it) of a block adapter's name: the layer of
    the model's stack that holds the adapter."""
    [found] = [(n, adapter_name[len(n) + 1:].removesuffix(".mtlora_adapter"))
               for n, _ in stack_of(model) if adapter_name.startswith(n + ".")]
    return found


def capture_z(layer: nn.Module, family, sub: str, store: dict, key) -> None:
    """Hooks on ``layer`` (of a model without adapters) that put sub-layer ``sub``'s z in
    ``store[key]`` as SPEC and the module docstring define it: the output of the norm the table
    names (of alternatives, the one the layer has; a post-LN layer's FFN: LN1's, the residual
    stream a); where the layer has no norm there, the residual stream: for attention (``sub``
    any other than the FFN: a hybrid layer's ``linear_attn`` too) the layer's input h, for the
    FFN ``h1 = h + PostNorm(Attn(h))``, the sum the layer forms (OLMo2's layout). Where the
    layer is one sub-layer (Nemotron-H's blocks: ``attn`` and ``ffn`` the same module), its
    block type says which."""
    is_ffn = sub in names(family.ffn)
    if family.sub_layer_by is not None:
        attr, _, ffns = family.sub_layer_by
        is_ffn = getattr(layer, attr) in ffns
    norm = family.ffn_norm if is_ffn else family.attn_norm
    if norm is not None:
        norm = first_present(layer, norm)
        layer.get_submodule(norm).register_forward_hook(  # Qwen4-Exp's: (z, streams, weights)
            lambda m, args, out: store.__setitem__(key, out[0] if isinstance(out, tuple) else out))
        return

    def layer_input(m, args, kwargs):
        store[key, "h"] = args[0] if args else kwargs["hidden_states"]

    layer.register_forward_pre_hook(layer_input, with_kwargs=True)
    if not is_ffn:
        layer.register_forward_pre_hook(
            lambda m, args, kwargs: store.__setitem__(key, store[key, "h"]), with_kwargs=True)
    else:  # the last transform after the attention: its output is what the layer adds to h
        getattr(layer, names(family.attn_after)[-1]).register_forward_hook(
            lambda m, args, out: store.__setitem__(key, store[key, "h"] + out))


def delta(x: torch.Tensor, a, cfg) -> torch.Tensor:
    """The adapter's delta on z = ``x``, in x's dtype (the parameters cast to it)."""
    route = a.lora_route.to(x.dtype) if a.lora_route is not None else None
    return mix_reference(x, a.lora_A.to(x.dtype), a.lora_B.to(x.dtype), route,
                         groups=cfg.groups, scaling=cfg.scaling)


def reference_model(base: nn.Module, handle) -> nn.Module:
    """``base`` (a pre-attach copy) with the adapters' delta added the way SPEC writes it: to
    the sub-layer's output (so before what the layer applies after it: the module docstring's
    kind 3; in a post-LN encoder, POST_LNS (POST_LN_CLASSES), to the sum its post-LN
    normalizes, LN(z + Sub(z) +
    delta); in ESM's layout, ADDS_RESIDUAL, to the sum the module that ends the sub-layer forms,
    Sub(z) + r + delta), from z captured by :func:`capture_z`."""
    cfg = handle.config
    captured = {}

    def plus(out, d):  # in the sub-layer's output's shape (Llama 4's MoE block: [B*S, d])
        if isinstance(out, tuple):
            return (out[0] + d.reshape(out[0].shape), *out[1:])
        return out + d.reshape(out.shape)

    for name, a in handle.adapters.items():
        if handle.placement == "component":
            lin = base.get_submodule(name.removesuffix(".adapter"))
            lin.register_forward_hook(lambda m, args, out, a=a: out + delta(args[0], a, cfg))
            continue
        layer_name, sub = layer_and_sub(base, name)
        layer = base.get_submodule(layer_name)
        family = family_of(base, layer)
        capture_z(layer, family, sub, captured, name)
        post_lns = POST_LNS.get(base.config.model_type, POST_LN_CLASSES.get(type(layer).__name__))
        if post_lns is not None:  # LN(z + Sub(z) + delta), wherever the adapter hangs
            layer.get_submodule(post_lns[sub in names(family.ffn)]).register_forward_pre_hook(
                lambda m, args, k=name, a=a: (args[0] + delta(captured[k], a, cfg),))
            continue
        ends = ADDS_RESIDUAL.get(base.config.model_type)
        if ends is not None:  # Sub(z) + r + delta, the sum the module that ends it forms
            layer.get_submodule(ends[sub in names(family.ffn)]).register_forward_hook(
                lambda m, args, out, k=name, a=a: out + delta(captured[k], a, cfg))
            continue
        layer.get_submodule(sub).register_forward_hook(
            lambda m, args, out, k=name, a=a: plus(out, delta(captured[k], a, cfg)))
    return base


# The tested types, by the module docstring's four layout kinds (docs/MODELS.md's table). A
# multimodal model (MULTIMODAL) is in its language model's list: the oracle test runs on text. The
# encoder-decoders' and the speech models' lists sit with the fields tiny_model builds them from
# (kind 1: T5_BLOCKS, BART_PRE_LN, AUDIO_PRE_LN; kind 3: POST_NORM_SEQ2SEQ; kind 4:
# BART_POST_LN, AUDIO_POST_LN). TESTED, below them, names the placements each test runs on
# each list; a list across kinds (MIXED, HYBRID, SSM_HYBRID) picks types for a test of its own.

# Kind 1, pre-LN (SPEC's formula). FAMILIES: the first four, every placement on LLaMA.
FAMILIES = ["llama", "mistral", "qwen2", "vit"]
LLAMA_LIKE = [
    # LLaMA's layer code under other names: exaone, internlm3: LLaMA's own classes under another
    # model_type (iquestcoder: LLaMA's model); Apertus, VaultGemma, JetMoE: with their own norm
    # or attention names; Phi-3, Persimmon: with residual dropouts; GPT-2's layer and its kin;
    # BLOOM, MPT: sub-layers that add the residual themselves; ModernBERT, EuroBERT: encoders;
    # OPT, XGLM, BioGPT: an FFN of Linear layers loose in the layer (LOOSE_FFN).
    "qwen3", "gemma", "olmo", "ministral", "ministral3", "starcoder2", "smollm3", "helium",
    "arcee", "seed_oss", "exaone", "internlm3", "glm", "ernie4_5", "hunyuan_v1_dense", "bitnet",
    "nemotron", "apertus", "phi3", "diffllama", "youtu", "cwm", "nanochat", "jais2", "vaultgemma",
    "persimmon", "gpt_neox_japanese", "gpt2", "gpt_bigcode", "gpt_neo", "bloom", "mpt",
    "modernbert", "eurobert", "opt", "xglm", "biogpt", "iquestcoder", "doge", "emu3_text_model",
    "apertus1p5_text", "modernbert-decoder",
    # Older and non-transformer decoders: RWKV's time and channel mix, xLSTM's mLSTM layer, CTRL,
    # CPM-Ant's wrapped sub-layers.
    "rwkv", "xlstm", "ctrl", "cpmant",
    # An MoE block as the FFN in every layer.
    "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", "minimax_m2", "phimoe", "solar_open",
    "hunyuan_v1_moe", "jetmoe", "doge-moe",
    # A dense FFN in some layers, an MoE block in the others (MIXED).
    "deepseek_v2", "deepseek_v3", "glm4_moe", "glm4_moe_lite", "dots1", "exaone_moe",
    "ernie4_5_moe", "mimo_v2_flash", "mellum", "laguna", "minicpm5_moe", "deepseek_v32",
    "mistral4", "llama4_text", "sarvam_mla", "sarvam_moe", "param2moe", "glm_moe_dsa", "hy_v3",
    "axk1", "axk2", "flint", "dots3_note_text",
    # Hybrid stacks of linear and full attention (HYBRID).
    "qwen3_next", "lara_mini", "kimi_linear", "bailing_hybrid",
    # Hybrid stacks of a state-space or convolution mixer and attention (SSM_HYBRID); Falcon-H1:
    # Mamba and attention side by side in every layer; Nemotron-H: each block one sub-layer.
    "jamba", "bamba", "lfm2", "lfm2_moe", "recurrent_gemma", "falcon_h1", "nemotron_h",
    # Vision encoders: ViT's layer under other names; CLIP's and its kin's; AIMv2's; the dual
    # encoders' image classifiers (DUAL).
    "deit", "vit_msn", "vit_mae", "ijepa", "clip_vision_model", "metaclip_2_vision_model",
    "siglip_vision_model", "siglip2_vision_model", "mlcd_vision_model", "aimv2_vision_model",
    "clip", "metaclip_2", "siglip", "siglip2",
    # Text encoders: LLaMA's layout (UltraBERT) and CLIP's (its text tower).
    "ultrabert", "clip_text_model",
    # Multimodal, their language models of this kind: llava, mistral3, the Qwen-VL models,
    # Qwen3.5(-MoE) (hybrid), Fuyu (its language model a Persimmon), Emu3, Dots3-Note,
    # Apertus 1.5.
    "llava", "mistral3", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5",
    "qwen3_5_moe", "fuyu", "emu3", "dots3_note", "apertus1p5"]
# Stacks of one-mixer blocks with no FFN ('attn' tested; 'both' the same, 'ffn' refused:
# test_a_stack_without_ffns_adapts_its_mixers_and_refuses_ffn).
PURE_SSM = ["mamba", "mamba2", "falcon_mamba"]
# Pre-LN encoders in BERT's modules (ESM's layout; tiny_model: AutoModel): the norms sit before
# the sub-layers, and a module that ends each sub-layer adds the residual, with no norm after
# (ADDS_RESIDUAL).
PRE_LN_OUTPUT = ["esm", "xlm-roberta-xl", "roberta-prelayernorm", "megatron-bert"]

# Kind 2, parallel: on one norm or two (GPT-NeoX, Falcon's variants). The "-sequential" ones are
# these types with the parallel flag off (LLaMA's layout), tested as these are.
PARALLEL = ["cohere", "cohere2", "cohere2_moe", "phi", "stablelm", "stablelm-sequential", "gptj",
            "codegen", "gpt_neox", "gpt_neox-sequential", "falcon", "falcon-sequential",
            "falcon-two_norms", "cohere_compass_text", "cohere_compass"]

# Kind 3, a transform after the sub-layer (docs/MODELS.md's table names each type's).
POST_TRANSFORM = ["gemma2", "gemma3_text", "gemma3", "glm4", "olmo2", "olmo3", "flex_olmo",
                  "exaone4", "granite", "granitemoe", "granitemoeshared", "minicpm3",
                  "hyperclovax", "granitemoehybrid", "granitemoehybrid-dense", "gemma4_text",
                  "gemma4", "gemma3n_text", "olmo_hybrid", "afmoe", "granite_swa",
                  "granitemoe_swa", "minimax", "kolibri1", "kolibri1_1", "lfm3", "dory", "ergo",
                  "beam", "inkling_text", "zaya", "lfm3_vl", "inkling_mm_model",
                  "dinov2", "dinov2_with_registers", "dinov3_vit", "beit"]
# Of them, those on the sum test too, their transform linear (a multiplier, a scale, Inkling's
# short convolution); not every linear one: Granite's multiplier, for one, is on the
# transform test alone.
LINEAR_AFTER = ["granite_swa", "granitemoe_swa", "minimax", "inkling_text", "zaya"]
# Layers that go on after the FFN's residual add (Gemma 4's per-layer input and layer_scalar,
# Gemma 3n's AltUp correction; Dory's, Ergo's, Beam's nGPT interpolation, gated or depth-scaled
# residual add): the kind-3 test reads the post-norm's output there.
GOES_ON = ["gemma4_text", "gemma4", "gemma3n_text", "dory", "ergo", "beam"]
# Hyper-connected layers: the hyper-connection module before the FFN, and which of its outputs
# holds the per-stream weights the layer expands the FFN's output by (read off transformers'
# code, not the table).
HYPER_CONNECTED = {"deepseek_v4": ("ffn_hc", 0), "hy_v4": ("ffn_hc", 0),
                   "qwen4_exp_text": ("mlp_hyper_connection", 2),
                   "qwen4_exp": ("mlp_hyper_connection", 2)}

# Kind 4, post-LN.
POST_LN = [  # encoders (tiny_model: AutoModel, or the text towers' classes, MORE_ENCODERS)
    "bert", "roberta", "xlm-roberta", "camembert", "electra", "ernie", "data2vec-text", "deberta",
    "deberta-v2", "rembert", "splinter", "layoutlm", "markuplm", "roc_bert", "luke", "convbert",
    "bert-generation", "mpnet", "distilbert", "nomic_bert", "jina_embeddings_v3",
    # More text and document encoders (transformers 5.25): BERT's layer code under other token
    # mixers, the text towers of dual encoders, FNet (a Fourier transform as the token mixer),
    # GTE (NomicBERT's shape).
    "roformer", "big_bird", "longformer", "yoso", "nystromformer", "mra", "tapas", "visual_bert",
    "layoutlmv3", "align_text_model", "altclip_text_model", "chinese_clip_text_model",
    "clap_text_model", "blip_text_model", "dpr", "fnet", "gte"]
# Inputs longer than tiny_inputs' 7 tokens, where the token mixer needs them (BigBird's block
# sparsity, Nystromformer's landmarks: EXTRA).
SEQ_LEN = {"big_bird": 16, "nystromformer": 8}
# X-MOD (an encoder; tiny_model: AutoModel): its FFN's output module runs a language adapter, and
# output.LayerNorm, after the residual add, so that LayerNorm runs twice (the language adapter
# reuses it) and POST_LNS cannot name the sum: reference_model adds the delta to what the FFN's
# last Linear (output.dense) returns, and the attention's to what attention.output returns (dense
# and the residual add; ``attention`` applies attention.output.LayerNorm after it), read off
# transformers' code (ADDS_RESIDUAL).
LANG_ADAPTER = ["xmod"]
# Decoders: GPT-1 in DistilBERT's shape, TrOCR's decoder in BART's with loose fc1 ... fc2, GIT in
# BERT's modules.
POST_LN_DECODERS = ["openai-gpt", "trocr", "git"]
# Their layers' post-LNs, (after the attention, after the FFN), read off transformers' code, not
# the table: reference_model adds each adapter's delta to the sum its sub-layer's LN normalizes.
_BERT_LNS = ("attention.output.LayerNorm", "output.LayerNorm")
POST_LNS = {**dict.fromkeys(POST_LN, _BERT_LNS), "mpnet": ("attention.LayerNorm", _BERT_LNS[1]),
            "distilbert": ("sa_layer_norm", "output_layer_norm"),
            "fnet": ("fourier.output.LayerNorm", _BERT_LNS[1]),
            **dict.fromkeys(["nomic_bert", "jina_embeddings_v3", "gte"],
                            ("post_attention_layernorm", "post_mlp_layernorm")),
            **dict.fromkeys([*map(model_type, BART_POST_LN + list(BART_DECODER)), "trocr"],
                            ("self_attn_layer_norm", "final_layer_norm")),
            "openai-gpt": ("ln_1", "ln_2"), "git": _BERT_LNS}
# The speech models' post-LN layer classes' post-LNs (after the attention, after the FFN), read
# off transformers' code, by class: a "-stable" model has the same model_type and pre-LN layers.
POST_LN_CLASSES = {**dict.fromkeys([f"{p}EncoderLayer" for p in (
    "Wav2Vec2", "Hubert", "WavLM", "UniSpeech", "UniSpeechSat", "Data2VecAudio", "SEW")],
    ("layer_norm", "final_layer_norm")), "SEWDLayer": _BERT_LNS}  # SEW-D: DeBERTa-v2's layer
# The modules, (the attention's, the FFN's), whose output reference_model adds each adapter's
# delta to, Sub(z) + r + delta, read off transformers' code, not the table: ESM's layout's
# (PRE_LN_OUTPUT), the module that ends each sub-layer and adds the residual; X-MOD's, above.
ADDS_RESIDUAL = {**dict.fromkeys(PRE_LN_OUTPUT, ("attention.output", "output")),
                 "xmod": ("attention.output", "output.dense")}

PLACEMENTS = [dict(placement="ffn"), dict(placement="attn"), dict(placement="both"),
              dict(target_modules=["q_proj", "v_proj"])]
_PLACEMENT = {w.get("placement", "component"): w for w in PLACEMENTS}
# Each list of tested types: (its types, the placements the oracle test runs on each, those the
# sum test runs on each). The oracle test: every placement on LLaMA; the other types differ
# only in names: 'both' and component ('both' alone where the Linear names are LLaMA's too, or
# where block-level is what differs); 'ffn' and 'attn' apart on one type of each other layout
# (ESM's, T5's, mBART's, Whisper's, BERT's, BART's) and on Nemotron-H, whose blocks take one by
# their block type. The sum test: on pre-LN (kind 1, ESM's layout too) and parallel (kind 2)
# layers, 'ffn' on every one; 'attn' where the layer forms h1 = h + Attn(z) before its FFN's
# norm (kind 1; a parallel layer has no such sum); both on kind 3's LINEAR_AFTER.
TESTED = [
    (FAMILIES, ("both", "component"), ("ffn", "attn")),
    (["llama", "nemotron_h", "esm", "t5", "mbart", "whisper", "bert", "bart"], ("ffn", "attn"),
     ()),
    # kind 1
    (LLAMA_LIKE, ("both",), ("ffn", "attn")),
    (PURE_SSM, ("attn",), ("attn",)),
    (PRE_LN_OUTPUT, ("both",), ("ffn", "attn")),
    (T5_BLOCKS, ("both",), ("ffn", "attn")),
    (BART_PRE_LN, ("both",), ("ffn", "attn")),
    (AUDIO_PRE_LN, ("both",), ("ffn", "attn")),
    # kind 2
    (PARALLEL, ("both",), ("ffn",)),
    # kind 3
    (POST_TRANSFORM, ("both",), ()),
    (LINEAR_AFTER, (), ("ffn", "attn")),
    (list(HYPER_CONNECTED), ("both",), ()),
    (POST_NORM_SEQ2SEQ, ("both",), ()),
    # kind 4
    (POST_LN, ("both",), ()),
    (LANG_ADAPTER, ("both",), ()),
    (BART_POST_LN, ("both",), ()),
    (AUDIO_POST_LN, ("both",), ()),
    (POST_LN_DECODERS, ("both",), ())]
CASES = [(f, _PLACEMENT[p]) for types, oracle, _ in TESTED for f in types for p in oracle]
SUM_CASES = [(f, p) for types, _, sums in TESTED for f in types for p in sums]

# Across kinds. Types whose layers hold a dense FFN or an MoE block, both as the FFN attribute:
# their tiny models (EXTRA) have one of each, so the tests above see both.
MIXED = ["deepseek_v2", "deepseek_v3", "glm4_moe", "glm4_moe_lite", "dots1", "exaone_moe",
         "ernie4_5_moe", "mimo_v2_flash", "cohere2_moe", "mellum", "laguna", "minicpm5_moe",
         "deepseek_v32", "mistral4", "qwen3_vl_moe", "qwen3_next", "kimi_linear",
         "bailing_hybrid", "llama4_text", "afmoe", "jamba", "lfm2_moe", "hy_v4", "sarvam_mla",
         "sarvam_moe", "param2moe", "glm_moe_dsa", "hy_v3", "axk1", "axk2", "flint",
         "dots3_note_text", "kolibri1_1", "ergo", "beam", "inkling_text"]
# Hybrid stacks: linear attention in some layers, full attention in the others (OLMo-Hybrid:
# layers of two classes, one family each); their tiny models have one of each.
HYBRID = ["qwen3_next", "qwen3_5", "qwen3_5_moe", "lara_mini", "kimi_linear", "bailing_hybrid",
          "olmo_hybrid"]
# Hybrid stacks of a state-space or convolution mixer (Mamba, LFM2's short convolution,
# Griffin's recurrent block) and attention; their tiny models have one of each.
SSM_HYBRID = ["jamba", "bamba", "granitemoehybrid", "granitemoehybrid-dense", "lfm2",
              "lfm2_moe", "recurrent_gemma", "lfm3"]


def test_every_supported_architecture_is_tested():
    """Each table entry by a model of its type, or (the Qwen-VL language models, Gemma 3's)
    by the multimodal model whose text_config has it; the dual encoders' by their image
    classifiers too."""
    tested = [f for types, _, _ in TESTED for f in types]
    assert set(MULTIMODAL) | set(VISION_CLASSES) <= set(tested)
    assert set(DUAL) == set(DUAL_ENCODERS)
    wrappers = {**MULTIMODAL, **DUAL}
    assert set(SUPPORTED_ARCHITECTURES) == {wrappers.get(f, model_type(f)) for f in tested}
    assert not set(wrappers) & set(SUPPORTED_ARCHITECTURES), "wrappers go by a sub-config"
    assert set(ENCODER_DECODERS) == {model_type(f) for f in SEQ2SEQ + AUDIO_SEQ2SEQ + BART_SEQ2SEQ}


def ours_(name: str) -> bool:
    """Whether a parameter's name is an mtLoRA adapter's (``...mlp.mtlora_adapter.lora_A``,
    component-level ``...q_proj.adapter.lora_A``), not a model's own adapter (X-MOD's
    ``output.adapter_modules.en_XX.dense1.weight``; Dots3-Note's audio projector,
    ``audio_tower.adapter.fc1.weight``): ours are all ``lora_*``."""
    return re.search(r"(^|\.)(mtlora_)?adapter\.lora_", name) is not None


@pytest.mark.parametrize("family,where", CASES,
                         ids=[f"{f}-{w.get('placement', 'component')}" for f, w in CASES])
def test_attach_matches_spec_and_removal_restores_the_model(family, where):
    model = distinct_norms(tiny_model(family))
    x = tiny_inputs(family)
    before = run(model, x)
    keys = list(model.state_dict())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    # The outputs of the model frozen, as attach leaves it: freezing alone can move them by an
    # ulp (AIMv2's: a Linear on a non-contiguous input, its patches transposed, takes another
    # kernel once its weight needs no grad), and adapters with B = 0 must add exactly nothing.
    model.requires_grad_(False)
    frozen = run(model, x)
    for n, p in model.named_parameters():
        p.requires_grad_(flags[n])
    base = copy.deepcopy(model)
    cfg = MTLoRAConfig(r=4, num_experts=3, groups=2, alpha=8.0, dropout=0.0)

    handle = attach(model, cfg, **where)
    assert torch.equal(run(model, x), frozen), "B = 0 at init must leave the outputs as they were"
    assert all(not p.requires_grad for n, p in model.named_parameters() if not ours_(n))

    randomize(handle)
    ours = run(model, x)
    want = run(reference_model(base, handle), x)
    assert rel_err(ours, before) > 1e-3, "the adapters must change the output"
    assert rel_err(ours, want) <= TOL

    # Gradients reach every adapter parameter (and only those) as through the oracle.
    loss_of(ours).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert set(grads) == {n for n, _ in model.named_parameters() if ours_(n)}
    for p in handle.parameters():
        p.grad = None
    loss_of(run(base, x)).backward()
    for name, a in handle.adapters.items():
        for k, p in a.named_parameters():
            assert rel_err(grads[f"{name}.{k}"], p.grad) <= TOL, f"{name}.{k}"

    with handle.disabled():
        assert torch.equal(run(model, x), frozen)
    assert rel_err(run(model, x), want) <= TOL

    handle.remove()
    assert torch.equal(run(model, x), before)
    assert list(model.state_dict()) == keys
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert get_handle(model) is None
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("family", MIXED)
def test_mixed_dense_and_moe_models_are_tested_on_both_kinds_of_ffn(family):
    """Layer 0 of the tiny model holds a dense FFN, layer 1 an MoE block (a config field that
    stopped taking effect would leave the MoE layers untested)."""
    model = tiny_model(family)
    dense, moe = (getattr(layer, family_of(model, layer).ffn) for layer in decoder_layers(model))
    assert "experts" not in dict(dense.named_children())
    assert "experts" in dict(moe.named_children())


@pytest.mark.parametrize("family", HYBRID)
def test_hybrid_models_are_tested_on_both_token_mixers(family):
    """Layer 0 of the tiny model mixes tokens by linear attention (a Gated DeltaNet, Kimi's delta
    attention), layer 1 by full attention, as its layer_types say: the tests above see both
    (a config field that stopped taking effect would leave one untested)."""
    model = tiny_model(family)
    config = getattr(model.config, "text_config", model.config)
    assert list(config.layer_types) == ["linear_attention", "full_attention"]
    linear, full = mixer_classes(model)
    assert "Delta" in linear and "Delta" not in full, (linear, full)


@pytest.mark.parametrize("family", SSM_HYBRID)
def test_ssm_hybrid_models_are_tested_on_both_token_mixers(family):
    """Layer 0 of the tiny model mixes tokens by a state-space or convolution mixer, layer 1 by
    attention: the tests above see both (a config field that stopped taking effect would leave
    one untested)."""
    model = tiny_model(family)
    ssm, attn = mixer_classes(model)
    assert "Attention" not in ssm and "Attention" in attn, (ssm, attn)


@pytest.mark.parametrize("family", HYPER_CONNECTED)
def test_a_hyper_connection_expands_the_adapters_delta_as_the_ffns_output(family):
    """Hyper-connected layers (DeepSeek-V4, HY-V4, Qwen4-Exp: the residual is several streams)
    expand the FFN's output into the streams by per-stream weights w computed from the layer's
    streams. By hand on the last layer: its output moves by w * adapter(z) in each stream, the
    delta expanded as FFN(z) is, not added to one stream or to the collapsed state."""
    model = distinct_norms(tiny_model(family))
    base = copy.deepcopy(model)
    handle = attach(model, MTLoRAConfig(r=4, num_experts=3, groups=2, alpha=8.0, dropout=0.0),
                    placement="ffn", layers=[-1])
    randomize(handle)
    [(name, adapter)] = handle.adapters.items()
    layer_name, layer = stack_of(base)[-1]
    assert name == f"{layer_name}.mlp.{ADAPTER_ATTR}"
    hc, index = HYPER_CONNECTED[family]
    got = {}
    capture_z(layer, family_of(base, layer), "mlp", got, "z")
    getattr(layer, hc).register_forward_hook(lambda m, a, out: got.__setitem__("w", out[index]))
    for key, net in (("base", base), ("ours", model)):
        net.get_submodule(layer_name).register_forward_hook(lambda m, a, out, key=key: (
            got.__setitem__(key, out[0] if isinstance(out, tuple) else out)))
    x = tiny_inputs(family)
    with torch.no_grad():
        run(base, x)
        run(model, x)
        moved = got["ours"] - got["base"]
        d = delta(got["z"], adapter, handle.config)
        assert got["w"].shape[-1] == 2 and moved.numel() == 2 * d.numel()  # two streams
        want = (got["w"].unsqueeze(-1) * d.unsqueeze(-2)).reshape(moved.shape)
        assert rel_err(moved, want) <= TOL


# Hybrid stacks (dec5) whose layer_types name their kinds otherwise: the token mixer of each
# layer of the tiny model, read off transformers' classes.
MIXERS_DEC5 = {"minimax": ["MiniMaxLightningAttention", "MiniMaxAttention"],
               "qwen4_exp_text": ["Qwen4ExpTextGatedDeltaNet", "Qwen4ExpTextAttention"]}


@pytest.mark.parametrize("family", MIXERS_DEC5)
def test_dec5_hybrids_are_tested_on_both_token_mixers(family):
    """MiniMax's ``self_attn`` is lightning (linear) attention in layer 0 of the tiny model,
    softmax attention in layer 1; Qwen4-Exp's a Gated DeltaNet (``linear_attn``), then
    (indexed) full attention: the tests above see both."""
    assert mixer_classes(tiny_model(family)) == MIXERS_DEC5[family]


def test_nemotron_h_blocks_take_the_adapter_of_their_kind():
    """Nemotron-H's blocks are one sub-layer each, ``mixer``; the tiny model's are a Mamba-2, an
    attention, an MLP and an MoE mixer (read off their classes, not the table). 'attn' adapts
    the first two, 'ffn' the last two, 'both' all four. layers=... counts blocks and skips the
    selected ones of the other kind; a selection with none of the placement's kind, a model with
    none, and a block type of neither kind are refused by name, the model as it was."""
    model = tiny_model("nemotron_h")
    assert [type(layer.mixer).__name__ for layer in decoder_layers(model)] == [
        "NemotronHMamba2Mixer", "NemotronHAttention", "NemotronHMLP", "NemotronHMoE"]
    cfg = MTLoRAConfig(r=2, num_experts=2, groups=1)
    for placement, blocks, layers in (("attn", [0, 1], None), ("ffn", [2, 3], None),
                                      ("both", [0, 1, 2, 3], None), ("ffn", [3], [0, -1]),
                                      ("attn", [1], [1, 2])):
        handle = attach(model, cfg, placement=placement, layers=layers)
        assert list(handle.adapters) == [f"model.layers.{i}.mixer.mtlora_adapter" for i in blocks]
        handle.remove()
    with pytest.raises(ValueError, match=r"placement='ffn' adapts the FFN blocks \(block_type "
                       r"one of \['mlp', 'moe'\]\), and layers \[0\] select none: model\.layers"
                       r"\.0 is 'linear_attention'\. The FFN blocks are layers \[2, 3\]"):
        attach(model, cfg, placement="ffn", layers=[0])
    with pytest.raises(ValueError, match=r"placement='attn' adapts the token-mixer blocks .*"
                       r"layers \[2, 3\] select none: .*layers\.3 is 'moe'\. The token-mixer "
                       r"blocks are layers \[0, 1\]"):
        attach(model, cfg, placement="attn", layers=[2, 3])
    decoder_layers(model)[1].block_type = "attention"  # transformers 4's name
    with pytest.raises(ValueError, match=r"layers\.1 \(NemotronHBlock\) lacks \[\"block_type one "
                       r"of \['linear_attention', 'full_attention', 'mlp', 'moe'\] \(it has "
                       r"'attention'\)\"\]"):
        attach(model, cfg, placement="both")
    assert get_handle(model) is None and all(p.requires_grad for p in model.parameters())
    mixers_only = tiny_model("nemotron_h", hybrid_override_pattern="M*")
    with pytest.raises(ValueError, match=r"and NemotronHForCausalLM has none\. The FFN blocks "
                       r"are layers \[\]"):
        attach(mixers_only, cfg, placement="ffn")
    assert get_handle(mixers_only) is None


@pytest.mark.parametrize("family", PURE_SSM)
def test_a_stack_without_ffns_adapts_its_mixers_and_refuses_ffn(family):
    """Mamba's blocks are one token mixer each, with no FFN: 'attn' and 'both' put one adapter
    beside each block's mixer (the same adapters: 'both' is every sub-layer the blocks have, as
    on a Nemotron-H stack of mixer blocks only), 'ffn', the default placement too, is refused by
    name, the model as it was."""
    model = tiny_model(family)
    cfg = MTLoRAConfig(r=2, num_experts=2, groups=1)
    for placement, layers in (("attn", None), ("both", None), ("both", [-1])):
        handle = attach(model, cfg, placement=placement, layers=layers)
        n = len(stack_of(model))
        assert list(handle.adapters) == [f"backbone.layers.{i}.mixer.mtlora_adapter"
                                         for i in range(n)][slice(-1, None) if layers else
                                                            slice(None)]
        handle.remove()
    for kwargs in (dict(placement="ffn"), dict(placement="ffn", layers=[0]), {}):
        with pytest.raises(ValueError, match=rf"placement='ffn': {type(model).__name__}'s "
                           rf"layers \({type(stack_of(model)[0][1]).__name__}\) have no FFN, each "
                           rf"is one token mixer \(mixer\) on its norm; placement='attn'"):
            attach(model, cfg, **kwargs)
        assert get_handle(model) is None and all(p.requires_grad for p in model.parameters())


def test_rwkv_is_refused_while_it_rescales_in_eval_mode(monkeypatch):
    """RWKV's config.rescale_every > 0 (its default, 6) halves the residual stream every
    rescale_every blocks in eval mode and divides the sub-layers' output weights to match, not
    the adapters' outputs: attach refuses it by name, the model as it was. Why, shown with the
    refusal lifted (rescale_every=1, two blocks): with adapters, train mode (no rescaling) and
    eval mode compute different outputs; without, the same (but for the LayerNorms' eps on a
    halved stream)."""
    model = tiny_model("rwkv", rescale_every=6, attention_hidden_size=32)
    cfg = MTLoRAConfig(r=4, num_experts=3, groups=2, dropout=0.0)
    with pytest.raises(NotImplementedError, match=r"rwkv\.blocks\.0 \(RwkvBlock\) has "
                       r"config\.rescale_every=6: in eval mode RWKV halves .* Set "
                       r"model\.config\.rescale_every = 0"):
        attach(model, cfg, placement="attn")
    assert get_handle(model) is None and all(p.requires_grad for p in model.parameters())
    monkeypatch.setitem(SUPPORTED_ARCHITECTURES, "rwkv",
                        replace(SUPPORTED_ARCHITECTURES["rwkv"], refused_if=None))
    model = tiny_model("rwkv", rescale_every=1)
    x = tiny_inputs("rwkv")

    def train_and_eval():
        with torch.no_grad():
            return run(model.train(), x), run(model.eval(), x)

    assert rel_err(*train_and_eval()) <= 1e-3
    randomize(attach(model, cfg, placement="both"))
    assert rel_err(*train_and_eval()) > 0.1


# Where the layer's h1 is not the input of the FFN's norm: the module whose output (its first
# element) is h1, read off transformers' code, not the table. T5's block: the self-attention's
# wrapper ``layer.0`` returns h + Attn(z) (a decoder block's cross-attention comes between it
# and the FFN's norm). ESM's layout: ``attention`` returns h + Attn(LN1(h)) (its first element).
H1_AT = {**{model_type(f): "layer.0" for f in T5_BLOCKS},
         **dict.fromkeys(PRE_LN_OUTPUT, "attention")}
# Or, by layer class, the module whose input is h1: a pre-LN encoder-decoder's decoder layer
# (the last layer, the sum test's, is a decoder layer) calls its cross-attention's norm on h1,
# between h1 and the FFN's norm (BART's lineage, Whisper, Speech2Text, Moonshine), read off
# transformers' code.
H1_INTO = {**{SUPPORTED_ARCHITECTURES[model_type(f)][1].layer_class: "encoder_attn_layer_norm"
              for f in BART_PRE_LN},
           "NllbMoeDecoderLayer": "cross_attention_layer_norm",
           "WhisperDecoderLayer": "encoder_attn_layer_norm",
           "Speech2TextDecoderLayer": "encoder_attn_layer_norm",
           "MoonshineDecoderLayer": "post_attention_layernorm"}


@pytest.mark.parametrize("family,placement", SUM_CASES,
                         ids=[f"{f}-{p}" for f, p in SUM_CASES])
def test_the_sum_the_layer_forms_moves_by_exactly_the_delta(family, placement):
    """SPEC's formula read on the layer's own sums, not at the module attach hangs the adapter
    on (which the oracle test follows): with one adapter, on the last layer, the sum that layer
    forms after the sub-layer (its output for 'ffn'; for 'attn' h1, the input of the FFN's norm)
    moves by exactly ``T(mix(z))``, z the output of the norm the table names, T the linear
    transforms the table names after the sub-layer (dropouts, identities in eval; Falcon-H1's
    ssm_out_multiplier). An adapter hung inside the sub-layer (on an MoE block's shared expert, a
    projection) or beside another one moves it by something else. Where each layer is one
    sub-layer (Nemotron-H's blocks), the last layer of the placement's kind, by the table's
    block types, and the sum is that layer's output for either placement; so it is where the
    layer has no FFN (PURE_SSM)."""
    model = distinct_norms(tiny_model(family))
    base = copy.deepcopy(model)
    cfg = MTLoRAConfig(r=4, num_experts=3, groups=2, alpha=8.0, dropout=0.0)
    index, one = len(stack_of(base)) - 1, family_of(base, stack_of(base)[-1][1]).sub_layer_by
    if one is not None:
        attr, mixers, ffns = one
        index = max(i for i, (_, m) in enumerate(stack_of(base))
                    if getattr(m, attr) in (ffns if placement == "ffn" else mixers))
    handle = attach(model, cfg, placement=placement, layers=[index])
    randomize(handle)
    [(name, adapter)] = handle.adapters.items()
    layer_name, layer = stack_of(base)[index]
    assert name.startswith(layer_name + "."), (name, layer_name)
    fam = family_of(base, layer)
    whole = one is not None or fam.ffn is None  # the layer is one sub-layer: its output
    got = {}
    capture_z(layer, fam, first_present(layer, fam.ffn if placement == "ffn" else fam.attn),
              got, "z")
    h1_at = H1_AT.get(base.config.model_type) if placement == "attn" else None
    for key, net in (("base", base), ("ours", model)):
        where = net.get_submodule(layer_name)
        if h1_at is not None:  # h1, that module's output
            where = where.get_submodule(h1_at)
        elif placement == "attn" and not whole:  # h1, what the FFN's norm is called on
            where = where.get_submodule(H1_INTO.get(type(layer).__name__)
                                        or first_present(where, fam.ffn_norm))
        where.register_forward_hook(lambda m, args, out, key=key: got.__setitem__(
            key, args[0] if placement == "attn" and h1_at is None and not whole
            else out[0] if isinstance(out, tuple) else out))
    x = tiny_inputs(family)
    with torch.no_grad():
        run(base, x)
        run(model, x)
        moved = got["ours"] - got["base"]
        want = delta(got["z"], adapter, cfg).reshape(moved.shape)
        for after in names(fam.ffn_after if placement == "ffn" else fam.attn_after):
            t = attribute(layer, after)
            want = t(want) if isinstance(t, nn.Module) else t * want
        assert rel_err(moved, want) <= TOL


@pytest.mark.parametrize("family", POST_TRANSFORM + POST_NORM_SEQ2SEQ)
def test_the_transform_after_the_ffn_applies_to_the_adapters_delta_too(family):
    """The module docstring's kind 3, by hand on the last layer: what the layer applies to the
    FFN's output (T: a post-norm, Granite's residual_multiplier 0.5) applies to the adapter's
    delta too. The layer's output moves from h1 + T(FFN(z)) to h1 + T(FFN(z) + adapter(z)),
    not to h1 + T(FFN(z)) + adapter(z) (SPEC's pre-LN form)."""
    model = distinct_norms(tiny_model(family))
    base = copy.deepcopy(model)
    x = tiny_inputs(family)
    handle = attach(model, MTLoRAConfig(r=4, num_experts=3, groups=2, alpha=8.0, dropout=0.0),
                    placement="ffn", layers=[-1])
    randomize(handle)
    [(name, adapter)] = handle.adapters.items()
    layer_name = name.rsplit(".", 2)[0]
    got = {}
    layer = base.get_submodule(layer_name)  # without adapters: h1 + T(FFN(z)), FFN(z) and z
    fam = family_of(base, layer)
    assert fam.ffn_after is not None, f"the table names no transform after {family}'s FFN"
    afters = [attribute(layer, n) for n in names(fam.ffn_after)]  # in the order the layer applies
    capture_z(layer, fam, fam.ffn, got, "z")
    getattr(layer, fam.ffn).register_forward_hook(lambda m, a, out: got.__setitem__(
        "ffn", out[0] if isinstance(out, tuple) else out))
    # The layer's output, h1 + T(...); where the layer goes on after that sum, T(...) itself.
    read = names(fam.ffn_after)[-1] if family in GOES_ON else None
    for key, net in (("base", base), ("ours", model)):
        where = net.get_submodule(layer_name if read is None else f"{layer_name}.{read}")
        where.register_forward_hook(lambda m, a, out, key=key: got.__setitem__(
            key, out[0] if isinstance(out, tuple) else out))  # ZAYA's layer: (output, state)

    def transform(v):
        for after in afters:
            v = after(v) if isinstance(after, nn.Module) else after * v
        return v

    with torch.no_grad():
        run(base, x)
        run(model, x)
        d = delta(got["z"], adapter, handle.config)
        moved = got["ours"] - got["base"]
        assert rel_err(moved, transform(got["ffn"] + d) - transform(got["ffn"])) <= TOL
        assert rel_err(moved, d) > 0.3, "the delta must not skip the transform"


@pytest.mark.parametrize("family,gone", [("llama", "post_attention_layernorm"),
                                         ("olmo2", "post_feedforward_layernorm"),
                                         ("granite", "residual_multiplier"),
                                         ("granitemoe", "block_sparse_moe"),
                                         ("mpt", "ffn"), ("bloom", "self_attention"),
                                         ("hyperclovax", "post_norm2"),
                                         ("dinov2", "layer_scale2"), ("beit", "lambda_2"),
                                         ("bert", "output"), ("nemotron_h", "block_type")])
def test_a_layer_laid_out_otherwise_is_refused(family, gone):
    """A transformers version whose layer lacks a piece the table names (the norm before a
    sub-layer, the post-norm or the multiplier after it, either of two transforms after it, the
    FFN or the attention by its name, a layer scale: a module, or BEiT's parameter; Nemotron-H's
    block type) gets a named error, the model as it was."""
    model = tiny_model(family)
    name, layer = stack_of(model)[1]
    delattr(layer, gone)
    with pytest.raises(ValueError, match=rf"{re.escape(name)} \({type(layer).__name__}\) lacks "
                                         rf"\['{gone}'\], .*target_modules"):
        attach(model, placement="ffn")
    assert get_handle(model) is None and all(p.requires_grad for p in model.parameters())


def test_an_nn_sequential_is_refused_as_the_adapters_host(monkeypatch):
    """CTRL's FFN is an nn.Sequential, which would run a child adapter as one more stage, on
    fc2's output: its entry names the Linear layers inside (ffn_first ... ffn); an entry naming
    the Sequential itself is refused, the model as it was."""
    monkeypatch.setitem(SUPPORTED_ARCHITECTURES, "ctrl", replace(
        SUPPORTED_ARCHITECTURES["ctrl"], ffn="ffn", ffn_first=None))
    model = tiny_model("ctrl")
    with pytest.raises(ValueError, match=r"transformer\.h\.0 \(EncoderLayer\): \['ffn'\] is an "
                                         r"nn\.Sequential, which would run an adapter"):
        attach(model, placement="ffn")
    assert get_handle(model) is None and all(p.requires_grad for p in model.parameters())


def test_a_post_ln_output_module_without_its_residual_argument_is_refused():
    """BERT's output modules get the residual stream, z, as ``input_tensor``: a version that
    names that argument otherwise gets a named error, the model as it was."""
    model = tiny_model("bert")
    name, layer = stack_of(model)[1]
    layer.output.forward = lambda hidden_states, residual: hidden_states + residual
    with pytest.raises(ValueError, match=rf"{re.escape(name)} \(BertLayer\) lacks "
                                         rf"\['output\(input_tensor=\)'\], .*target_modules"):
        attach(model, placement="ffn")
    assert get_handle(model) is None and all(p.requires_grad for p in model.parameters())


def assert_checkpointing_reruns_the_hooks(model: nn.Module, handle, x, module: nn.Module) -> None:
    """Under non-reentrant gradient checkpointing ``model`` (in training mode, its dropouts
    off) computes the outputs and adapter gradients of its plain forward, and ``module``, which
    a hook rides on, runs again in the backward pass (the recompute re-runs the hooks)."""
    calls = []
    module.register_forward_pre_hook(lambda m, a: calls.append(1))

    def step():
        for p in handle.parameters():
            p.grad = None
        out = run(model, x)
        loss_of(out).backward()
        return out.detach(), [p.grad.clone() for p in handle.parameters()]

    out, grads = step()
    # transformers 5.25's name; 5.17 and 4.57 have the older one only
    enable = (getattr(model, "activation_checkpointing_enable", None)
              or model.gradient_checkpointing_enable)
    enable({"use_reentrant": False})
    del calls[:]
    out_ckpt, grads_ckpt = step()
    assert len(calls) == 2, "the layer's forward must run again in the backward pass"
    assert torch.equal(out_ckpt, out)
    assert all(rel_err(g, w) <= TOL for g, w in zip(grads_ckpt, grads))


def test_xmods_pre_norm_variant_is_refused():
    """X-MOD's table entry is its post-LN layer (pre_norm=False, the default, tested above); with
    pre_norm its norms run before the sub-layers, where that entry would take z from the
    residual stream: every placement is refused by name, the model as it was, and
    component-level placement still works."""
    model = tiny_model("xmod", pre_norm=True)
    for placement in ("ffn", "attn", "both"):
        with pytest.raises(NotImplementedError, match=r"encoder\.layer\.0 \(XmodLayer\) has "
                                                      r"pre_norm=True: X-MOD's pre-norm variant"):
            attach(model, placement=placement)
    assert get_handle(model) is None and all(p.requires_grad for p in model.parameters())
    attach(model, target_modules=["query", "value"]).remove()


def test_big_bird_is_tested_on_its_block_sparse_attention():
    """The tiny BigBird (EXTRA, 16 tokens) runs block-sparse attention: with too few tokens for
    its blocks the model falls back to full attention, and the oracle test would not see it."""
    model = tiny_model("big_bird")
    run(model, tiny_inputs("big_bird"))
    assert model.attention_type == "block_sparse"
    assert {type(layer.attention.self).__name__ for _, layer in stack_of(model)} == {
        "BigBirdBlockSparseAttention"}


@pytest.mark.parametrize("family", ["bert", "esm"])
def test_an_encoder_hooked_on_its_output_modules_checkpoints_and_saves(family):
    """BERT (post-LN) and ESM (pre-LN, the hook applying the norm again) with adapters on both
    sub-layers (forward pre-hooks on their output modules, which add the residual): under
    gradient checkpointing (the recompute re-runs the hooks) the outputs and gradients are the
    plain forward's; save_adapters and load_adapters give a fresh model the adapted outputs (by
    the adapters' paths). Compiled: test_switching_a_compiled_model_follows_the_switch."""
    from mtlora_kernels import load_adapters, save_adapters

    model = tiny_model(family, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    handle = attach(model.train(), MTLoRAConfig(r=4, num_experts=3, groups=2, dropout=0.0),
                    placement="both")
    randomize(handle)
    x = tiny_inputs(family)
    assert_checkpointing_reruns_the_hooks(model, handle, x, model.encoder.layer[0].output)

    model.eval()
    with tempfile.TemporaryDirectory() as d:
        save_adapters(handle, d)
        assert torch.equal(run(load_adapters(tiny_model(family), d).model, x), run(model, x))


# Layers whose FFN is Linear layers loose in the layer (the table's ffn_first, fc1 ... fc2).
LOOSE_FFN = ["opt", "xglm", "biogpt", "bart", "mbart"]


@pytest.mark.parametrize("family", LOOSE_FFN)
def test_an_ffn_of_loose_linear_layers_hands_z_from_its_first_to_its_last(family):
    """The FFN adapter hangs on fc2 and takes z from fc1's input, handed between two hooks
    (the one place block-level placement keeps state between hooks): under gradient
    checkpointing (the recompute calls fc1 and fc2 again, in order) the outputs and gradients
    are the plain forward's, no activation is left on the adapter after a forward, and fc2
    called without fc1 before it is refused."""
    model = tiny_model(family, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    handle = attach(model.train(), MTLoRAConfig(r=4, num_experts=3, groups=2, dropout=0.0),
                    placement="ffn")
    randomize(handle)
    x = tiny_inputs(family)
    layer = stack_of(model)[0][1]
    assert layer.fc2.mtlora_adapter is handle.adapters[
        f"{stack_of(model)[0][0]}.fc2.mtlora_adapter"]
    assert_checkpointing_reruns_the_hooks(model, handle, x, layer.fc1)
    assert all(a.span_input.z is None for a in handle.adapters.values())
    with pytest.raises(RuntimeError, match="without the FFN's first module"):
        layer.fc2(torch.randn(3, layer.fc2.in_features))


def test_an_ffn_call_that_raises_leaves_no_z_on_the_adapter():
    """An exception between fc1's hook and fc2's (here in the activation) left z on the adapter:
    the input, and its graph, stayed alive after the failed forward, and fc2 called alone then
    used it instead of refusing. The layer's hook drops it whether the call returns or raises;
    the next forward is the adapted model's."""
    model = tiny_model("opt")
    handle = attach(model, MTLoRAConfig(r=2, num_experts=3, groups=2, dropout=0.0),
                    placement="ffn")
    randomize(handle)
    x = tiny_inputs("opt")
    want = run(model, x)
    layer = stack_of(model)[0][1]

    def fail(module, args):
        raise ValueError("a failing activation")

    hook = layer.activation_fn.register_forward_pre_hook(fail)
    with pytest.raises(ValueError, match="a failing activation"):
        run(model, x)
    hook.remove()
    assert all(a.span_input.z is None for a in handle.adapters.values())
    with pytest.raises(RuntimeError, match="without the FFN's first module"):
        layer.fc2(torch.randn(x.numel(), layer.fc2.in_features))
    torch.testing.assert_close(run(model, x), want, rtol=0, atol=0)


def test_two_threads_running_an_ffn_of_loose_linear_layers_hand_over_their_own_z():
    """Two threads calling one adapted model at once (serving under no_grad, which a plain
    model allows): the z handed from fc1's hook to fc2's was one attribute, so one thread's fc2
    took the other's z (a silently wrong output) and the other's found none (RuntimeError).
    A barrier between fc1 and fc2 makes both threads hand over before either takes (copies:
    test_copies_of_an_adapted_model_carry_adapters_and_a_handle_of_their_own)."""
    import threading

    model = tiny_model("opt")
    handle = attach(model, MTLoRAConfig(r=2, num_experts=3, groups=2, dropout=0.0),
                    placement="ffn")
    randomize(handle)
    xs = [tiny_inputs("opt", seed=s) for s in (1, 2)]
    with torch.no_grad():
        want = [run(model, x) for x in xs]
    barrier = threading.Barrier(2, timeout=30)

    def both_handed_over(module, args):
        barrier.wait()

    for _, layer in stack_of(model):
        layer.activation_fn.register_forward_pre_hook(both_handed_over)
    got, errors = [None, None], []

    def work(i):
        try:
            with torch.no_grad():
                got[i] = run(model, xs[i])
        except Exception as e:  # reported below, and the other thread let past the barrier
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def data_parallel_copies(model: nn.Module, monkeypatch, n: int = 2) -> list[nn.Module]:
    """The n copies of ``model`` nn.DataParallel makes for a forward on n GPUs, made on the
    CPU: torch's replicate, its broadcast swapped for one that hands copy j the parameters and
    floating buffers times (1 + j/10). Copy j stands for the one on GPU j: a hook computing
    with the original model's modules instead of its copy's gives copy 1 another output."""
    import importlib

    replicate = importlib.import_module("torch.nn.parallel.replicate")

    def broadcast(tensors, devices, detach=False):
        return [[(t.detach() if detach else t) * (1 + j / 10) if t.is_floating_point() else t
                 for t in tensors] for j in range(len(devices))]

    monkeypatch.setattr(replicate, "_broadcast_coalesced_reshape", broadcast)
    return replicate.replicate(model, list(range(n)))


@pytest.mark.parametrize("family", ["llama", "opt", "bert"])
def test_data_parallel_copies_run_their_own_adapters_and_leave_no_balance_loss(family,
                                                                               monkeypatch):
    """nn.DataParallel (transformers' Trainer with several GPUs in one process) runs each forward
    in copies of the model: on a copy the hooks (a sub-layer's own, OPT's fc1 -> fc2 hand-over,
    BERT's output module) compute with the copy's adapters, as the same model with the copy's
    parameters does. The copies' routing weights go with them, so the balance loss refuses
    with the reason (it said the output was dropped, or read an older forward's routing) until
    the model runs a forward itself again."""
    model = tiny_model(family)
    handle = attach(model, MTLoRAConfig(r=2, num_experts=3, groups=2, dropout=0.0),
                    placement="ffn")
    randomize(handle)
    x = tiny_inputs(family)
    kept = run(model, x)  # an older forward, its output (and routing) still referenced
    copies = data_parallel_copies(model, monkeypatch)
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for t in [*moved.parameters(), *moved.buffers()]:
            if t.is_floating_point():
                t.mul_(1.1)
    assert torch.equal(run(copies[0], x), kept)
    out = run(copies[1], x)
    torch.testing.assert_close(out, run(moved, x), rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match="nn.DataParallel's replicas"):
        handle.aux_loss()
    kept = run(model, x)
    assert handle.aux_loss(spectral_weight=0.0) > 0


def test_an_esm_layout_refuses_data_parallel_copies(monkeypatch):
    """ESM's hook applies the layer's norm again, a module the hooked one does not hold: a copy
    made for another GPU would apply the original's (on the first GPU). It refuses instead."""
    model = tiny_model("esm")
    handle = attach(model, MTLoRAConfig(r=2, num_experts=3, groups=2), placement="ffn")
    randomize(handle)
    copies = data_parallel_copies(model, monkeypatch)
    with pytest.raises(RuntimeError, match="do not run under nn.DataParallel"):
        run(copies[1], tiny_inputs("esm"))


# OPT with do_layer_norm_before=False (OPT-350m) is post-LN, BART's layout: z is the layer's
# input for the attention, self_attn_layer_norm's output for the FFN, and the adapters' deltas
# join the sums the post-LNs normalize. The table's entry names the pre-LN variant's norms, which
# only the tests read (the hooks take z where the sub-layers get it); with the entry that names
# the post-LN variant's, the oracle holds for it.
POST_LN_OPT = replace(SUPPORTED_ARCHITECTURES["opt"], attn_norm=None,
                      ffn_norm="self_attn_layer_norm")


def test_post_ln_opt_matches_the_oracle_with_its_norms_named(monkeypatch):
    monkeypatch.setitem(SUPPORTED_ARCHITECTURES, "opt", POST_LN_OPT)
    monkeypatch.setitem(POST_LNS, "opt", ("self_attn_layer_norm", "final_layer_norm"))
    test_attach_matches_spec_and_removal_restores_the_model("opt-post_ln", dict(placement="both"))


@pytest.mark.parametrize("family", PRE_LN_OUTPUT)
def test_the_norm_the_hook_applies_again_is_the_sub_layers_own(family):
    """ESM's layout: the hook applies the sub-layer's norm to its output module's residual
    argument again. With adapters on, each of those norms runs twice a forward, the layer's call
    and the hook's, on the same tensor with the same output bit for bit (the adapter's z is the
    sub-layer's); disabled, once (the hook computes no norm for nothing), and the adapters keep
    the routing of the forward before."""
    model = distinct_norms(tiny_model(family))
    handle = attach(model, MTLoRAConfig(r=4, num_experts=3, groups=2), placement="both")
    randomize(handle)
    calls = {}
    for name, layer in stack_of(model):
        fam = family_of(model, layer)
        for norm in (fam.attn_norm, fam.ffn_norm):
            layer.get_submodule(norm).register_forward_hook(
                lambda m, args, out, key=(name, norm): calls.setdefault(key, []).append(
                    (args[0], out)))
    with torch.no_grad():
        run(model, tiny_inputs(family))
        assert len(calls) == 2 * len(stack_of(model))
        for (layers_in, layers_out), (hooks_in, hooks_out) in calls.values():  # two each
            assert torch.equal(layers_in, hooks_in) and torch.equal(layers_out, hooks_out)
        before = balance_loss(model)
        calls.clear()
        with handle.disabled():
            run(model, tiny_inputs(family, seed=5))
        assert all(len(c) == 1 for c in calls.values()) and len(calls) == 4
        # A disabled forward computes no routing: the balance loss is still the one before's.
        assert torch.equal(balance_loss(model), before) and before > 0


def _hooked(module: nn.Module, cfg: MTLoRAConfig) -> nn.Module:
    """``module`` holding a random adapter of width 16, as attach hangs one on its host."""
    from mtlora_kernels import MTLoRAAdapter

    setattr(module, ADAPTER_ATTR, MTLoRAAdapter(16, config=cfg))
    randomize(type("H", (), {"adapters": {"a": getattr(module, ADAPTER_ATTR)}})())
    return module


def test_the_hook_reads_z_from_the_first_argument_by_any_keyword():
    """A sub-layer called by keyword gets its adapter on that argument: ``hidden_states=``, or the
    name its forward gives its first parameter (DistilBERT's attention is called with query=,
    key=, value= in transformers 4); called without it, a named error rather than a KeyError."""

    class Attention(nn.Module):
        def forward(self, query=None, key=None, value=None):
            return (2 * (query if query is not None else key), None)

    cfg = MTLoRAConfig(r=4, num_experts=3, groups=2, alpha=8.0, dropout=0.0)
    sub = _hooked(Attention(), cfg)
    sub.register_forward_hook(_block_hook, with_kwargs=True)
    x = torch.randn(2, 5, 16)
    want = 2 * x + delta(x, getattr(sub, ADAPTER_ATTR), cfg)
    for call in (lambda: sub(x, x, x), lambda: sub(query=x, key=x, value=x)):
        assert rel_err(call()[0], want) <= TOL
    with pytest.raises(RuntimeError, match=r"Attention found no input: the layer called it with "
                                           r"keywords \['key', 'value'\].*nor query="):
        sub(key=x, value=x)

    class Passing(nn.Module):  # a forward that names no parameter hidden_states
        def forward(self, *args, **kwargs):
            return 2 * kwargs["hidden_states"]

    passing = Passing()
    setattr(passing, ADAPTER_ATTR, getattr(sub, ADAPTER_ATTR))
    passing.register_forward_hook(_block_hook, with_kwargs=True)
    assert rel_err(passing(hidden_states=x), want) <= TOL


def test_the_hook_keeps_the_outputs_kind_shape_and_other_elements():
    """A sub-layer's output: a tensor, a tuple (attention's weights, an MoE block's router
    logits after it) or a list (GPT-1's attention) gets the adapter's delta on its first element,
    the others passed on as they are, the container of its kind; an output of another shape
    than z with as many elements (Llama 4's MoE block: [B*S, d]) in its own shape."""

    class Sub(nn.Module):
        def __init__(self, kind):
            super().__init__()
            self.kind = kind

        def forward(self, h):
            y = 2 * h
            if self.kind == "flat":
                return y.reshape(-1, h.shape[-1])
            return y if self.kind is None else self.kind([y, h.sum(-1)])

    cfg = MTLoRAConfig(r=4, num_experts=3, groups=2, alpha=8.0, dropout=0.0)
    x = torch.randn(2, 5, 16)
    for kind in (None, "flat", tuple, list):
        sub = _hooked(Sub(kind), cfg)
        sub.register_forward_hook(_block_hook, with_kwargs=True)
        want = 2 * x + delta(x, getattr(sub, ADAPTER_ATTR), cfg)
        out = sub(x)
        if kind in (tuple, list):
            assert type(out) is kind and len(out) == 2 and torch.equal(out[1], x.sum(-1))
            out = out[0]
        elif kind == "flat":
            assert out.shape == (10, 16)
            want = want.reshape(10, 16)
        assert rel_err(out, want) <= TOL


def test_the_residual_hook_replaces_the_residual_argument_by_position_or_keyword():
    """The pre-hook on a module that ends a sub-layer and adds the residual r it gets (BERT's
    output modules; ESM's, with the sub-layer's norm) gives it ``r + adapter(z)`` for r, z = r
    (or norm(r)), whether the layer passes r by position or by keyword, the other arguments
    passed on as they are."""

    class Output(nn.Module):
        def forward(self, hidden_states, input_tensor, scale=1.0):
            return scale * hidden_states + input_tensor

    cfg = MTLoRAConfig(r=4, num_experts=3, groups=2, alpha=8.0, dropout=0.0)
    norm = distinct_norms(nn.LayerNorm(16))
    h, r = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    for n in (None, norm):
        out = _hooked(Output(), cfg)
        out.register_forward_pre_hook(functools.partial(
            _residual_hook, arg="input_tensor", index=_argument_index(out, "input_tensor"),
            norm=n), with_kwargs=True)
        want = 3 * h + r + delta(r if n is None else n(r), getattr(out, ADAPTER_ATTR), cfg)
        for call in (lambda: out(h, r, 3.0), lambda: out(h, input_tensor=r, scale=3.0),
                     lambda: out(hidden_states=h, input_tensor=r, scale=3.0)):
            assert rel_err(call(), want) <= TOL


def test_of_alternative_hosts_the_first_the_layer_has_gets_the_adapter(monkeypatch):
    """A table field of alternatives (a hybrid stack's ``self_attn`` or ``linear_attn``) names
    the host in its order: the first the layer has, where it has more than one of them."""
    monkeypatch.setitem(SUPPORTED_ARCHITECTURES, "llama", replace(
        SUPPORTED_ARCHITECTURES["llama"], attn=("linear_attn", "self_attn", "mlp")))
    handle = attach(tiny_model("llama"), MTLoRAConfig(r=2, num_experts=2, groups=1),
                    placement="attn")
    assert list(handle.adapters) == [f"model.layers.{i}.self_attn.mtlora_adapter"
                                     for i in (0, 1)]


def test_target_names_match_whole_path_parts_within_whole_layers():
    """A target name matches a module's path or its last dotted parts, not the end of a name
    ('q_proj' is not 'xq_proj'); layers=[1] scopes the targets to layer 1, not to every path
    that starts with 'model.layers.1' (layer 10's)."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.xq_proj = nn.Linear(8, 8), nn.Linear(8, 8)

    cfg = MTLoRAConfig(r=2, num_experts=2, groups=1)
    handle = attach(nn.Sequential(Block()), cfg, target_modules="q_proj")
    assert list(handle.adapters) == ["0.q_proj.adapter"]
    handle = attach(tiny_model("llama", layers=11), cfg, target_modules="q_proj", layers=[1])
    assert list(handle.adapters) == ["model.layers.1.self_attn.q_proj.adapter"]


def test_gemma4s_per_layer_input_and_layer_scalar_take_the_delta_as_the_ffns_output():
    """Gemma 4's layer goes on after the FFN's residual add h2 = h1 + PostNorm(FFN(z) +
    adapter(z)): out = s * (h2 + P(h2)), P its per-layer-input block (gate, times the layer's
    per-layer input, projection, norm), s its layer_scalar (0.5 here). By hand on the last
    layer: the adapter's delta goes through P and s as the FFN's output does."""
    model = tiny_model("gemma4_text")
    for layer in decoder_layers(model):
        layer.layer_scalar.fill_(0.5)
    base = copy.deepcopy(model)
    handle = attach(model, MTLoRAConfig(r=4, num_experts=3, groups=2, alpha=8.0, dropout=0.0),
                    placement="ffn", layers=[-1])
    randomize(handle)
    [adapter] = handle.adapters.values()
    layer = decoder_layers(base)[-1]
    got = {}
    capture_z(layer, family_of(base, layer), "mlp", got, "z")
    layer.pre_feedforward_layernorm.register_forward_pre_hook(
        lambda m, a: got.__setitem__("h1", a[0]))
    layer.mlp.register_forward_hook(lambda m, a, out: got.__setitem__("ffn", out))
    layer.register_forward_pre_hook(lambda m, a: got.__setitem__("per_layer_input", a[1]))
    decoder_layers(model)[-1].register_forward_hook(lambda m, a, out: got.__setitem__("ours", out))

    def rest(h2):  # s * (h2 + P(h2))
        p = layer.act_fn(layer.per_layer_input_gate(h2)) * got["per_layer_input"]
        return (h2 + layer.post_per_layer_input_norm(layer.per_layer_projection(p))) * 0.5

    x = tiny_inputs("gemma4_text")
    with torch.no_grad():
        run(base, x)
        run(model, x)
        d = delta(got["z"], adapter, handle.config)
        post = layer.post_feedforward_layernorm
        assert rel_err(got["ours"], rest(got["h1"] + post(got["ffn"] + d))) <= TOL
        assert rel_err(got["ours"], rest(got["h1"] + post(got["ffn"])) + d) > 0.1


@pytest.mark.parametrize("placement", ["ffn", "both"])
def test_gemma4_moe_layers_refuse_the_ffn_placement(placement):
    """Gemma 4's MoE layers (enable_moe_block) run router and experts beside the mlp, on another
    norm of h1, and add them between the mlp's two post-norms: no one module is their FFN.
    'ffn' and 'both' are refused, named, the model as it was; 'attn' (Gemma 2's layout there
    too) matches the oracle."""
    moe = dict(enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=16)
    model = tiny_model("gemma4_text", **moe)
    with pytest.raises(NotImplementedError, match=rf"placement='{placement}': model.layers.0 "
                                                  r"\(Gemma4TextDecoderLayer\) has 'experts': "
                                                  r"Gemma 4's MoE layers .*placement='attn'"):
        attach(model, placement=placement)
    assert get_handle(model) is None and all(p.requires_grad for p in model.parameters())
    base, x = copy.deepcopy(model), tiny_inputs("gemma4_text")
    handle = attach(model, MTLoRAConfig(r=4, num_experts=3, groups=2, dropout=0.0),
                    placement="attn")
    randomize(handle)
    assert rel_err(run(model, x), run(reference_model(base, handle), x)) <= TOL


def image_inputs(family: str) -> dict:
    """One image for ``family``'s tiny vision tower, as its get_image_features takes it (Qwen-VL,
    LFM3-VL, Cohere Compass: 16 flattened 4x4 patches of 2 frames, a 4x4 grid)."""
    g = torch.Generator().manual_seed(4)
    if family.startswith("qwen") or family in ("lfm3_vl", "cohere_compass"):
        return dict(pixel_values=torch.randn(16, 3 * 2 * 4 * 4, generator=g),
                    image_grid_thw=torch.tensor([[1, 4, 4]]))
    if family == "mistral3":
        return dict(pixel_values=torch.randn(1, 3, 32, 32, generator=g),
                    image_sizes=torch.tensor([[32, 32]]))
    if family == "gemma4":  # 16 flattened 4x4 patches and their (x, y) on a 4x4 grid
        grid = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(4), indexing="xy"), -1)
        return dict(pixel_values=torch.rand(1, 16, 3 * 4 * 4, generator=g),
                    image_position_ids=grid.reshape(1, 16, 2))
    if family == "dots3_note":  # 16 flattened 4x4 patches, one frame, a 4x4 grid
        return dict(pixel_values=torch.randn(16, 3 * 4 * 4, generator=g),
                    image_grid_thw=torch.tensor([[1, 4, 4]]))
    if family == "inkling_mm_model":  # 4 patches: 2 frames of 2x2 pixels, channels last
        return dict(pixel_values=torch.randn(4, 2, 2, 2, 3, generator=g))
    if family in ("emu3", "apertus1p5"):  # a VQ tokenizer's codes, embedded as text tokens
        return dict(pixel_values=torch.randn(1, 3, 16, 16, generator=g),
                    image_sizes=torch.tensor([[16, 16]]))
    if family == "fuyu":  # 4 flattened 8x8 patches
        return dict(pixel_values=torch.randn(1, 4, 3 * 8 * 8, generator=g))
    return dict(pixel_values=torch.randn(2, 3, 16, 16, generator=g))


@pytest.mark.parametrize("family", MULTIMODAL)
def test_multimodal_models_adapt_their_language_model_only(family):
    """A multimodal model (its model_type not in the table, its text_config's in it): adapters on
    its language model's decoder layers, layers=... counting those; none in the vision tower
    (whose layers have an ``mlp`` too) or the projector, whose image features stay what they
    were; the adapters as wide as the text model (32), not the vision tower (16)."""
    model = tiny_model(family)
    assert model.config.model_type not in SUPPORTED_ARCHITECTURES
    assert model.config.text_config.model_type == MULTIMODAL[family]

    def image_features():  # Fuyu's get_image_features is its model's (a Linear on the patches)
        get = getattr(model, "get_image_features", None) or model.model.get_image_features
        out = get(**image_inputs(family))
        if getattr(out, "pooler_output", None) is not None:
            out = out.pooler_output
        elif hasattr(out, "last_hidden_state"):
            out = out.last_hidden_state
        return torch.cat(list(out)) if isinstance(out, (list, tuple)) else out

    with torch.no_grad():
        before = image_features()
        handle = attach(model, MTLoRAConfig(r=2, num_experts=2, groups=2), placement="both")
        randomize(handle)
        lm = "text_model" if family == "emu3" else "language_model"  # Emu3's language model
        layers = list(getattr(model.model, lm).layers)
        ffn = first_present(layers[1], family_of(model, layers[1]).ffn)  # LFM3: feed_forward
        assert list(handle.adapters) == [
            f"model.{lm}.layers.{i}.{sub}.mtlora_adapter" for i in (0, 1)
            for sub in (first_present(layers[i], family_of(model, layers[i]).attn), ffn)]
        assert {a.d_in for a in handle.adapters.values()} == {32}
        assert torch.equal(image_features(), before)
        handle.remove()
        handle = attach(model, MTLoRAConfig(r=2, num_experts=2, groups=2), layers=[-1])
        assert list(handle.adapters) == [f"model.{lm}.layers.1.{ffn}.mtlora_adapter"]


def test_nemotron_h_omni_adapts_its_language_models_blocks():
    """Nemotron-H Omni (its text_config a nemotron_h; a RADIO vision tower, no audio tower): the
    multimodal rule puts the adapters on its language model's blocks by their kinds, and the
    oracle agrees on text (the tiny vision tower is not run here)."""
    text = {**SMALL, "vocab_size": 64, "num_key_value_heads": 2, "max_position_embeddings": 32,
            "head_dim": 8, "pad_token_id": None, "bos_token_id": 1, "eos_token_id": 2,
            **EXTRA["nemotron_h"]}
    torch.manual_seed(0)
    model = distinct_norms(transformers.AutoModelForImageTextToText.from_config(
        transformers.AutoConfig.for_model(
            "nemotron_h_omni", text_config=text, vision_hidden_size=16, projector_hidden_size=16,
            image_token_id=60, vision_config=dict(
                hidden_size=16, num_hidden_layers=1, num_attention_heads=2, patch_size=8,
                image_size=16, max_img_size=32, num_registers=1, num_cls_tokens=1,
                video_temporal_patch_size=2))).eval())
    assert model.config.model_type not in SUPPORTED_ARCHITECTURES
    base, x = copy.deepcopy(model), tiny_inputs("nemotron_h")
    handle = attach(model, MTLoRAConfig(r=4, num_experts=3, groups=2, alpha=8.0, dropout=0.0),
                    placement="ffn")
    assert list(handle.adapters) == [
        f"language_model.model.layers.{i}.mixer.mtlora_adapter" for i in (2, 3)]
    randomize(handle)
    assert rel_err(run(model, x), run(reference_model(base, handle), x)) <= TOL


def test_layers_of_the_class_outside_the_one_stack_are_refused():
    """A second stack of the layer class (a vision tower built of it, extra prediction layers)
    would get adapters too and shift the indices layers=... counts: refused, named."""
    model = tiny_model("llama")
    model.extra = nn.ModuleList([copy.deepcopy(model.model.layers[0])])
    with pytest.raises(ValueError, match=r"LlamaDecoderLayer modules in 2 places \(extra, "
                                         r"model.layers\) .*target_modules"):
        attach(model, placement="ffn")
    assert get_handle(model) is None and all(p.requires_grad for p in model.parameters())


def test_an_encoder_decoder_adapts_both_stacks_encoder_first():
    """T5: the encoder's blocks and the decoder's get adapters, layers=... counting the encoder's
    first (4 layers here: encoder 0, 1, decoder 0, 1); 'attn' adapts the decoder's
    self-attention, not its cross-attention; the FFN's adapter on the block's last sub-layer
    (layer.1 in the encoder, layer.2 in the decoder). The encoder alone (model.encoder,
    T5EncoderModel) is one stack of 2, and matches the oracle. A third stack of the class, two
    stacks not an encoder's and a decoder's, or two stacks in a model not of an encoder-decoder
    type are refused by the one-stack guard."""
    cfg = MTLoRAConfig(r=2, num_experts=2, groups=2, dropout=0.0)
    model = tiny_model("t5")
    assert normalized_layers(model, None) == [0, 1, 2, 3]
    handle = attach(model, cfg, placement="both", layers=[1, -2])
    assert handle.layers == [1, 2]
    assert list(handle.adapters) == [
        "encoder.block.1.layer.0.SelfAttention.mtlora_adapter",
        "encoder.block.1.layer.1.DenseReluDense.mtlora_adapter",
        "decoder.block.0.layer.0.SelfAttention.mtlora_adapter",
        "decoder.block.0.layer.2.DenseReluDense.mtlora_adapter"]
    handle.remove()
    handle = attach(model.encoder, cfg, placement="ffn", layers=[-1])
    assert list(handle.adapters) == ["block.1.layer.1.DenseReluDense.mtlora_adapter"]
    handle.remove()

    torch.manual_seed(0)
    encoder = transformers.T5EncoderModel(model.config).eval()
    distinct_norms(encoder)
    base, x = copy.deepcopy(encoder), tiny_inputs("llama")
    handle = attach(encoder, cfg, placement="both")
    assert len(handle.adapters) == 4
    randomize(handle)
    assert rel_err(run(encoder, x), run(reference_model(base, handle), x)) <= TOL

    for where, extra in (("extra", model.encoder.block[0]),  # a third stack
                         ("encoder.extra", model.encoder.block[0])):
        bad = copy.deepcopy(model)
        bad.get_submodule(where.rpartition(".")[0] or "").add_module(
            where.rpartition(".")[2], nn.ModuleList([copy.deepcopy(extra)]))
        with pytest.raises(ValueError, match=r"T5Block modules in 3 places"):
            attach(bad, placement="ffn")
    bad = copy.deepcopy(model)  # two stacks, not an encoder's and a decoder's
    bad.decoder.extra = bad.decoder.block
    del bad.decoder.block
    with pytest.raises(ValueError, match=r"T5Block modules in 2 places"):
        attach(bad, placement="ffn")
    llama = tiny_model("llama")  # two stacks named so, in a type that is no encoder-decoder
    llama.encoder = nn.Module()
    llama.encoder.layers = nn.ModuleList([copy.deepcopy(llama.model.layers[0])])
    llama.decoder = nn.Module()
    llama.decoder.layers = llama.model.layers
    del llama.model.layers
    with pytest.raises(ValueError, match=r"LlamaDecoderLayer modules in 2 places"):
        attach(llama, placement="ffn")


def test_t5gemmas_stacks_get_adapters_of_their_own_widths():
    """T5Gemma's encoder (32 wide in the tiny model) and decoder (16) differ in width: each
    adapter is as wide as its stack, and groups must divide both."""
    model = tiny_model("t5gemma")
    handle = attach(model, MTLoRAConfig(r=4, num_experts=3, groups=2), placement="both")
    widths = {(name.split(".")[1], a.lora_A.shape[1], a.lora_B.shape[1])
              for name, a in handle.adapters.items()}
    assert widths == {("encoder", 32, 32), ("decoder", 16, 16)}
    assert len(handle.adapters) == 8
    handle.remove()
    with pytest.raises(ValueError, match="groups=32 must divide hidden_size=16"):
        attach(model, MTLoRAConfig(r=4, num_experts=3, groups=32), placement="ffn")
    assert get_handle(model) is None


def test_switch_transformers_is_tested_on_both_kinds_of_ffn():
    """Block 0 of each stack of the tiny Switch Transformers holds a dense FFN, block 1 an MoE
    block, as EXTRA's num_sparse_*_layers say: the tests above see both."""
    model = tiny_model("switch_transformers")
    for stack in (model.encoder.block, model.decoder.block):
        dense, moe = (block.layer[-1].mlp for block in stack)
        assert "experts" not in dict(dense.named_children())
        assert "experts" in dict(moe.named_children())


@pytest.mark.parametrize("family", ["bart", "whisper"])
def test_an_encoder_decoder_of_two_layer_classes_adapts_both_stacks_encoder_first(family):
    """BART and Whisper: the encoder's layers (BartEncoderLayer) and the decoder's
    (BartDecoderLayer) get adapters, layers=... counting the encoder's first; 'attn' adapts the
    decoder's self-attention, not its cross-attention (encoder_attn); the FFN's adapter on fc2
    in both. The encoder alone (model.model.encoder) is one stack of 2. Two stacks not an
    encoder's and a decoder's are refused by the one-stack guard."""
    cfg = MTLoRAConfig(r=2, num_experts=2, groups=2, dropout=0.0)
    model = tiny_model(family)
    classes = [f.layer_class for f in SUPPORTED_ARCHITECTURES[family]]
    assert [type(m).__name__ for _, m in stack_of(model)] == [
        classes[0], classes[0], classes[1], classes[1]]
    assert normalized_layers(model, None) == [0, 1, 2, 3]
    handle = attach(model, cfg, placement="both", layers=[1, -2])
    assert handle.layers == [1, 2]
    assert list(handle.adapters) == [
        "model.encoder.layers.1.self_attn.mtlora_adapter",
        "model.encoder.layers.1.fc2.mtlora_adapter",
        "model.decoder.layers.0.self_attn.mtlora_adapter",
        "model.decoder.layers.0.fc2.mtlora_adapter"]
    handle.remove()
    handle = attach(model, cfg, placement="attn")
    assert [n for n in handle.adapters if "decoder" in n] == [
        f"model.decoder.layers.{i}.self_attn.mtlora_adapter" for i in (0, 1)]
    assert not any(hasattr(layer.encoder_attn, ADAPTER_ATTR)
                   for layer in model.model.decoder.layers)
    handle.remove()
    handle = attach(model.model.encoder, cfg, placement="ffn", layers=[-1])
    assert list(handle.adapters) == ["layers.1.fc2.mtlora_adapter"]
    handle.remove()
    bad = copy.deepcopy(model)  # two stacks, not an encoder's and a decoder's
    bad.model.decoder.extra = bad.model.decoder.layers
    del bad.model.decoder.layers
    with pytest.raises(ValueError, match=rf"{classes[0]} or {classes[1]} modules in 2 places"):
        attach(bad, placement="ffn")


def test_bart_decoder_alone_is_one_stack_and_matches_the_oracle(monkeypatch):
    """BartForCausalLM, BART's decoder alone: one stack of BartDecoderLayer. Without
    encoder_hidden_states its layers skip the cross-attention, so the FFN's z is the
    self-attention's post-LN output (the table names the cross-attention's norm, which the
    encoder-decoder's FFN reads: with that entry the oracle captures nothing); with the table's
    decoder entry naming it, the oracle holds."""
    decoder = replace(SUPPORTED_ARCHITECTURES["bart"][1], ffn_norm="self_attn_layer_norm")
    monkeypatch.setitem(SUPPORTED_ARCHITECTURES, "bart",
                        (SUPPORTED_ARCHITECTURES["bart"][0], decoder))
    model = tiny_model("bart-causal")
    assert [n for n, _ in stack_of(model)] == ["model.decoder.layers.0", "model.decoder.layers.1"]
    test_attach_matches_spec_and_removal_restores_the_model("bart-causal",
                                                            dict(placement="both"))


@pytest.mark.parametrize("family", ["nllb-moe"])
def test_nllb_moe_is_tested_on_both_kinds_of_ffn(family):
    """Layer 0 of each stack of the tiny NLLB-MoE holds a dense FFN, layer 1 an MoE block, as
    EXTRA's *_sparse_step say: the tests above see both."""
    model = tiny_model(family)
    for stack in (model.model.encoder.layers, model.model.decoder.layers):
        dense, moe = (layer.ffn for layer in stack)
        assert "experts" not in dict(dense.named_children())
        assert "experts" in dict(moe.named_children())


@pytest.mark.parametrize("model_class", ["ChineseCLIPModel", "AltCLIPModel"])
def test_a_dual_encoder_by_its_text_config_adapts_its_text_tower_alone(model_class):
    """A dual encoder whose text_config's type is in the table and whose vision tower is of
    another layer class (ChineseCLIPModel, AltCLIPModel; AlignModel, ClapModel likewise) goes by
    the multimodal rule: adapters on the text tower's layers only, at its width. Its text
    features move with them and its image features do not."""
    torch.manual_seed(0)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                vocab_size=64, max_position_embeddings=32)
    vision = dict(_VISION, num_hidden_layers=2)
    config = getattr(transformers, model_class.replace("Model", "Config"))(
        text_config=text, vision_config=vision, projection_dim=16)
    model = getattr(transformers, model_class)(config).eval()
    ids, images = tiny_inputs("llama"), tiny_inputs("vit")["pixel_values"]

    def features():
        with torch.no_grad():
            return (model.get_text_features(input_ids=ids, attention_mask=torch.ones_like(ids)),
                    model.get_image_features(pixel_values=images))

    def tensor(out):  # transformers 5 returns an output object where 4 returned the tensor
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    text_before, image_before = map(tensor, features())
    handle = attach(model, MTLoRAConfig(r=4, num_experts=3, groups=2), placement="both")
    randomize(handle)
    assert len(handle.adapters) == 4
    assert all(n.startswith("text_model.") and a.lora_A.shape[1] == 32
               for n, a in handle.adapters.items())
    text_after, image_after = map(tensor, features())
    assert rel_err(text_after, text_before) > 1e-3
    assert torch.equal(image_after, image_before)


@pytest.mark.parametrize("family", DUAL)
def test_a_dual_encoder_is_refused_and_its_vision_model_takes_adapters(family):
    """CLIPModel, SiglipModel, ...: a text tower of the vision tower's layer class beside it.
    attach refuses the whole model by the one-stack guard, naming both stacks and the way out,
    the model as it was; attached to its vision_model (a CLIPVisionModel, ..., its own type in
    the table) the adapters sit on the vision tower, as wide as it (32; the text tower 48),
    and the text features stay what they were."""
    torch.manual_seed(0)
    text = dict(hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=4, vocab_size=64, max_position_embeddings=16,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = transformers.AutoModel.from_config(vision_config(family, text=text)).eval()
    with pytest.raises(ValueError, match=r"EncoderLayer modules in 2 places \(text_model\.\S+, "
                                         r"vision_model\.\S+\) .*a dual encoder's vision_model"):
        attach(model, placement="ffn")
    assert get_handle(model) is None and all(p.requires_grad for p in model.parameters())

    def features(kind, x):
        out = getattr(model, f"get_{kind}_features")(**x)
        return out.pooler_output if hasattr(out, "pooler_output") else out

    ids = dict(input_ids=tiny_inputs("llama"))
    with torch.no_grad():
        text_before, image_before = features("text", ids), features("image", tiny_inputs(family))
        handle = attach(model.vision_model, MTLoRAConfig(r=2, num_experts=2, groups=2),
                        placement="both")
        randomize(handle)
        assert len(handle.adapters) == 4 and {a.d_in for a in handle.adapters.values()} == {32}
        assert torch.equal(features("text", ids), text_before)
        assert rel_err(features("image", tiny_inputs(family)), image_before) > 1e-3


# Vision types AutoModelForImageClassification builds a model of (its model_type the type's);
# DeiT's it maps to two, one by the config's architectures (the other, with a distillation
# head, takes no labels).
CLASSIFIERS = ["vit", "deit", "vit_msn", "ijepa", "dinov2", "dinov2_with_registers", "beit",
               "siglip"]
ARCHITECTURES = {"deit": ["DeiTForImageClassification"]}


@pytest.mark.parametrize("family", CLASSIFIERS)
def test_image_classifiers_match_the_oracle_and_train(family):
    """AutoModelForImageClassification's model (a head on the backbone, the backbone's
    model_type; a dual encoder's image classifier): adapters on the backbone's layers only,
    matching the oracle in eval; a training step (train mode, DINOv2's and BEiT's drop path
    live; the labels' loss plus aux_loss) sends gradients to every adapter parameter and to
    nothing else (attach freezes the classifier head with the rest of the base model)."""
    torch.manual_seed(0)
    model = transformers.AutoModelForImageClassification.from_config(
        vision_config(family, architectures=ARCHITECTURES.get(family))).eval()
    assert model.config.model_type == family
    base, x = copy.deepcopy(model), tiny_inputs(family)
    handle = attach(model, MTLoRAConfig(r=4, num_experts=3, groups=2, dropout=0.0),
                    placement="both")
    assert [n.rsplit(".", 2)[0] for n in handle.adapters][::2] == [n for n, _ in stack_of(model)]
    randomize(handle)
    ours = run(model, x)
    assert rel_err(ours, run(base, x)) > 1e-3
    assert rel_err(ours, run(reference_model(base, handle), x)) <= TOL
    model.train()
    out = model(**x, labels=torch.tensor([0, 1]))
    (out.loss + handle.aux_loss()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in handle.parameters())
    assert all(p.grad is None for n, p in model.named_parameters() if ".mtlora_adapter." not in n)


@pytest.mark.parametrize("family", ["llama", "opt"])  # opt: an FFN of loose Linear layers
@pytest.mark.parametrize("where", [dict(placement="both"), dict(target_modules="q_proj,v_proj")],
                         ids=["block", "component"])
def test_copies_of_an_adapted_model_carry_adapters_and_a_handle_of_their_own(where, family):
    """README: copy.deepcopy and torch.save / torch.load of the model carry the adapters and a
    handle whose remove() takes them off that copy alone (its hooks and wrappers, not the
    original's). OPT's block adapters also carry the per-thread hand-over of the FFN's input
    (a bare threading.local does not pickle)."""
    import io

    model = tiny_model(family)
    base = copy.deepcopy(model)
    handle = attach(model, MTLoRAConfig(r=4, num_experts=3), **where)
    randomize(handle)
    x = tiny_inputs(family)
    want, plain = run(model, x), run(base, x)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for twin in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        assert torch.equal(run(twin, x), want)
        twin_handle = get_handle(twin)
        assert twin_handle is not handle and twin_handle.model is twin
        twin_handle.remove()
        assert torch.equal(run(twin, x), plain)
        assert torch.equal(run(model, x), want)


@pytest.mark.parametrize("where", [dict(placement="both"), dict(target_modules="q_proj,v_proj")],
                         ids=["block", "component"])
def test_remove_restores_requires_grad_of_parameters_replaced_after_attach(where):
    """to('meta') + to_empty (and FSDP2's fully_shard) put new Parameter objects in the model:
    remove() restored the flags on the old objects and left the whole base model frozen. The
    state dict loaded back, the model computes as before, and the handle's parameters (what an
    optimizer gets) are the new objects."""
    model = tiny_model("llama")
    model.model.embed_tokens.weight.requires_grad_(False)  # a flag that must come back False
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    handle = attach(model, MTLoRAConfig(r=4, num_experts=3), **where)
    randomize(handle)
    x = tiny_inputs("llama")
    want, state = run(model, x), copy.deepcopy(model.state_dict())
    buffers = {n: b.clone() for n, b in model.named_buffers()}  # rotary's: not in the state dict
    model.to("meta").to_empty(device="cpu")
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        for n, b in model.named_buffers():
            b.copy_(buffers[n])
    assert torch.equal(run(model, x), want)
    live = {id(p) for p in model.parameters()}
    assert all(id(p) in live and p.requires_grad for p in handle.parameters())
    handle.remove()
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_wrapped_lm_head_stays_tied_through_tie_weights_and_remove():
    """Tied embeddings with lm_head wrapped: the wrapped head shares the embedding's weight, and
    transformers' tie_weights() after attach (which assigns ``lm_head.weight``) keeps it so; it
    registered a second ``lm_head.weight`` on the wrapper, a stray key in the state dict."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **SMALL, vocab_size=64, num_key_value_heads=2, tie_word_embeddings=True)).eval()
    embedding = model.model.embed_tokens.weight
    assert model.lm_head.weight is embedding
    x = tiny_inputs("llama")
    before = run(model, x)
    keys = list(model.state_dict())
    handle = attach(model, MTLoRAConfig(r=2, num_experts=2, groups=1),
                    target_modules="lm_head,q_proj")
    randomize(handle)
    adapted = run(model, x)
    attached_keys = list(model.state_dict())
    model.tie_weights()
    assert model.get_output_embeddings().weight is embedding
    assert list(model.state_dict()) == attached_keys
    assert torch.equal(run(model, x), adapted)
    handle.remove()
    assert model.lm_head.weight is embedding
    assert list(model.state_dict()) == keys
    assert torch.equal(run(model, x), before)


def test_model_code_reading_a_targets_weight_runs():
    """T5's feed-forward reads ``wo.weight.dtype`` in its forward: with wo wrapped it raised
    AttributeError."""
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
        decoder_start_token_id=0)).eval()
    x = tiny_inputs("llama")
    with torch.no_grad():  # attach's freezing alone moves T5's logits by 6e-7 under autograd
        before = model(input_ids=x, decoder_input_ids=x).logits
        handle = attach(model, MTLoRAConfig(r=2, num_experts=2, groups=1), target_modules="wo")
        assert torch.equal(model(input_ids=x, decoder_input_ids=x).logits, before)
        randomize(handle)
        assert rel_err(model(input_ids=x, decoder_input_ids=x).logits, before) > 1e-3


@pytest.mark.parametrize("where", PLACEMENTS, ids=[w.get("placement", "component")
                                                  for w in PLACEMENTS])
def test_training_step_under_autocast(where):
    """A tiny LLaMA with adapters trains under torch.autocast(bf16): outputs and every adapter
    gradient within bf16's tolerance of the fp32 run, or 2x the error of the same model in
    plain PyTorch (reference_model) under the same autocast. It raised a TypeError before
    (the sub-layer's bf16 output as residual beside fp32 hidden states)."""
    model = tiny_model("llama")
    base = copy.deepcopy(model)
    handle = attach(model, MTLoRAConfig(r=4, num_experts=3, groups=2, alpha=8.0, dropout=0.0),
                    **where)
    randomize(handle)
    plain = reference_model(base, handle)
    x = tiny_inputs("llama")

    def step(m, autocast: bool):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = run(m, x)
            loss_of(out.float()).backward()
        return out, taken_grads(handle)

    want, want_grads = step(model, False)
    ours, ours_grads = step(model, True)
    theirs, their_grads = step(plain, True)
    assert ours.dtype == torch.bfloat16
    assert_close_to_reference(ours, want, torch.bfloat16, "logits", baseline=theirs)
    for i, (g, w, t) in enumerate(zip(ours_grads, want_grads, their_grads)):
        assert_close_to_reference(g, w, torch.bfloat16, f"grad {i}", baseline=t)


def test_t5_loaded_in_fp16_trains_with_ffn_adapters():
    """T5 loaded in fp16 keeps ``wo`` in fp32 (transformers' ``_keep_in_fp32_modules``; its FFN
    casts its input to wo's dtype), so the FFN's output is fp32 beside its fp16 z: the default
    placement raised TypeError (the op's residual fp32, x fp16) at the first forward. The delta
    is computed in z's dtype and added in the output's: outputs and every adapter gradient
    within fp16's tolerance of the fp64 model, or 2x the error of the same in plain PyTorch."""
    model = tiny_model("t5").eval()
    ref = copy.deepcopy(model).double()
    for m in (model, plain := copy.deepcopy(model)):
        m.half()  # then wo back to fp32, as from_pretrained(dtype=torch.float16) loads it
        for name, module in m.named_modules():
            if name.endswith("DenseReluDense"):
                module.wo.float()
    handle = attach(model, MTLoRAConfig(r=4, num_experts=3, groups=2, alpha=8.0, dropout=0.0),
                    placement="ffn")
    randomize(handle)
    x = tiny_inputs("t5")

    def step(m):
        out = run(m, x)
        loss_of(out.double()).backward()
        return out, taken_grads(handle)

    ours, ours_grads = step(model)
    want, want_grads = step(reference_model(ref, handle))
    theirs, their_grads = step(reference_model(plain, handle))
    assert all(p.dtype == torch.float32 and g.dtype == torch.float32
               for p, g in zip(handle.parameters(), ours_grads))
    assert_close_to_reference(ours, want, torch.float16, "output", baseline=theirs)
    for i, (g, w, t) in enumerate(zip(ours_grads, want_grads, their_grads)):
        assert_close_to_reference(g, w, torch.float16, f"grad {i}", baseline=t)


@pytest.mark.parametrize("placement,g,expected", [("ffn", 1, 37_748_736), ("ffn", 2, 39_845_888),
                                                  ("component", 1, 75_497_472)])
def test_parameter_counts_are_the_papers_on_llama2_7b(placement, g, expected):
    """SPEC section 2: 37.7M (block FFN, g=1), 39.8M (g=2), 75.5M (HydraLoRA on W_q, W_v),
    r = N = 16 on LLaMA-2-7B (d = 4096, 32 layers); built on the meta device, no memory."""
    cfg = transformers.LlamaConfig(hidden_size=4096, intermediate_size=11008,
                                   num_hidden_layers=32, num_attention_heads=32, vocab_size=32000)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    mcfg = MTLoRAConfig(r=16, num_experts=16, groups=g)
    where = dict(target_modules="q_proj,v_proj") if placement == "component" else dict(
        placement=placement)
    handle = attach(model, mcfg, **where)
    assert handle.num_parameters() == expected
    assert handle.num_trainable_parameters() == expected


@pytest.mark.parametrize("placement,per_layer", [("ffn", 1), ("both", 2)])
def test_trainable_count_is_the_block_formula(placement, per_layer):
    model = tiny_model("llama")
    r, n, g, d, layers = 3, 5, 4, 32, 2
    handle = attach(model, MTLoRAConfig(r=r, num_experts=n, groups=g), placement=placement)
    formula = d * r + n * r * d + d * n * g
    assert handle.num_trainable_parameters() == layers * per_layer * formula
    assert len(handle.adapters) == layers * per_layer


def test_layers_selects_which_blocks_get_adapters():
    model = tiny_model("llama")
    handle = attach(model, MTLoRAConfig(r=2, num_experts=2, groups=1), placement="ffn",
                    layers=[-1])
    assert list(handle.adapters) == ["model.layers.1.mlp.mtlora_adapter"]
    handle.remove()
    handle = attach(model, MTLoRAConfig(r=2, num_experts=2, groups=1), target_modules=["q_proj"],
                    layers=[0])
    assert list(handle.adapters) == ["model.layers.0.self_attn.q_proj.adapter"]


def test_a_target_outside_the_selected_layers_is_named_so():
    """target_modules='lm_head' with layers=[0] said it matched no nn.Linear and then listed
    'lm_head' among the model's Linear names."""
    model = tiny_model("llama")
    want = (r"\['lm_head'\] match no nn.Linear \(or Conv1D\) in layers \[0\] of "
            r"LlamaForCausalLM; "
            r".* named \[[^]]*'q_proj'[^]]*\]$")
    with pytest.raises(ValueError, match=want) as err:
        attach(model, target_modules="q_proj,lm_head", layers=[0])
    assert "'lm_head'" not in str(err.value).partition("named")[2]
    assert get_handle(model) is None


@pytest.mark.parametrize("index", [np.int64(-1), np.int32(1), torch.tensor(1)],
                         ids=["np.int64", "np.int32", "tensor"])
def test_layer_indices_of_any_integer_type_are_taken(index):
    handle = attach(tiny_model("llama"), MTLoRAConfig(r=2, num_experts=2, groups=1),
                    placement="ffn", layers=[index])
    assert list(handle.adapters) == ["model.layers.1.mlp.mtlora_adapter"]
    assert handle.layers == [1] and type(handle.layers[0]) is int


@pytest.mark.parametrize("index", [True, np.True_, torch.tensor(True)],
                         ids=["bool", "np.bool", "bool-tensor"])
def test_bool_layer_indices_are_refused(index):
    """layers=[0, True] meant layer 1 (True's index) and was taken without a word."""
    model = tiny_model("llama")
    with pytest.raises(TypeError, match=r"layers\[1\] must be an integer, got"):
        attach(model, MTLoRAConfig(r=2, num_experts=2, groups=1), layers=[0, index])
    assert get_handle(model) is None


def test_aux_loss_is_the_packages_auxiliary_loss_and_has_gradients():
    model = tiny_model("llama").train()
    handle = attach(model, MTLoRAConfig(r=2, num_experts=4, groups=2, dropout=0.0),
                    placement="both")
    randomize(handle)
    out = run(model, tiny_inputs("llama"))  # kept: the routing lives with its graph
    balance = torch.stack([a.balance_loss() for a in handle.adapters.values()]).mean()
    torch.testing.assert_close(handle.aux_loss(spectral_weight=0.0), 0.01 * balance)
    loss = handle.aux_loss()
    # the defaults: balance 0.01 + the paper-variant spectral term at weight 1
    torch.testing.assert_close(loss, 0.01 * balance + SpectralRegularizer()(model))
    assert loss > 0.01 * balance > 0  # the spectral term is in
    loss.backward()
    for a in handle.adapters.values():
        assert a.lora_route.grad.abs().sum() > 0 and a.lora_B.grad.abs().sum() > 0


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_aux_loss_with_the_attention_mask_ignores_padding(family):
    """A right-padded batch with its attention_mask: the balance term over the real tokens is
    the one of the sequences run alone, unpadded (causal attention: the real tokens never see
    the padding); without the mask the padding counts. OPT's FFN adapters see the tokens
    flattened, [B*S, d], and take the [B, S] mask all the same."""
    model = tiny_model(family, dropout=0.0, attention_dropout=0.0).train()  # OPT's dropouts off
    handle = attach(model, MTLoRAConfig(r=2, num_experts=4, groups=2, dropout=0.0),
                    placement="both")
    randomize(handle)
    ids = tiny_inputs(family)  # [2, 7]
    short = ids[:1, :4]
    routing = []
    for alone in (short, ids[1:]):
        out = model(alone)  # kept (as below): the routing lives with its graph
        routing.append({k: a._last_routing().reshape(-1, 2, 4)
                        for k, a in handle.adapters.items()})
    want = torch.stack([balance_loss_reference(torch.cat([r[k] for r in routing]))
                        for k in handle.adapters]).mean()
    padded = ids.clone()
    padded[0, 4:] = 0
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    out = model(padded, attention_mask=mask)
    got = handle.aux_loss(spectral_weight=0.0, mask=mask) / 0.01
    torch.testing.assert_close(got, want, rtol=1e-4, atol=0)
    assert abs(handle.aux_loss(spectral_weight=0.0) / 0.01 - want) > 1e-3 * want


def test_enable_disable_round_trip_component_level():
    model = tiny_model("qwen2")
    x = tiny_inputs("qwen2")
    before = run(model, x)
    handle = attach(model, MTLoRAConfig(r=2, num_experts=2, groups=1), target_modules="o_proj")
    randomize(handle)
    adapted = run(model, x)
    handle.disable()
    assert not handle.enabled and torch.equal(run(model, x), before)
    handle.enable()
    assert torch.equal(run(model, x), adapted)


def test_disabled_gives_back_each_adapters_own_switch():
    """One adapter switched off by hand (an ablation) came out of ``disabled()`` with every
    adapter off, its outputs silently the base model's; with all on, a remove() inside the block
    made the exit raise."""
    model = tiny_model("llama")
    x = tiny_inputs("llama")
    handle = attach(model, MTLoRAConfig(r=2, num_experts=2, groups=1), placement="ffn")
    randomize(handle)
    first, second = handle.adapters.values()
    first.enabled = False
    assert not handle.enabled  # enabled: every adapter is on
    ablated = run(model, x)
    with handle.disabled():
        assert not second.enabled
    assert (first.enabled, second.enabled) == (False, True)
    assert torch.equal(run(model, x), ablated)
    # The ablated model's balance term is the adapter still on's (aux_loss refused it: "the
    # adapters are disabled"), with its gradient.
    out = run(model, x)
    got = handle.aux_loss(spectral_weight=0)
    assert torch.equal(got, 0.01 * second.balance_loss()) and got > 0
    got.backward()
    assert second.lora_route.grad.abs().sum() > 0 and first.lora_route.grad is None
    del out
    first.enabled = True
    assert handle.enabled
    with handle.disabled():
        handle.remove()
    assert get_handle(model) is None


@pytest.mark.parametrize("family,where", [("llama", dict(placement="ffn")),
                                          ("llama", dict(target_modules="o_proj")),
                                          ("bert", dict(placement="both")),
                                          ("opt", dict(placement="both"))],
                         ids=["block", "component", "post_ln", "loose_ffn"])
def test_switching_a_compiled_model_follows_the_switch(family, where):
    """A compiled model computes base outputs while the adapters are disabled and the adapted
    ones again after enable() (with forward hooks toggled, dynamo, which does not guard on hooks,
    reused the hook-less graph: base outputs after enable(), no error); BERT's adapters run from
    forward pre-hooks, OPT's FFN adapters from two hooks that hand z from fc1 to fc2."""
    model = tiny_model(family)
    x = tiny_inputs(family)
    before = run(model, x)
    handle = attach(model, MTLoRAConfig(r=2, num_experts=3, groups=2, dropout=0.0), **where)
    randomize(handle)
    adapted = run(model, x)
    assert rel_err(adapted, before) > 1e-2
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")  # the bug is in dynamo's guards
    with torch.no_grad():
        outs = [run(compiled, x)]
        handle.disable()
        outs.append(run(compiled, x))
        handle.enable()
        outs.append(run(compiled, x))
    for got, want, what in zip(outs, (adapted, before, adapted),
                               ("adapted", "disabled", "re-enabled")):
        assert rel_err(got, want) <= TOL, what


@pytest.mark.parametrize("where", [dict(placement="ffn"), dict(target_modules="o_proj")],
                         ids=["block", "component"])
def test_a_reference_forward_while_disabled_keeps_the_adapted_forwards_balance_term(where):
    """A KL-to-base step: the adapted forward, then the base model's reference logits under
    ``disabled()``, then the loss with the balance term. That term is the adapted forward's,
    with its gradient to the routers (the disabled forward raised here: no routing)."""
    model = tiny_model("llama")
    x = tiny_inputs("llama")
    handle = attach(model, MTLoRAConfig(r=2, num_experts=3, groups=2, dropout=0.0), **where)
    randomize(handle)
    adapted = run(model, x)
    want = handle.aux_loss(spectral_weight=0)
    (want_grad,) = torch.autograd.grad(want, [handle.adapters[next(iter(handle.adapters))]
                                              .lora_route], retain_graph=True)
    with handle.disabled():
        ref = run(model, x)
    assert rel_err(adapted, ref) > 1e-3  # the adapters change the output
    got = handle.aux_loss(spectral_weight=0)
    (got_grad,) = torch.autograd.grad(got, [handle.adapters[next(iter(handle.adapters))]
                                            .lora_route])
    assert got.item() == want.item() > 0
    assert torch.equal(got_grad, want_grad) and want_grad.abs().sum() > 0


@pytest.mark.parametrize("where", [dict(placement="ffn"), dict(target_modules="o_proj")],
                         ids=["block", "component"])
def test_disabled_adapters_stay_in_the_model(where):
    """While disabled the adapters are still the model's parameters: model.to() moves them and
    the state_dict keeps its keys; the handle's aux_loss refuses to run while they are off."""
    model = tiny_model("llama")
    x = tiny_inputs("llama")
    handle = attach(model, MTLoRAConfig(r=2, num_experts=3, groups=2, dropout=0.0), **where)
    randomize(handle)
    adapted = run(model, x)
    keys = list(model.state_dict())
    handle.disable()
    adapter_params = {id(p) for p in handle.parameters()}
    assert adapter_params <= {id(p) for p in model.parameters()}
    assert list(model.state_dict()) == keys
    run(model, x)
    with pytest.raises(RuntimeError, match="disabled"):
        handle.aux_loss()
    model.to(torch.float64)
    handle.enable()
    assert {p.dtype for p in handle.parameters()} == {torch.float64}
    assert rel_err(run(model, x).float(), adapted) <= TOL


# --- train_modules: a task head that trains beside the adapters --------------------------------


def head_model(case: str, seed: int = 0) -> tuple[nn.Module, str, dict, str]:
    """(model, its tiny_inputs family, placement, head) for a train_modules test: image
    classifiers of ViT and DINOv2 (block-level), a LLaMA causal LM's ``lm_head`` and a LLaMA
    sequence classifier's ``score`` (component- and block-level), a BERT sequence classifier's
    ``classifier`` (block-level, 'both'). The head is filled with fresh
    random values (its bias starts at zero)."""
    torch.manual_seed(seed)
    if case in ("vit", "dinov2"):
        model = transformers.AutoModelForImageClassification.from_config(
            vision_config(case, num_labels=3))
        where, head = dict(placement="both" if case == "vit" else "ffn"), "classifier"
    elif case == "llama-lm_head":
        model = tiny_model("llama", seed)
        where, head = dict(target_modules="q_proj,v_proj"), "lm_head"
    elif case == "bert-classifier":  # a post-LN encoder's sequence classifier (GLUE's)
        config = tiny_model("bert").config
        config.num_labels = 3
        torch.manual_seed(seed)
        model = transformers.AutoModelForSequenceClassification.from_config(config)
        where, head = dict(placement="both"), "classifier"
    else:
        config = tiny_model("llama").config
        config.pad_token_id, config.num_labels = 0, 3
        torch.manual_seed(seed)
        model = transformers.AutoModelForSequenceClassification.from_config(config)
        where, head = dict(placement="attn"), "score"
    fill(model.get_submodule(head), seed + 10)
    return model.eval(), case.partition("-")[0], where, head


HEAD_CASES = ["vit", "dinov2", "llama-lm_head", "llama-score", "bert-classifier"]


def fill(module: nn.Module, seed: int) -> None:
    """Fresh random values in every parameter of ``module``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


@pytest.mark.parametrize("case", HEAD_CASES)
def test_train_modules_train_with_the_adapters_and_remove_restores_them(case):
    """attach(..., train_modules=head): the head's parameters need grad and are the handle's
    (parameters(), state_dict(), num_parameters()) beside the adapters'; one SGD step on
    handle.parameters() changes the adapters and the head and nothing else, and the auxiliary
    loss does not reach the head; disabled() keeps the trained head (the base model with it);
    remove() gives the original outputs, values and flags back."""
    model, family, where, head = head_model(case)
    for p in model.get_submodule(head).parameters():
        p.requires_grad_(False)  # a flag remove() must give back (attach sets it True)
    x = tiny_inputs(family)
    before = run(model, x)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    original = {k: v.clone() for k, v in model.state_dict().items()}
    base = copy.deepcopy(model)
    cfg = MTLoRAConfig(r=4, num_experts=3, groups=2, dropout=0.0)

    handle = attach(model, cfg, **where, train_modules=[head])
    assert handle.train_modules == [head] and head in repr(handle)
    head_names = {f"{head}.{k}" for k, _ in model.get_submodule(head).named_parameters()}
    adapter_names = {f"{n}.{k}" for n, a in handle.adapters.items()
                     for k, _ in a.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == adapter_names | head_names and head_names
    params = dict(model.named_parameters())
    in_order = [f"{n}.{k}" for n, a in handle.adapters.items() for k, _ in a.named_parameters()]
    in_order += [f"{head}.{k}" for k, _ in model.get_submodule(head).named_parameters()]
    assert [(n, id(p)) for n, p in handle.named_parameters()] == [(n, id(params[n]))
                                                                 for n in in_order]
    assert [id(p) for p in handle.parameters()] == [id(p) for _, p in handle.named_parameters()]
    assert set(handle.state_dict()) == trainable
    assert handle.num_parameters() == sum(params[n].numel() for n in trainable)

    randomize(handle)
    out = run(model, x)
    head_params = list(model.get_submodule(head).parameters())
    assert all(g is None for g in torch.autograd.grad(handle.aux_loss(), head_params,
                                                      allow_unused=True, retain_graph=True))
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(handle.parameters(), lr=0.1)
    (loss_of(out) + handle.aux_loss()).backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, state[n])}
    assert changed == trainable

    # Disabled: the base model with the trained head (the head is the model's, no adapter).
    trained_head = {k: v.clone() for k, v in model.get_submodule(head).state_dict().items()}
    base.get_submodule(head).load_state_dict(trained_head)
    base.get_submodule(head).requires_grad_(True)
    with handle.disabled():
        assert torch.equal(run(model, x), run(base, x))
        assert all(p.requires_grad for p in head_params)
    assert not torch.equal(run(base, x), before)

    handle.remove()
    assert torch.equal(run(model, x), before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert list(model.state_dict()) == list(original)
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())


# --- bad input -------------------------------------------------------------------------------


def test_unknown_placement_is_refused_and_the_model_untouched():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="placement must be one of"):
        attach(model, placement="mlp")
    with pytest.raises(ValueError, match="not both"):
        attach(model, placement="ffn", target_modules=["q_proj"])
    assert get_handle(model) is None and all(p.requires_grad for p in model.parameters())


def test_missing_or_non_linear_targets_are_named():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"\['qkv_proj'\].*named \[.*'q_proj'"):
        attach(model, target_modules=["q_proj", "qkv_proj"])
    with pytest.raises(TypeError, match="post_attention_layernorm is a LlamaRMSNorm"):
        attach(model, target_modules=["post_attention_layernorm"])
    assert get_handle(model) is None and all(p.requires_grad for p in model.parameters())
    # A Linear whose owner reads its weight (MultiheadAttention's out_proj) never runs forward.
    mha = nn.Sequential(nn.MultiheadAttention(8, 2, batch_first=True))
    with pytest.raises(TypeError, match="0.out_proj belongs to an nn.MultiheadAttention"):
        attach(mha, target_modules="out_proj")
    assert get_handle(mha) is None


def test_bad_train_modules_are_refused_and_the_model_untouched():
    """A name that matches nothing (the names that exist are listed), an adapted module or one
    holding it, the adapters themselves, a module without parameters, a weight tied to a target,
    and an empty list: each refused before the model is touched."""
    model = tiny_model("llama")
    cases = [
        (dict(placement="ffn", train_modules="classifier"),
         r"train_modules \['classifier'\] match no module of LlamaForCausalLM; its modules with "
         r"parameters are named \[.*'lm_head'.*'mlp'.*\]"),
        (dict(target_modules="q_proj", train_modules="lm_head,q_proj"),
         r"train_modules: model\.layers\.0\.self_attn\.q_proj gets an adapter; a module that "
         r"trains must lie outside the adapted ones"),
        (dict(placement="ffn", train_modules="mlp"),
         r"model\.layers\.0\.mlp gets an adapter"),
        (dict(target_modules="v_proj", train_modules="self_attn"),
         r"model\.layers\.0\.self_attn holds model\.layers\.0\.self_attn\.v_proj, which gets an "
         r"adapter"),
        (dict(placement="attn", layers=[1], train_modules="model"),
         r"model holds model\.layers\.1\.self_attn, which gets an adapter"),
        (dict(placement="ffn", train_modules="mtlora_adapter"),
         r"\['mtlora_adapter'\] name the mtLoRA adapters, which train anyway"),
        (dict(target_modules="q_proj", train_modules=["q_proj.adapter"]),
         r"\['q_proj.adapter'\] name the mtLoRA adapters"),
        (dict(placement="ffn", train_modules="rotary_emb"),
         r"train_modules: \['model\.rotary_emb'\] have no parameters to train"),
        (dict(placement="ffn", train_modules=" , "), "train_modules is empty"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            attach(model, MTLoRAConfig(r=2, num_experts=2, groups=1), **kwargs)
        assert get_handle(model) is None and all(p.requires_grad for p in model.parameters())
    tied = tiny_model("llama", tie_word_embeddings=True)
    with pytest.raises(ValueError, match=r"model\.embed_tokens shares a parameter with lm_head "
                                         r"\(tied weights\), which gets an adapter"):
        attach(tied, target_modules="lm_head", train_modules="embed_tokens")
    assert get_handle(tied) is None and all(p.requires_grad for p in tied.parameters())


def test_unsupported_architecture_gets_a_clear_error():
    """ALBERT shares one layer module across depth (docs/MODELS.md's "Not supported")."""
    torch.manual_seed(0)
    albert = transformers.AlbertModel(transformers.AlbertConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        embedding_size=16, vocab_size=64))
    with pytest.raises(NotImplementedError, match=r"supports model types afmoe, "
                       r"aimv2_vision_model, .*, vit, vit_mae, vit_msn, (.*, )?youtu, (\S+, )*"
                       r"multimodal "
                       r"models whose text_config has one of these types, and the image "
                       r"classifiers of "
                       r"the dual encoders clip, metaclip_2, siglip, siglip2; AlbertModel has "
                       r"model_type 'albert'.*target_modules") as err:
        attach(albert, placement="ffn")
    assert ", ".join(sorted(SUPPORTED_ARCHITECTURES)) in str(err.value)
    with pytest.raises(ValueError, match="layers=.*supported architecture"):
        attach(albert, target_modules=["query"], layers=[0])


def test_gpt2_conv1d_targets_are_wrapped_and_removed():
    """GPT-2's c_attn / c_fc are transformers' Conv1D (a linear layer with its weight stored
    [d_in, d_out]), not nn.Linear: attach refused them. Wrapped, they compute
    base(x) + mix_reference(x, ...) and train, save, load and come off like Linear targets."""
    from mtlora_kernels import load_adapters, save_adapters

    def gpt2():
        torch.manual_seed(0)
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=16)).eval()

    model, x = gpt2(), tiny_inputs("gpt2")
    before, keys = run(model, x), list(model.state_dict())
    model.transformer.wte.requires_grad_(False)  # a flag remove() must bring back False
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    base = copy.deepcopy(model)
    with pytest.raises(TypeError, match="ln_1 is a LayerNorm; .*nn.Linear .*Conv1D"):
        attach(model, target_modules="c_attn,ln_1")
    handle = attach(model, MTLoRAConfig(r=4, num_experts=3, groups=2, dropout=0.0),
                    target_modules="c_attn,c_fc")
    assert len(handle.adapters) == 4
    assert handle.adapters["transformer.h.0.attn.c_attn.adapter"].d_out == 96  # 3 * n_embd
    randomize(handle)
    ours = run(model, x)
    assert rel_err(ours, before) > 1e-3
    assert rel_err(ours, run(reference_model(base, handle), x)) <= TOL
    loss_of(ours).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in handle.parameters())
    with handle.disabled():
        assert torch.equal(run(model, x), before)
    with tempfile.TemporaryDirectory() as d:
        save_adapters(handle, d)
        assert torch.equal(run(load_adapters(gpt2(), d).model, x), ours)
    handle.remove()
    assert torch.equal(run(model, x), before) and list(model.state_dict()) == keys
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_other_config_errors():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="groups=3 must divide hidden_size=32"):
        attach(model, MTLoRAConfig(groups=3))
    with pytest.raises(ValueError, match=r"indices \[5\] out of range .* 2 layers"):
        attach(model, layers=[5])
    with pytest.raises(ValueError, match=r"layers=\[\] selects no layer"):
        attach(model, layers=[])
    with pytest.raises(TypeError, match="MTLoRAConfig"):
        attach(model, {"r": 4})
    handle = attach(model, MTLoRAConfig(r=2, num_experts=2, groups=1))
    with pytest.raises(RuntimeError, match="already has mtLoRA adapters"):
        attach(model)
    handle.remove()
    with pytest.raises(RuntimeError, match="removed"):
        handle.enable()


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(dtype=torch.int64), TypeError, r"dtype \(the adapters' parameters\) must be one of"),
    (dict(dtype=torch.complex64, target_modules="q_proj"), TypeError, "dtype .* must be one of"),
    (dict(dtype="bfloat16"), TypeError, "dtype .* must be one of"),
    (dict(layers=1), TypeError, "layers must be a sequence of layer indices, got int 1"),
], ids=["int", "complex", "str", "layers-int"])
def test_a_bad_dtype_or_layers_is_refused_and_the_model_untouched(kwargs, error, message):
    """An integer or string dtype failed in the adapters' .to() after attach had frozen the
    model, which stayed frozen; a complex one gave adapters the op refuses at the forward."""
    model = tiny_model("llama")
    with pytest.raises(error, match=message):
        attach(model, MTLoRAConfig(r=2, num_experts=2, groups=1), **kwargs)
    assert get_handle(model) is None and all(p.requires_grad for p in model.parameters())


def test_importing_the_package_does_not_import_transformers():
    """Nor torch._dynamo or triton (1.4 s more per import, and triton would read
    TRITON_INTERPRET before the kernel report's workers clear it)."""
    import pathlib
    import subprocess
    import sys

    code = ("import sys, mtlora_kernels; mtlora_kernels.attach; "
            "heavy = {'transformers', 'torch._dynamo', 'triton'} & set(sys.modules); "
            "assert not heavy, f'{heavy} imported'")
    subprocess.run([sys.executable, "-c", code], check=True,
                   cwd=pathlib.Path(__file__).resolve().parents[1])


# Decoders whose cache holds a recurrent or convolution state beside the KV cache: a decode step
# runs their mixers (and the adapters beside them) on one new token.
STATEFUL = ["qwen3_next", "jamba", "bamba", "falcon_h1", "lfm2", "recurrent_gemma", "nemotron_h",
            "mamba", "mamba2", "falcon_mamba", "rwkv", "xlstm"]
# RWKV's one-token decode step mixes the state's [B, d] into the token's [B, 1, d] by
# broadcasting, to [B, B, d]: transformers' own cached generate goes wrong beyond one sequence
# (with adapters the hook then refuses the shape). Generated from one sequence.
ONE_SEQUENCE = ["rwkv"]
GENERATE_CASES = ([("llama", dict(placement="both")),
                   ("llama", dict(target_modules="q_proj,v_proj"))]
                  + [(f, dict(placement="both")) for f in STATEFUL + ["opt", "bart-causal"]])


@pytest.mark.parametrize("family,where", GENERATE_CASES,
                         ids=["block", "component"] + STATEFUL + ["loose_ffn", "bart-causal"])
def test_generate_with_the_kv_cache_matches_full_forwards(family, where):
    """Greedy ``generate`` with adapters attached: its cached decode steps (one new token per
    sequence through the adapters) pick the tokens that full forwards over the whole prefix
    pick, and no cache gives the same."""
    model = tiny_model(family)
    handle = attach(model, MTLoRAConfig(r=4, num_experts=3, groups=2, dropout=0.1), **where)
    randomize(handle)
    prompt = tiny_inputs(family)[:1 if family in ONE_SEQUENCE else None]
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0,
              attention_mask=torch.ones_like(prompt))  # else the prompt's 0s count as padding
    with torch.no_grad():
        cached = model.generate(prompt, use_cache=True, **kw)
        uncached = model.generate(prompt, use_cache=False, **kw)
        ids = prompt
        for _ in range(6):
            ids = torch.cat([ids, run(model, ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
        with handle.disabled():
            base = model.generate(prompt, use_cache=True, **kw)
    assert torch.equal(cached, ids) and torch.equal(uncached, ids)
    assert not torch.equal(base, ids), "the adapters must change what is generated"


@pytest.mark.parametrize("where", [dict(placement="both"),
                                   dict(target_modules="q_proj,k_proj,v_proj")],
                         ids=["block", "component"])
def test_left_padded_batched_generation_is_each_prompt_generated_alone(where):
    """Serving in bf16 under inference_mode: greedy ``generate`` on three left-padded prompts
    picks, with the KV cache and without, the tokens each prompt picks alone (each token is
    routed by itself: padding and the other rows change nothing, and a decode step computes a
    token as the prefill does), and the adapters change them. After it each adapter holds the
    last step's routing alone, nothing accumulated over the steps, and aux_loss with gradients
    on refuses it rather than return a value of that inference step."""
    model = tiny_model("llama").to(torch.bfloat16)
    handle = attach(model, MTLoRAConfig(r=4, num_experts=3, groups=2, dropout=0.1),
                    dtype=torch.bfloat16, **where)
    randomize(handle)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 64, (n,), generator=g) for n in (7, 4, 2)]
    ids = torch.stack([nn.functional.pad(p, (7 - len(p), 0)) for p in prompts])  # pad id 0
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)

    def alone() -> torch.Tensor:
        return torch.stack([model.generate(p[None], attention_mask=torch.ones(1, len(p)), **kw)
                            [0, len(p):] for p in prompts])

    with torch.inference_mode():
        cached = model.generate(ids, attention_mask=(ids != 0).long(), **kw)[:, 7:]
    assert {tuple(a._last_routing().shape) for a in handle.adapters.values()} == {(3, 1, 2, 3)}
    with pytest.raises(RuntimeError, match="ran without autograd"):  # the last step's [B, 1, g, N]
        handle.aux_loss()
    with torch.inference_mode():
        uncached = model.generate(ids, attention_mask=(ids != 0).long(), use_cache=False,
                                  **kw)[:, 7:]
        each = alone()
        with handle.disabled():
            base_batched = model.generate(ids, attention_mask=(ids != 0).long(), **kw)[:, 7:]
            base = alone()
    if not torch.equal(base_batched, base):
        pytest.skip("this CPU's bf16 GEMMs change the base model's tokens with the batch")
    assert torch.equal(cached, each) and torch.equal(uncached, each)
    assert not torch.equal(each, base), "the adapters must change what is generated"


@pytest.mark.parametrize("family", ["t5", "t5gemma", "bart", "mbart"])
def test_an_encoder_decoder_generates_what_its_full_forwards_pick(family):
    """T5, T5Gemma, BART and mBART with adapters in both stacks: greedy ``generate`` (the
    encoder once, the decoder one token per step with its self- and cross-attention caches;
    BART's FFN adapters from the hooks on fc1 and fc2) picks the tokens that one full forward
    over the generated target picks, and the adapters change them."""
    model = tiny_model(family)
    handle = attach(model, MTLoRAConfig(r=4, num_experts=3, groups=2, dropout=0.1),
                    placement="both")
    randomize(handle)
    source = tiny_inputs(family)["input_ids"]
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)  # no early end of sequence
    with torch.no_grad():
        out = model.generate(input_ids=source, **kw)
        full = model(input_ids=source, decoder_input_ids=out[:, :-1]).logits.argmax(-1)
        with handle.disabled():
            base = model.generate(input_ids=source, **kw)
    assert torch.equal(full, out[:, 1:])
    assert not torch.equal(base, out), "the adapters must change what is generated"


def test_whispers_encoder_and_decoder_alone_are_one_stack_each():
    """Whisper's audio classifier (its encoder alone) and its decoder-only model
    (WhisperForCausalLM) are one stack each; the classifier matches the oracle in
    test_attach_matches_spec_and_removal_restores_the_model."""
    cfg = MTLoRAConfig(r=2, num_experts=2, groups=2)
    model = tiny_model("whisper")
    handle = attach(tiny_model("whisper-classifier"), cfg, placement="ffn")
    assert list(handle.adapters) == [f"encoder.layers.{i}.fc2.mtlora_adapter" for i in (0, 1)]
    torch.manual_seed(0)
    decoder = transformers.WhisperForCausalLM(model.config)
    handle = attach(decoder, cfg, placement="both", layers=[-1])
    assert list(handle.adapters) == [
        f"model.decoder.layers.1.{sub}.mtlora_adapter" for sub in ("self_attn", "fc2")]


def test_whisper_checkpoints_with_z_handed_from_fc1_to_fc2():
    """Whisper's FFN (fc1 ... fc2 loose in its layers, both stacks): under gradient
    checkpointing the outputs and gradients are the plain forward's, as OPT's."""
    test_an_ffn_of_loose_linear_layers_hands_z_from_its_first_to_its_last("whisper")


def test_whisper_generates_what_its_full_forwards_pick():
    """Whisper with adapters in both stacks: greedy ``generate`` (its own generation loop: the
    encoder once on the features, the decoder one token per step with its self- and
    cross-attention caches; no end-of-sequence token, so all 6 steps run) picks the tokens that
    one full forward over the generated target picks, without the cache too, and the adapters
    change them."""
    model = tiny_model("whisper")
    model.generation_config.eos_token_id = None
    handle = attach(model, MTLoRAConfig(r=4, num_experts=3, groups=2, dropout=0.1),
                    placement="both")
    randomize(handle)
    features = tiny_inputs("whisper")["input_features"]
    kw = dict(max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        out = model.generate(input_features=features, **kw)  # the start token stripped
        assert out.shape == (2, 6)
        target = torch.cat([torch.full((2, 1), model.config.decoder_start_token_id), out], 1)
        full = model(input_features=features, decoder_input_ids=target[:, :-1]).logits
        uncached = model.generate(input_features=features, use_cache=False, **kw)
        with handle.disabled():
            base = model.generate(input_features=features, **kw)
    assert torch.equal(full.argmax(-1), out) and torch.equal(uncached, out)
    assert not torch.equal(base, out), "the adapters must change what is generated"


# Audio-language models -> (their class, the audio tower's type): the multimodal rule adapts
# their language model (text_config's type: qwen2, llama); the audio tower is in the table too.
AUDIO_LANGUAGE = {"qwen2_audio": ("Qwen2AudioForConditionalGeneration", "qwen2_audio_encoder"),
                  "voxtral": ("VoxtralForConditionalGeneration", "voxtral_encoder")}


def audio_language_model(family: str) -> nn.Module:
    """A tiny ``family`` model (an AUDIO_LANGUAGE key): a one-layer audio tower 16 wide beside a
    two-layer language model 32 wide, audio token 63."""
    cls, tower = AUDIO_LANGUAGE[family]
    audio = dict(EXTRA[tower], **dict.fromkeys(AUDIO[tower][1], 1),
                 **{"d_model" if "d_model" in EXTRA[tower] else "hidden_size": 16})
    text = {**SMALL, "vocab_size": 64, "num_key_value_heads": 2, "max_position_embeddings": 32,
            "head_dim": 8, "model_type": "qwen2" if family == "qwen2_audio" else "llama"}
    tokens = {"audio_token_index" if family == "qwen2_audio" else "audio_token_id": 63}
    torch.manual_seed(0)
    return getattr(transformers, cls)(transformers.AutoConfig.for_model(
        family, text_config=text, audio_config=audio, **tokens))


@pytest.mark.parametrize("family", AUDIO_LANGUAGE)
def test_audio_language_models_adapt_their_language_model_or_their_audio_tower(family):
    """Qwen2-Audio and Voxtral (a Whisper-style audio tower 16 wide beside a 32-wide language
    model): attached whole, adapters on the language model's layers alone, as wide as it;
    attached to ``model.model.audio_tower``, on the tower's one layer, as wide as the tower."""
    model = audio_language_model(family)
    assert model.config.model_type not in SUPPORTED_ARCHITECTURES
    cfg = MTLoRAConfig(r=2, num_experts=2, groups=2)
    handle = attach(model, cfg, placement="both")
    assert list(handle.adapters) == [f"model.language_model.layers.{i}.{sub}.mtlora_adapter"
                                     for i in (0, 1) for sub in ("self_attn", "mlp")]
    assert {a.d_in for a in handle.adapters.values()} == {32}
    handle.remove()
    handle = attach(model.model.audio_tower, cfg, placement="both")
    assert list(handle.adapters) == [f"layers.0.{sub}.mtlora_adapter"
                                     for sub in ("self_attn", "fc2")]
    assert {a.d_in for a in handle.adapters.values()} == {16}


# The wav2vec 2.0 family's two layer classes, by do_stable_layer_norm (the "-stable" variants).
STABLE_LN = [f for f in AUDIO if f.endswith("-stable")]


@pytest.mark.parametrize("family", STABLE_LN)
def test_the_wav2vec2_family_is_tested_on_both_layer_classes(family):
    """A "-stable" tiny model holds the pre-LN layer class (the table's second family), its
    type's default the post-LN one (the first): the tests above see both (a config field that
    stopped taking effect would leave one untested)."""
    post, pre = SUPPORTED_ARCHITECTURES[model_type(family)]
    assert {type(m).__name__ for _, m in stack_of(tiny_model(family))} == {pre.layer_class}
    assert {type(m).__name__ for _, m in stack_of(tiny_model(model_type(family)))} == {
        post.layer_class}


def test_the_models_doc_names_every_supported_type():
    """docs/MODELS.md, the users' list, names every type of the table, every multimodal model
    tested here and every dual encoder (a type added without it, or dropped from it, fails),
    before its "Not supported" paragraph, which names none of them; README's short section
    gives the table's number of types and points there."""
    root = Path(__file__).resolve().parents[1]
    text = (root / "docs" / "MODELS.md").read_text()
    refused = text.index("**Not supported block-level:**")
    words = re.compile(r"[\w-]+")  # model types: xlm-roberta
    missing = ((set(SUPPORTED_ARCHITECTURES) | set(MULTIMODAL) | set(DUAL))
               - set(words.findall(text[:refused])))
    assert not missing, f"docs/MODELS.md does not name {sorted(missing)}"
    assert "albert" in words.findall(text[refused:])
    both = set(SUPPORTED_ARCHITECTURES) & set(words.findall(text[refused:]))
    assert not both, f"docs/MODELS.md's 'Not supported' paragraph names {sorted(both)}"
    readme = (root / "README.md").read_text()
    short = readme[readme.index("### Supported models (block-level)"):
                   readme.index("## The command line")]
    assert f"{len(SUPPORTED_ARCHITECTURES)} `config.model_type`s" in short
    assert "(docs/MODELS.md)" in short
