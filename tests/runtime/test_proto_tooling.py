"""The codegen and lint commands of protos/: `generate.py --check` notices stale generated code and
`lint.sh` (buf, STANDARD rules) passes on the real protos and fails on a badly named one."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PROTOS = Path(__file__).resolve().parents[2] / "protos"
BAD_PROTO = """syntax = "proto3";
package cryostack.lintprobe.v1;
message probe_request { string Name = 1; }
"""


@pytest.fixture
def protos_copy(tmp_path: Path) -> Path:
    """A copy of protos/ (sources, generated code, tools) to break without touching the real tree."""
    copy = tmp_path / "protos"
    shutil.copytree(PROTOS, copy, ignore=shutil.ignore_patterns("node_modules", "__pycache__"))
    if (PROTOS / "node_modules").is_dir():
        (copy / "node_modules").symlink_to(PROTOS / "node_modules")
    return copy


def run(*command: str | Path) -> subprocess.CompletedProcess[str]:
    """Run a tooling command with this interpreter, capturing its output."""
    return subprocess.run(
        [str(part) for part in command],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "PYTHON": sys.executable},
    )


def test_check_mode_reports_edited_and_stale_generated_files(protos_copy):
    assert run(sys.executable, protos_copy / "generate.py", "--check").returncode == 0
    generated = protos_copy / "cryostack" / "jobs" / "v1" / "jobs_pb2.py"
    generated.write_text(generated.read_text() + "\n# edited by hand\n")
    stale = protos_copy / "cryostack" / "jobs" / "v1" / "old_pb2.py"
    stale.write_text("")
    result = run(sys.executable, protos_copy / "generate.py", "--check")
    assert result.returncode == 1
    assert "out of date: cryostack/jobs/v1/jobs_pb2.py" in result.stderr
    assert "stale (no .proto source): cryostack/jobs/v1/old_pb2.py" in result.stderr


@pytest.mark.skipif(
    shutil.which("npm") is None and not (PROTOS / "node_modules" / ".bin" / "buf").exists(),
    reason="buf comes from npm, which is not installed",
)
def test_buf_lint_passes_on_the_protos_and_fails_on_bad_names(protos_copy):
    passing = run("bash", protos_copy / "lint.sh")
    assert passing.returncode == 0, passing.stdout + passing.stderr
    bad = protos_copy / "cryostack" / "lintprobe" / "v1" / "lintprobe.proto"
    bad.parent.mkdir(parents=True)
    bad.write_text(BAD_PROTO)
    failing = run("bash", protos_copy / "lint.sh")
    assert failing.returncode != 0
    assert 'Message name "probe_request" should be PascalCase' in failing.stdout + failing.stderr
