//! Worker logs as a stream of line batches: the last lines first, then, when following, new
//! lines as they are written. The process and fake runtimes read the worker's log file
//! (`<state_dir>/logs/<endpoint>/<worker>.log`); the Docker runtime reads `docker logs`.

use std::io::SeekFrom;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use futures::{Stream, StreamExt, stream};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

/// Which worker's log, and how much of it.
#[derive(Debug, Clone)]
pub struct LogQuery {
    pub endpoint: String,
    pub worker_id: String,
    /// Where the process runtime writes the worker's output.
    pub log_file: PathBuf,
    /// How many of the last lines come first.
    pub lines: usize,
    /// Keep the stream open for new lines.
    pub follow: bool,
}

/// Batches of lines, oldest first; it ends when the log does (or at once without `follow`).
pub type LogStream = Pin<Box<dyn Stream<Item = Vec<String>> + Send>>;

/// How much of the end of a log file is read for its last lines.
const TAIL_BYTES: u64 = 256 * 1024;
/// How often a followed log file is checked for new lines.
const FOLLOW_EVERY: Duration = Duration::from_millis(250);

/// The log file's last lines, then (following) what is appended to it.
pub async fn file_lines(query: LogQuery) -> Result<LogStream, String> {
    let path = query.log_file.clone();
    let mut file = tokio::fs::File::open(&path)
        .await
        .map_err(|_| format!("worker {} has no log on this host", query.worker_id))?;
    let len = file.metadata().await.map_err(|e| format!("cannot read {}: {e}", path.display()))?.len();
    let start = len.saturating_sub(TAIL_BYTES);
    file.seek(SeekFrom::Start(start)).await.map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut buf = Vec::new();
    file.read_to_end(&mut buf).await.map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut text = String::from_utf8_lossy(&buf).into_owned();
    if start > 0 {
        // the first line was cut by the seek
        text = text.split_once('\n').map(|(_, rest)| rest.to_string()).unwrap_or_default();
    }
    let tail = last_lines(&text, query.lines);
    let first = stream::once(async move { tail });
    if !query.follow {
        return Ok(Box::pin(first));
    }
    let follow = stream::unfold((path, len, String::new()), |(path, pos, partial)| async move {
        let mut pos = pos;
        let mut partial = partial;
        loop {
            tokio::time::sleep(FOLLOW_EVERY).await;
            let Ok(mut file) = tokio::fs::File::open(&path).await else { return None };
            let Ok(meta) = file.metadata().await else { return None };
            if meta.len() < pos {
                pos = 0; // truncated or replaced
                partial.clear();
            }
            if meta.len() == pos || file.seek(SeekFrom::Start(pos)).await.is_err() {
                continue;
            }
            let mut buf = Vec::new();
            if file.read_to_end(&mut buf).await.is_err() {
                continue;
            }
            pos += buf.len() as u64;
            let (lines, rest) = complete_lines(&partial, &String::from_utf8_lossy(&buf));
            partial = rest;
            if !lines.is_empty() {
                return Some((lines, (path, pos, partial)));
            }
        }
    });
    Ok(Box::pin(first.chain(follow)))
}

/// The last `n` lines of `text` (blank lines dropped).
pub fn last_lines(text: &str, n: usize) -> Vec<String> {
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    all[all.len().saturating_sub(n)..].iter().map(|l| l.to_string()).collect()
}

/// Splits `partial + new` into complete lines and what is left after the last newline.
fn complete_lines(partial: &str, new: &str) -> (Vec<String>, String) {
    let text = format!("{partial}{new}");
    match text.rfind('\n') {
        Some(end) => {
            let lines = text[..end].lines().map(str::to_string).collect();
            (lines, text[end + 1..].to_string())
        }
        None => (vec![], text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_lines_skip_blanks_and_keep_order() {
        assert_eq!(last_lines("a\n\nb\nc\n", 2), vec!["b", "c"]);
        assert_eq!(last_lines("a\n", 5), vec!["a"]);
        assert!(last_lines("", 3).is_empty());
    }

    #[test]
    fn partial_lines_wait_for_their_newline() {
        let (lines, rest) = complete_lines("he", "llo\nwor");
        assert_eq!((lines, rest.as_str()), (vec!["hello".to_string()], "wor"));
        let (lines, rest) = complete_lines(&rest, "ld\n");
        assert_eq!((lines, rest.as_str()), (vec!["world".to_string()], ""));
        let (lines, rest) = complete_lines("", "no newline");
        assert!(lines.is_empty());
        assert_eq!(rest, "no newline");
    }

    #[tokio::test]
    async fn a_followed_file_yields_its_tail_then_new_lines() {
        let dir = std::env::temp_dir().join(format!("shoal-logs-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("w.log");
        std::fs::write(&path, "one\ntwo\nthree\n").expect("write");
        let query =
            LogQuery { endpoint: "e".into(), worker_id: "w".into(), log_file: path.clone(), lines: 2, follow: true };
        let mut s = file_lines(query.clone()).await.expect("log");
        assert_eq!(s.next().await, Some(vec!["two".to_string(), "three".to_string()]));
        {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new().append(true).open(&path).expect("open");
            writeln!(f, "four").expect("append");
        }
        let next = tokio::time::timeout(Duration::from_secs(5), s.next()).await.expect("a new line in time");
        assert_eq!(next, Some(vec!["four".to_string()]));
        let missing = LogQuery { log_file: dir.join("nope.log"), ..query };
        assert!(file_lines(missing).await.err().is_some_and(|e| e.contains("no log")));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
