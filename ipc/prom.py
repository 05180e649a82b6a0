"""prometheus-client set-up shared by every process (imported lazily: the library is only
loaded by processes that record metrics).

Every process records into prometheus-client's multiprocess files in one directory per
server instance, keyed by a *stable* process key (its control-block index), never a pid:
a replacement continues its predecessor's counters and files never pile up.
"""

from __future__ import annotations

import os


def use_multiprocess_files(directory: str, process_key: str) -> None:
    """Must run before this process creates any metric object."""
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    from prometheus_client import values

    values.ValueClass = values.MultiProcessValue(process_identifier=lambda: process_key)
