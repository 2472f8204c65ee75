"""Qwen2-VL and Qwen2.5-VL (``Qwen2VLForConditionalGeneration`` / ``Qwen2_5_VLForConditionalGeneration``).

Both share the layout ``model.visual`` (patch embedding, ViT blocks, patch merger = the projector) and
``model.language_model``; an image expands to ``grid_t * grid_h * grid_w / merge_size**2`` ``<|image_pad|>``
tokens between ``<|vision_start|>`` and ``<|vision_end|>``.

transformers' Qwen-VL processors always carry a video processor, and video processors need torchvision.
Without torchvision the adapter uses the same processor class less its video processor (:func:`image_only`):
images and text are processed identically, and saved directories still load with plain ``AutoProcessor``
where torchvision is installed.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from mmunlearn.errors import ModelError
from mmunlearn.models.base import ModelAdapter

PROCESSOR_CLASSES = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor"}


def has_torchvision() -> bool:
    from transformers.utils import is_torchvision_available

    return is_torchvision_available()


@functools.cache
def image_only(processor_cls: type) -> type:
    """``processor_cls`` without its video processor; saves under the original class name."""

    class ImageOnly(processor_cls):
        video_processor = None

        @classmethod
        def get_attributes(cls) -> list[str]:
            return [a for a in super().get_attributes() if a != "video_processor"]

    ImageOnly.__name__ = processor_cls.__name__
    ImageOnly.__qualname__ = processor_cls.__qualname__
    return ImageOnly


def load_processor(path: str | Path, **kwargs):
    """``AutoProcessor.from_pretrained``, or the image-only processor where torchvision is missing."""
    import transformers

    if has_torchvision():
        return transformers.AutoProcessor.from_pretrained(path, **kwargs)
    kwargs.pop("trust_remote_code", None)
    model_type = transformers.AutoConfig.from_pretrained(path).model_type
    if model_type not in PROCESSOR_CLASSES:
        raise ModelError(f"{path}: model_type {model_type!r} is not a Qwen-VL model")
    return image_only(getattr(transformers, PROCESSOR_CLASSES[model_type])).from_pretrained(path, **kwargs)


class Qwen2VLAdapter(ModelAdapter):
    family = "qwen2-vl"
    model_types = ("qwen2_vl", "qwen2_5_vl")
    group_prefixes = {
        "vision": ("model.visual.blocks.", "model.visual.patch_embed."),
        "projector": ("model.visual.merger.",),
        "language": ("model.language_model.", "lm_head."),
    }
    answer_sep = ""
    block_classes = ("Qwen2VLDecoderLayer", "Qwen2VLVisionBlock", "Qwen2_5_VLDecoderLayer", "Qwen2_5_VLVisionBlock")
    blank_image_side = 56  # 2 × 2 merged patches of 14 px: the smallest image the vision tower takes

    # ChatML: <|im_end|> closes a turn; generation also stops on end of text, as the published configs do
    turn_end = "<|im_end|>"
    stop_tokens = ("<|im_end|>", "<|endoftext|>")

    @staticmethod
    def load_processor(path: str | Path, **kwargs):
        return load_processor(path, **kwargs)

    def position_ids(self, enc: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """M-RoPE positions (3, B, T): image tokens get (time, row, column) ids, text continues after them.

        None where the processor gives no ``mm_token_type_ids`` for a batch with images (older transformers).
        """
        if "mm_token_type_ids" not in enc:
            return None if "image_grid_thw" in enc else super().position_ids(enc).expand(3, -1, -1)
        pos, _ = self.model.model.get_rope_index(
            enc["input_ids"], mm_token_type_ids=enc["mm_token_type_ids"],
            image_grid_thw=enc.get("image_grid_thw"), attention_mask=enc["attention_mask"],
        )
        return pos

    def image_inputs(self, enc: dict[str, torch.Tensor], images: list[int]) -> dict[str, torch.Tensor]:
        """Qwen-VL flattens every image's patches into one tensor; image i owns ``prod(image_grid_thw[i])`` rows."""
        if not images:
            return {}
        patches = torch.split(enc["pixel_values"], enc["image_grid_thw"].prod(-1).tolist())
        return {"pixel_values": torch.cat([patches[i] for i in images]),
                "image_grid_thw": enc["image_grid_thw"][images]}

    def save(self, out_dir: str | Path) -> None:
        super().save(out_dir)
        if getattr(self.processor, "video_processor", None) is None:
            # no video processor to save: transformers builds one from preprocessor_config.json, as it does
            # for the published checkpoints
            self.processor.image_processor.save_pretrained(out_dir)
