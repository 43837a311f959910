"""A runpod SDK worker that returns what it was handed: the job object's keys, its input and its
s3Config, so tests can check what reaches the handler (shared/reference/runpod.md §1.6, §3.5)."""

import runpod


async def handler(job):
    return {"keys": sorted(job.keys()), "input": job.get("input"), "s3Config": job.get("s3Config")}


if __name__ == "__main__":
    runpod.serverless.start({"handler": handler})
