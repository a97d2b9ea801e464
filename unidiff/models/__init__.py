"""The shared denoising backbone (DESIGN.md §5) and its layers; nothing here knows a modality or a
noise schedule.

- ``backbone.py``: :class:`HybridBackbone`, the stack built from a layer pattern string
  (``M`` Mamba-2, ``*`` attention, ``E`` MoE, ``-`` MLP) with adaLN-Zero sublayers;
- ``mamba2.py`` / ``ssd.py``: the Mamba-2 mixer and its chunked SSD scan (with ``ssd_naive``, the
  sequential reference); ``scan.py``: the 2-D scan orders over the patch grid;
- ``attention.py``: grouped-query attention; ``moe.py``: the sigmoid router, MoE and dense MLP;
- ``embed.py``: patch/timestep embeddings and positions; ``presets.py``: the named sizes.
"""
