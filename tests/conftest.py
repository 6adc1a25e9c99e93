"""Shared test settings: never touch a model hub, keep torch deterministic and small."""

from __future__ import annotations

import os

# Any accidental hub download must fail loudly instead of silently fetching weights.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
