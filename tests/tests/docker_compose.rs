//! The deployment of `deploy/`: `docker compose up` brings up a 3-node NATS JetStream cluster,
//! two control replicas, the gateway (when `shoal gateway` exists) and two Docker hosts, from
//! images built locally without a registry. Jobs submitted through NATS (and HTTP) all
//! complete although a control replica and a NATS node are killed mid-run, and `docker
//! compose down` leaves no shoal container behind. Needs the Docker engine.

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use shoal_actors::client::ApiClient;
use shoal_actors::nats::{Nats, Topology};
use shoal_protocol::api::{JobRef, RunRequest};
use shoal_protocol::endpoint::{EndpointSpec, ScalerKind};
use shoal_protocol::job::JobState;
use shoal_protocol::names::Names;
use shoal_tests::docker::{
    Sweeper, build_images, cargo_build, compose_command, containers, host_containers, require_docker, run,
};
use shoal_tests::{eventually, free_port, repo_root};

const NATS_JOBS: usize = 40;
const HTTP_JOBS: usize = 10;

/// One compose project of `deploy/docker-compose.yml`; brought down on drop if a test failed.
struct Compose {
    command: Vec<String>,
    project: String,
    env: HashMap<String, String>,
    up: bool,
}

impl Compose {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.command[0]);
        cmd.args(&self.command[1..])
            .arg("-p")
            .arg(&self.project)
            .arg("-f")
            .arg(repo_root().join("deploy/docker-compose.yml"))
            .args(args)
            .envs(&self.env);
        cmd
    }

    fn run(&self, args: &[&str]) -> Result<String> {
        run(&mut self.cmd(args))
    }

    fn down(&mut self) -> Result<()> {
        self.up = false;
        self.run(&["down", "-v", "-t", "60"]).map(|_| ())
    }
}

