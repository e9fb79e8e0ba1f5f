"""The LLaMA-style decoder (``transformer``), how it is cut into pipeline chunks (``partition``,
pure Python) and the chunk modules the workers run (``stages``).

Importing this package does not import torch; import the submodules you need.
"""
