"""Files shipped inside the package, found without importing the code that uses them.

A leaf module: the base-model loader (:mod:`medmoe.base_model`) and the toy clinic
(:mod:`medmoe.data.toy_clinic`) both locate the toy base here, so neither imports the other.
"""

from __future__ import annotations

from pathlib import Path

TOY_BASE_DIR = Path(__file__).resolve().parent / "data" / "toy_base"


def toy_base_path() -> Path:
    """The shipped toy base: a tiny Llama trained on the general toy tasks (``from_pretrained``
    ready; built by ``python -m medmoe.data.build_toy_base``)."""
    return TOY_BASE_DIR
