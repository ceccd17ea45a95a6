"""How much of the model this device can afford this round.

The client predicts, for a keep fraction k (of dense training FLOPs):

    time(k)   = c * samples * (t0 + t1 * k)          training, from a two-point calibration
              + scoring (refresh rounds: s * score_samples * dense seconds per sample; the
                scoring passes, the plan and the extraction cost s ~ 2 dense training
                samples each)
              + upload of the compact update (bytes(k) / uplink bandwidth)
    memory(k) = param_bytes * k * 5                   weights, gradients, momentum, two
                                                      serialised copies
              + batch * activation_bytes * sqrt(k)    activations scale with the channel
                                                      fraction, FLOPs with its square

and keeps the largest k on a grid from ``max_keep`` down to ``min_keep`` whose time fits
``safety * remaining deadline`` and whose memory fits ``safety * usable memory`` (safety and
the keep range are the federation's ``clients`` settings, sent with every task). ``c`` is a
correction learned in closed loop: after every round the measured training time is compared
with the prediction and ``c`` moves toward their ratio (exponential moving average), so a
throttled or busy board adapts within a few rounds; ``s`` and the time outside training are
learned the same way. Until the first round has been measured the time limit is tightened
further (``unmeasured_margin``). If not even the smallest keep fits, the client declines the
round.

``DeviceBudget`` is a device's whole budget (this model, its memory, its uplink and, for an
emulated board, its time scale), made in one place, ``device_budget``, for the MQTT client,
the simulation's emulated clients and ``cahfp profile`` alike.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cahfp.errors import BudgetInfeasible
from cahfp.messages import BudgetSettings

MIB = 1 << 20


@dataclass
class Calibration:
    """Measured on this device for one model (see ``cahfp.device.calibrate``)."""

    seconds_per_sample: float  # dense training step time per sample
    seconds_per_sample_small: float  # the same at ``small_keep``
    small_keep: float
    activation_bytes_per_sample: float  # tensors saved for backward, dense model
    param_bytes: int  # dense parameters (float32)
    state_bytes: int = 0  # dense state dict incl. buffers (what an update carries)
    flops_per_sample: float = 0.0  # dense training FLOPs per sample (0: not measured)
    # the two step times again in this process's CPU seconds (dense, small); () not measured
    cpu_seconds: tuple[float, ...] = ()

    @property
    def flops_per_second(self) -> float:
        """This device's measured dense training throughput (0 when unknown)."""
        if self.flops_per_sample <= 0 or self.seconds_per_sample <= 0:
            return 0.0
        return self.flops_per_sample / self.seconds_per_sample

    def scaled(self, factor: float) -> Calibration:
        """The same device measurement for a device ``factor`` times slower (emulation)."""
        from dataclasses import replace

        return replace(
            self,
            seconds_per_sample=self.seconds_per_sample * factor,
            seconds_per_sample_small=self.seconds_per_sample_small * factor,
        )

    def on_cpu_clock(self) -> Calibration:
        """The same measurement in CPU seconds (unchanged when those were not measured)."""
        from dataclasses import replace

        if len(self.cpu_seconds) != 2 or min(self.cpu_seconds) <= 0:
            return self
        dense, small = self.cpu_seconds
        return replace(self, seconds_per_sample=dense, seconds_per_sample_small=small)

    def per_sample(self, keep: float) -> tuple[float, float]:
        """(t0, t1) with seconds per sample = t0 + t1 * keep, through the two measurements."""
        k0, s0, s1 = self.small_keep, self.seconds_per_sample_small, self.seconds_per_sample
        t1 = max((s1 - s0) / (1.0 - k0), 0.0) if k0 < 1 else s1
        t0 = max(s1 - t1, 0.0)
        return t0, t1


@dataclass
class Constraints:
    deadline_s: float
    samples: int  # samples processed this round
    batch_size: int
    memory_bytes: int  # usable memory
    uplink_bytes_per_s: float | None = None
    score_samples: int = 0  # refresh rounds: samples scored on the dense model
    elapsed_s: float = 0.0  # already spent on this task (e.g. receiving it)
    safety: float = 0.8
    min_keep: float = 0.1
    max_keep: float = 1.0


@dataclass
class Choice:
    keep: float
    seconds: float
    compute_seconds: float
    memory: int
    reason: str


