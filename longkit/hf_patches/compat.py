"""What differs between the transformers versions of longkit's window, found by feature detection.

transformers 5.24 renamed the KV cache argument from ``past_key_values`` to ``cache`` everywhere: the
models' ``forward``, ``prepare_inputs_for_generation``, the ``model_kwargs`` that ``generate()`` threads
through ``_prepare_cache_for_generation`` and ``get_compiled_call(...)(**model_inputs)``, and the outputs.
The old name still works in *user* calls (a ``FutureWarning``, removal announced for 5.40 / 6.0), but
``generate()`` reads only the new key from ``model_kwargs``: a cache written under the old key would not be
seen by ``_valid_auto_compile_criteria`` and the CUDA-graph decode path would silently run eagerly.
"""

from __future__ import annotations

import functools
import inspect

from ..errors import HostVersionError

__all__ = ["cache_kwarg"]

_NAMES = ("cache", "past_key_values")  # newest first


@functools.cache
def cache_kwarg() -> str:
    """The name under which ``generate()`` passes the KV cache: ``"cache"`` (5.24+) or ``"past_key_values"``.

    Read from the signature of ``GenerationMixin.prepare_inputs_for_generation`` (the function that hands the
    cache to the model's forward). With 5.25's ``expose_in_signature`` the deprecated name is listed too, so
    the newer name is looked for first.
    """
    from transformers.generation.utils import GenerationMixin

    params = inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    for name in _NAMES:
        if name in params:
            return name
    raise HostVersionError(
        "this transformers version passes the KV cache under neither 'cache' nor 'past_key_values' "
        f"(prepare_inputs_for_generation{inspect.signature(GenerationMixin.prepare_inputs_for_generation)}); "
        "longkit's generate() integration does not support it"
    )
