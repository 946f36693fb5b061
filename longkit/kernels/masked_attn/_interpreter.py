"""Triton interpreter compatibility (``TRITON_INTERPRET=1``, the CPU test tier); compiled kernels are unaffected."""

from __future__ import annotations

__all__ = ["fix_interpreter_index"]


def fix_interpreter_index() -> None:
    """Work around Triton's CPU interpreter with numpy >= 2.3 (interpreter mode only).

    The interpreter stores scalars as 1-element arrays and converts loop bounds with
    ``int(array)``, which numpy >= 2.3 refuses ("only 0-dimensional arrays can be converted"), so any
    ``for`` loop with a run-time bound fails under ``TRITON_INTERPRET=1``. We wrap the interpreter's
    tensor patching to convert through ``.reshape(-1)[0]``. Compiled (GPU) kernels are unaffected.
    """
    import numpy as np  # only the interpreter tier needs these two

    try:
        int(np.array([1]))
        return  # this numpy still converts 1-element arrays
    except TypeError:
        pass
    from triton.runtime import interpreter as _interp

    orig = _interp._patch_lang_tensor
    if getattr(orig, "_longkit_fixed", False):
        return

    def patched(tensor, scope):  # noqa: ANN001, ANN202 - mirrors the private signature
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._longkit_fixed = True  # type: ignore[attr-defined]
    _interp._patch_lang_tensor = patched
