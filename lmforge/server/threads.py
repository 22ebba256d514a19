"""How the server's ONNX Runtime threads wait: sleeping, or spinning within a run, chosen by
measurement while it serves.

A decode step of a small model is ~200 short parallel sections. Threads that spin between them
are fastest on a quiet machine; threads that sleep need a wake-up per section, which cost the
default model's single stream 30% here (server 136.8 tok/s sleeping, 181.8 spinning within runs,
`lmforge bench` 186.6). On a loaded machine it turns round: a spinning thread holds a core the
thread it waits for needs (same server with four other busy processes: 111 sleeping, 44 spinning
within runs). Which one wins changes with whatever else runs, so the server opens the model
twice, once each way (`spin="auto"`, for models small enough that a second copy of the weights
is cheap and where steps are short enough for the wake-ups to matter), decodes on the faster
one and tries the other for a few steps every few seconds (`SessionChooser`). Both sessions run
the same kernels on the same number of threads: the numbers are the same, only the waiting
differs.
"""

from __future__ import annotations

from pathlib import Path

SLEEP = {"session.intra_op.allow_spinning": "0", "session.inter_op.allow_spinning": "0"}
# spin between a run's parallel sections, sleep between runs: the event loop gets the core
# while the scheduler samples and streams
SPIN_IN_RUN = {"session.intra_op.allow_spinning": "1", "session.force_spinning_stop": "1"}
TWIN_MAX_BYTES = 1 << 30  # auto: a second session only for model files up to this size
SPIN_POLICIES = ("auto", "sleep", "spin")

TRY_EVERY_S = 3.0  # how often the other session gets a trial
TRY_STEPS = 8  # decode steps per trial (the first is a warm-up, not measured)
ALPHA = 0.2  # weight of a new measurement in the running averages


def model_bytes(model_path: Path) -> int:
    """The bytes of an ONNX graph file and its external weights file."""
    data = model_path.with_name(model_path.name + ".data")
    return model_path.stat().st_size + (data.stat().st_size if data.exists() else 0)


class SessionChooser:
    """Which of two sessions runs the next decode step. A step's cost is its whole cycle, from
    one decode's start to the next (sampling, streaming and the event loop's share of the CPU
    included), counted only when nothing else ran in between (one engine pass) and the step
    before ran on the same session (a session's first step after the other's wakes its parked
    threads). The running average of each session's cycle per batch size is kept; during a
    trial each cycle of the tried session is compared with the current one's average at that
    batch size, and the running average of that ratio picks the current session."""

    def __init__(self, clock_start: float = 0.0):
        self.current = 0
        self.cost: dict[tuple[int, int], float] = {}  # (session, batch size) -> seconds per cycle
        self.ratio: float | None = None  # session 1's cycle / session 0's, from trials
        self.trying = 0  # trial steps left on the other session
        self.next_try = clock_start
        self.last: tuple[int, int, float, int, bool] | None = None  # session, batch, start, passes, warm
        self.switches = 0

    def choose(self, batch: int, now: float, passes: int) -> int:
        """The session for a decode step of `batch` rows starting at `now`, the engine having run
        `passes` passes so far."""
        self._record(now, passes)
        if self.trying:
            self.trying -= 1
            session = 1 - self.current
        else:
            best = self.current if self.ratio is None else int(self.ratio < 1)
            self.switches += best != self.current
            self.current = session = best
            if now >= self.next_try and (self.current, batch) in self.cost:  # a trial compares with known steps
                self.trying, self.next_try = TRY_STEPS - 1, now + TRY_EVERY_S
                session = 1 - self.current
        warm = self.last is not None and self.last[0] == session
        self.last = (session, batch, now, passes, warm)
        return session

    def _record(self, now: float, passes: int) -> None:
        if self.last is None:
            return
        session, batch, start, before, warm = self.last
        if passes != before + 1 or not warm:
            return
        cycle = now - start
        ref = self.cost.get((self.current, batch))
        if session != self.current and ref is not None:
            sample = cycle / ref if session == 1 else ref / cycle
            self.ratio = sample if self.ratio is None else (1 - ALPHA) * self.ratio + ALPHA * sample
        old = self.cost.get((session, batch))
        self.cost[(session, batch)] = cycle if old is None else (1 - ALPHA) * old + ALPHA * cycle
