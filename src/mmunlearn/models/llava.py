"""LLaVA-1.5 in the llava-hf layout (``LlavaForConditionalGeneration``); also the tiny built-in model."""

from __future__ import annotations

from mmunlearn.models.base import ModelAdapter


class LlavaAdapter(ModelAdapter):
    family = "llava"
    model_types = ("llava",)
    group_prefixes = {
        "vision": ("model.vision_tower.",),
        "projector": ("model.multi_modal_projector.",),
        "language": ("model.language_model.", "lm_head."),
    }
    answer_sep = " "
    block_classes = ("LlamaDecoderLayer", "CLIPEncoderLayer")
