"""A worker that posts the result of its first job and hangs up without waiting for the answer
(as a worker killed right after its post would), then takes jobs as the runpod SDK does and
returns their input. Speaks the worker protocol by hand (shared/reference/runpod.md §3)."""

import json
import os
import socket
import urllib.request
from urllib.parse import urlsplit

take_url = os.environ["RUNPOD_WEBHOOK_GET_JOB"]
done_url = os.environ["RUNPOD_WEBHOOK_POST_OUTPUT"]
headers = {"Authorization": os.environ["RUNPOD_AI_API_KEY"]}


def take():
    while True:
        with urllib.request.urlopen(urllib.request.Request(take_url, headers=headers), timeout=30) as r:
            if r.status != 204:
                return json.loads(r.read())


job = take()
body = json.dumps({"output": {"input": job["input"]}}).encode()
url = urlsplit(done_url.replace("$ID", job["id"]))
with socket.create_connection((url.hostname, url.port)) as s:
    head = (
        f"POST {url.path}?{url.query} HTTP/1.1\r\nHost: {url.hostname}\r\n"
        f"Authorization: {headers['Authorization']}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    s.sendall(head.encode() + body)
    # gone before the answer

while True:
    job = take()
    body = json.dumps({"output": {"input": job["input"]}}).encode()
    post = urllib.request.Request(done_url.replace("$ID", job["id"]), data=body, headers=headers, method="POST")
    urllib.request.urlopen(post, timeout=30).read()
