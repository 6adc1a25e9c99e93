"""The console commands: ``xclr-embed-captions``, ``xclr-train``, ``xclr-openclip-train``,
``xclr-build-pretrained``, ``xclr-wise-ft``.

Each module parses its command line once into typed values and hands them to the
library; errors reach the user through :mod:`xclr_plugin.errors`.
"""
