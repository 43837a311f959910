//! What the NATS server handled per job, from its monitoring endpoint (`/varz`, `/jsz`):
//! messages and bytes in and out, and JetStream API calls. A run's snapshot before and after,
//! divided by its completed jobs, says how chatty a job is, for shoal and for the baseline.
//! The counters are server-wide: background traffic (heartbeats, ticks) is included.

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
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Snapshot {
    pub msgs_in: u64,
    pub msgs_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub js_api: u64,
}

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
        })
    }
}

/// The monitoring endpoint of a nats-server (`http://host:8222`).
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
            &json!({"in_msgs": 100, "out_msgs": 50, "in_bytes": 1000, "out_bytes": 500}),
            &json!({"api": {"total": 10, "errors": 0}}),
        );
        let after = Snapshot::from_json(
            &json!({"in_msgs": 300, "out_msgs": 450, "in_bytes": 3000, "out_bytes": 4500}),
            &json!({"api": {"total": 30}}),
        );
        let t = before.per_job(&after, 100).expect("jobs ran");
        assert_eq!((t.msgs_in_per_job, t.msgs_out_per_job, t.js_api_per_job), (2.0, 4.0, 0.2));
        assert_eq!(t.bytes_out_per_job, 40.0);
        assert!(before.per_job(&after, 0).is_none());
    }
}
