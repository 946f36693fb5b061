"""What a verified draft token costs, learned from the engine's own step times.

A draft token is worth verifying only if it is likely enough to be accepted. An accepted token saves the
request one future step, worth ``t0 / B + t1`` (its share of the step's fixed cost plus its own token);
verifying a draft token costs ``t1`` whether it is accepted or not. So a token whose probability of being
accepted (together with all tokens before it) is ``p`` pays off iff ``p * (t0 / B + t1) >= t1``, i.e.
``p >= t1 / (t0 / B + t1)``: the *break-even probability*. On a GPU a small-batch decode step is bound by
memory traffic, so a few more tokens should hardly cost time (``t1 ~ 0``, break-even ~ 0, drafts as long as
``min_token_prob`` allows; expected, not measured here); on a CPU each
verified token costs real compute (measured: ``t1`` is 1.7-3.2x the per-request share of the fixed cost
on a 2-core AVX2 machine, break-even 0.63-0.76), so long low-confidence drafts make decoding slower.

:class:`StepCostModel` fits ``step seconds = t0 + t1 * tokens`` by exponentially weighted least squares
over decode-only engine steps (steps with prefill chunks are left out: prompt tokens cost differently).
"""

from __future__ import annotations

__all__ = ["StepCostModel"]


class StepCostModel:
    """Online fit of one engine step's time as ``t0 + t1 * tokens``.

    Args:
        decay: weight of the past per new step (0.98: the last ~50 steps dominate).
        min_steps: steps observed before the fit is used.
        max_break_even: cap on :meth:`break_even` (drafting never stops entirely: a cap below 1 lets a
            workload whose drafts are nearly always right keep them).
    """

    def __init__(self, decay: float = 0.98, min_steps: int = 16, max_break_even: float = 0.9) -> None:
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"StepCostModel decay must be in (0, 1], got {decay}")
        self.decay = decay
        self.min_steps = min_steps
        self.max_break_even = max_break_even
        self.steps = 0
        self._w = self._x = self._y = self._xx = self._xy = 0.0
        self._fit: tuple[float, float] | None = None

    def observe(self, tokens: int, seconds: float) -> None:
        """Add one decode-only engine step: ``tokens`` verified (rows + draft tokens) in ``seconds``."""
        if tokens <= 0 or not seconds > 0.0:
            return
        if self._fit is not None:
            t0, t1 = self._fit
            if seconds > 4.0 * (t0 + t1 * tokens):  # a stall (GC, another process): not the step's cost
                return
        d = self.decay
        x, y = float(tokens), float(seconds)
        self._w = self._w * d + 1.0
        self._x = self._x * d + x
        self._y = self._y * d + y
        self._xx = self._xx * d + x * x
        self._xy = self._xy * d + x * y
        self.steps += 1
        if self.steps < self.min_steps:
            return
        mx, my = self._x / self._w, self._y / self._w
        var = self._xx / self._w - mx * mx
        if var < 0.25:  # token counts barely varied: the slope is not identified, keep the last fit
            return
        t1 = max(0.0, (self._xy / self._w - mx * my) / var)
        t0 = max(0.0, my - t1 * mx)
        self._fit = (t0, t1)

    @property
    def coefficients(self) -> tuple[float, float] | None:
        """``(t0, t1)`` in seconds (per step, per verified token), or ``None`` before a fit."""
        return self._fit

    def break_even(self, rows: int) -> float:
        """Least acceptance probability at which a draft token pays off, with ``rows`` requests per step
        (0 before the first fit)."""
        if self._fit is None or rows <= 0:
            return 0.0
        t0, t1 = self._fit
        per_request = t0 / rows + t1
        return min(self.max_break_even, t1 / per_request) if per_request > 0 else 0.0
