"""``xclr-openclip-train``: ``open_clip_train.main`` (3.x) with ``--loss NAME``; the
offline pretrained model (``pretrained``) and WiSE-FT (``wise_ft``)."""
