"""Tiny random-weight models of many transformers architectures, and inputs to run them on.

Each entry: model class name -> config class name and its keyword arguments (small sizes, 2 layers).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

_TEXT = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)
_DECODER = dict(_TEXT, num_key_value_heads=2, tie_word_embeddings=False)
_MOE = dict(_DECODER, num_experts=4, num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=96)
_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
_BART = dict(
    vocab_size=128, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
    encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64,
)

#: class -> (kind, config class, config kwargs)
ARCHITECTURES: dict[str, tuple[str, str, dict[str, Any]]] = {
    # dense decoders
    "LlamaForCausalLM": ("dense", "LlamaConfig", _DECODER),
    "MistralForCausalLM": ("dense", "MistralConfig", _DECODER),
    "Qwen2ForCausalLM": ("dense, qkv biases", "Qwen2Config", _DECODER),
    "Qwen3ForCausalLM": ("dense", "Qwen3Config", dict(_DECODER, head_dim=16)),
    "Gemma2ForCausalLM": ("dense, tied head", "Gemma2Config", dict(_DECODER, head_dim=16, tie_word_embeddings=True)),
    "Phi3ForCausalLM": ("dense, fused qkv and gate_up", "Phi3Config", dict(_DECODER, pad_token_id=0)),
    "PhiForCausalLM": ("dense, biases", "PhiConfig", _DECODER),
    "GPT2LMHeadModel": ("dense, Conv1D, tied head", "GPT2Config", dict(vocab_size=128, n_positions=64, n_embd=64, n_layer=2, n_head=4)),
    "GPTNeoXForCausalLM": ("dense, embed_out head", "GPTNeoXConfig", _DECODER),
    "FalconForCausalLM": ("dense, FalconLinear", "FalconConfig", dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)),
    "OPTForCausalLM": ("dense, biases", "OPTConfig", dict(vocab_size=128, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=64)),
    "BloomForCausalLM": ("dense, fused qkv", "BloomConfig", dict(vocab_size=128, hidden_size=64, n_layer=2, n_head=4)),
    "GPTBigCodeForCausalLM": ("dense, multi-query", "GPTBigCodeConfig", dict(vocab_size=128, n_positions=64, n_embd=64, n_layer=2, n_head=4)),
    "StableLmForCausalLM": ("dense", "StableLmConfig", _DECODER),
    "GemmaForCausalLM": ("dense", "GemmaConfig", dict(_DECODER, head_dim=16)),
    "Gemma3ForCausalLM": ("dense, Gemma 3 text-only", "Gemma3TextConfig", dict(_DECODER, head_dim=16)),
    "Olmo2ForCausalLM": ("dense, q/k norms", "Olmo2Config", _DECODER),
    "GraniteForCausalLM": ("dense, scaled residuals", "GraniteConfig", _DECODER),
    "SmolLM3ForCausalLM": ("dense, NoPE layers", "SmolLM3Config", dict(_DECODER, pad_token_id=0)),
    "Starcoder2ForCausalLM": ("dense, biases", "Starcoder2Config", _DECODER),
    # MoE
    "MixtralForCausalLM": ("MoE, per-expert", "MixtralConfig", _MOE),
    "Qwen2MoeForCausalLM": ("MoE, shared expert", "Qwen2MoeConfig", dict(_MOE, shared_expert_intermediate_size=96)),
    "Qwen3MoeForCausalLM": ("MoE, per-expert", "Qwen3MoeConfig", dict(_MOE, head_dim=16)),
    "OlmoeForCausalLM": ("MoE, per-expert", "OlmoeConfig", _MOE),
    "DeepseekV3ForCausalLM": ("MoE, MLA, dense first layer", "DeepseekV3Config", dict(
        _MOE, n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=32,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=1, topk_group=1,
    )),
    "JambaForCausalLM": ("MoE, hybrid attention + Mamba", "JambaConfig", dict(
        _MOE, num_experts=4, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
        mamba_d_state=8, mamba_expand=2, mamba_dt_rank=8,
    )),
    # MoE whose checkpoints store the experts fused, as 3-D tensors (FUSED)
    "GptOssForCausalLM": ("MoE, fused: [E, H, 2I] with biases, gate/up interleaved", "GptOssConfig", dict(_MOE, head_dim=16, layer_types=["full_attention"] * 2)),
    "GraniteMoeForCausalLM": ("MoE, fused: input_linear.weight renamed on load", "GraniteMoeConfig", _MOE),
    "GraniteMoeSharedForCausalLM": ("MoE, fused, shared expert", "GraniteMoeSharedConfig", dict(_MOE, shared_intermediate_size=64)),
    "AriaTextForCausalLM": ("MoE, fused: fc1.weight [E, H, 2I] renamed on load", "AriaTextConfig", dict(_MOE, head_dim=16, moe_num_experts=4, pad_token_id=0)),
    "Qwen3VLMoeForConditionalGeneration": ("MoE, fused: stored [E, H, 2I], transposed by transformers on load", "Qwen3VLMoeConfig", dict(
        text_config=dict(_MOE, head_dim=16, moe_intermediate_size=128), vision_config=dict(
            depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=8, spatial_merge_size=2,
            temporal_patch_size=2, num_position_embeddings=16, deepstack_visual_indexes=[0],
        ),
    )),
    "InklingForCausalLM": ("MoE, fused, hybrid attention", "InklingTextConfig", dict(
        _MOE, head_dim=16, moe_intermediate_size=64, layer_types=["hybrid_sliding"] * 2, mlp_layer_types=["sparse"] * 2,
    )),
    "LaraMiniForCausalLM": ("MoE, fused, linear attention", "LaraMiniConfig", dict(
        _MOE, head_dim=16, moe_intermediate_size=128, shared_expert_intermediate_size=64, layer_types=["linear_attention", "sliding_attention"],
        linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
    )),
    "Mistral4Model": ("MoE, fused, MLA attention", "Mistral4Config", dict(
        _MOE, moe_intermediate_size=128, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
    )),
    "HYV4ForCausalLM": ("MoE, fused, dense first layer", "HYV4Config", dict(_MOE, head_dim=16, moe_intermediate_size=128, q_lora_rank=32, pad_token_id=0)),
    "OpenAIPrivacyFilterModel": ("MoE, fused: [E, H, 2I] with biases (gpt-oss's experts)", "OpenAIPrivacyFilterConfig", dict(_MOE, head_dim=16, pad_token_id=0)),
    "ZayaForCausalLM": ("MoE, fused, top-1 routing", "ZayaConfig", dict(_MOE, moe_intermediate_size=128, num_experts_per_tok=1)),
    "MuseSparkTextModel": ("MoE, fused, sliding attention", "MuseSparkTextConfig", dict(
        _MOE, head_dim=16, moe_intermediate_size=64, layer_types=["sliding_attention", "full_attention"], mlp_layer_types=["sparse"] * 2,
    )),
    "Inkling2ForCausalLM": ("MoE, fused: w13_weight interleaved by transformers on load", "Inkling2TextConfig", dict(
        _MOE, head_dim=16, moe_intermediate_size=64, unpadded_vocab_size=128, layer_types=["hybrid_sliding"] * 2,
    )),
    # encoder-decoder
    "T5ForConditionalGeneration": ("encoder-decoder, fp32 wo", "T5Config", dict(vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, decoder_start_token_id=0)),
    "BartForConditionalGeneration": ("encoder-decoder", "BartConfig", _BART),
    "MarianMTModel": ("encoder-decoder, sinusoidal positions computed at init, not stored", "MarianConfig", dict(_BART, decoder_start_token_id=0, pad_token_id=0)),
    # state-space
    "FalconMambaForCausalLM": ("state-space", "FalconMambaConfig", dict(vocab_size=128, hidden_size=64, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4)),
    # encoder-only with heads
    "BertForMaskedLM": ("encoder, MLM head", "BertConfig", _TEXT),
    "RobertaForMaskedLM": ("encoder, lm_head.dense", "RobertaConfig", dict(_TEXT, pad_token_id=1, max_position_embeddings=80)),
    "DistilBertForSequenceClassification": ("encoder, classifier", "DistilBertConfig", dict(vocab_size=128, dim=64, hidden_dim=128, n_layers=2, n_heads=4, max_position_embeddings=64)),
    "ElectraForPreTraining": ("encoder, discriminator head", "ElectraConfig", dict(_TEXT, embedding_size=32)),
    # speech
    "WhisperForConditionalGeneration": ("speech, tied proj_out", "WhisperConfig", dict(
        vocab_size=128, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=16, max_source_positions=32, max_target_positions=32,
        decoder_start_token_id=1, pad_token_id=0,
    )),
    "Wav2Vec2ForCTC": ("speech, CTC head", "Wav2Vec2Config", dict(
        vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        conv_dim=(32, 32), conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
    )),
    # vision and vision-language
    "CLIPModel": ("text + vision towers", "CLIPConfig", dict(text_config=dict(_TEXT, vocab_size=128), vision_config=_VISION, projection_dim=32)),
    "SiglipVisionModel": ("vision, MultiheadAttention pooling head", "SiglipVisionConfig", _VISION),
    "LlavaForConditionalGeneration": ("vision-language", "LlavaConfig", dict(
        text_config=dict(_DECODER, model_type="llama"), vision_config=dict(_VISION, model_type="clip_vision_model", projection_dim=32),
        image_token_index=127, vision_feature_layer=-1,
    )),
    "Gemma3ForConditionalGeneration": ("vision-language, SigLIP tower", "Gemma3Config", dict(
        text_config=dict(_DECODER, model_type="gemma3_text", head_dim=16, sliding_window=16),
        vision_config=dict(_VISION, model_type="siglip_vision_model"), mm_tokens_per_image=4, image_token_index=127,
        boi_token_index=125, eoi_token_index=126,
    )),
}

MOE = [name for name, (kind, _, _) in ARCHITECTURES.items() if kind.startswith("MoE")]
#: MoE architectures whose checkpoints store the experts fused, as 3-D tensors
FUSED = [name for name in MOE if ARCHITECTURES[name][0].startswith("MoE, fused")]


def build(name: str, *, dtype: torch.dtype = torch.float32, **config_changes: Any) -> torch.nn.Module:
    """The tiny model ``name`` with random weights (seeded), in ``dtype``, its config changed by ``config_changes``."""
    import transformers

    _, config_name, kwargs = ARCHITECTURES[name]
    config = getattr(transformers, config_name)(**{**kwargs, **config_changes})
    torch.manual_seed(0)
    model = getattr(transformers, name)(config).to(dtype).eval()
    return model


#: architectures whose published checkpoints store the fused experts transposed from the model's layout
#: (``[E, H, 2I]`` for ``[E, 2I, H]``), which transformers' ``save_pretrained`` does not reproduce
STORED_TRANSPOSED = {"Qwen3VLMoeForConditionalGeneration"}


def save_checkpoint(name: str, path: Path) -> Path:
    """The tiny model ``name`` saved by transformers, its experts in the published checkpoints' layout."""
    from safetensors.torch import load_file, save_file

    build(name).save_pretrained(path)
    if name in STORED_TRANSPOSED:
        tensors = load_file(path / "model.safetensors")
        tensors = {k: v.transpose(1, 2).contiguous() if v.dim() == 3 and ".experts." in k else v for k, v in tensors.items()}
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


