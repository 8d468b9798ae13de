"""``engine batch``: many generations from a JSONL file, split across processes, GPUs and nodes.

``jobs`` reads and validates the file (every line before any work), ``manifest`` keeps the record
of finished and failed jobs that makes a batch resumable, ``runner`` splits the jobs between the
ranks of an ``accelerate launch`` (or runs them in one process), plans once per workload for the
rank's own device and runs them on one loaded model. See ``docs/scale-out.md``.
"""