@dataclass
class BudgetModel:
    calibration: Calibration
    grid_step: float = 0.05
    correction: float = 1.0  # learned: measured / predicted training time
    overhead_s: float = 0.0  # learned: time spent outside training, scoring and upload
    score_factor: float = 2.0  # learned: scoring seconds per scored sample / dense train s
    # until the first round has been measured, plan with this much less of the deadline
    unmeasured_margin: float = 0.85
    alpha: float = 0.5
    history: list[tuple[float, float]] = field(default_factory=list)

    def train_seconds(self, keep: float, samples: int) -> float:
        t0, t1 = self.calibration.per_sample(keep)
        return self.correction * samples * (t0 + t1 * keep)

    def score_seconds(self, samples: int) -> float:
        return self.score_factor * self.train_seconds(1.0, samples)

    def memory(self, keep: float, batch: int) -> int:
        c = self.calibration
        return int(
            5 * c.param_bytes * keep + batch * c.activation_bytes_per_sample * math.sqrt(keep)
        )

    def predict(self, keep: float, cons: Constraints) -> tuple[float, float, int]:
        """(total seconds, training seconds, peak memory) at ``keep``."""
        compute = self.train_seconds(keep, cons.samples)
        score = self.score_seconds(cons.score_samples)
        upload = 0.0
        if cons.uplink_bytes_per_s:
            upload = self.calibration.state_bytes * keep / cons.uplink_bytes_per_s
        total = cons.elapsed_s + self.overhead_s + compute + score + upload
        return total, compute, self.memory(keep, cons.batch_size)

    def grid(self, min_keep: float = 0.1, max_keep: float = 1.0) -> list[float]:
        """Keeps from ``max_keep`` down to ``min_keep`` in steps of ``grid_step``."""
        n = math.floor((max_keep - min_keep) / self.grid_step + 1e-9)
        return sorted(
            {round(max_keep - i * self.grid_step, 6) for i in range(n + 1)} | {min_keep},
            reverse=True,
        )

    def choose(self, cons: Constraints) -> Choice:
        """The largest keep that fits both the deadline and the memory budget."""
        time_limit = cons.safety * cons.deadline_s
        if not self.history:
            time_limit *= self.unmeasured_margin
        mem_limit = cons.safety * cons.memory_bytes
        sps = self.train_seconds(1.0, 1)
        for keep in self.grid(cons.min_keep, cons.max_keep):
            total, compute, mem = self.predict(keep, cons)
            if total <= time_limit and mem <= mem_limit:
                reason = (
                    f"keep {keep:.2f}: compute {compute:.1f} s of {cons.deadline_s:.0f} s "
                    f"deadline at {sps * 1e3:.2f} ms/sample (dense), predicted total "
                    f"{total:.1f} s, memory {mem / MIB:.0f} MiB of "
                    f"{cons.memory_bytes / MIB:.0f} MiB"
                )
                return Choice(keep, total, compute, mem, reason)
        total, compute, mem = self.predict(cons.min_keep, cons)
        raise BudgetInfeasible(
            f"even keep {cons.min_keep:.2f} does not fit: predicted {total:.1f} s against "
            f"{time_limit:.1f} s ({time_limit / cons.deadline_s:.0%} of the "
            f"{cons.deadline_s:.0f} s deadline), "
            f"memory {mem / MIB:.0f} MiB against {mem_limit / MIB:.0f} MiB; sitting this round out"
        )

    def observe(
        self,
        keep: float,
        samples: int,
        measured_seconds: float,
        other_seconds: float | None = None,
        scored: tuple[int, float] | None = None,
    ) -> None:
        """Closed loop: move the correction toward measured / predicted training time, the
        overhead toward the measured time outside training, scoring and upload, and (on refresh
        rounds, ``scored`` = (samples scored, seconds)) the scoring factor toward its measured
        value."""
        predicted = self.train_seconds(keep, samples)
        if predicted > 0 and measured_seconds > 0:
            ratio = measured_seconds / (predicted / self.correction)
            self.correction = (1 - self.alpha) * self.correction + self.alpha * ratio
            self.history.append((keep, measured_seconds))
        if scored is not None and scored[0] > 0 and scored[1] > 0:
            factor = scored[1] / self.train_seconds(1.0, scored[0])
            self.score_factor = (1 - self.alpha) * self.score_factor + self.alpha * factor
        if other_seconds is not None and other_seconds >= 0:
            self.overhead_s = (1 - self.alpha) * self.overhead_s + self.alpha * other_seconds


@dataclass
class DeviceBudget:
    """What one device can afford: its budget model (its calibration, in the device's own
    seconds), memory and uplink. ``clock`` is what the device times its work with and
    ``time_scale`` turns those seconds into the device's own: wall-clock and 1 on a real board;
    for a board emulated here, this process's CPU time and the ratio of this host's throughput
    to the board's."""

    model: BudgetModel
    memory_bytes: int
    uplink_bytes_per_s: float | None = None
    time_scale: float = 1.0
    profile: str | None = None  # the emulated board's profile name
    clock: Callable[[], float] = time.perf_counter

    def constraints(
        self,
        settings: BudgetSettings,
        deadline_s: float,
        samples: int,
        batch_size: int,
        score_samples: int = 0,
        elapsed_s: float = 0.0,
    ) -> Constraints:
        return Constraints(
            deadline_s=deadline_s,
            samples=samples,
            batch_size=batch_size,
            memory_bytes=self.memory_bytes,
            uplink_bytes_per_s=self.uplink_bytes_per_s,
            score_samples=score_samples,
            elapsed_s=elapsed_s,
            safety=settings.safety,
            min_keep=settings.min_keep,
            max_keep=settings.max_keep,
        )


def device_budget(measured: Calibration, usable_memory: int, profile=None) -> DeviceBudget:
    """The one way a device's budget is set up. ``profile`` None: this device as measured, with
    its usable memory. A ``device_profiles.DeviceProfile``: the board it describes, emulated on
    this host (the measurement scaled to the board's training throughput, whatever this host's
    speed is today; the board's memory and uplink).

    An emulated board keeps time in this process's CPU seconds, measured and scaled alike: boards
    emulated side by side on one host share its cores, and wall-clock time would charge each
    board for the others' work (three boards on two cores: rounds several times slower than
    the boards they emulate)."""
    if profile is None:
        return DeviceBudget(BudgetModel(measured), usable_memory)
    on_cpu = measured.on_cpu_clock()
    clock = time.process_time if on_cpu is not measured else time.perf_counter
    scale = profile.time_scale(on_cpu.flops_per_second)
    return DeviceBudget(
        BudgetModel(on_cpu.scaled(scale)),
        profile.memory_bytes,
        profile.uplink_bytes_per_s,
        scale,
        profile.name,
        clock,
    )
