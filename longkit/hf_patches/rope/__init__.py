"""Giraffe RoPE types (Pal et al., arXiv 2308.10882) for transformers, and ``apply_patches(model, rope=...)``.

* :mod:`.basis`: the power and truncated frequency bases (plain torch);
* :mod:`.hf`: their ``ROPE_INIT_FUNCTIONS`` entries and ``rope_parameters`` validators, :func:`register`;
* :mod:`.patch`: ``install`` / ``uninstall`` on a loaded model (recompute ``inv_freq``, ``attention_scaling``).

Importing this package registers the types (so does ``longkit.register_rope_types()``): do it before building
or loading a model whose ``config.rope_parameters`` names ``giraffe_power`` or ``giraffe_truncated``.
"""

from ...config import GIRAFFE_ROPE_TYPES
from .basis import power_basis, standard_inv_freq, truncated_basis
from .hf import compute_giraffe_power_parameters, compute_giraffe_truncated_parameters, is_registered, register
from .patch import install, rotary_modules, uninstall

__all__ = [
    "GIRAFFE_ROPE_TYPES",
    "register",
    "is_registered",
    "compute_giraffe_power_parameters",
    "compute_giraffe_truncated_parameters",
    "standard_inv_freq",
    "power_basis",
    "truncated_basis",
    "install",
    "uninstall",
    "rotary_modules",
]

register()
