"""One replica serving the counting job kind, for the multi-process tests.

Reads `ServiceSettings` and `ObjectStoreSettings` from the environment, prints "PORT <n>" once it serves, and
stops gracefully on SIGTERM. Short leases let a second replica take over a killed one's job within seconds.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from counting_job import register

from cryostack.config import ObjectStoreSettings, ServiceSettings
from cryostack.runtime import serve


def announce(port: int) -> None:
    """Tell the parent test which port the replica serves on."""
    print(f"PORT {port}", flush=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    serve(
        ServiceSettings(),
        ObjectStoreSettings(),
        register,
        on_started=announce,
        lease_s=1.5,
        cancel_poll_s=0.2,
        progress_write_s=0.2,
    )
