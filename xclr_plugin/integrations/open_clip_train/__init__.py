"""``xclr-openclip-train``: ``open_clip_train.main`` (3.x) with ``--loss NAME``.

Bottom to top: :mod:`.options` (parsed and checked once), :mod:`.targets` (caption
embeddings), :mod:`.data` (rows carried with the batch), :mod:`.loss` (the registry's
loss, wrapped), :mod:`.patch` (open_clip_train patched while a run lasts).
"""
