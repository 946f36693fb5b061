"""PIE: keep a KV cache valid through code edits (He et al., "Let the Code LLM Edit Itself When You Edit the Code",
ICLR 2025, Positional Integrity Encoding).

Not an ``apply_patches`` technique: nothing in the model changes. An :class:`EditableContext` owns one sequence's
token ids and its transformers ``DynamicCache``; :meth:`EditableContext.edit` encodes only the edited tokens and
re-rotates the cached keys after them to their new positions (:func:`longkit.kernels.rope.rerotate_`), leaving a
cache that ``generate()`` continues from. Composes with LM-Infinite's attention
(``apply_patches(model, lm_infinite=...)``): the context keeps its own full ``DynamicCache``, which
``generate()`` uses as given; LM-Infinite's bounded caches themselves cannot be edited (refused).

Modules: :mod:`.config` (:class:`PIEConfig`), :mod:`.checks` (model/cache checks, errors), :mod:`.edits`
(edit types, text → token splices), :mod:`.context` (:class:`EditableContext`, :class:`EditableBatch`).
"""

from .checks import STATIC_ROPE_TYPES, PIEEditError, UnsupportedCacheError, check_cache, check_pie_model
from .config import PIEConfig
from .context import METHODS, EditableBatch, EditableContext, EditStats
from .edits import TextEdit, TokenEdit

__all__ = ["PIEConfig", "EditableContext", "EditableBatch", "EditStats", "TextEdit", "TokenEdit", "METHODS",
           "PIEEditError", "UnsupportedCacheError", "STATIC_ROPE_TYPES", "check_pie_model", "check_cache"]
