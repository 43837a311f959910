"""Example shoal worker: a plain runpod SDK (1.12.0) serverless handler, started with `python handler.py`.

The job's input (a JSON object) picks the behaviour with input["mode"] (default "echo"); see README.md.
Start-time environment:
  SHOAL_EXAMPLE_HANDLER=generator     register an async generator handler (streams chunks) instead of the normal one
  SHOAL_EXAMPLE_AGGREGATE=true        start with return_aggregate_stream=True (job-done carries all chunks)
  SHOAL_EXAMPLE_CONCURRENCY=N         N > 1: concurrency_modifier returning N (the SDK then takes jobs in batches)
  SHOAL_EXAMPLE_CRASH_IF_EXISTS=path  exit 1 at import when path exists (a handler that crashes at start)
"""

import asyncio
import os
import sys

# Simulate a worker that crashes while loading, before the SDK starts (supervision tests).
# Checked before importing runpod, which alone takes about 2 s.
_crash_path = os.environ.get("SHOAL_EXAMPLE_CRASH_IF_EXISTS")
if _crash_path and os.path.exists(_crash_path):
    print(f"shoal example worker: {_crash_path} exists, crashing at start", file=sys.stderr)
    sys.exit(1)

import runpod  # noqa: E402


async def handler(job):
    """Normal (non-generator) handler; async so the SDK's job-stop channel can cancel it."""
    inp = job["input"] if isinstance(job.get("input"), dict) else {}
    mode = inp.get("mode", "echo")
    if mode == "error":
        raise RuntimeError(inp.get("message", "boom"))  # -> {"error": "<JSON string with error_type, ...>"}
    if mode == "error_dict":
        return {"error": inp.get("message", "bad input")}  # -> {"error": "..."}, no output
    if mode == "sleep":
        seconds = inp["seconds"]
        await asyncio.sleep(seconds)  # a job-stop raises CancelledError here; nothing is posted
        return {"slept": seconds}
    if mode == "progress":
        runpod.serverless.progress_update(job, "half")  # {"status": "IN_PROGRESS", "output": "half"} to job-done
        return {"done": True}
    if mode == "refresh":
        return {"refresh_worker": True, "ok": True}  # -> {"output": {"ok": true}, "stopPod": true}
    if mode == "crash":
        os._exit(3)  # the process dies mid-job: no result is ever posted
    return job["input"]  # echo (also for unknown modes and non-object inputs)


async def generator_handler(job):
    """Generator handler: yields {"i": n} for n in 0..chunks, each posted to job-stream.

    "chunk_bytes" pads each chunk with {"pad": "x" * bytes} (a number for every chunk, or a list: one per chunk).
    Also honours mode "error" (raise after the chunks) and "error_dict" (yield {"error": ...} after the chunks)."""
    inp = job["input"] if isinstance(job.get("input"), dict) else {}
    delay = inp.get("chunk_delay_s", 0)
    pads = inp.get("chunk_bytes", 0)
    for n in range(inp.get("chunks", 3)):
        if n and delay:
            await asyncio.sleep(delay)
        pad = pads[n] if isinstance(pads, list) else pads
        yield {"i": n, "pad": "x" * pad} if pad else {"i": n}
    if inp.get("mode") == "error":
        raise RuntimeError(inp.get("message", "boom"))
    if inp.get("mode") == "error_dict":
        yield {"error": inp.get("message", "bad input")}


if __name__ == "__main__":
    generator = os.environ.get("SHOAL_EXAMPLE_HANDLER") == "generator"
    config = {
        "handler": generator_handler if generator else handler,
        "return_aggregate_stream": os.environ.get("SHOAL_EXAMPLE_AGGREGATE", "").lower() == "true",
    }
    concurrency = int(os.environ.get("SHOAL_EXAMPLE_CONCURRENCY", "1") or "1")
    if concurrency > 1:
        config["concurrency_modifier"] = lambda current: concurrency
    runpod.serverless.start(config)