def inputs(name: str, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Inputs for one forward pass of ``model`` (seeded)."""
    g = torch.Generator().manual_seed(1)
    config = model.config
    main = model.main_input_name
    ids = torch.randint(2, 100, (1, 7), generator=g)
    if main == "input_features":
        return {"input_features": torch.randn(1, config.num_mel_bins, 2 * config.max_source_positions, generator=g), "decoder_input_ids": ids}
    if main == "input_values":
        return {"input_values": torch.randn(1, 1600, generator=g)}
    vision = getattr(config, "vision_config", config)
    pixels = torch.randn(1, 3, vision.image_size, vision.image_size, generator=g) if hasattr(vision, "image_size") else None
    if main == "pixel_values" and not hasattr(config, "text_config"):
        return {"pixel_values": pixels}
    if name.startswith(("Llava", "Gemma3ForConditional")):
        tokens = getattr(config, "mm_tokens_per_image", None) or (vision.image_size // vision.patch_size) ** 2
        ids = torch.cat([ids[:, :2], torch.full((1, tokens), config.image_token_index), ids[:, 2:]], dim=1)
        return {"input_ids": ids, "pixel_values": pixels}
    if pixels is not None:
        return {"input_ids": ids, "pixel_values": pixels}
    if config.is_encoder_decoder:
        return {"input_ids": ids, "decoder_input_ids": ids[:, :4]}
    return {"input_ids": ids}


def assert_same_model(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    """Same class, the same module types under the same names (a ``RowDecodeLinear4bit`` is the
    ``Linear4bit`` it decodes for), the same tensors, both in eval mode."""
    kind = lambda m: "Linear4bit" if type(m).__name__ == "RowDecodeLinear4bit" else type(m).__name__  # noqa: E731
    assert type(ours) is type(theirs)
    assert [(n, kind(m)) for n, m in ours.named_modules()] == [(n, kind(m)) for n, m in theirs.named_modules()]
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert not ours.training and not theirs.training


def save_tokenizer(path: Path) -> Path:
    """A character-level tokenizer (printable ASCII, ids < 100) in ``path``, for the tiny models'
    vocabularies: what ``nf4convert importance`` reads calibration text with."""
    import string

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{c: i + 1 for i, c in enumerate(string.printable[:95])}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]").save_pretrained(path)
    return path
