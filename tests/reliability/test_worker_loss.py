"""Losing a worker, without fakes: a real ``redis-server``, real prefork Celery workers (the production
command) and the segmenter API (``TestClient`` on ``create_app``, so its reconciler runs).

- A pool process SIGKILLed mid-inference (production heartbeat settings, so the worker's main
  process alone can tell): within :data:`LOST_STATUS_BOUND_S` the job reads
  ``queued``, "worker lost (its process died (signal 9 (SIGKILL))); retrying (attempt 2 of 3)",
  not a frozen "running, patch k of n"; then it is redelivered, restarted once from scratch and
  gives the mask of the in-process evaluation path.
- The whole worker SIGKILLed mid-inference, with the production visibility timeout (2 h): the
  job's heartbeat stops, the API's reconciler reads "worker lost (no heartbeat ...)" within
  heartbeat timeout + reconcile interval and sends it again, and a new worker runs it to the same
  mask, without waiting two hours and without a second concurrent run.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import numpy as np
import pytest

from services.segmenter.settings import Settings
from tests.redis_server import needs_redis
from tests.reliability.test_load_and_faults import (
    Env,
    Worker,
    download_mask,
    poll,
    start_redis_on,
    start_worker,
    submit,
)
from tests.segmenter.test_worker_integration import pool_children

pytestmark = [needs_redis, pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

#: how soon a killed pool process must show in the job: Celery's ``worker_lost_wait`` (2 s) + slack
LOST_STATUS_BOUND_S = 10.0
#: heartbeat and reconciler settings of these tests (production: 5 s / 30 s / 10 s / 30 s)
FAST_RECOVERY = {"heartbeat_interval_s": 0.5, "heartbeat_timeout_s": 3.0, "reconcile_interval_s": 1.0,
                 "reconcile_grace_s": 2.0}
FAST_RECOVERY_ENV = {f"SEGMENTER_{key.upper()}": str(value) for key, value in FAST_RECOVERY.items()}
#: slack on a loaded 2-core machine, on top of the documented heartbeat timeout + reconcile interval
SLACK_S = 10.0


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    from brainscan.data.phantoms import write_brats_phantoms
    from tests.reliability.test_load_and_faults import LONG_SHAPE
    from tests.segmenter import make_segmenter_store

    root = tmp_path_factory.mktemp("worker-loss")
    models = make_segmenter_store(root / "models", patch_size=(32, 32, 32), overlap=0.5)
    long_case = write_brats_phantoms(root / "long", n=1, seed=12, shape=LONG_SHAPE)[0]
    return Env(root, models, [], long_case)


@pytest.fixture(scope="module")
def long_case_mask(env: Env) -> np.ndarray:
    """The long case's mask by the evaluation path, in this process, with the same bundle."""
    from brainscan.data.brats import find_case, load_case
    from brainscan.evaluation.segment import segment_case
    from brainscan.models.bundle import load_bundle
    from brainscan.models.store import ModelStore

    bundle = load_bundle(ModelStore(env.models).current("segmentation", "unet3d"))
    return segment_case(bundle, load_case(find_case(env.long_case), with_seg=False))


def mid_inference(job: dict[str, Any]) -> bool:
    return job["status"] == "running" and job["stage"] == "inference" and bool(job["stage_detail"])


def test_a_killed_pool_process_shows_as_worker_lost_at_once(env: Env, long_case_mask: np.ndarray) -> None:
    folder = env.root / "pool-process"
    redis = start_redis_on(folder / "redis", password="worker-loss-" + os.urandom(8).hex())
    worker = start_worker(env.worker_env(redis, folder / "jobs"), folder / "worker.log")
    try:
        with env.api(redis, folder / "jobs") as client:  # heartbeat timeout 30 s: the reconciler stays out
            job_id = submit(client, env.long_case)
            worker.wait_ready(processes=1)
            running = poll(client, job_id, worker, until=mid_inference)
            done, total = (int(n) for n in running["stage_detail"].removeprefix("patch ").split(" of "))
            assert done < total, running
            children = pool_children(worker.process.pid)
            assert len(children) == 1, children
            os.kill(children[0], signal.SIGKILL)
            killed = time.monotonic()

            lost = poll(client, job_id, worker, until=lambda job: job["status"] != "running",
                        timeout_s=LOST_STATUS_BOUND_S)
            assert time.monotonic() - killed < LOST_STATUS_BOUND_S
            assert lost["status"] == "queued" and lost["progress"] == 0.0, lost
            assert lost["stage_detail"] == ("worker lost (its process died (signal 9 (SIGKILL))); retrying "
                                            "(attempt 2 of 3)"), lost

            final = poll(client, job_id, worker)
            assert final["status"] == "succeeded" and final["attempts"] == 2, (final, worker.log_tail())
            np.testing.assert_array_equal(download_mask(client, final), long_case_mask)
            history = [(h["status"], h["stage"]) for h in client.app.state.store.get(job_id)["history"]]
            assert history.count(("running", "preprocessing")) == 2 and ("queued", "queued") in history[1:]
    finally:
        worker.stop()
        redis.stop()


def test_a_killed_worker_is_replaced_without_waiting_for_the_visibility_timeout(
        env: Env, long_case_mask: np.ndarray) -> None:
    folder = env.root / "whole-worker"
    redis = start_redis_on(folder / "redis", password="worker-loss-" + os.urandom(8).hex())
    worker_env = env.worker_env(redis, folder / "jobs", **FAST_RECOVERY_ENV)
    assert Settings().visibility_timeout_s == 7200  # production's: kombu alone would redeliver in 2 h
    first = start_worker(worker_env, folder / "worker-1.log")
    second: Worker | None = None
    try:
        with env.api(redis, folder / "jobs", **FAST_RECOVERY) as client:
            job_id = submit(client, env.long_case)
            first.wait_ready(processes=1)
            poll(client, job_id, first, until=mid_inference)
            first.kill_all()
            killed = time.monotonic()
            second = start_worker(worker_env, folder / "worker-2.log")

            bound_s = FAST_RECOVERY["heartbeat_timeout_s"] + FAST_RECOVERY["reconcile_interval_s"] + SLACK_S
            lost = poll(client, job_id, second, until=lambda job: job["status"] != "running" or job["attempts"] > 1,
                        timeout_s=bound_s)
            assert time.monotonic() - killed < bound_s
            if lost["attempts"] == 1:  # seen between the reconciler and the new worker's claim
                assert lost["status"] == "queued" and lost["stage_detail"].startswith(
                    "worker lost (no heartbeat for "), lost

            final = poll(client, job_id, second)
            assert final["status"] == "succeeded" and final["attempts"] == 2, (final, second.log_tail())
            np.testing.assert_array_equal(download_mask(client, final), long_case_mask)
            history = [(h["status"], h["stage"]) for h in client.app.state.store.get(job_id)["history"]]
            # Two attempts started. In between, the reconciler usually queued the job again ("no heartbeat");
            # on a loaded machine the first worker's main process may outlive its pool process by a moment and
            # hand the message back (reject_on_worker_lost), and the new worker then takes over the dead
            # attempt directly: both are the recovery this test is about.
            assert history.count(("running", "preprocessing")) == 2, history
    finally:
        for worker in (first, second):
            if worker is not None:
                worker.stop()
        redis.stop()
