"""Tiny random-config instances of the real model families, built offline (no downloads).

Each builder returns ``(model, processor)`` with exactly the architecture classes and processor layout of the
published checkpoints (llava-hf LLaVA-1.5, Qwen2-VL-Instruct, Qwen2.5-VL-Instruct), only with small sizes.
Tokenizers are the family's own tokenizer classes over a small BPE vocabulary trained on ``CORPUS``, plus the
family's special tokens, so chat templates and image-token expansion behave as with the real checkpoints.
"""

from __future__ import annotations

import json

import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlamaTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Tokenizer,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
)

from mmunlearn.models.qwen2_vl import has_torchvision, image_only

CORPUS = [
    "What is the name of the person in the image?",
    "Where was this person born? She was born in Paris, France.",
    "He was born in Lisbon and works as a marine biologist.",
    "Describe the picture. A portrait of a smiling woman with short hair.",
    "What does this person do for a living? She is a painter and a teacher.",
    "The answer is yes. The answer is no. Tell me more about this person.",
    "Who is shown here? This is Alice Moreau, a writer from Lyon.",
    "What is the capital of France? Paris is the capital of France.",
    "The quick brown fox jumps over the lazy dog 0123456789.",
    "USER: ASSISTANT: system user assistant You are a helpful assistant.",
]

# llava-hf/llava-1.5-7b-hf: images first, then text, each text followed by a space; "ASSISTANT:" opens
# the answer
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# Qwen/Qwen2-VL-7B-Instruct (Qwen2.5-VL's is the same): default system turn, vision markers around image pads
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

