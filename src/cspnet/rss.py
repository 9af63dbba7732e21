"""This process's resident memory (RSS) and its peak, from Linux ``/proc``: for `cspnet.compare`
and `cspnet.bench`, which measure a model's training memory in a fresh process."""
from __future__ import annotations


def status_kib(field: str) -> int | None:
    """A ``/proc/self/status`` field in KiB (``VmRSS``: now, ``VmHWM``: the peak); ``None`` without ``/proc``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark ``VmHWM`` (Linux: ``echo 5 > /proc/self/clear_refs``); whether it could."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_kib(was_reset: bool) -> int:
    """Peak RSS in KiB: ``VmHWM`` since the `reset_peak_rss` that returned ``was_reset``; without
    a reset (or ``/proc``), ``ru_maxrss``, which after fork + exec can still hold the parent's peak."""
    peak = status_kib("VmHWM") if was_reset else None
    if peak is None:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return peak
