//! Plain text tables for the terminal.

use shoal_protocol::human_ms;

/// Left-aligned columns separated by two spaces; `-` stands for an empty cell.
pub fn render(headers: &[&str], rows: &[Vec<String>]) -> String {
    let cell = |s: &str| if s.is_empty() { "-".to_string() } else { s.to_string() };
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, c) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell(c).chars().count());
            }
        }
    }
    let mut out = String::new();
    let mut push_row = |cells: Vec<String>| {
        let mut line = String::new();
        for (i, c) in cells.iter().enumerate() {
            let width = widths.get(i).copied().unwrap_or(0);
            line.push_str(&format!("{c:width$}  "));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    };
    push_row(headers.iter().map(|h| h.to_string()).collect());
    for row in rows {
        push_row(row.iter().map(|c| cell(c)).collect());
    }
    out
}

/// The first line of `text`, at most `max` characters (an ellipsis marks a cut).
pub fn first_line(text: &str, max: usize) -> String {
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let line = lines.next().unwrap_or("");
    let more = lines.next().is_some();
    if line.chars().count() > max {
        let mut s: String = line.chars().take(max.saturating_sub(1)).collect();
        s.push('…');
        s
    } else if more {
        format!("{line} …")
    } else {
        line.to_string()
    }
}

/// How long before `now_ms` a moment `at_ms` was; under a second (or a clock ahead of ours)
/// reads as now.
pub fn ago(now_ms: u64, at_ms: u64) -> String {
    match now_ms.saturating_sub(at_ms) {
        0..1_000 => "just now".to_string(),
        ms => format!("{} ago", human_ms(ms)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moments_read_as_how_long_ago() {
        assert_eq!(ago(10_000, 7_500), "2.5s ago");
        assert_eq!(ago(400_000, 96_000), "5m 04s ago");
        assert_eq!(ago(10_000, 9_500), "just now");
        assert_eq!(ago(10_000, 12_000), "just now", "a clock ahead of ours");
    }

    #[test]
    fn columns_align_and_empty_cells_show_a_dash() {
        let t =
            render(&["WORKER", "STATE"], &[vec!["w-1".into(), "idle".into()], vec!["worker-22".into(), String::new()]]);
        assert_eq!(t, "WORKER     STATE\nw-1        idle\nworker-22  -\n");
    }

    #[test]
    fn reasons_are_cut_to_one_line() {
        assert_eq!(first_line("exited with code 1", 40), "exited with code 1");
        assert_eq!(first_line("exited with code 1\nTraceback", 40), "exited with code 1 …");
        assert_eq!(first_line("abcdef", 4), "abc…");
        assert_eq!(first_line("", 4), "");
    }
}
