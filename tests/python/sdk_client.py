"""Drives shoal's HTTP gateway with the real runpod SDK client (runpod.Endpoint), as a RunPod user would.

Usage: python sdk_client.py SCENARIO
Environment: RUNPOD_ENDPOINT_BASE_URL (the gateway's http://host:port/v2, read by the SDK at import)
             SHOAL_API_KEY (sent by the SDK as `Authorization: Bearer <key>`)
Prints one JSON object with what the SDK saw, as the last line of stdout; the Rust tests
(tests/tests/gateway_sdk.rs) assert on it. Scenarios:
  basic    endpoints echo (examples/python-worker/handler.py), jobinfo (tests/python/job_handler.py)
           and idle (no workers): run, status, output, run_sync, a raising handler, cancel of a running
           job, refresh_worker, s3Config/policy pass-through, purge_queue, health
  streams  endpoints gen (generator), gen-agg (generator with return_aggregate_stream) and multi
           (concurrency_modifier 3): stream, aggregate outputs, a generator that raises, concurrent jobs
"""

import json
import os
import sys
import time

import runpod

KEY = os.environ["SHOAL_API_KEY"]
TIMEOUT_S = 90


def raw_status(endpoint, job_id):
    """The whole status envelope (the SDK's Job only exposes status and output)."""
    return endpoint.rp_client.get(f"{endpoint.endpoint_id}/status/{job_id}")


def wait_for(what, check, timeout=TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(f"timed out waiting for {what}")


def basic():
    out = {}
    echo = runpod.Endpoint("echo", api_key=KEY)
    out["health_before"] = echo.health()

    # run, then status and output (output polls /status until the job ends)
    job = echo.run({"mode": "echo", "text": "héllo", "n": [1, 2, 3]})
    out["run_id"] = job.job_id
    out["run_first_status"] = job.status()
    out["run_output"] = job.output(timeout=TIMEOUT_S)
    out["run_status"] = job.status()
    out["run_envelope"] = raw_status(echo, job.job_id)

    # run_sync: /runsync answers with the output
    out["run_sync_output"] = echo.run_sync({"mode": "echo", "sync": True}, timeout=TIMEOUT_S)

    # a handler that raises: FAILED with the SDK's JSON error report, no output, no exception
    failing = echo.run({"mode": "error", "message": "kaboom"})
    out["error_output"] = failing.output(timeout=TIMEOUT_S)
    out["error_status"] = failing.status()
    out["error_envelope"] = raw_status(echo, failing.job_id)
    out["error_run_sync_output"] = echo.run_sync({"mode": "error", "message": "again"}, timeout=TIMEOUT_S)

    # a slow handler cancelled while it runs; the worker is then free for the next job
    slow = echo.run({"mode": "sleep", "seconds": 120})
    wait_for("the slow job to run", lambda: slow.status() == "IN_PROGRESS")
    out["cancel_reply"] = slow.cancel()
    out["cancelled_status"] = slow.status()
    out["after_cancel_output"] = echo.run_sync({"mode": "echo", "after": "cancel"}, timeout=TIMEOUT_S)

    # refresh_worker: the result without the flag, and the (replaced) worker keeps serving
    refresh = echo.run({"mode": "refresh"})
    out["refresh_output"] = refresh.output(timeout=TIMEOUT_S)
    after = echo.run({"mode": "echo", "after": "refresh"})
    out["after_refresh_output"] = after.output(timeout=TIMEOUT_S)

    # webhook, policy and s3Config pass through the SDK as-is; s3Config reaches the handler
    info = runpod.Endpoint("jobinfo", api_key=KEY)
    s3 = {"accessId": "AK", "accessSecret": "SK", "bucketName": "results", "endpointUrl": "http://s3.local"}
    out["jobinfo_output"] = info.run_sync(
        {"input": {"x": 1}, "s3Config": s3, "policy": {"executionTimeout": 60000, "ttl": 600000}},
        timeout=TIMEOUT_S,
    )

    # purge_queue: queued jobs go, as CANCELLED
    idle = runpod.Endpoint("idle", api_key=KEY)
    queued = [idle.run({"n": n}) for n in range(3)]
    out["idle_statuses"] = [j.status() for j in queued]
    out["idle_health"] = idle.health()
    out["purge"] = idle.purge_queue()
    out["purged_statuses"] = [j.status() for j in queued]

    out["health_after"] = echo.health()
    return out


def streams():
    out = {}
    gen = runpod.Endpoint("gen", api_key=KEY)
    job = gen.run({"chunks": 5, "chunk_delay_s": 0.4})
    out["gen_stream"] = list(job.stream())
    out["gen_output"] = job.output(timeout=TIMEOUT_S)
    out["gen_status"] = job.status()

    # a generator that raises after its chunks: the chunks, then FAILED
    failing = gen.run({"chunks": 2, "mode": "error", "message": "gen-boom"})
    out["gen_error_stream"] = list(failing.stream())
    out["gen_error_status"] = failing.status()
    out["gen_error_envelope"] = raw_status(gen, failing.job_id)

    agg = runpod.Endpoint("gen-agg", api_key=KEY)
    out["agg_run_sync_output"] = agg.run_sync({"chunks": 4}, timeout=TIMEOUT_S)
    job = agg.run({"chunks": 3})
    out["agg_stream"] = list(job.stream())
    out["agg_output"] = job.output(timeout=TIMEOUT_S)

    # concurrency_modifier 3: one worker runs several jobs at once
    multi = runpod.Endpoint("multi", api_key=KEY)
    jobs = [multi.run({"mode": "sleep", "seconds": 3, "n": n}) for n in range(4)]
    most = 0
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        states = [raw_status(multi, j.job_id)["status"] for j in jobs]
        most = max(most, states.count("IN_PROGRESS"))
        if all(s == "COMPLETED" for s in states):
            break
        time.sleep(0.2)
    out["multi_most_in_progress"] = most
    out["multi_outputs"] = [j.output(timeout=TIMEOUT_S) for j in jobs]
    out["multi_workers"] = sorted({raw_status(multi, j.job_id).get("workerId") for j in jobs})
    return out


SCENARIOS = {"basic": basic, "streams": streams}

if __name__ == "__main__":
    result = SCENARIOS[sys.argv[1]]()
    print(json.dumps(result))
