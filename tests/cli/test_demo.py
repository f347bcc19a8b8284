"""`cryostack demo` end to end as a subprocess against the session's object store, at a tiny size."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

from cryostack.config import ObjectStoreSettings


def test_demo_classifies_with_and_without_the_cap_and_writes_a_report(
    object_store_settings: ObjectStoreSettings, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "CRYOSTACK_S3_ENDPOINT": object_store_settings.endpoint,
        "CRYOSTACK_S3_ACCESS_KEY": object_store_settings.access_key.get_secret_value(),
        "CRYOSTACK_S3_SECRET_KEY": object_store_settings.secret_key.get_secret_value(),
        "CRYOSTACK_S3_SECURE": "false",
        "CRYOSTACK_JOBS_URI": "s3://cryostack-demo/test-jobs",
        "CRYOSTACK_BACKEND": "numpy",
    }
    particles, classes, cap_multiple = 400, 4, 1.2
    completed = subprocess.run(
        [sys.executable, "-m", "cryostack.cli.main", "demo", "--particles", str(particles), "--box", "32",
         "--classes", str(classes), "--cap-multiple", str(cap_multiple), "--online-iterations", "2",
         "--seed", "7", "--report-dir", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    cap = math.ceil(cap_multiple * particles / classes)
    lines = [line for line in completed.stdout.splitlines() if line.startswith("classify2d")]
    assert len(lines) == 2
    capped_largest = int(re.search(r"largest (\d+)", lines[1]).group(1))
    assert f"with cap {cap}" in lines[1]
    assert capped_largest <= cap
    report = (tmp_path / "report.md").read_text()
    assert "| plain |" in report and f"| capped | {cap} |" in report
    assert (tmp_path / "montage_plain.png").read_bytes().startswith(b"\x89PNG")
    assert (tmp_path / "montage_capped.png").read_bytes().startswith(b"\x89PNG")
