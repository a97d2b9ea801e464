"""unidiff: unified multi-modal diffusion with a hybrid Mamba-Transformer MoE backbone.

See ``README.md`` for the commands and ``DESIGN.md`` (shared) for the mathematics.
"""

__version__ = "0.1.0"
