"""What several benchmarks share: the predicted-vs-measured row the memory benchmarks print
(``ae_memory``, ``foreign_modules``), and the date and machine the CPU benchmarks record."""
from __future__ import annotations


def mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:9.1f}"


def print_memory_row(head: str, r: dict, extra: str = "") -> None:
    """``head`` then predicted bytes, and for a measured row the measurement, the relative error,
    the seconds it took and ``extra``; an unmeasured row shows its status instead."""
    if r["status"] != "measured":
        print(f"{head} pred {mib(r['predicted_bytes'])} MiB  {r['status']}", flush=True)
        return
    print(f"{head} pred {mib(r['predicted_bytes'])} MiB  meas {mib(r['measured_bytes'])} MiB  "
          f"err {r['rel_error']:+.4f}  {r['seconds']:6.1f} s{extra}", flush=True)


def utc_now() -> str:
    """The run's date, as every results file records it."""
    import datetime

    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def cpu_machine(**extra) -> dict:
    """The CPU a benchmark ran on: platform, model, torch's thread count and version, and ``extra``."""
    import platform

    import torch

    from engine.device.host import cpu_name

    return {"platform": platform.platform(), "cpu": cpu_name(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, **extra}
