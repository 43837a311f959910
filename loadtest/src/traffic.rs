//! What the NATS server handled per job, from its monitoring endpoint (`/varz`, `/jsz`):
//! messages and bytes in and out, JetStream API calls, and what JetStream stores. A run's
//! snapshot before and after, divided by its completed jobs, says how chatty a job is and what it
//! leaves on the server's disk, for shoal and for the baseline; the server's resident memory
//! before and after is reported as it is. The counters are server-wide: background traffic
//! (heartbeats, ticks) is included.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::stats::round3;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServerTraffic {
    pub msgs_in_per_job: f64,
    pub msgs_out_per_job: f64,
    pub bytes_in_per_job: f64,
    pub bytes_out_per_job: f64,
    /// JetStream API requests (`$JS.API.>`: stream/consumer info, KV direct gets, ...).
    pub js_api_per_job: f64,
    /// JetStream's stored bytes (file and memory storage, `/jsz`) added per job: what a job
    /// leaves in the streams and buckets while it is retained (for shoal, its record and its
    /// end event; its token goes when it ends). Negative when more expired or was deleted
    /// during the run than it stored.
    #[serde(default)]
    pub stored_bytes_per_job: Option<f64>,
    /// The server's resident memory (`/varz` `mem`) before and after the run, MiB.
    #[serde(default)]
    pub rss_mib_before: Option<f64>,
    #[serde(default)]
    pub rss_mib_after: Option<f64>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Snapshot {
    pub msgs_in: u64,
    pub msgs_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub js_api: u64,
    /// Resident memory of the server process, bytes (0: not reported).
    pub rss_bytes: u64,
    /// JetStream's stored bytes, file and memory storage together.
    pub stored_bytes: u64,
}

/// Bytes in a MiB.
pub const MIB: f64 = 1024.0 * 1024.0;

impl Snapshot {
    /// Reads `/varz` and `/jsz` JSON bodies.
    pub fn from_json(varz: &Value, jsz: &Value) -> Snapshot {
        let n = |v: &Value, k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
        Snapshot {
            msgs_in: n(varz, "in_msgs"),
            msgs_out: n(varz, "out_msgs"),
            bytes_in: n(varz, "in_bytes"),
            bytes_out: n(varz, "out_bytes"),
            js_api: jsz.get("api").map(|a| n(a, "total")).unwrap_or(0),
            rss_bytes: n(varz, "mem"),
            stored_bytes: n(jsz, "storage") + n(jsz, "memory"),
        }
    }

    pub fn per_job(&self, after: &Snapshot, jobs: u64) -> Option<ServerTraffic> {
        if jobs == 0 {
            return None;
        }
        let d = |a: u64, b: u64| round3(b.saturating_sub(a) as f64 / jobs as f64);
        Some(ServerTraffic {
            msgs_in_per_job: d(self.msgs_in, after.msgs_in),
            msgs_out_per_job: d(self.msgs_out, after.msgs_out),
            bytes_in_per_job: d(self.bytes_in, after.bytes_in),
            bytes_out_per_job: d(self.bytes_out, after.bytes_out),
            js_api_per_job: d(self.js_api, after.js_api),
            stored_bytes_per_job: Some(round3((after.stored_bytes as f64 - self.stored_bytes as f64) / jobs as f64)),
            rss_mib_before: (self.rss_bytes > 0).then(|| round3(self.rss_bytes as f64 / MIB)),
            rss_mib_after: (after.rss_bytes > 0).then(|| round3(after.rss_bytes as f64 / MIB)),
        })
    }
}

/// The monitoring endpoint of a nats-server (`http://host:8222`).
#[derive(Clone)]
pub struct Monitor {
    http: reqwest::Client,
    url: String,
}

impl Monitor {
    pub fn new(url: &str) -> Option<Monitor> {
        let http = reqwest::Client::builder().timeout(std::time::Duration::from_secs(5)).build().ok()?;
        Some(Monitor { http, url: url.trim_end_matches('/').to_string() })
    }

    async fn get(&self, path: &str) -> Option<Value> {
        let resp = self.http.get(format!("{}{path}", self.url)).send().await.ok()?;
        serde_json::from_slice(&resp.bytes().await.ok()?).ok()
    }

    /// `None` when the endpoint does not answer (the numbers are then left out of the report).
    pub async fn snapshot(&self) -> Option<Snapshot> {
        let varz = self.get("/varz").await?;
        let jsz = self.get("/jsz").await.unwrap_or(Value::Null);
        Some(Snapshot::from_json(&varz, &jsz))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn traffic_is_the_difference_per_job() {
        let before = Snapshot::from_json(
            &json!({"in_msgs": 100, "out_msgs": 50, "in_bytes": 1000, "out_bytes": 500, "mem": 64 << 20}),
            &json!({"api": {"total": 10, "errors": 0}, "storage": 5000, "memory": 1000}),
        );
        let after = Snapshot::from_json(
            &json!({"in_msgs": 300, "out_msgs": 450, "in_bytes": 3000, "out_bytes": 4500, "mem": 96 << 20}),
            &json!({"api": {"total": 30}, "storage": 125_000, "memory": 1000}),
        );
        let t = before.per_job(&after, 100).expect("jobs ran");
        assert_eq!((t.msgs_in_per_job, t.msgs_out_per_job, t.js_api_per_job), (2.0, 4.0, 0.2));
        assert_eq!(t.bytes_out_per_job, 40.0);
        assert_eq!(t.stored_bytes_per_job, Some(1200.0));
        assert_eq!((t.rss_mib_before, t.rss_mib_after), (Some(64.0), Some(96.0)));
        assert!(before.per_job(&after, 0).is_none());
    }

    #[test]
    fn storage_freed_during_a_run_is_negative_and_a_missing_mem_is_none() {
        let before = Snapshot::from_json(&json!({}), &json!({"storage": 10_000}));
        let after = Snapshot::from_json(&json!({}), &json!({"storage": 4_000}));
        let t = before.per_job(&after, 10).expect("jobs ran");
        assert_eq!(t.stored_bytes_per_job, Some(-600.0));
        assert_eq!((t.rss_mib_before, t.rss_mib_after), (None, None));
    }
}
