"""Transfer times over the host<->GPU link.

A copy costs the link's fixed ``setup_us`` plus its bytes at the rate it gets: the pinned rate of
its direction, or, from pageable host memory, a rate that depends on the copy's size (a measured
table, interpolated in log(size) and held constant beyond its first and last sizes).

The table is interpolated log-log (log rate linear in log size, i.e. a power law between two
rows). Interpolating the rate itself linearly in log(size) can make a larger copy finish earlier
where the rate climbs steeply (4 KiB -> 64 KiB on the H100 host); the power law cannot, as long
as the table's own copy times grow with size.
When copies run in both directions at once each keeps ``bidirectional_derate`` of its rate.
"""

from __future__ import annotations

import math
from bisect import bisect_right

from moesim.hardware.spec import HardwareSpec

DIRECTIONS = ("h2d", "d2h")


class _LogTable:
    """Rate (bytes/s) as a function of size: log-log interpolation, clamped at both ends."""

    def __init__(self, rows):
        self.logs = [math.log(float(s)) for s, _ in rows]
        self.log_rates = [math.log(float(b) * 1e9) for _, b in rows]

    def rate(self, nbytes: float) -> float:
        """Interpolated rate in bytes/s for a copy of ``nbytes`` bytes."""
        x = math.log(nbytes)
        logs, ys = self.logs, self.log_rates
        if x <= logs[0]:
            return math.exp(ys[0])
        if x >= logs[-1]:
            return math.exp(ys[-1])
        i = bisect_right(logs, x)
        x0, x1 = logs[i - 1], logs[i]
        return math.exp(ys[i - 1] + (ys[i] - ys[i - 1]) * (x - x0) / (x1 - x0))


class LinkModel:
    """Duration (seconds) of host<->GPU copies over the one link of ``hw``.

    This is the single-flow case of the max-min fair fluid model that multi-GPU runs will use:
    a copy alone on a dedicated link gets the link's full rate in its direction, so its duration
    is ``setup + bytes / rate`` with no event needed to share bandwidth. Sharing among concurrent
    flows is not modelled here (beyond the two-direction derate).
    """

    def __init__(self, hw: HardwareSpec):
        link, mem = hw.link, hw.host_memory
        self.name = link.name
        self.setup_s = link.setup_us * 1e-6
        self.pinned_rate = {"h2d": link.h2d_bandwidth_gb_s * 1e9, "d2h": link.d2h_bandwidth_gb_s * 1e9}
        h2d_table = _LogTable(mem.pageable_h2d_gb_s)
        d2h_rows = mem.pageable_d2h_gb_s
        self.pageable = {"h2d": h2d_table, "d2h": _LogTable(d2h_rows) if d2h_rows else h2d_table}
        self.derate = link.bidirectional_derate

    def rate_bytes_s(self, nbytes: float, direction: str = "h2d", pinned: bool = True,
                     both_directions: bool = False) -> float:
        """Rate in bytes/s a copy of ``nbytes`` bytes gets after its setup time."""
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        rate = self.pinned_rate[direction] if pinned else self.pageable[direction].rate(max(nbytes, 1.0))
        return rate * self.derate if both_directions else rate

    def duration_s(self, nbytes: float, direction: str = "h2d", pinned: bool = True,
                   both_directions: bool = False) -> float:
        """Seconds one copy of ``nbytes`` bytes takes: setup + bytes / rate (0 for 0 bytes).

        ``pinned=False`` uses the pageable table of ``direction``; ``both_directions=True``
        applies the bidirectional derate to the rate."""
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        if nbytes == 0:
            return 0.0
        return self.setup_s + nbytes / self.rate_bytes_s(nbytes, direction, pinned, both_directions)
