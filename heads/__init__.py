"""The modality files (DESIGN.md §6): one per modality, found by ``kind``.

The core never imports a particular head; it calls :func:`build_image_head`,
:func:`build_modality`, :func:`modality_class` and :func:`modality_tasks`. A kind is one of

- a built-in kind (``_BUILTIN``: a file here and one line in that table);
- a kind added with :func:`register_modality` (a :class:`unidiff.modality.Modality` subclass that
  lives anywhere, e.g. in the user's own package), for in-process use (notebooks, scripts, tests);
- a ``"package.module:Class"`` string in a config's ``modalities[i].kind``: the module is imported
  and the class registered under its own ``kind`` on first use. The string is saved in the run's
  ``config.yaml``, so ``unidiff sample``/``evaluate`` in a new process find the class again (the
  module must be importable there too, e.g. on ``PYTHONPATH``).

The sampling tasks of every kind form one table (:func:`modality_tasks`), from the classes'
``tasks`` declarations; the sampler and the CLI both read it.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import replace
from typing import Any, Dict, Tuple, Union

from torch import nn

from unidiff.errors import ConfigError
from unidiff.modality import GENERIC_TASKS, TASK_ACTIONS, Modality, ModalityTask

# kind -> "module:Class", imported lazily so an unused modality costs nothing.
_BUILTIN = {
    "label": "heads.label:LabelModality",
    "representation": "heads.representation:RepresentationModality",
    "masked_image": "heads.masked_image:MaskedImageModality",
    "source_image": "heads.source_image:SourceImageModality",
}
MODALITY_KINDS: Tuple[str, ...] = tuple(_BUILTIN)  # the built-in kinds
# kind -> class, or its "module:Class" path until first use. Built-ins first, then registrations.
_REGISTRY: Dict[str, Union[str, type]] = dict(_BUILTIN)

# Arguments every modality takes from UnifiedModel/the config, beside its own options.
_COMMON = ("name", "image_shape", "hidden_size", "patch_size", "weight", "loss_weight")


def build_image_head(image_shape: Tuple[int, int, int], hidden_size: int, patch_size: int) -> nn.Module:
    """The image head (DiT FinalLayer): features -> (B, C, H, W) ε̂ / v̂ / x̂0."""
    from .image import ImageHead

    return ImageHead(image_shape=tuple(image_shape), hidden_size=hidden_size, patch_size=patch_size)


# --- the registry ----------------------------------------------------------------------------
def _import_class(path: str, what: str) -> type:
    """The class at ``"package.module:Class"``; ConfigError naming ``what`` when it is not there."""
    module, _, name = path.partition(":")
    if not module or not name:
        raise ConfigError(f"{what}: {path!r} is not of the form 'package.module:Class'")
    try:
        mod = importlib.import_module(module)
    except ImportError as err:
        raise ConfigError(f"{what}: cannot import module {module!r} ({err})") from None
    if not hasattr(mod, name):
        raise ConfigError(f"{what}: module {module!r} has no attribute {name!r}")
    return getattr(mod, name)


def _check_class(kind: str, cls: Any) -> type:
    """``cls`` must be a Modality subclass whose ``kind`` is ``kind`` and whose tasks are well formed."""
    if not (isinstance(cls, type) and issubclass(cls, Modality)):
        raise ConfigError(f"modality kind {kind!r}: {cls!r} is not a subclass of unidiff.modality.Modality")
    if cls.kind != kind:
        raise ConfigError(f"modality kind {kind!r}: class {cls.__name__} declares kind {cls.kind!r}")
    for task in cls.tasks:
        if not isinstance(task, ModalityTask) or task.action not in TASK_ACTIONS:
            raise ConfigError(f"modality kind {kind!r}: tasks must be ModalityTask(name, action in {list(TASK_ACTIONS)}), got {task!r}")
        if task.name in GENERIC_TASKS:
            raise ConfigError(f"modality kind {kind!r}: task name {task.name!r} is reserved for the sampler")
    if cls.npz_key == "images":  # every sample .npz holds the images under that key
        raise ConfigError(f"modality kind {kind!r}: npz_key 'images' is reserved for the images")
    return cls


def register_modality(kind: str, cls: Union[type, str]) -> type:
    """Add the modality kind ``kind``: ``cls`` is a :class:`Modality` subclass (with
    ``cls.kind == kind``) or its ``"package.module:Class"`` path (imported now). Returns the class.

    A config naming ``kind`` then builds it. Rejected with :class:`ConfigError`: a malformed kind,
    a class that is not a Modality, a kind that is taken by another class, a task name that another
    kind (or the sampler) already uses. Registering the same class again is a no-op.
    """
    if not isinstance(kind, str) or not kind.isidentifier():
        raise ConfigError(f"modality kind {kind!r} must be a Python identifier (e.g. 'thickness')")
    if isinstance(cls, str):
        cls = _import_class(cls, f"modality kind {kind!r}")
    cls = _check_class(kind, cls)
    if kind in _REGISTRY:
        if modality_class(kind) is cls:
            return cls
        held = _REGISTRY[kind]
        held = held if isinstance(held, str) else f"{held.__module__}:{held.__qualname__}"
        raise ConfigError(f"modality kind {kind!r} is already registered ({held})")
    taken = modality_tasks()
    for task in cls.tasks:
        if task.name in taken:
            raise ConfigError(f"modality kind {kind!r}: task {task.name!r} is already a task of kind {taken[task.name].kind!r}")
    _REGISTRY[kind] = cls
    return cls


def modality_kinds() -> Tuple[str, ...]:
    """Every registered kind: the built-in ones, then those of :func:`register_modality`."""
    return tuple(_REGISTRY)


def modality_class(kind: str) -> type:
    """The :class:`Modality` subclass of ``kind`` (a registered kind or ``"package.module:Class"``)."""
    if isinstance(kind, str) and ":" in kind:
        cls = _import_class(kind, f"modality kind {kind!r}")
        if not (isinstance(cls, type) and issubclass(cls, Modality)):
            raise ConfigError(f"modality kind {kind!r}: {cls!r} is not a subclass of unidiff.modality.Modality")
        return register_modality(cls.kind, cls)
    if kind not in _REGISTRY:
        raise ConfigError(f"unknown modality kind {kind!r}; choose one of {list(_REGISTRY)} or 'package.module:Class'")
    entry = _REGISTRY[kind]
    if isinstance(entry, str):  # a built-in, imported on first use
        entry = _REGISTRY[kind] = _check_class(kind, _import_class(entry, f"modality kind {kind!r}"))
    return entry


def modality_tasks() -> Dict[str, ModalityTask]:
    """The one task table: task name -> :class:`ModalityTask` (with ``kind``), over every
    registered kind, in registration order (DESIGN.md §3)."""
    table: Dict[str, ModalityTask] = {}
    for kind in _REGISTRY:
        for task in modality_class(kind).tasks:
            table[task.name] = replace(task, kind=kind)
    return table


# --- building ------------------------------------------------------------------------------------
def modality_options(kind: str) -> Tuple[str, ...]:
    """The options a kind accepts beyond the common ones (``name``, ``weight``, ...), for docs/CLI."""
    params = inspect.signature(modality_class(kind).__init__).parameters
    return tuple(p for p in params if p not in ("self", *_COMMON))


def build_modality(kind: str, **kwargs: Any) -> Modality:
    """Build the modality ``kind`` from the common arguments (``name``, ``image_shape``,
    ``hidden_size``, ``patch_size``, ``weight``, ``loss_weight``) and the kind's own options.

    Unknown kinds, unknown or missing options raise :class:`ConfigError` naming them; each head
    checks the type and range of its options itself.
    """
    cls = modality_class(kind)
    params = inspect.signature(cls.__init__).parameters
    allowed = modality_options(kind)
    for key in kwargs:
        if key not in params or key == "self":
            raise ConfigError(f"modality kind {kind!r} has no option {key!r}; its options are {list(allowed)}")
    for key, p in params.items():
        if key != "self" and p.default is inspect.Parameter.empty and key not in kwargs:
            raise ConfigError(f"modality kind {kind!r} needs option {key!r}")
    return cls(**kwargs)