impl Drop for Compose {
    fn drop(&mut self) {
        if self.up {
            let _ = self.cmd(&["down", "-v", "-t", "5"]).output();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compose_cluster_runs_every_job_through_replica_and_node_loss_and_leaves_nothing_behind() -> Result<()> {
    require_docker()?;
    let command = compose_command()?;
    let bin_dir = cargo_build(&["shoal", "shoal-example-worker"])?;
    let images = build_images(&bin_dir, &["shoal", "nats", "worker"])?;
    let gateway = Command::new(bin_dir.join("shoal")).args(["gateway", "--help"]).output()?.status.success();
    if !gateway {
        println!("`shoal gateway` does not exist yet: the HTTP part of this test is skipped");
    }
    let project = format!("shoaltest{}", std::process::id());
    let env = HashMap::from([
        ("SHOAL_IMAGE".to_string(), images["shoal"].clone()),
        ("SHOAL_NATS_IMAGE".to_string(), images["nats"].clone()),
        ("SHOAL_NETWORK".to_string(), project.clone()),
        ("SHOAL_CLUSTER".to_string(), project.clone()),
    ]);
    let hosts = [format!("{project}-host1"), format!("{project}-host2")];
    let _sweeper = Sweeper { host_ids: hosts.to_vec() };
    let mut compose = Compose { command, project: project.clone(), env, up: true };
    let mut services = vec!["nats1", "nats2", "nats3", "control1", "control2", "host1", "host2"];
    if gateway {
        services.push("gateway");
    }
    // a port found free may still be taken before Docker binds it: then down, new ports, again
    let (mut nats_port, mut gateway_port) = (0, 0);
    for attempt in 1..=3 {
        (nats_port, gateway_port) = (free_port()?, free_port()?);
        compose.env.insert("SHOAL_NATS_PORT".into(), nats_port.to_string());
        compose.env.insert("SHOAL_GATEWAY_PORT".into(), gateway_port.to_string());
        match compose.run(&[&["up", "-d"][..], &services].concat()) {
            Err(e) if attempt < 3 && format!("{e:#}").contains("address already in use") => {
                println!("a published port was taken before Docker bound it; again with others: {e:#}");
                compose.run(&["down", "-v", "-t", "5"])?;
            }
            up => {
                up?;
                break;
            }
        }
    }

    // the cluster as a client sees it: NATS on the published port, the API of the replicas
    let url = format!("nats://127.0.0.1:{nats_port}");
    let topology = Topology { replicas: 3, ..Topology::default() };
    let nats = eventually(Duration::from_secs(90), "the NATS cluster with JetStream", || async {
        Nats::connect(&url, Names::default(), &topology).await.ok()
    })
    .await?;
    let api = ApiClient::new(nats.client.clone(), nats.names.clone());
    let mut spec = EndpointSpec::with_command("echo", "unused");
    spec.command = None;
    spec.image = Some(images["example-worker"].clone());
    spec.workers_max = 4;
    spec.scaler = ScalerKind::RequestCount;
    spec.scaler_value = 5.0;
    spec.idle_timeout_s = 60;
    eventually(Duration::from_secs(60), "the control plane takes the endpoint", || async {
        api.create_endpoint(&spec).await.ok()
    })
    .await?;

    let mut jobs: Vec<(String, Value)> = Vec::new();
    for n in 0..NATS_JOBS {
        let input = json!({"n": n, "via": "nats", "sleep_ms": 300});
        jobs.push((api.run(&RunRequest::new("echo", input.clone())).await?.id, input));
    }
    // every step bounded: a step that hangs fails the test, saying which
    let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build()?;
    if gateway {
        // as a client would: a request that gets no answer (once, right after the cluster
        // formed, one waited here for ever) is given up after 10 s and made again
        let key = eventually(Duration::from_secs(90), "an API key created", || async {
            let created = shoal_gateway::keys::create(&nats, "compose", &[]);
            tokio::time::timeout(Duration::from_secs(10), created).await.ok()?.ok()
        })
        .await?
        .secret;
        // the gateway may still be restarting after starting before the NATS cluster was up
        eventually(Duration::from_secs(90), "the gateway answers", || async {
            let resp = http
                .get(format!("http://127.0.0.1:{gateway_port}/v2/echo/health"))
                .bearer_auth(&key)
                .send()
                .await
                .ok()?;
            resp.status().is_success().then_some(())
        })
        .await?;
        for n in 0..HTTP_JOBS {
            let input = json!({"n": n, "via": "http", "sleep_ms": 300});
            let resp = http
                .post(format!("http://127.0.0.1:{gateway_port}/v2/echo/run"))
                .bearer_auth(&key)
                .json(&json!({ "input": input }))
                .send()
                .await?;
            ensure!(resp.status().is_success(), "HTTP /run answered {}", resp.status());
            let body: Value = resp.json().await?;
            jobs.push((body["id"].as_str().context("job id")?.to_string(), input));
        }
    }

    // mid-run: a control replica and a NATS node die
    eventually(Duration::from_secs(120), "some jobs done", || async {
        let mut done = 0;
        for (id, _) in jobs.iter().take(10) {
            let s = api.status(&JobRef { endpoint: Some("echo".into()), id: id.clone(), wait_ms: 0 }).await.ok()?;
            done += usize::from(s.status == JobState::Completed);
        }
        (done >= 3).then_some(())
    })
    .await?;
    compose.run(&["kill", "-s", "SIGKILL", "control1"])?;
    compose.run(&["kill", "-s", "SIGKILL", "nats2"])?;
    println!("killed control1 and nats2 with jobs in flight");

    for (id, input) in &jobs {
        let s = eventually(Duration::from_secs(240), &format!("job {id} completed"), || async {
            let s =
                api.status(&JobRef { endpoint: Some("echo".into()), id: id.clone(), wait_ms: 10_000 }).await.ok()?;
            s.status.is_terminal().then_some(s)
        })
        .await?;
        assert_eq!(s.status, JobState::Completed, "{s:?}");
        assert_eq!(s.output.as_ref(), Some(input), "{s:?}");
    }
    let retried = {
        let mut n = 0;
        for (id, _) in &jobs {
            let s = api.status(&JobRef { endpoint: Some("echo".into()), id: id.clone(), wait_ms: 0 }).await?;
            n += usize::from(s.attempts > 1);
        }
        n
    };
    println!("{} jobs completed ({retried} after a redelivery)", jobs.len());
    let made = hosts.iter().map(|h| host_containers(h)).collect::<Result<Vec<_>>>()?.concat();
    let running = made.iter().filter(|c| c.running()).count();
    assert!((1..=4).contains(&running), "the workers ran in containers, at most workers_max: {made:?}");

    compose.down()?;
    let left = containers(&[format!("com.docker.compose.project={project}")])?;
    assert!(left.is_empty(), "compose containers left: {left:?}");
    for h in &hosts {
        assert!(host_containers(h)?.is_empty(), "worker containers of {h} left behind");
    }
    Ok(())
}
