"""XCLRClipLoss against open_clip's ClipLoss and a dense transcription of the spec."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from _clip_helpers import (
    LAYOUTS,
    TARGET_TEMPERATURE,
    clip_batch,
    dense_xclr_clip,
    distributed_worker,
    loss_and_grads,
)
from open_clip.loss import ClipLoss

from xclr_plugin.clip_loss import XCLRClipLoss

from _dist_helpers import run_gloo

TOL: dict[str, Any] = {"rtol": 0.0, "atol": 1e-10}
GRAD_KEYS = ("image_features", "text_features", "logit_scale", "logit_bias")


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    torch.testing.assert_close(got["loss"], want["loss"], **TOL)
    for key in GRAD_KEYS:
        if key in want:
            torch.testing.assert_close(
                got[key], want[key], **TOL, msg=f"gradient of {key}"
            )


class TestIdentityIsClipLoss:
    @pytest.mark.parametrize("batch_size", [2, 7])
    @pytest.mark.parametrize("bias", [False, True])
    def test_values_and_gradients(self, batch_size: int, bias: bool) -> None:
        batch = clip_batch(batch_size, seed=batch_size, bias=bias)
        want = loss_and_grads(ClipLoss(), batch)
        for loss_fn in (XCLRClipLoss(), XCLRClipLoss(cache_labels=True)):
            got = loss_and_grads(loss_fn, batch)
            assert torch.equal(got["loss"], want["loss"])
            assert_same(got, want)

    def test_output_dict_and_get_logits(self) -> None:
        batch = clip_batch(5)
        inputs = {k: batch[k] for k in GRAD_KEYS}
        out = XCLRClipLoss()(**inputs, output_dict=True)
        assert list(out) == ["contrastive_loss"]
        torch.testing.assert_close(out["contrastive_loss"], ClipLoss()(**inputs), **TOL)
        for got, want in zip(
            XCLRClipLoss().get_logits(**inputs),
            ClipLoss().get_logits(**inputs),
            strict=True,
        ):
            torch.testing.assert_close(got, want, **TOL)
        assert isinstance(XCLRClipLoss(), ClipLoss)


class TestSoftTargets:
    @pytest.mark.parametrize("bias", [False, True])
    def test_captions_match_dense_reference(self, bias: bool) -> None:
        batch = clip_batch(6, seed=1, bias=bias)
        got = loss_and_grads(
            XCLRClipLoss(target_temperature=0.3), batch, targets=batch["captions"]
        )
        want = loss_and_grads(
            lambda **kw: dense_xclr_clip(
                **kw, descriptions=batch["captions"], target_temperature=0.3
            ),
            batch,
        )
        assert_same(got, want)

    def test_clip_text_uses_the_detached_text_features(self) -> None:
        batch = clip_batch(6, seed=2)
        got = loss_and_grads(
            XCLRClipLoss(target_temperature=0.5, target_mode="clip-text"), batch
        )
        want = loss_and_grads(
            lambda **kw: dense_xclr_clip(
                **kw, descriptions=kw["text_features"].detach(), target_temperature=0.5
            ),
            batch,
        )
        assert_same(got, want)

    def test_labels_build_a_block_graph(self) -> None:
        batch = clip_batch(6, seed=3)
        labels = torch.tensor([0, 1, 0, 2, 1, 0])
        got = loss_and_grads(
            XCLRClipLoss(target_temperature=0.3), batch, targets=labels
        )
        one_hot = F.one_hot(
            labels
        ).double()  # cos(one_hot_i, one_hot_j) = 1[y_i == y_j]
        want = loss_and_grads(
            lambda **kw: dense_xclr_clip(
                **kw, descriptions=one_hot, target_temperature=0.3
            ),
            batch,
        )
        assert_same(got, want)

    def test_distinct_captions_with_tiny_target_temperature_are_clip(self) -> None:
        batch = clip_batch(5, seed=4)
        got = XCLRClipLoss(target_temperature=1e-3)(
            **{k: batch[k] for k in GRAD_KEYS}, targets=batch["captions"]
        )
        torch.testing.assert_close(
            got, ClipLoss()(**{k: batch[k] for k in GRAD_KEYS}), **TOL
        )

    def test_permuting_samples_leaves_the_loss_unchanged(self) -> None:
        batch = clip_batch(7, seed=5)
        perm = torch.randperm(7, generator=torch.Generator().manual_seed(0))
        loss_fn = XCLRClipLoss(target_temperature=0.2)
        inputs = {k: batch[k] for k in GRAD_KEYS}
        permuted = {k: v[perm] if v.ndim else v for k, v in inputs.items()}
        torch.testing.assert_close(
            loss_fn(**inputs, targets=batch["captions"]),
            loss_fn(**permuted, targets=batch["captions"][perm]),
            **TOL,
        )

    def test_loss_is_at_least_the_target_entropy(self) -> None:
        batch = clip_batch(6, seed=6, bias=False)
        loss_fn = XCLRClipLoss(target_temperature=0.2)
        c = F.normalize(batch["captions"], dim=1)
        target = torch.softmax(c @ c.T / 0.2, dim=1)
        entropy = -(target * target.log()).sum(1).mean()
        inputs = {k: batch[k] for k in GRAD_KEYS if k != "logit_bias"}
        assert loss_fn(**inputs, targets=batch["captions"]) > entropy
        # Logits that reproduce G exactly reach the bound: log G is symmetric (up to a
        # per-row constant), so both directions predict G.
        logits = c @ c.T / 0.2
        exact = loss_fn.loss_from_logits(logits, logits.T, target)
        torch.testing.assert_close(exact, entropy, **TOL)

    def test_bf16_autocast_computes_in_float32(self) -> None:
        batch = clip_batch(6, seed=7)
        inputs = {k: batch[k].float() for k in GRAD_KEYS}
        captions = batch["captions"].float()
        want = XCLRClipLoss()(**inputs, targets=captions)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = XCLRClipLoss()(
                **{k: v.bfloat16() if v.ndim else v for k, v in inputs.items()},
                targets=captions,
            )
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=0.02, atol=0.0)


class TestErrors:
    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"target_temperature": 0.0}, "target_temperature"),
            ({"target_temperature": float("nan")}, "target_temperature"),
            ({"target_mode": "labels"}, "target_mode"),
            ({"use_horovod": True}, "horovod"),
        ],
    )
    def test_constructor(self, kwargs: dict[str, Any], message: str) -> None:
        with pytest.raises(ValueError, match=message):
            XCLRClipLoss(**kwargs)

    @pytest.mark.parametrize(
        ("mode", "targets", "message"),
        [
            ("clip-text", torch.zeros(4, 3), "clip-text"),
            (
                "captions",
                torch.zeros(3, 3),
                r"batch size 4 like image_features, got shape \(3, 3\)",
            ),
            ("captions", torch.zeros(4), "1-D targets are class labels .* integer"),
            (
                "captions",
                torch.zeros(4, 3, dtype=torch.long),
                "2-D targets are caption embeddings and must be floating point",
            ),
        ],
    )
    def test_forward(self, mode: str, targets: torch.Tensor, message: str) -> None:
        batch = clip_batch(4)
        with pytest.raises(ValueError, match=message):
            XCLRClipLoss(target_mode=mode)(
                **{k: batch[k] for k in GRAD_KEYS}, targets=targets
            )


# -- two gloo processes -------------------------------------------------------------

WORLD, LOCAL_BATCH = 2, 3


@pytest.fixture(scope="module")
def per_rank() -> list[dict[Any, dict[str, torch.Tensor]]]:
    """One spawn of 2 gloo processes computing every layout (a few seconds)."""
    return run_gloo(distributed_worker, WORLD, LOCAL_BATCH)


def single_process_reference(mode: str) -> dict[str, torch.Tensor]:
    batch = clip_batch(WORLD * LOCAL_BATCH)
    if mode == "captions":
        return loss_and_grads(
            XCLRClipLoss(target_temperature=TARGET_TEMPERATURE),
            batch,
            targets=batch["captions"],
        )
    return loss_and_grads(
        XCLRClipLoss(target_temperature=TARGET_TEMPERATURE, target_mode="clip-text"),
        batch,
    )


def rank_slice(grads: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    return {k: v[rows] if v.ndim else v for k, v in grads.items()}


@pytest.mark.distributed
@pytest.mark.parametrize(("local_loss", "gather_with_grad"), LAYOUTS)
def test_distributed_identity_is_clip_loss(
    per_rank: list[dict[Any, dict[str, torch.Tensor]]],
    local_loss: bool,
    gather_with_grad: bool,
) -> None:
    for rank in range(WORLD):
        got = per_rank[rank][("identity", local_loss, gather_with_grad)]
        want = per_rank[rank][("clip", local_loss, gather_with_grad)]
        assert_same(got, want)


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["captions", "clip-text"])
@pytest.mark.parametrize(("local_loss", "gather_with_grad"), LAYOUTS)
def test_distributed_equals_global(
    per_rank: list[dict[Any, dict[str, torch.Tensor]]],
    mode: str,
    local_loss: bool,
    gather_with_grad: bool,
) -> None:
    """Mean rank loss is the global loss; the gradients a DDP step applies are global.

    DDP averages parameter gradients over ranks. With ``gather_with_grad`` the gather's
    backward sums every rank's contribution, so a rank's feature gradient divided by the
    world size is the single-process gradient of its slice (shared scalars: the mean
    over ranks). Without it only the local slice carries gradient: with the global
    logits (``local_loss=False``) that is exactly the global gradient of the slice, as
    for ``ClipLoss``.
    """
    ref = single_process_reference(mode)
    results = [per_rank[r][(mode, local_loss, gather_with_grad)] for r in range(WORLD)]
    mean_loss = torch.stack([r["loss"] for r in results]).mean()
    torch.testing.assert_close(mean_loss, ref["loss"], **TOL)
    if not local_loss:
        for res in results:
            torch.testing.assert_close(res["loss"], ref["loss"], **TOL)
    if not gather_with_grad and local_loss:
        return  # open_clip's approximate layout: only the loss is global
    feature_scale = 1.0 / WORLD if gather_with_grad else 1.0
    for rank, res in enumerate(results):
        want = rank_slice(ref, rank)
        for key in ("image_features", "text_features"):
            torch.testing.assert_close(
                res[key] * feature_scale, want[key], **TOL, msg=key
            )
    for key in ("logit_scale", "logit_bias"):
        mean_grad = torch.stack([r[key] for r in results]).mean(0)
        torch.testing.assert_close(mean_grad, ref[key], **TOL, msg=key)


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["identity", "captions", "clip-text"])
@pytest.mark.parametrize(("local_loss", "gather_with_grad"), LAYOUTS)
def test_distributed_chunked_equals_dense(
    per_rank: list[dict[Any, dict[str, torch.Tensor]]],
    mode: str,
    local_loss: bool,
    gather_with_grad: bool,
) -> None:
    """Issue 7: chunk_size gives each rank the dense values and gradients."""
    for rank in range(WORLD):
        got = per_rank[rank][(f"{mode}-chunked", local_loss, gather_with_grad)]
        assert_same(got, per_rank[rank][(mode, local_loss, gather_with_grad)])


@pytest.mark.distributed
def test_distributed_uneven_batch_sizes_are_named_on_every_rank(
    per_rank: list[dict[Any, dict[str, Any]]],
) -> None:
    sizes = [LOCAL_BATCH] * (WORLD - 1) + [LOCAL_BATCH - 1]
    for rank in range(WORLD):
        assert per_rank[rank][("uneven", False, False)]["error"] == (
            f"XCLRClipLoss(world_size={WORLD}) needs the same batch size on every "
            f"process, got {sizes} (by rank). Drop the last, smaller batch "
            "(DataLoader(..., drop_last=True))."
        )


class TestChunked:
    """Issue 7: the chunked path equals the dense one (values and every gradient)."""

    @pytest.mark.parametrize("mode", ["identity", "captions", "labels", "clip-text"])
    @pytest.mark.parametrize("chunk_size", [1, 3, 7, 50])
    def test_float64_matches_dense(self, mode: str, chunk_size: int) -> None:
        batch = clip_batch(7, bias=True)
        target_mode = "clip-text" if mode == "clip-text" else "captions"
        kwargs: dict[str, Any] = {}
        if mode == "captions":
            kwargs["targets"] = batch["captions"]
        elif mode == "labels":
            kwargs["targets"] = torch.tensor([0, 1, 0, 2, 1, 0, 3])
        dense_loss = XCLRClipLoss(target_temperature=0.2, target_mode=target_mode)
        chunked_loss = XCLRClipLoss(
            target_temperature=0.2, target_mode=target_mode, chunk_size=chunk_size
        )
        dense = loss_and_grads(dense_loss, batch, **kwargs)
        chunked = loss_and_grads(chunked_loss, batch, **kwargs)
        assert_same(chunked, dense)

    def test_float32_matches_dense(self) -> None:
        gen = torch.Generator().manual_seed(0)
        batch = {
            "image_features": torch.nn.functional.normalize(
                torch.randn(300, 32, generator=gen), dim=1
            ),
            "text_features": torch.nn.functional.normalize(
                torch.randn(300, 32, generator=gen), dim=1
            ),
            "logit_scale": torch.tensor(20.0),
        }
        captions = torch.randn(300, 16, generator=gen)
        dense = loss_and_grads(XCLRClipLoss(), batch, targets=captions)
        chunked = loss_and_grads(XCLRClipLoss(chunk_size=64), batch, targets=captions)
        for key, want in dense.items():
            torch.testing.assert_close(
                chunked[key], want, atol=1e-5, rtol=1e-5, msg=key
            )

    @pytest.mark.parametrize("chunk_size", [0, -2, 1.5])
    def test_bad_chunk_size(self, chunk_size: object) -> None:
        with pytest.raises(
            ValueError, match="chunk_size must be a positive integer or None"
        ):
            XCLRClipLoss(chunk_size=chunk_size)  # type: ignore[arg-type]


def test_zero_dim_targets_are_a_value_error() -> None:
    batch = clip_batch(4)
    with pytest.raises(ValueError, match="targets must be caption embeddings"):
        XCLRClipLoss()(
            batch["image_features"],
            batch["text_features"],
            batch["logit_scale"],
            targets=torch.tensor(1.0),
        )


@pytest.mark.parametrize("scale", [7.5, torch.tensor([7.5], dtype=torch.float64)])
def test_chunked_accepts_the_logit_scales_dense_accepts(
    scale: float | torch.Tensor,
) -> None:
    batch = clip_batch(5, bias=False)
    captions = batch["captions"]
    dense = XCLRClipLoss()(
        batch["image_features"], batch["text_features"], scale, targets=captions
    )
    if isinstance(scale, torch.Tensor):
        scale = scale.clone().requires_grad_(True)
    chunked = XCLRClipLoss(chunk_size=2)(
        batch["image_features"], batch["text_features"], scale, targets=captions
    )
    assert isinstance(chunked, torch.Tensor) and isinstance(dense, torch.Tensor)
    torch.testing.assert_close(chunked, dense, atol=1e-12, rtol=1e-12)
    if isinstance(scale, torch.Tensor):
        chunked.backward()
        assert scale.grad is not None and scale.grad.shape == scale.shape


class TestNonFiniteInputs:
    """Issue 12: never a finite loss with non-finite gradients (NaN in, NaN out)."""

    @pytest.mark.parametrize("bad", [float("nan"), float("inf")])
    @pytest.mark.parametrize("chunk_size", [None, 2])
    @pytest.mark.parametrize("mode", ["captions", "labels-like"])
    def test_non_finite_target_row_gives_nan(
        self, bad: float, chunk_size: int | None, mode: str
    ) -> None:
        batch = clip_batch(5, bias=True)
        captions = batch["captions"].clone()
        captions[2, 1] = bad
        got = loss_and_grads(
            XCLRClipLoss(chunk_size=chunk_size), batch, targets=captions
        )
        assert torch.isnan(got["loss"]), got["loss"]

    @pytest.mark.parametrize("value", [1e-320, 1e-39])
    def test_target_temperature_whose_inverse_overflows(self, value: float) -> None:
        with pytest.raises(ValueError, match="whose inverse is finite in float32"):
            XCLRClipLoss(target_temperature=value)

    def test_finite_loss_always_has_finite_gradients(self) -> None:
        batch = clip_batch(6, bias=True)
        for tau_s in (1e-30, 1e-3, 1.0, 1e3):
            for chunk_size in (None, 4):
                got = loss_and_grads(
                    XCLRClipLoss(target_temperature=tau_s, chunk_size=chunk_size),
                    batch,
                    targets=batch["captions"],
                )
                assert torch.isfinite(got["loss"])
                for key in GRAD_KEYS:
                    assert torch.isfinite(got[key]).all(), (tau_s, chunk_size, key)


class TestTargetShapes:
    @pytest.mark.parametrize("width", [0, 1])
    def test_one_dimensional_caption_embeddings(self, width: int) -> None:
        batch = clip_batch(4)
        with pytest.raises(
            ValueError,
            match=r"Caption embeddings need text_dim >= 2.*pass them as a 1-D integer tensor",
        ):
            XCLRClipLoss()(
                **{k: batch[k] for k in GRAD_KEYS}, targets=torch.randn(4, width)
            )


class TestAutocastProducts:
    """Issue 13: under autocast the products run in the autocast dtype, as in ClipLoss."""

    def _inputs(self, n: int = 64) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        gen = torch.Generator().manual_seed(0)
        inputs = {
            "image_features": F.normalize(torch.randn(n, 16, generator=gen), dim=1),
            "text_features": F.normalize(torch.randn(n, 16, generator=gen), dim=1),
            "logit_scale": torch.tensor(100.0),  # open_clip's clamp: tau = 0.01
        }
        return inputs, torch.randn(n, 12, generator=gen)

    @pytest.mark.parametrize("chunk_size", [None, 16])
    @pytest.mark.parametrize("with_captions", [False, True])
    def test_close_to_float32_and_finite(
        self, chunk_size: int | None, with_captions: bool
    ) -> None:
        inputs, captions = self._inputs()
        targets = captions if with_captions else None
        want = loss_and_grads(
            XCLRClipLoss(chunk_size=chunk_size), inputs, targets=targets
        )
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = loss_and_grads(
                XCLRClipLoss(chunk_size=chunk_size), inputs, targets=targets
            )
        assert got["loss"].dtype == torch.float32
        for key, value in got.items():
            assert torch.isfinite(value).all(), key
        # bf16 products: about 3 significant digits on logits of up to 100.
        torch.testing.assert_close(got["loss"], want["loss"], rtol=0.03, atol=0.05)
        assert not torch.equal(got["loss"], want["loss"])  # the products did follow

    def test_chunked_and_dense_are_as_accurate_under_autocast(self) -> None:
        """Both within bf16 accuracy (3% of the largest entry) of float64."""
        inputs, captions = self._inputs()
        want = loss_and_grads(
            XCLRClipLoss(),
            {k: v.double() for k, v in inputs.items()},
            targets=captions.double(),
        )
        with torch.autocast("cpu", dtype=torch.bfloat16):
            dense = loss_and_grads(XCLRClipLoss(), inputs, targets=captions)
            chunked = loss_and_grads(
                XCLRClipLoss(chunk_size=16), inputs, targets=captions
            )
        for got in (dense, chunked):
            for key, value in want.items():
                tol = 0.03 * float(value.abs().max())
                torch.testing.assert_close(
                    got[key].double(), value, rtol=0.0, atol=tol, msg=key
                )

    def test_identity_equals_clip_loss_under_autocast(self) -> None:
        inputs, _ = self._inputs()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = loss_and_grads(XCLRClipLoss(), inputs)
            want = loss_and_grads(ClipLoss(), inputs)
        for key, value in want.items():
            torch.testing.assert_close(got[key], value, atol=0.0, rtol=0.0, msg=key)
