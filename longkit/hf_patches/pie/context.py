"""An editable KV-cache context: a file's tokens and their transformers ``DynamicCache``, kept valid through edits.

PIE (He et al., "Let the Code LLM Edit Itself When You Edit the Code", ICLR 2025) for one edit replacing tokens
``[s, e)`` by ``n`` new ones:

* cache entries ``[0, s)`` are kept as they are (they never saw the edited tokens);
* the ``n`` new tokens are encoded at their true positions ``s .. s+n-1``, attending to the kept prefix;
* the old suffix ``[e, T)`` is appended with its keys re-rotated by ``Δ = n - (e - s)`` (RoPE composes:
  ``R(p + Δ) = R(Δ)·R(p)``) and its values unchanged. That is PIE's approximation: the suffix's keys and values
  still reflect the old text, but every key sits at its new position, so attention sees a coherent order.

Several edits of one call are applied left to right; the suffix between two edits gets the sum of the deltas
before it, and each edit's new tokens attend to everything already updated on their left. ``method="reencode"``
(recompute everything from the first edit on, reusing the prefix) and ``method="splice"`` (PIE without the
re-rotation) are the baselines, built in so a benchmark compares the three on the same state.

The cache always holds every token of the context, at positions ``0 .. T-1`` (no padding): the layout that
``generate()`` continues from. Keys of a bf16/fp16 cache are re-rotated in fp32 and rounded back once per edit.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ...kernels.rope import rerotate_
from ..compat import cache_kwarg
from .checks import PIEEditError, check_cache, check_pie_model
from .config import PIEConfig
from .edits import Splice, TextEdit, TokenEdit, normalise_splices, run_bounds, text_to_splices, token_bounds
from .edits import token_edit_to_splice as _token_splice

__all__ = ["EditableContext", "EditableBatch", "EditStats", "METHODS"]

METHODS = ("pie", "splice", "reencode")


@dataclass(frozen=True)
class EditStats:
    """What one :meth:`EditableContext.edit` call did to the cache (token counts)."""

    edits: int  # token splices after merging (0: the call changed nothing)
    removed: int  # old tokens dropped
    encoded: int  # tokens run through the model
    rerotated: int  # cached keys rotated (per layer and head)
    length: int  # context length afterwards


class EditableContext:
    """One sequence (e.g. an open file) and its KV cache, editable in place.

    Args:
        model: a supported RoPE causal LM (Llama, Qwen2, Qwen3, Mistral without sliding window).
        ids: the token ids (``Sequence[int]`` or a ``[T]``/``[1, T]`` tensor); or give ``text`` and ``tokenizer``.
        text: the text to tokenize (without special tokens); text edits need it.
        tokenizer: a fast tokenizer (offset mapping). With ``ids`` it only serves token edits' text tracking.
        config: :class:`~.config.PIEConfig`.
        cache: a ``DynamicCache`` already holding exactly these tokens (else the context prefills one).

    Examples::

        >>> ctx = EditableContext(model, text=source, tokenizer=tok)
        >>> i = source.index("return x")
        >>> ctx.edit(TextEdit(i, i + 8, "return x + 1"))          # PIE: encode the line, re-rotate the rest
        >>> new_tokens = ctx.generate(max_new_tokens=32)          # [1, 32]; the context itself is unchanged
    """

    def __init__(self, model: Any, ids: Sequence[int] | torch.Tensor | None = None, *,  # noqa: ANN401
                 text: str | None = None, tokenizer: Any = None, config: PIEConfig | None = None,  # noqa: ANN401
                 cache: Any = None) -> None:  # noqa: ANN401
        self.model = model
        self.inv_freq = check_pie_model(model)
        self.config = PIEConfig() if config is None else config
        if not isinstance(self.config, PIEConfig):
            raise TypeError(f"config must be a PIEConfig, got {type(self.config).__name__}")
        self.tokenizer = tokenizer
        self._text: str | None = None
        self._bounds: list[int] | None = None
        if ids is None:
            if text is None or tokenizer is None:
                raise PIEEditError("give token ids, or text together with a tokenizer")
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            ids = list(enc["input_ids"])
            self._track_text(text, ids, token_bounds(enc["offset_mapping"], len(text)))
        else:
            if text is not None:
                raise PIEEditError("give either ids or text, not both")
            ids = self._as_ids(ids)
            if tokenizer is not None:  # track the decoded text so text edits work on id-built contexts too
                t, b = run_bounds(tokenizer, ids) if len(ids) <= 256 else _offsets_of(tokenizer, ids)
                self._track_text(t, ids, b)
        if not ids:
            raise PIEEditError("an EditableContext needs at least one token")
        self._ids: list[int] = list(ids)
        if cache is None:
            from transformers.cache_utils import DynamicCache

            cache = DynamicCache()  # no config: full DynamicLayers everywhere (sliding models are refused above)
            self.cache = cache
            self._encode(self._ids, 0)
        else:
            check_cache(cache)
            if cache.get_seq_length() != len(self._ids):
                raise PIEEditError(f"the given cache holds {cache.get_seq_length()} tokens, the ids {len(self._ids)}")
            self.cache = cache

    # -- state -------------------------------------------------------------------------------------------
    @property
    def ids(self) -> list[int]:
        """The current token ids (a copy)."""
        return list(self._ids)

    @property
    def text(self) -> str | None:
        """The current text, or ``None`` if the context tracks ids only."""
        return self._text

    def __len__(self) -> int:
        return len(self._ids)

    def clone(self) -> EditableContext:
        """An independent copy (cache tensors cloned)."""
        new = object.__new__(EditableContext)
        new.__dict__.update(self.__dict__)
        new._ids = list(self._ids)
        new._bounds = None if self._bounds is None else list(self._bounds)
        from transformers.cache_utils import DynamicCache

        new.cache = DynamicCache()
        for layer in self.cache.layers:
            new.cache.update(layer.keys.clone(), layer.values.clone(), len(new.cache.layers))
        return new

    def prefix(self, n: int) -> EditableContext:
        """A new context of the first ``n`` tokens (cache cloned, no model call): entries ``[0, n)`` of a causal
        cache are exactly those of a prefill of the first ``n`` tokens."""
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(self._ids):
            raise PIEEditError(f"prefix length must be an int in [1, {len(self._ids)}], got {n!r}")
        if self._bounds is not None and self._bounds[n] < 0:
            raise PIEEditError(f"token {n} starts inside a character; pick a neighbouring length")
        new = self.clone()
        new._ids = new._ids[:n]
        for layer in new.cache.layers:
            layer.keys, layer.values = layer.keys[..., :n, :].clone(), layer.values[..., :n, :].clone()
        if new._bounds is not None and new._text is not None:
            new._text = new._text[: new._bounds[n]]
            new._bounds = new._bounds[: n + 1]
        return new

    def _track_text(self, text: str, ids: Sequence[int], bounds: list[int]) -> None:
        decoded = self.tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if decoded != text:
            raise PIEEditError(
                "this tokenizer does not decode its tokens back to the same text (e.g. SentencePiece drops a "
                "leading space), so text edits cannot be mapped to tokens; build the context from ids and use "
                "TokenEdit"
            )
        self._text, self._bounds = text, bounds

    @staticmethod
    def _as_ids(ids: Sequence[int] | torch.Tensor) -> list[int]:
        if isinstance(ids, torch.Tensor):
            if ids.dim() == 2 and ids.shape[0] == 1:
                ids = ids[0]
            if ids.dim() != 1 or ids.dtype.is_floating_point:
                raise PIEEditError(f"ids must be an integer tensor [T] or [1, T], got {tuple(ids.shape)} {ids.dtype}; "
                                   "for several sequences use EditableBatch")
            return ids.tolist()
        return [int(i) for i in ids]

    # -- the model -----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def _encode(self, ids: Sequence[int], start: int) -> torch.Tensor | None:
        """Run ``ids`` at positions ``start ..`` through the model, appending to the cache; last logits ``[V]``."""
        logits = None
        dev = self.model.device
        step = self.config.chunk_size
        for a in range(0, len(ids), step):
            chunk = torch.tensor([list(ids[a:a + step])], device=dev)
            pos = torch.arange(start + a, start + a + chunk.shape[1], device=dev)[None]
            out = self.model(input_ids=chunk, position_ids=pos, past_key_values=self.cache, use_cache=True,
                             logits_to_keep=1)
            logits = out.logits[0, -1]
        return logits

    @torch.inference_mode()
    def continuation_logits(self, ids: Sequence[int]) -> torch.Tensor:
        """Logits ``[n, V]`` of ``ids`` run after the context; the context's cache is left as it was."""
        n = len(self._ids)
        dev = self.model.device
        chunk = torch.tensor([list(ids)], device=dev)
        pos = torch.arange(n, n + chunk.shape[1], device=dev)[None]
        saved = [(layer.keys, layer.values) for layer in self.cache.layers]
        try:
            return self.model(input_ids=chunk, position_ids=pos, past_key_values=self.cache, use_cache=True).logits[0]
        finally:  # DynamicLayer.update concatenates into new tensors: restoring the references undoes it
            for layer, (k, v) in zip(self.cache.layers, saved):
                layer.keys, layer.values = k, v

    def generate(self, max_new_tokens: int = 32, **kwargs: Any) -> torch.Tensor:  # noqa: ANN401
        """``model.generate`` continuing the context from its cache; returns the new tokens ``[1, n]``.

        Greedy unless ``kwargs`` say otherwise. The context (ids and cache) is unchanged afterwards: the last
        token is handed to ``generate()`` as its prompt step, its cache entries are restored afterwards.
        """
        n = len(self._ids)
        layers = self.cache.layers
        check_cache(self.cache)
        saved = [(layer.keys, layer.values) for layer in layers]
        for layer, (k, v) in zip(layers, saved):
            layer.keys, layer.values = k[..., : n - 1, :], v[..., : n - 1, :]
        dev = self.model.device
        kwargs.setdefault("do_sample", False)
        if kwargs.get("pad_token_id") is None and getattr(self.model.generation_config, "pad_token_id", None) is None:
            eos = getattr(self.model.generation_config, "eos_token_id", None)
            kwargs["pad_token_id"] = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0
        try:
            out = self.model.generate(input_ids=torch.tensor([self._ids], device=dev),
                                      attention_mask=torch.ones(1, n, dtype=torch.long, device=dev),
                                      max_new_tokens=max_new_tokens, **{cache_kwarg(): self.cache}, **kwargs)
        finally:
            for layer, (k, v) in zip(layers, saved):
                layer.keys, layer.values = k, v
        return out[:, n:]

    # -- edits ---------------------------------------------------------------------------------------------
    def edit(self, text_edits: TextEdit | Iterable[TextEdit] = (), *, tokens: TokenEdit | Iterable[TokenEdit] = (),
             method: str = "pie") -> EditStats:
        """Apply text and/or token edits (all in the coordinates *before* the call) and update the cache.

        Args:
            text_edits: :class:`~.edits.TextEdit` s (character spans of :attr:`text`); see :mod:`.edits` for
                how they become token splices (tokens straddling an edit are replaced).
            tokens: :class:`~.edits.TokenEdit` s (insert / delete / replace token spans).
            method: ``"pie"`` (default), ``"splice"`` (no re-rotation: the naive baseline) or ``"reencode"``
                (recompute from the first edit on, reusing the prefix cache: exact, slow).

        Returns:
            :class:`EditStats`.

        Raises:
            PIEEditError: spans out of range, overlapping edits, text edits without tracked text, an edit that
                would empty the context. UnsupportedCacheError: the cache was replaced by one PIE cannot edit.
        """
        if method not in METHODS:
            raise PIEEditError(f"method must be one of {list(METHODS)}, got {method!r}")
        text_edits = [text_edits] if isinstance(text_edits, TextEdit) else list(text_edits)
        token_edits = [tokens] if isinstance(tokens, TokenEdit) else list(tokens)
        check_cache(self.cache)
        n_old = len(self._ids)
        if self.cache.get_seq_length() != n_old:
            raise PIEEditError(f"the cache holds {self.cache.get_seq_length()} tokens but the context {n_old}: it was "
                               "changed outside the EditableContext")
        splices: list[Splice] = []
        if text_edits:
            if self._text is None or self._bounds is None:
                raise PIEEditError("text edits need a context built with text= and tokenizer= (this one tracks ids "
                                   "only); use TokenEdit")
            splices += text_to_splices(text_edits, self._text, self._ids, self._bounds, self.tokenizer,
                                       self.config.window, self.config.trim_common)
        vocab = getattr(self.model.config, "vocab_size", None)
        for te in token_edits:
            if not isinstance(te, TokenEdit):
                raise PIEEditError(f"tokens= takes TokenEdit objects, got {type(te).__name__}")
            sp = _token_splice(te, n_old, vocab)
            if self._text is not None:
                sp = self._with_text(sp)
            splices.append(sp)
        splices = [sp for sp in normalise_splices(splices, n_old) if sp.ids != tuple(self._ids[sp.start:sp.end])]
        if not splices:
            return EditStats(0, 0, 0, 0, n_old)
        n_new = n_old + sum(len(sp.ids) - (sp.end - sp.start) for sp in splices)
        if n_new == 0:
            raise PIEEditError("this edit would delete the whole context; build a new EditableContext instead")
        encoded, rerotated = self._update_cache(splices, method)
        self._update_tokens(splices)
        if method == "pie" and self.config.refresh_tail:
            last_end = splices[-1].end + n_new - n_old  # the last edit's end, in the new coordinates
            encoded += self._refresh(min(self.config.refresh_tail, n_new - last_end))
        return EditStats(len(splices), sum(sp.end - sp.start for sp in splices), encoded, rerotated, n_new)

    def _refresh(self, r: int) -> int:
        """Re-encode the last ``r`` tokens (their cache entries are dropped first); returns ``r``."""
        if r <= 0:
            return 0
        n = len(self._ids)
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[..., : n - r, :], layer.values[..., : n - r, :]
        self._encode(self._ids[n - r:], n - r)
        return r

    def _with_text(self, sp: Splice) -> Splice:
        """A token splice's text and bounds (its ends must be clean character boundaries)."""
        assert self._bounds is not None
        for i in (sp.start, sp.end):
            if self._bounds[i] < 0:
                raise PIEEditError(f"token edit boundary {i} falls inside a character (its bytes are split over "
                                   "tokens); widen the edit to whole characters")
        text, rel = run_bounds(self.tokenizer, sp.ids) if sp.ids else ("", [0])
        return Splice(sp.start, sp.end, sp.ids, text, tuple(rel))

    def _update_tokens(self, splices: list[Splice]) -> None:
        for sp in reversed(splices):  # right to left: earlier offsets stay valid
            self._ids[sp.start:sp.end] = sp.ids
            if self._text is not None and self._bounds is not None:
                assert sp.text is not None and sp.rel_bounds is not None
                c0, c1 = self._bounds[sp.start], self._bounds[sp.end]
                shift = len(sp.text) - (c1 - c0)
                self._text = self._text[:c0] + sp.text + self._text[c1:]
                mid = [c0 + r if r >= 0 else -1 for r in sp.rel_bounds[:-1]]
                tail = [b + shift if b >= 0 else -1 for b in self._bounds[sp.end:]]
                self._bounds[sp.start:] = mid + tail

    def _update_cache(self, splices: list[Splice], method: str) -> tuple[int, int]:
        """Rewrite the cache for ``splices`` (sorted, old coordinates); returns (tokens encoded, keys rotated)."""
        layers = self.cache.layers
        old = [(layer.keys, layer.values) for layer in layers]
        n_old = len(self._ids)
        s0 = splices[0].start
        # Every step below replaces layer tensors (slices, torch.cat): the old tensors are never written to.
        for layer, (k, v) in zip(layers, old):
            layer.keys, layer.values = k[..., :s0, :], v[..., :s0, :]
        if method == "reencode":
            new_ids = list(self._ids)
            for sp in reversed(splices):
                new_ids[sp.start:sp.end] = sp.ids
            self._encode(new_ids[s0:], s0)
            return len(new_ids) - s0, 0
        encoded = rotated = 0
        offset = 0  # new position - old position of the suffix currently being appended
        inv_freq = self.inv_freq
        for i, sp in enumerate(splices):
            if sp.ids:
                self._encode(sp.ids, sp.start + offset)
                encoded += len(sp.ids)
            offset += len(sp.ids) - (sp.end - sp.start)
            a, b = sp.end, splices[i + 1].start if i + 1 < len(splices) else n_old
            if b <= a:
                continue
            delta = None
            if method == "pie" and offset != 0:
                delta = torch.full((b - a,), offset, dtype=torch.long, device=old[0][0].device)
                rotated += b - a
            for layer, (k, v) in zip(layers, old):
                n0 = layer.keys.shape[-2]
                layer.keys = torch.cat([layer.keys, k[..., a:b, :]], dim=-2)
                layer.values = torch.cat([layer.values, v[..., a:b, :]], dim=-2)
                if delta is not None:  # in place on the freshly appended columns (a strided view)
                    rerotate_(layer.keys[..., n0:, :], delta, inv_freq.to(k.device), impl=self.config.rerotate_impl)
        return encoded, rotated


