"""The method registry: method name <-> method class <-> config class, and the one loader.

Every fine-tuning method is registered under the name its adapter directories record
(``{"method": ...}``, see :mod:`medmoe.adapters.format`)::

    @register_method("MoELoRA", config_class=MoELoRAConfig)
    class MoELoRA(AdapterSpec): ...

    @register_method("LoRA")          # a dataclass that is its own config
    @dataclass
    class LoRA(AdapterSpec): ...

:func:`adapter_spec` turns any registered config into its method (a config subclass selects the
method registered for it, else its nearest registered parent's, built around that config);
:func:`saved_method` is the method, with its saved config, that wrote a directory; and
:func:`load_adapted` loads any directory onto a base model by its recorded method.
"""

from __future__ import annotations

import importlib
import os
import warnings
from typing import TYPE_CHECKING, Any

from torch import nn

from medmoe.adapters.format import AdapterDescription, read_description

if TYPE_CHECKING:
    from medmoe.adapters.spec import AdapterConfig, AdapterSpec

_METHODS: dict[str, type] = {}
_CONFIG_METHODS: dict[type, type] = {}
# the modules defining the built-in methods, imported on first look-up (they import this one)
_BUILTIN_MODULES = (
    "medmoe.adapters.med_moe_lora",
    "medmoe.adapters.lora",
    "medmoe.adapters.multi_lora",
    "medmoe.adapters.full",
)
# what a config must not define: a config that does is pretending to be a method
_METHOD_HOOKS = ("apply", "save", "load", "disabled", "prepare_batch")

__all__ = [
    "adapter_spec",
    "load_adapted",
    "method_class",
    "register_method",
    "registered_methods",
    "saved_method",
]


def register_method(name: str, *, config_class: type | None = None):
    """Class decorator: register an :class:`AdapterSpec` subclass as method ``name``.

    ``config_class``: the data-only config (an ``AdapterConfig``) the method holds, if it has
    one; :func:`adapter_spec` then turns such a config (or a subclass of it) into this method.
    A name is registered once; a subclass of a registered method that is not registered itself
    saves under its parent's name (and its ``class_path``).
    """

    def decorate(cls: type) -> type:
        existing = _METHODS.get(name)
        if existing is not None and existing is not cls:
            raise ValueError(
                f"method {name!r} is already registered by {existing.__module__}."
                f"{existing.__qualname__}"
            )
        _METHODS[name] = cls
        cls.method_name = name
        if config_class is not None:
            _CONFIG_METHODS[config_class] = cls
            cls.config_class = config_class
        return cls

    return decorate


def _builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def registered_methods() -> dict[str, type]:
    """Every registered method: name -> class."""
    _builtins()
    return dict(_METHODS)


def method_class(name: str) -> type:
    """The class registered as ``name``; KeyError naming the registered ones."""
    _builtins()
    if name not in _METHODS:
        raise KeyError(
            f"no adapter method {name!r} is registered; registered: {', '.join(sorted(_METHODS))}"
        )
    return _METHODS[name]


def adapter_spec(adapter: AdapterSpec | AdapterConfig) -> AdapterSpec:
    """The method of ``adapter``: an :class:`AdapterSpec` as it is; a registered config (or a
    subclass of one) as the method registered for the nearest class of its MRO, holding it."""
    from medmoe.adapters.spec import AdapterSpec

    if isinstance(adapter, AdapterSpec):
        return adapter
    _builtins()
    for cls in type(adapter).__mro__:
        method = _CONFIG_METHODS.get(cls)
        if method is None:
            continue
        hooks = [h for h in _METHOD_HOOKS if hasattr(type(adapter), h)]
        if hooks:
            raise TypeError(
                f"{type(adapter).__name__} is a config (data only) but defines {hooks}, which "
                f"would be ignored; to change how {method.method_name} applies, subclass "
                f"{method.__module__.rsplit('.', 1)[0]}.{method.__name__} (the method) instead"
            )
        return method(config=adapter)
    configs = ", ".join(sorted(c.__name__ for c in _CONFIG_METHODS))
    raise TypeError(
        f"adapter must be an AdapterSpec (e.g. medmoe.adapters.MoELoRA, "
        f"medmoe.adapters.baselines.LoRA) or a registered config ({configs}), got "
        f"{type(adapter).__name__}"
    )


def _saved_class(description: AdapterDescription) -> type:
    """The class that saved ``description``: its ``class_path`` where that imports and is the
    registered method or a subclass of it, else the registered method (with a warning)."""
    registered = method_class(description.method)
    class_path = description.class_path
    if not class_path or class_path == f"{registered.__module__}.{registered.__qualname__}":
        return registered
    module_name, _, name = class_path.rpartition(".")
    try:
        cls: Any = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        cls = None
    if isinstance(cls, type) and issubclass(cls, registered):
        return cls
    warnings.warn(
        f"{description.path}: the adapter was saved by {class_path}, which does not import here "
        f"(or is no {registered.__name__}); loading it as {registered.__name__}. Pass the "
        "method to load it with that class",
        stacklevel=3,
    )
    return registered


def saved_method(directory: str | os.PathLike) -> AdapterSpec:
    """The method, with its saved config, that wrote the adapter directory (any format)."""
    description = read_description(directory)
    return _saved_class(description).from_config_dict(description.config)


def load_adapted(
    model: nn.Module, directory: str | os.PathLike, method: AdapterSpec | None = None
) -> nn.Module:
    """Load an adapter directory of any method and format onto ``model`` (a bare base, or one
    adapted by the same method) and return the adapted model (peft LoRA: a ``PeftModel``).

    ``method``: load with this method (e.g. a subclass with another layer); by default the one
    the directory records (:func:`saved_method`).
    """
    spec = method if method is not None else saved_method(directory)
    return spec.load(model, directory)
