"""``xclr-openclip-train``: ``open_clip_train.main`` (3.x) with ``--loss NAME``."""
