"""The verifier pool (ckptd.workers): real spawned worker processes verifying real checkpoints."""

from __future__ import annotations

import time
from concurrent.futures import wait
from pathlib import Path

import checkpoints

from ckptd.workers import VerifierPool


def test_the_worker_count_follows_the_load_within_workers(tmp_path: Path) -> None:
    """A burst of two at once gets two workers; while work then comes one at a time, it goes to the same
    worker, so the other idles out and stops (its ~250 MB given back) although the pool is never idle."""
    made = [checkpoints.torch_zip(tmp_path / f"epoch_{i}.pt", size_floats=1 << 20) for i in range(2)]
    pool = VerifierPool(2, [], idle_timeout=3.0)
    try:
        burst = [pool.submit(path, 60.0, tmp_path) for path in made]
        assert pool.size == 2  # the second found the first busy
        wait(burst, timeout=120)
        assert all(f.result()[0].status == "ok" for f in burst)
        deadline = time.monotonic() + 60
        while pool.size == 2:
            assert time.monotonic() < deadline, "the idle worker never stopped"
            result = pool.submit(made[0], 60.0, tmp_path).result(timeout=60)  # one at a time, never idle
            assert result[0].status == "ok"
            pool.reap_idle(in_flight=0)
            time.sleep(0.5)
        assert pool.size == 1 and pool.running
        time.sleep(3.5)
        assert pool.reap_idle(in_flight=0) and not pool.running  # a quiet spell stops the last one too
    finally:
        pool.kill()


def test_a_killed_pool_starts_fresh_workers(tmp_path: Path) -> None:
    path = checkpoints.torch_zip(tmp_path / "a.pt", size_floats=64)
    pool = VerifierPool(1, [])
    try:
        assert pool.submit(path, 60.0, tmp_path).result(timeout=120)[0].status == "ok"
        pool.kill()
        assert not pool.running
        assert pool.submit(path, 60.0, tmp_path).result(timeout=120)[0].status == "ok"
    finally:
        pool.kill()
