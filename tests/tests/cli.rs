//! The `shoal` command-line client, as an operator runs it: the built binary against a real
//! installation (control plane and host on the test's own nats-server, the Rust example worker
//! as a process). Every command's output and exit code, and bad input answered with a clear
//! error and a non-zero exit, never a panic.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use futures::TryStreamExt;
use serde_json::{Value, json};
use shoal_tests::process::shoal_bin;
use shoal_tests::{Shoal, eventually, example_worker_bin};

/// What one run of the binary gave.
#[derive(Debug)]
struct Ran {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Ran {
    fn json(&self) -> Result<Value> {
        serde_json::from_str(&self.stdout).with_context(|| format!("stdout is not JSON: {self:?}"))
    }
}

/// Runs `shoal <args>` as a client of `shoal`'s installation and waits for it to exit.
async fn shoal_cli(shoal: &Shoal, args: &[&str]) -> Result<Ran> {
    let prefix = shoal.nats.names.prefix().to_string();
    let child = tokio::process::Command::new(shoal_bin()?)
        .args(["--nats", &shoal.server.url, "--prefix", &prefix])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("start shoal")?;
    let out = tokio::time::timeout(Duration::from_secs(90), child.wait_with_output())
        .await
        .with_context(|| format!("shoal {} did not exit", args.join(" ")))??;
    let ran = Ran {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    ensure!(!ran.stderr.contains("panicked"), "shoal {} panicked: {ran:?}", args.join(" "));
    Ok(ran)
}

/// Runs `shoal <args>` and expects it to succeed.
async fn ok(shoal: &Shoal, args: &[&str]) -> Result<Ran> {
    let ran = shoal_cli(shoal, args).await?;
    ensure!(ran.code == 0, "shoal {} failed: {ran:?}", args.join(" "));
    Ok(ran)
}

/// Runs `shoal <args>` and expects it to fail with `code`, saying `what` on stderr.
async fn refused(shoal: &Shoal, args: &[&str], code: i32, what: &str) -> Result<()> {
    let ran = shoal_cli(shoal, args).await?;
    ensure!(
        ran.code == code && ran.stderr.contains(what),
        "shoal {}: want exit {code} and {what:?}: {ran:?}",
        args.join(" ")
    );
    ensure!(ran.stdout.is_empty(), "nothing on stdout for a refused command: {ran:?}");
    Ok(())
}

/// The jobs `job list` gives, as JSON.
async fn listed(shoal: &Shoal, args: &[&str]) -> Result<Vec<Value>> {
    let list = ok(shoal, &[&["job", "list", "--json"], args].concat()).await?.json()?;
    Ok(list["jobs"].as_array().context("jobs")?.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_runs_and_follows_jobs_from_the_command_line() -> Result<()> {
    let shoal = Shoal::start().await?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("endpoints.toml");
    let command = format!("exec {}", example_worker_bin()?.display());
    std::fs::write(
        &file,
        format!("[[endpoint]]\nid = \"cli-rs\"\ncommand = \"{command}\"\nworkers_min = 1\nworkers_max = 1\n"),
    )?;
    let file = file.to_string_lossy().to_string();

    // endpoints: apply, list, get
    let applied = ok(&shoal, &["endpoint", "apply", "-f", &file]).await?;
    assert!(applied.stdout.contains("endpoint cli-rs applied (version 1)"), "{applied:?}");
    let list = ok(&shoal, &["endpoint", "list"]).await?;
    assert!(list.stdout.lines().any(|l| l.starts_with("cli-rs") && l.contains("1..1")), "{list:?}");
    assert_eq!(ok(&shoal, &["endpoint", "get", "cli-rs"]).await?.json()?["id"], "cli-rs");

    // a job that completes: its status, exit 0; one that fails: exit 1
    let done = ok(&shoal, &["job", "run", "cli-rs", r#"{"hello":"world"}"#]).await?.json()?;
    assert_eq!((&done["status"], &done["output"]), (&json!("COMPLETED"), &json!({"hello": "world"})), "{done}");
    let failed = shoal_cli(&shoal, &["job", "run", "cli-rs", r#"{"fail":"boom"}"#]).await?;
    assert_eq!(failed.code, 1, "{failed:?}");
    let failed = failed.json()?;
    assert_eq!((&failed["status"], &failed["error"]), (&json!("FAILED"), &json!("boom")), "{failed}");

    // a running job and one queued behind it (one worker, one slot)
    let running =
        ok(&shoal, &["job", "run", "--async", "cli-rs", r#"{"sleep_ms":60000}"#]).await?.stdout.trim().to_string();
    eventually(Duration::from_secs(30), "the job running", || async {
        let ran = ok(&shoal, &["job", "status", &running]).await.ok()?;
        (ran.json().ok()?["status"] == "IN_PROGRESS").then_some(())
    })
    .await?;
    let queued =
        ok(&shoal, &["job", "run", "--async", "--low-priority", "cli-rs", "{}"]).await?.stdout.trim().to_string();
    let waiting = listed(&shoal, &["cli-rs", "--state", "in_queue"]).await?;
    assert_eq!(waiting.len(), 1, "{waiting:?}");
    assert_eq!((&waiting[0]["id"], &waiting[0]["priority"]), (&json!(queued), &json!("low")));
    assert!(waiting[0]["waiting_reason"].as_str().is_some_and(|r| !r.is_empty()), "why it waits: {waiting:?}");

    // the table: one row per job, newest first, with what each is doing or why it failed
    let table = ok(&shoal, &["job", "list", "cli-rs"]).await?.stdout;
    let rows: Vec<&str> = table.lines().collect();
    assert_eq!(rows.len(), 5, "a header and four jobs:\n{table}");
    assert!(rows[0].starts_with("JOB") && rows[0].contains("STATE") && rows[0].ends_with("NOTE"), "{table}");
    assert!(rows[1].starts_with(queued.as_str()) && rows[1].contains("IN_QUEUE") && rows[1].contains("low"), "{table}");
    assert!(rows[2].starts_with(running.as_str()) && rows[2].contains("IN_PROGRESS"), "{table}");
    assert!(rows[3].contains("FAILED") && rows[3].ends_with("boom"), "{table}");
    assert!(rows[4].contains("COMPLETED"), "{table}");
    let failed_only = listed(&shoal, &["cli-rs", "--state", "FAILED,TIMED_OUT", "--limit", "5"]).await?;
    assert_eq!(failed_only.len(), 1, "{failed_only:?}");

    // the endpoint's health, the hosts, the workers
    // (the owner counts from the job events, a moment behind the writes)
    let counts = "in queue 1, in progress 1, completed 1, failed 1";
    let health = eventually(Duration::from_secs(10), counts, || async {
        let text = ok(&shoal, &["endpoint", "health", "cli-rs"]).await.ok()?.stdout;
        text.contains(counts).then_some(text)
    })
    .await?;
    assert!(health.starts_with("endpoint cli-rs (owned by ") && health.contains("rollout  version 1"), "{health}");
    let health = ok(&shoal, &["endpoint", "health", "cli-rs", "--json"]).await?.json()?;
    assert_eq!(health["jobs"]["in_queue"], 1, "{health}");
    let host = shoal.host.as_ref().context("host")?;
    let hosts = ok(&shoal, &["hosts"]).await?.stdout;
    assert!(hosts.starts_with("HOST") && hosts.lines().count() == 2, "{hosts}");
    let row = hosts.lines().nth(1).unwrap_or_default();
    assert!(
        row.starts_with(host.id.as_str()) && row.contains("process") && row.ends_with(host.bridge_url.as_str()),
        "{hosts}"
    );
    let workers = ok(&shoal, &["workers", "--endpoint", "cli-rs"]).await?.stdout;
    assert!(workers.lines().any(|l| l.contains("cli-rs") && l.contains(running.as_str())), "{workers}");

    // purge the queue, cancel the running job
    let purged = ok(&shoal, &["endpoint", "purge", "cli-rs"]).await?.stdout;
    assert!(purged.contains("1 queued jobs cancelled"), "{purged}");
    let cancelled = ok(&shoal, &["job", "cancel", &running]).await?.json()?;
    assert_eq!(cancelled["status"], "CANCELLED", "{cancelled}");
    let ended = listed(&shoal, &["cli-rs", "--state", "cancelled"]).await?;
    assert_eq!(ended.len(), 2, "{ended:?}");

    // the host out of service and back: drained once its workers have stopped
    let drained = ok(&shoal, &["hosts", "drain", &host.id, "--wait"]).await?.stdout;
    assert!(drained.contains(&format!("host {} is drained: no workers left", host.id)), "{drained}");
    let hosts = ok(&shoal, &["hosts"]).await?.stdout;
    assert!(hosts.lines().nth(1).is_some_and(|r| r.contains(" draining ")), "{hosts}");
    let listed = ok(&shoal, &["hosts", "--json"]).await?.json()?;
    assert_eq!(listed[0]["id"], host.id.as_str(), "{listed}");
    assert_eq!(listed[0]["draining"], true, "{listed}");
    let resumed = ok(&shoal, &["hosts", "resume", &host.id]).await?.stdout;
    assert!(resumed.contains("is in service"), "{resumed}");
    let hosts = ok(&shoal, &["hosts"]).await?.stdout;
    assert!(hosts.lines().nth(1).is_some_and(|r| r.contains(" active ")), "{hosts}");
    refused(&shoal, &["hosts", "drain", "no-such-host"], 1, "host no-such-host does not answer").await?;
    refused(&shoal, &["hosts", "resume", "bad.id"], 1, "host id").await?;

    // many jobs from a JSON-lines file, in batches: their ids in the file's order
    let lines = dir.path().join("inputs.jsonl");
    std::fs::write(&lines, "{\"n\":1}\n\n{\"n\":2}\n{\"n\":3}\n")?;
    let lines = lines.to_string_lossy().to_string();
    let submitted = ok(&shoal, &["job", "submit", "cli-rs", &lines, "--batch", "2"]).await?;
    let ids: Vec<&str> = submitted.stdout.lines().collect();
    assert_eq!(ids.len(), 3, "{submitted:?}");
    for (id, n) in ids.iter().copied().zip(1..) {
        let status = eventually(Duration::from_secs(30), "a submitted job ends", || async {
            let s = ok(&shoal, &["job", "status", id]).await.ok()?.json().ok()?;
            (s["status"] == "COMPLETED").then_some(s)
        })
        .await?;
        assert_eq!(status["output"], json!({"n": n}), "{status}");
    }
    // a job refused by shoal: its line on stderr, the others queued, exit 1
    let mixed = dir.path().join("mixed.jsonl");
    std::fs::write(&mixed, "{\"n\":4}\nnull\n")?;
    let ran = shoal_cli(&shoal, &["job", "submit", "cli-rs", &mixed.to_string_lossy()]).await?;
    assert_eq!((ran.code, ran.stdout.lines().count()), (1, 1), "{ran:?}");
    assert!(ran.stderr.contains("line 2: bad_request: input is required"), "{ran:?}");

    // bad input: a clear error and a non-zero exit, nothing sent
    let broken_lines = dir.path().join("broken.jsonl");
    std::fs::write(&broken_lines, "{\"n\":1}\n{oops\n")?;
    refused(
        &shoal,
        &["job", "submit", "cli-rs", &broken_lines.to_string_lossy()],
        1,
        "broken.jsonl line 2: not valid JSON",
    )
    .await?;
    std::fs::write(&broken_lines, "\n")?;
    refused(&shoal, &["job", "submit", "cli-rs", &broken_lines.to_string_lossy()], 1, "holds no job inputs").await?;
    refused(&shoal, &["job", "submit", "cli-rs", &lines, "--batch", "1001"], 2, "1..=1000").await?;
    refused(&shoal, &["job", "run", "cli-rs", "{not json"], 1, "not valid JSON").await?;
    refused(&shoal, &["job", "run", "no-such-ep", "{}"], 1, "not_found: endpoint no-such-ep does not exist").await?;
    refused(&shoal, &["job", "run", "bad.id", "{}"], 1, "bad_request").await?;
    refused(&shoal, &["job", "status", "no-such-job"], 1, "not_found: job no-such-job not found").await?;
    refused(&shoal, &["job", "list", "cli-rs", "--state", "DONE"], 2, "unknown job state \"DONE\" (one of IN_QUEUE")
        .await?;
    refused(&shoal, &["job", "list", "cli-rs", "--limit", "501"], 2, "1..=500").await?;
    refused(&shoal, &["job", "list", "no-such-ep"], 1, "not_found").await?;
    refused(&shoal, &["endpoint", "health", "no-such-ep"], 1, "not_found").await?;
    refused(&shoal, &["endpoint", "purge", "no-such-ep"], 1, "not_found").await?;
    let broken = dir.path().join("broken.toml");
    std::fs::write(&broken, "[[endpoint]]\nid = \"x\"\ncommand = \"true\"\nworkers = 3\n")?;
    refused(&shoal, &["endpoint", "apply", "-f", &broken.to_string_lossy()], 1, "broken.toml").await?;

    // the gateway's API keys: shown once, listed by id and name, revoked
    let created = ok(&shoal, &["keys", "create", "--name", "ci", "--endpoint", "cli-rs"]).await?;
    let secret = created.stdout.trim();
    assert!(secret.starts_with("shoal_") && created.stderr.contains("for cli-rs"), "{created:?}");
    let keys = ok(&shoal, &["keys", "list"]).await?.stdout;
    let row = keys.lines().find(|l| l.contains(" ci ")).with_context(|| format!("no key named ci: {keys}"))?;
    assert!(keys.starts_with("ID") && row.contains("cli-rs") && !keys.contains(secret), "{keys}");
    let key_id = row.split_whitespace().next().context("key id")?;
    assert!(ok(&shoal, &["keys", "revoke", key_id]).await?.stdout.contains("revoked"));
    refused(&shoal, &["keys", "revoke", key_id], 1, "no key").await?;
    refused(&shoal, &["keys", "create", "--endpoint", "a.b"], 1, "endpoint id").await?;

    // an input and an output twice NATS' default message limit: through the object store, whole
    let text: String = (0..2_000_000).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
    let big = json!({"text": text});
    let big_file = dir.path().join("big.json");
    std::fs::write(&big_file, serde_json::to_vec(&big)?)?;
    let big_arg = format!("@{}", big_file.display());
    let done = ok(&shoal, &["job", "run", "cli-rs", &big_arg]).await?.json()?;
    assert_eq!(done["status"], "COMPLETED", "{}", done["error"]);
    ensure!(done["output"] == big && done.get("output_ref").is_none_or(Value::is_null), "the whole output");
    let id = done["id"].as_str().context("id")?;
    ensure!(ok(&shoal, &["job", "status", id]).await?.json()?["output"] == big, "job status prints it whole too");
    let lines = dir.path().join("big.jsonl");
    std::fs::write(
        &lines,
        format!("{}\n{{\"n\":0}}\n{}\n", serde_json::to_string(&big)?, serde_json::to_string(&big)?),
    )?;
    let submitted = ok(&shoal, &["job", "submit", "cli-rs", &lines.to_string_lossy()]).await?;
    let ids: Vec<&str> = submitted.stdout.lines().collect();
    assert_eq!(ids.len(), 3, "{submitted:?}");
    for (id, input) in ids.iter().copied().zip([&big, &json!({"n": 0}), &big]) {
        let status = eventually(Duration::from_secs(30), "a submitted big job ends", || async {
            let s = ok(&shoal, &["job", "status", id]).await.ok()?.json().ok()?;
            (s["status"] == "COMPLETED").then_some(s)
        })
        .await?;
        ensure!(&status["output"] == input, "submitted job {id}: the output is its input, whole");
    }
    // a big input whose job is refused is not left behind in the object store
    let uploads = || async {
        let store = shoal.nats.js.get_object_store(shoal.nats.names.blobs_bucket()).await?;
        let mut list = store.list().await?;
        let mut names = Vec::new();
        while let Some(info) = list.try_next().await? {
            if info.name.starts_with("upload-") {
                names.push(info.name);
            }
        }
        anyhow::Ok(names)
    };
    let before = uploads().await?;
    assert_eq!(before.len(), 3, "one upload per big job: {before:?}");
    refused(&shoal, &["job", "run", "no-such-ep", &big_arg], 1, "not_found").await?;
    assert_eq!(uploads().await?, before, "the refused job's input was removed");

    // delete: the endpoint is gone for jobs too
    assert!(ok(&shoal, &["endpoint", "delete", "cli-rs"]).await?.stdout.contains("endpoint cli-rs deleted"));
    refused(&shoal, &["job", "run", "cli-rs", "{}"], 1, "not_found").await?;
    shoal.stop().await;
    Ok(())
}
