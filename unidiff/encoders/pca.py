"""PCA (optionally whitening) of representation vectors (DESIGN.md §4): the
representation modality may use a reduced vector instead of the frozen encoder's full output.

Fitted on the *train* representations only, so val/test never leak into the basis. Whitening
gives every kept direction unit variance on train, so the representation head's MSE weighs the
directions equally instead of being dominated by the top few components.

Computed in float64 through an SVD of the centred data (numerically safer than eigendecomposing
the covariance); with ``dim`` = the full dimension, ``inverse_transform(transform(x)) == x`` up
to float rounding. Conventions match scikit-learn's ``PCA(whiten=...)`` (variance with ``N - 1``,
component signs fixed so the largest-|loading| entry is positive), which the tests use as oracle.

Legend: ``N`` vectors, ``D`` input dimension, ``k`` kept components.
"""

from __future__ import annotations

import os
from typing import Dict, Optional

import torch
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError, ConfigError
from ..io import atomic_write


class PCAWhitener:
    """``y = (x - mean) Vᵀ / s`` with ``V`` the top-k principal directions and ``s`` their standard
    deviations (``s = 1`` without whitening).

    Usage: ``p = PCAWhitener().fit(train_r, dim=32)``; ``p.transform(r)``; ``p.inverse_transform(y)``.
    """

    def __init__(self, eps: float = 1e-8):
        self.eps = float(eps)
        self.mean: Optional[torch.Tensor] = None  # (D,) float64
        self.components: Optional[torch.Tensor] = None  # (k, D) orthonormal rows
        self.explained_variance: Optional[torch.Tensor] = None  # (k,)
        self.whiten = True

    @property
    def dim(self) -> int:
        """k, the output dimension."""
        self._check_fitted()
        return int(self.components.shape[0])

    def fit(self, X: torch.Tensor, dim: Optional[int] = None, whiten: bool = True) -> "PCAWhitener":
        """X: (N, D) train representations; dim: k (None: min(N, D)). Returns self."""
        X = torch.as_tensor(X).detach().to("cpu", torch.float64)
        if X.ndim != 2 or len(X) < 2:
            raise ConfigError(f"PCA needs a (N, D) matrix with N >= 2; got shape {tuple(X.shape)}")
        N, D = X.shape
        k = min(N, D) if dim is None else int(dim)
        if not 1 <= k <= min(N, D):
            raise ConfigError(f"pca dim={dim}: must be in [1, min(N, D) = {min(N, D)}]")
        self.mean = X.mean(0)  # (D,)
        _, S, Vh = torch.linalg.svd(X - self.mean, full_matrices=False)  # S (min(N,D),), Vh (min(N,D), D)
        # Deterministic signs: flip each direction so its largest-magnitude loading is positive.
        sign = torch.sign(Vh.gather(1, Vh.abs().argmax(1, keepdim=True)))  # (min(N,D), 1)
        Vh = Vh * torch.where(sign == 0, torch.ones_like(sign), sign)
        self.components = Vh[:k].contiguous()  # (k, D)
        self.explained_variance = (S[:k] ** 2 / (N - 1)).contiguous()  # (k,)
        self.whiten = bool(whiten)
        return self

    def _scale(self) -> torch.Tensor:
        # Directions with ~zero variance (rank-deficient data) are not blown up by 1/σ.
        return self.explained_variance.sqrt().clamp_min(self.eps) if self.whiten else torch.ones_like(self.explained_variance)

    def transform(self, X: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N, k), in X's dtype and device."""
        self._check_fitted()
        X = torch.as_tensor(X)
        y = (X.to("cpu", torch.float64) - self.mean) @ self.components.T / self._scale()  # (N, k)
        return y.to(X.device, X.dtype if X.is_floating_point() else torch.float32)

    def inverse_transform(self, Y: torch.Tensor) -> torch.Tensor:
        """(N, k) -> (N, D): back to representation space (exact when k = D)."""
        self._check_fitted()
        Y = torch.as_tensor(Y)
        x = (Y.to("cpu", torch.float64) * self._scale()) @ self.components + self.mean  # (N, D)
        return x.to(Y.device, Y.dtype if Y.is_floating_point() else torch.float32)

    # --- persistence -------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, torch.Tensor]:
        """Tensors only (safetensors- and ``weights_only``-loadable)."""
        self._check_fitted()
        return {
            "mean": self.mean.clone(), "components": self.components.clone(),
            "explained_variance": self.explained_variance.clone(),
            "whiten": torch.tensor(int(self.whiten)), "eps": torch.tensor(self.eps, dtype=torch.float64),
        }

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> "PCAWhitener":
        missing = {"mean", "components", "explained_variance", "whiten"} - set(state)
        if missing:
            raise CheckpointError(f"PCA state is missing {sorted(missing)}")
        self.mean = state["mean"].to(torch.float64)
        self.components = state["components"].to(torch.float64)
        self.explained_variance = state["explained_variance"].to(torch.float64)
        self.whiten = bool(int(state["whiten"]))
        if "eps" in state:
            self.eps = float(state["eps"])
        return self

    def save(self, path: str | os.PathLike) -> None:
        """Write the state to a ``.safetensors`` file (atomically)."""
        atomic_write(path, lambda p: save_file(self.state_dict(), p))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PCAWhitener":
        if not os.path.isfile(path):
            raise CheckpointError(f"PCA file {str(path)!r} does not exist")
        return cls().load_state_dict(load_file(str(path)))

    def _check_fitted(self) -> None:
        if self.components is None:
            raise ConfigError("PCAWhitener is not fitted: call fit(X, dim) or load a saved one first")