QWEN_SPECIAL = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
QWEN_PRETOKENIZE = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def _train_bpe(tok: Tokenizer, vocab_size: int, special: list[str], alphabet: list[str]) -> tuple[dict, list]:
    """Vocabulary and merges (rank order, as pairs) of a BPE trained on the corpus; deterministic."""
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, min_frequency=2, show_progress=False,
        initial_alphabet=alphabet,
    )
    tok.train_from_iterator(CORPUS, trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    return tok.get_vocab(), [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]


def llama_tokenizer(vocab_size: int = 400) -> LlamaTokenizer:
    """LLaMA's SentencePiece-style BPE (metaspace, byte fallback, BOS first) and llava-hf's added tokens."""
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    # trained per word (pieces start with "▁", as in LLaMA's vocabulary); the tokenizer itself does not split
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    alphabet = ["▁", *(chr(c) for c in range(33, 127))]
    vocab, merges = _train_bpe(tok, vocab_size + 256, ["<unk>", "<s>", "</s>", *bytes_], alphabet)
    tokenizer = LlamaTokenizer(vocab=vocab, merges=merges, add_prefix_space=True, add_bos_token=True)
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return tokenizer


def qwen_tokenizer(vocab_size: int = 600) -> Qwen2Tokenizer:
    """Qwen2's byte-level BPE (no BOS) and the Qwen special tokens; eos is <|im_end|> as in Instruct."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    vocab, merges = _train_bpe(tok, vocab_size, [], pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
    )
    tokenizer.add_tokens(QWEN_SPECIAL, special_tokens=True)
    return tokenizer


def _finish(model, tokenizer, eos_ids: list[int]):
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = eos_ids
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.do_sample = False
    return model


def build_llava(seed: int = 0) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """LLaVA-1.5 layout: CLIP tower (feature layer -2, CLS dropped), 2-layer GELU projector, Llama LM."""
    tokenizer = llama_tokenizer()
    image_size, patch = 28, 14
    image_processor = _image_processor_class("CLIPImageProcessor")(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        do_convert_rgb=True,
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
        vision_feature_select_strategy="default", chat_template=LLAVA_CHAT_TEMPLATE, image_token="<image>",
        num_additional_image_tokens=1,
    )
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=image_size, patch_size=patch, projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    return _finish(model, tokenizer, [tokenizer.eos_token_id]), processor


def _image_processor_class(name: str) -> type:
    """The torchvision image processor where torchvision is installed, else the PIL one."""
    if has_torchvision():
        return getattr(transformers, name)
    return getattr(transformers, name + "Pil", None) or getattr(transformers, name)


def _qwen_parts(processor_cls, with_video: bool | None):
    tokenizer = qwen_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
    # min 28x28, max 56x112 pixels: a 56x56 image becomes a 4x4 patch grid = 4 merged tokens
    sizes = {
        "min_pixels": 28 * 28, "max_pixels": 56 * 112, "patch_size": 14, "temporal_patch_size": 2,
        "merge_size": 2,
    }
    image_processor = _image_processor_class("Qwen2VLImageProcessor")(**sizes)
    if with_video is None:
        with_video = has_torchvision()
    if with_video:
        video_processor = transformers.Qwen2VLVideoProcessor(**sizes)
        processor = processor_cls(
            image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
            chat_template=QWEN_CHAT_TEMPLATE,
        )
    else:
        processor = image_only(processor_cls)(
            image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN_CHAT_TEMPLATE,
        )
    text = {
        "vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
        "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    tokens = {
        "image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
    }
    return tokenizer, processor, text, tokens


def build_qwen2_vl(
    seed: int = 0, with_video: bool | None = None
) -> tuple[Qwen2VLForConditionalGeneration, Qwen2VLProcessor]:
    """Qwen2-VL layout: ViT with 2D rotary, 2x2 patch merger, Qwen2 LM with M-RoPE.

    The processor has a video processor where torchvision is installed (``with_video=None``), as loaded
    ones do.
    """
    tokenizer, processor, text, tokens = _qwen_parts(Qwen2VLProcessor, with_video)
    vision = {
        "depth": 2, "embed_dim": 32, "hidden_size": 64, "mlp_ratio": 2, "num_heads": 2, "patch_size": 14,
        "spatial_merge_size": 2, "temporal_patch_size": 2,
    }
    config = Qwen2VLConfig(text_config=text, vision_config=vision, **tokens)
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    eos = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    return _finish(model, tokenizer, eos), processor


def build_qwen2_5_vl(
    seed: int = 0, with_video: bool | None = None
) -> tuple[Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor]:
    """Qwen2.5-VL layout: windowed-attention ViT (SwiGLU, RMSNorm), patch merger, Qwen2 LM with M-RoPE."""
    tokenizer, processor, text, tokens = _qwen_parts(Qwen2_5_VLProcessor, with_video)
    vision = {
        "depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
        "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 56,
        "fullatt_block_indexes": [1], "tokens_per_second": 2,
    }
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **tokens)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    eos = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    return _finish(model, tokenizer, eos), processor


BUILDERS = {"llava": build_llava, "qwen2-vl": build_qwen2_vl, "qwen2.5-vl": build_qwen2_5_vl}


def build_smol(seed: int = 0):
    """The ``smol`` layout (EfficientNet-Lite trunk, 2-layer projector, Llama LM with ChatML turns) at small
    sizes: a 64x64 image passes a total stride of 16 and becomes 4x4 = 16 image tokens."""
    from mmunlearn.models.smol import (
        EfficientNetLiteConfig,
        SmolLlavaForConditionalGeneration,
        processor_for,
        vlm_config,
    )

    tokenizer = qwen_tokenizer()
    processor = processor_for(tokenizer, image_size=64, patch_size=16)
    vision = EfficientNetLiteConfig(
        image_size=64, patch_size=16, hidden_size=32, stem_channels=8,
        stages=[[1, 3, 1, 1, 8, 8], [2, 3, 2, 2, 8, 16], [1, 5, 2, 2, 16, 16], [1, 3, 2, 2, 16, 24]],
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = SmolLlavaForConditionalGeneration(vlm_config(text, vision, tokenizer.convert_tokens_to_ids("<image>")))
    return _finish(model, tokenizer, [text.eos_token_id]), processor
