"""A worker that gives up its first job-take before the host answers it (it closes the
connection mid-poll, as a worker that restarts or times out would), says so in the file named by
$GAVE_UP_FILE, waits for that take's hold to pass, then takes jobs as the runpod SDK does and
returns their input. Speaks the worker protocol by hand (shared/reference/runpod.md §3)."""

import http.client
import json
import os
import time
import urllib.request
from urllib.parse import urlsplit

worker = os.environ["RUNPOD_POD_ID"]
take_url = os.environ["RUNPOD_WEBHOOK_GET_JOB"]
done_url = os.environ["RUNPOD_WEBHOOK_POST_OUTPUT"]
headers = {"Authorization": os.environ["RUNPOD_AI_API_KEY"]}

# the first job-take, given up while the host still holds it
url = urlsplit(take_url)
conn = http.client.HTTPConnection(url.hostname, url.port)
conn.request("GET", f"{url.path}?{url.query}", headers=headers)
time.sleep(0.3)
conn.sock.close()
with open(os.environ["GAVE_UP_FILE"], "w") as f:
    f.write(worker)

# the given-up take's hold (2 s in the tests) passes before this worker asks again
time.sleep(float(os.environ.get("WAIT_BEFORE_TAKING", "3")))
while True:
    with urllib.request.urlopen(urllib.request.Request(take_url, headers=headers), timeout=30) as r:
        if r.status == 204:
            continue
        job = json.loads(r.read())
    body = json.dumps({"output": {"input": job["input"]}}).encode()
    post = urllib.request.Request(done_url.replace("$ID", job["id"]), data=body, headers=headers, method="POST")
    urllib.request.urlopen(post, timeout=30).read()
