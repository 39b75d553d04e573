"""An independent clock for the speed records of dha.bench (and `eval`'s speed columns).

`SpeedClock` times, with the test's own time.perf_counter(), every timed run (`dha.bench.time_point`)
and every prefill, random-cache fill and decode step a runner makes inside it, and counts the tokens
each call is given. dha's seconds must then lie between what the test saw, whatever the machine:

    decode:  first step's start .. last step's end  <=  decode_s  <=  end of the prefill (or of the
             random cache) .. end of the run
    prefill: the prefill call  <=  prefill_s  <=  start of the run .. first step's start

and tokens/s between (tokens counted from the calls) / (the outer span) and / (the inner span).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import dha.bench
from dha.bench import Runner, TransformersRunner

# Seconds are differences of perf_counter readings in float64: dha's and the test's readings
# interleave, so the bounds hold exactly up to rounding. 1e-9 relative slack on the bounds.
REL = 1e-9


@dataclass
class Run:
    """One call of time_point as the test saw it: perf_counter readings, tokens counted from the calls."""

    runner: object
    batch_size: int
    context: int
    new_tokens: int
    start: float = 0.0
    end: float = 0.0
    prefill: tuple[float, float] | None = None  # (start, end) of runner.prefill
    prefill_tokens: int = 0  # ids given to runner.prefill
    random_cache_end: float | None = None  # decode_only: end of runner.random_cache
    steps: list[tuple[float, float]] = field(default_factory=list)  # (start, end) of each runner.step
    decoded_tokens: int = 0  # tokens given to runner.step, summed

    @property
    def decode_inner(self) -> float:
        return self.steps[-1][1] - self.steps[0][0]

    @property
    def decode_outer(self) -> float:
        ready = self.prefill[1] if self.prefill is not None else self.random_cache_end
        return self.end - ready

    @property
    def prefill_inner(self) -> float:
        return self.prefill[1] - self.prefill[0]

    @property
    def prefill_outer(self) -> float:
        return self.steps[0][0] - self.start


class SpeedClock:
    def __init__(self, monkeypatch):
        self.runs: list[Run] = []
        self._current: Run | None = None
        original = dha.bench.time_point

        def timed_point(runner, batch_size, context, new_tokens, seed=0, decode_only=False):
            run = Run(runner, batch_size, context, new_tokens)
            self._current = run
            run.start = time.perf_counter()
            try:
                return original(runner, batch_size, context, new_tokens, seed, decode_only)
            finally:
                run.end = time.perf_counter()
                self._current = None
                self.runs.append(run)

        monkeypatch.setattr(dha.bench, "time_point", timed_point)  # measure() looks it up at each call
        for cls in (Runner, TransformersRunner):
            for name in ("prefill", "step", "random_cache"):
                if name in vars(cls):
                    monkeypatch.setattr(cls, name, self._wrap(vars(cls)[name], name))

    def _wrap(self, method, name):
        def timed(runner, *args):
            t0 = time.perf_counter()
            out = method(runner, *args)
            t1 = time.perf_counter()
            run = self._current
            if run is not None:
                if name == "prefill":
                    run.prefill, run.prefill_tokens = (t0, t1), run.prefill_tokens + args[0].numel()  # ids (B, T)
                elif name == "step":
                    run.steps.append((t0, t1))
                    run.decoded_tokens += args[1].numel()  # token (B, 1)
                else:
                    run.random_cache_end = t1
            return out

        return timed

    def timed_run(self, which, batch_size: int, context: int, new_tokens: int) -> Run:
        """The timed run (repeats=1) at a point of the runner `which(runner)` picks: the last call
        with those sizes. measure() runs a point's warm-up (prompt min(context, 16), min(new_tokens,
        2) steps) just before it, so a warm-up may share the sizes but never comes after."""
        runs = [
            r
            for r in self.runs
            if which(r.runner) and (r.batch_size, r.context, r.new_tokens) == (batch_size, context, new_tokens)
        ]
        assert 1 <= len(runs) <= 2, (
            f"expected a timed run (and maybe its warm-up) at batch {batch_size}, context {context}, got {len(runs)}"
        )
        return runs[-1]

    @staticmethod
    def check_record(s: dict, run: Run, decode_only: bool = False) -> None:
        """A speed record against the test's clock (float64 seconds, REL slack for rounding)."""
        assert len(run.steps) == run.new_tokens and run.decoded_tokens == run.batch_size * run.new_tokens
        assert 0 < run.decode_inner * (1 - REL) <= s["decode_s"] <= run.decode_outer * (1 + REL), (
            run.decode_inner,
            s["decode_s"],
            run.decode_outer,
        )
        assert (
            run.decoded_tokens / run.decode_outer * (1 - REL)
            <= s["decode_tokens_per_s"]
            <= run.decoded_tokens / run.decode_inner * (1 + REL)
        ), (run.decoded_tokens / run.decode_outer, s["decode_tokens_per_s"], run.decoded_tokens / run.decode_inner)
        if decode_only:
            assert run.prefill is None and run.random_cache_end is not None
            return
        assert run.random_cache_end is None and run.prefill_tokens == run.batch_size * run.context
        assert 0 < run.prefill_inner * (1 - REL) <= s["prefill_s"] <= run.prefill_outer * (1 + REL), (
            run.prefill_inner,
            s["prefill_s"],
            run.prefill_outer,
        )
        assert (
            run.prefill_tokens / run.prefill_outer * (1 - REL)
            <= s["prefill_tokens_per_s"]
            <= run.prefill_tokens / run.prefill_inner * (1 + REL)
        ), (run.prefill_tokens / run.prefill_outer, s["prefill_tokens_per_s"], run.prefill_tokens / run.prefill_inner)
