"""Tests of the frozen sentence encoder (real packaged all-MiniLM-L6-v2, offline)."""

from __future__ import annotations

import sys
from typing import Any

import pytest
import torch

from xclr_plugin.text import (
    DEFAULT_MODEL_NAME,
    SupportsEncode,
    TextEncoder,
    default_model_path,
    encoder_name,
)

CAPTIONS = [
    "a photo of a cat",
    "a photo of a dog",
    "a red sports car on a highway",
    "quarterly tax report",
    "a kitten sleeping on a sofa",
]


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return TextEncoder()


def test_default_model_identity(encoder: TextEncoder) -> None:
    assert encoder.name == DEFAULT_MODEL_NAME
    assert encoder.dim == 384
    assert isinstance(encoder, SupportsEncode)
    assert "all-MiniLM-L6-v2" in repr(encoder)


def test_model_is_frozen(encoder: TextEncoder) -> None:
    model = encoder._model
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())


def test_encode_contract(encoder: TextEncoder) -> None:
    emb = encoder.encode(CAPTIONS)
    assert emb.shape == (len(CAPTIONS), 384)
    assert emb.dtype == torch.float32
    assert emb.device.type == "cpu"
    assert not emb.requires_grad
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(len(CAPTIONS)))
    # An ordinary tensor: usable as a constant inside autograd (not an inference tensor).
    weight = torch.randn(384, requires_grad=True)
    (emb @ weight).sum().backward()
    assert weight.grad is not None


def test_encode_matches_bare_sentence_transformer(encoder: TextEncoder) -> None:
    from sentence_transformers import SentenceTransformer

    bare = SentenceTransformer(default_model_path(), device="cpu")
    expected = bare.encode(CAPTIONS, normalize_embeddings=True, convert_to_tensor=True)
    torch.testing.assert_close(
        encoder.encode(CAPTIONS), expected.float(), atol=1e-5, rtol=0
    )


def test_encode_is_semantic(encoder: TextEncoder) -> None:
    emb = encoder.encode(CAPTIONS)
    sim = emb @ emb.T
    # cat ~ dog ~ kitten, all far from the tax report.
    assert sim[0, 1] > 0.5
    assert sim[0, 4] > sim[0, 2]
    assert sim[0, 3] < 0.3


def test_batch_size_does_not_change_values(encoder: TextEncoder) -> None:
    expected = encoder.encode(CAPTIONS)
    encoder.batch_size = 2
    try:
        torch.testing.assert_close(
            encoder.encode(CAPTIONS), expected, atol=1e-5, rtol=0
        )
    finally:
        encoder.batch_size = 256


def test_encode_edge_cases(encoder: TextEncoder) -> None:
    assert encoder.encode([]).shape == (0, 384)
    assert encoder.encode(iter(CAPTIONS[:2])).shape == (2, 384)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="single string"):
        encoder.encode("a photo of a cat")
    with pytest.raises(TypeError, match="item 1"):
        encoder.encode(["ok", 3])  # type: ignore[list-item]


def test_default_path_by_path_gets_stable_name() -> None:
    encoder = TextEncoder(default_model_path(), batch_size=8)
    assert encoder.name == DEFAULT_MODEL_NAME
    assert encoder.batch_size == 8


def test_bad_batch_size() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        TextEncoder(batch_size=0)
    for bad in (2.5, "8", True):
        with pytest.raises(ValueError, match="batch_size must be a positive integer"):
            TextEncoder(batch_size=bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="model must be a sentence-transformers name"):
        TextEncoder(384)  # type: ignore[arg-type]


def test_missing_sentence_transformers_gives_install_hint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)
    with pytest.raises(ImportError, match=r'pip install "xclr-plugin\[text\]"'):
        TextEncoder()


def test_importing_module_does_not_import_sentence_transformers() -> None:
    import subprocess

    code = (
        "import sys, xclr_plugin.text, xclr_plugin.cache, xclr_plugin.data; "
        "sys.exit('sentence_transformers' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_encoder_name_without_loading(encoder: TextEncoder, tmp_path: Any) -> None:
    assert encoder_name() == encoder.name == DEFAULT_MODEL_NAME
    assert encoder_name(default_model_path()) == DEFAULT_MODEL_NAME
    assert encoder_name("org/model") == "org/model"
    assert encoder_name(tmp_path) == str(tmp_path.resolve())


def test_captions_past_the_token_limit_warn() -> None:
    """Past max_seq_length (256 for MiniLM) two captions differing only there are one target."""
    encoder = TextEncoder()
    long = " ".join(["word"] * 300)
    with pytest.warns(
        UserWarning, match=r"1 of 2 captions are longer than the encoder's 256 tokens"
    ):
        rows = encoder.encode([long + " cat", "a short caption"])
    with pytest.warns(UserWarning):
        other = encoder.encode([long + " dog"])
    assert torch.equal(rows[0], other[0])
