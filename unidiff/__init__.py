"""unidiff: unified multi-modal diffusion with a hybrid Mamba-Transformer MoE backbone.

See ``README.md`` for the commands and ``docs/DESIGN.md`` for the mathematics and architecture.
"""

__version__ = "0.1.0"
