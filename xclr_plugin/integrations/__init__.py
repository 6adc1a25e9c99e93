"""Adapters to host libraries' training loops (the only code that knows them).

- :mod:`xclr_plugin.integrations.lightly_train`: ``xclr-train``, lightly-ssl-train's
  hydra config and Lightning fit with ``criterion.name``.
- :mod:`xclr_plugin.integrations.open_clip_train`: ``xclr-openclip-train``, open_clip's
  ``open_clip_train.main`` with ``--loss NAME`` (open_clip_torch 3.x); an offline
  pretrained ``local-dir:`` model to start from; WiSE-FT weight interpolation.

Nothing is imported here: each adapter imports its host library only when used.
"""
