"""prometheus-client set-up shared by every process (imported lazily: the library is only
loaded by processes that record metrics).

Every process records into prometheus-client's multiprocess files in one directory per
server instance, keyed by a *stable* process key (its control-block index), never a pid:
a replacement continues its predecessor's counters and files never pile up.
"""

from __future__ import annotations

import os

# Shared by every process that records a histogram, so series from different processes
# aggregate (a bucket boundary must be the same everywhere).
LATENCY_BUCKETS = (
    0.0001,  # a small model's queue wait and inference are tens of µs
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,  # finer around a vision model's 100 ms
    0.1,
    0.15,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def use_multiprocess_files(directory: str, process_key: str) -> None:
    """Must run before this process creates any metric object."""
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    from prometheus_client import values

    values.ValueClass = values.MultiProcessValue(process_identifier=lambda: process_key)
