"""The one walker over nested states: dicts, lists and tuples of tensors and plain values.

Every module that goes through a state (digests and type checks, staging for async saves,
DTensor placeholders and placement, best-state copies) maps a function over its leaves with
`map_leaves`, or asks `any_leaf`. Containers are the exact types in `CONTAINERS`; anything else,
a tensor included, is a leaf. Dicts come back as plain dicts, lists and tuples as their type.
"""

from __future__ import annotations

import typing as tp
from collections import OrderedDict

import torch

CONTAINERS = (dict, OrderedDict, list, tuple, torch.Size)
Path = tuple[tp.Any, ...]  # the keys and indices from the root to a value


def map_leaves(obj: tp.Any, leaf: tp.Callable[[tp.Any, Path, tp.Any], tp.Any], like: tp.Any = None,
               is_leaf: tp.Callable[[tp.Any], bool] | None = None,
               check_key: tp.Callable[[tp.Any], None] | None = None, path: Path = ()) -> tp.Any:
    """`obj` rebuilt with `leaf(value, path, like_value)` in place of each leaf.

    `like` is walked alongside (`like_value` is None where it has no such entry): the live
    state a checkpoint is read into. `is_leaf` stops the walk at some containers (a placeholder
    dict); `check_key` sees every dict key (and may raise).
    """
    kind = type(obj)
    if kind not in CONTAINERS or (is_leaf is not None and is_leaf(obj)):
        return leaf(obj, path, like)
    if kind in (dict, OrderedDict):
        if check_key is not None:
            for key in obj:
                check_key(key)
        return {key: map_leaves(value, leaf, child(like, key), is_leaf, check_key, (*path, key))
                for key, value in obj.items()}
    return kind(map_leaves(value, leaf, child(like, index), is_leaf, check_key, (*path, index))
                for index, value in enumerate(obj))


def any_leaf(obj: tp.Any, predicate: tp.Callable[[tp.Any], bool]) -> bool:
    """Whether `predicate` holds for some leaf (stops at the first)."""
    if type(obj) not in CONTAINERS:
        return predicate(obj)
    values = obj.values() if isinstance(obj, dict) else obj
    return any(any_leaf(value, predicate) for value in values)


def child(like: tp.Any, key: tp.Any) -> tp.Any:
    """`like[key]`, or None where `like` has no such entry."""
    try:
        return like[key]
    except (KeyError, IndexError, TypeError):
        return None


def dotted(path: Path) -> str:
    """A path as a dotted name: ('model', 'layers', 0, 'weight') -> 'model.layers.0.weight'."""
    return '.'.join(str(part) for part in path)


_PLAIN = (type(None), bool, int, float, complex, str, bytes)


def skeleton(obj: tp.Any, tensors: list[torch.Tensor]) -> tp.Any:
    """The structure of `obj` with each tensor replaced by its dtype and shape (collected).

    Raises TypeError for anything but tensors, plain containers and plain scalars (keys
    included): such a value would make the file need arbitrary pickles, which loading refuses.
    Exact types are checked, since a subclass (defaultdict, a str enum) pickles as its class.
    """
    def leaf(value: tp.Any, path: Path, like: tp.Any) -> tp.Any:
        kind = type(value)
        if kind in _PLAIN:
            return value
        if isinstance(value, torch.Tensor):
            tensors.append(value)
            return ('tensor', str(value.dtype), tuple(value.shape))
        raise TypeError(f"cannot checkpoint a {kind.__module__}.{kind.__qualname__} ({value!r:.60}): "
                        "store tensors, plain containers and plain scalars only")

    def check_key(key: tp.Any) -> None:
        if type(key) not in _PLAIN:
            raise TypeError(f"cannot checkpoint a dict key of type {type(key).__qualname__} ({key!r:.60})")
    return map_leaves(obj, leaf, check_key=check_key)


def map_tensors(obj: tp.Any, function: tp.Callable[[torch.Tensor], tp.Any]) -> tp.Any:
    """`obj` rebuilt with `function(tensor)` for each tensor, in traversal order."""
    return map_leaves(obj, lambda value, path, like: function(value) if isinstance(value, torch.Tensor) else value)