def _offsets_of(tokenizer: Any, ids: list[int]) -> tuple[str, list[int]]:  # noqa: ANN401
    """Text and bounds of a long id sequence: decode once, re-tokenize, and require the same ids."""
    text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if list(enc["input_ids"]) != list(ids):
        raise PIEEditError("these ids are not the tokenizer's own tokenization of their text, so character "
                           "offsets cannot be recovered; pass tokenizer=None (token edits only) or build from text")
    return text, token_bounds(enc["offset_mapping"], len(text))


class EditableBatch:
    """Several contexts (open files) of different lengths, each with its own ``DynamicCache``.

    Kept simple on purpose: rows are edited and generated one at a time (no padding, so every row's cache stays
    in the exact layout PIE edits). A server batching decode steps across files would left-pad the rows' caches
    into one; that is not built here.
    """

    def __init__(self, contexts: Sequence[EditableContext]) -> None:
        self.rows = list(contexts)
        if not self.rows or not all(isinstance(c, EditableContext) for c in self.rows):
            raise PIEEditError("EditableBatch needs a non-empty list of EditableContext")

    @classmethod
    def from_texts(cls, model: Any, tokenizer: Any, texts: Sequence[str],  # noqa: ANN401
                   config: PIEConfig | None = None) -> EditableBatch:
        """One context per text."""
        return cls([EditableContext(model, text=t, tokenizer=tokenizer, config=config) for t in texts])

    @classmethod
    def from_ids(cls, model: Any, rows: Sequence[Sequence[int]], config: PIEConfig | None = None) -> EditableBatch:  # noqa: ANN401
        """One context per id sequence (token edits only)."""
        return cls([EditableContext(model, ids=r, config=config) for r in rows])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> EditableContext:
        return self.rows[i]

    def edit(self, edits: dict[int, dict[str, Any]], method: str = "pie") -> dict[int, EditStats]:
        """``edits[row] = {"text_edits": [...], "tokens": [...]}`` (either key optional); rows checked first."""
        for row in edits:
            if isinstance(row, bool) or not isinstance(row, int) or not 0 <= row < len(self.rows):
                raise PIEEditError(f"row {row!r} is out of range for a batch of {len(self.rows)}")
        return {row: self.rows[row].edit(kw.get("text_edits", ()), tokens=kw.get("tokens", ()), method=method)
                for row, kw in edits.items()}

    def generate(self, max_new_tokens: int = 32, **kwargs: Any) -> list[torch.Tensor]:  # noqa: ANN401
        """Each row's new tokens ``[1, n]``, generated row by row."""
        return [c.generate(max_new_tokens, **kwargs) for c in self.rows]
