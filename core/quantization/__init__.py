"""Quantization schemes shared by every architecture.

A scheme (:class:`QuantScheme`) does two things:

* ``quantize_model(model)`` swaps the model's :class:`kiln.modeling.Linear` and
  :class:`kiln.modeling.Embedding` layers for quantized ones (in place) and returns a plan:
  ``{float parameter name: function(float array) -> {stored name: array}}``;
* parameters the plan does not name are stored in the scheme's ``model_dtype``.

The converter runs the plan tensor by tensor; the compiler builds the swapped model.  A plugin
adds a scheme by returning a :class:`kiln.specs.QuantizationSpec` holding its own
``QuantScheme`` from ``register_quantizations``: nothing in the core changes.
"""

from __future__ import annotations

from typing import Callable, Protocol

import numpy as np

QuantizePlan = dict[str, Callable[[np.ndarray], dict[str, np.ndarray]]]


class QuantScheme(Protocol):
    """What a quantization scheme provides (see the module docstring)."""

    kind: str
    model_dtype: str
    # optional: the dtype of the KV cache, when it differs from ``model_dtype`` (see ``kv_dtype``)
    # kv_cache_dtype: str | None

    def quantize_model(self, model) -> QuantizePlan: ...


def kv_dtype(scheme) -> str:
    """The dtype a model quantized with ``scheme`` keeps its KV cache in: the scheme's
    ``kv_cache_dtype`` if it declares one, else its ``model_dtype``."""
    return getattr(scheme, "kv_cache_dtype", None) or scheme.model_dtype


from .group import GroupQuant, dequantize_groups, pack_codes, quantize_groups, unpack_codes  # noqa: E402
from .noquant import NoQuant  # noqa: E402

__all__ = ["QuantScheme", "QuantizePlan", "kv_dtype", "GroupQuant", "NoQuant", "quantize_groups", "dequantize_groups",
           "pack_codes", "unpack_codes"]
