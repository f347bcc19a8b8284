"""Small helpers shared by the runtime tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from counting_job import next_total
from google.protobuf import struct_pb2

from cryostack.jobs.v1 import jobs_pb2

T = TypeVar("T")


def expected_total(steps: int, seed: int) -> int:
    """The counting job's result computed here, independently of the runtime."""
    total = 0
    for step in range(steps):
        total = next_total(total, step, seed % 2**31)
    return total


def result_of(job: jobs_pb2.Job) -> dict:
    """The job's Struct result as a dict."""
    result = struct_pb2.Struct()
    assert job.result.Unpack(result)
    return dict(result)


def wait_for(predicate: Callable[[], T], timeout_s: float = 10.0, interval_s: float = 0.05) -> T:
    """Poll until `predicate()` is truthy and return its value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError("condition not reached in time")
