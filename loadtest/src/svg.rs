//! Line charts as inline SVG, so the HTML report needs nothing but a browser: axes with round
//! ticks, one polyline per series (straight or stepped, solid or dashed), and a legend.

use std::fmt::Write as _;

pub struct Series {
    pub name: String,
    pub color: &'static str,
    pub points: Vec<(f64, f64)>,
    /// Hold each value until the next point (counts), instead of joining points (rates).
    pub step: bool,
    pub dashed: bool,
}

pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    /// Tick labels for x, when the axis is not linear in the shown values: (position, label).
    pub x_ticks: Option<Vec<(f64, String)>>,
}

const W: f64 = 760.0;
const H: f64 = 300.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 16.0;
const TOP: f64 = 30.0;
const BOTTOM: f64 = 62.0;

pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A round step that splits `span` into about `n` parts (1, 2 or 5 times a power of ten).
pub fn nice_step(span: f64, n: f64) -> f64 {
    if !(span.is_finite() && span > 0.0) {
        return 1.0;
    }
    let raw = span / n;
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let nice = if norm <= 1.0 {
        1.0
    } else if norm <= 2.0 {
        2.0
    } else if norm <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

fn label(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 10_000.0 {
        format!("{:.0}k", v / 1000.0)
    } else if v.abs() >= 10.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}").trim_end_matches('0').to_string()
    }
}

/// Renders the chart; an empty chart says "no data".
pub fn line_chart(chart: &Chart) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" width="{W}" height="{H}" font-family="sans-serif" font-size="11">"#
    );
    let _ = write!(out, r#"<text x="{LEFT}" y="18" font-size="13" font-weight="bold">{}</text>"#, escape(&chart.title));
    let all: Vec<(f64, f64)> = chart
        .series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect();
    if all.is_empty() {
        let _ = write!(out, r##"<text x="{}" y="{}" fill="#888">no data</text></svg>"##, W / 2.0 - 20.0, H / 2.0);
        return out;
    }
    let (mut x0, mut x1) = all.iter().fold((f64::MAX, f64::MIN), |(a, b), (x, _)| (a.min(*x), b.max(*x)));
    if x1 <= x0 {
        x0 -= 0.5;
        x1 += 0.5;
    }
    let ymax = all.iter().fold(0f64, |m, (_, y)| m.max(*y));
    let ystep = nice_step(if ymax > 0.0 { ymax } else { 1.0 }, 5.0);
    let y1 = (ymax / ystep).ceil().max(1.0) * ystep;
    let pw = W - LEFT - RIGHT;
    let ph = H - TOP - BOTTOM;
    let sx = |x: f64| LEFT + (x - x0) / (x1 - x0) * pw;
    let sy = |y: f64| TOP + ph - (y / y1) * ph;
    // grid and y ticks
    let mut y = 0.0;
    while y <= y1 + ystep / 2.0 {
        let py = sy(y);
        let _ = write!(
            out,
            r##"<line x1="{LEFT}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="#e5e5e5"/><text x="{:.1}" y="{:.1}" text-anchor="end" fill="#444">{}</text>"##,
            W - RIGHT,
            LEFT - 6.0,
            py + 4.0,
            label(y)
        );
        y += ystep;
    }
    // x ticks
    let ticks: Vec<(f64, String)> = match &chart.x_ticks {
        Some(t) => t.iter().filter(|(x, _)| *x >= x0 && *x <= x1).cloned().collect(),
        None => {
            let step = nice_step(x1 - x0, 8.0);
            let mut t = Vec::new();
            let mut x = (x0 / step).ceil() * step;
            while x <= x1 + step * 1e-9 {
                t.push((x, label(x)));
                x += step;
            }
            t
        }
    };
    for (x, text) in ticks {
        let px = sx(x);
        let _ = write!(
            out,
            r##"<line x1="{px:.1}" y1="{TOP}" x2="{px:.1}" y2="{:.1}" stroke="#f0f0f0"/><text x="{px:.1}" y="{:.1}" text-anchor="middle" fill="#444">{}</text>"##,
            TOP + ph,
            TOP + ph + 14.0,
            escape(&text)
        );
    }
    let _ = write!(
        out,
        r##"<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="#999"/><text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#222">{}</text><text transform="translate(14 {:.1}) rotate(-90)" text-anchor="middle" fill="#222">{}</text>"##,
        LEFT + pw / 2.0,
        TOP + ph + 30.0,
        escape(&chart.x_label),
        TOP + ph / 2.0,
        escape(&chart.y_label)
    );
    // series
    for s in &chart.series {
        let pts: Vec<(f64, f64)> = s.points.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite()).collect();
        if pts.is_empty() {
            continue;
        }
        let mut path = String::new();
        for (i, (x, y)) in pts.iter().enumerate() {
            if s.step && i > 0 {
                let _ = write!(path, "{:.1},{:.1} ", sx(*x), sy(pts[i - 1].1));
            }
            let _ = write!(path, "{:.1},{:.1} ", sx(*x), sy(*y));
        }
        let dash = if s.dashed { r#" stroke-dasharray="5 3""# } else { "" };
        let _ = write!(
            out,
            r#"<polyline fill="none" stroke="{}" stroke-width="1.6"{dash} points="{}"><title>{}</title></polyline>"#,
            s.color,
            path.trim_end(),
            escape(&s.name)
        );
        if pts.len() == 1 {
            let _ = write!(
                out,
                r#"<circle cx="{:.1}" cy="{:.1}" r="2.5" fill="{}"/>"#,
                sx(pts[0].0),
                sy(pts[0].1),
                s.color
            );
        }
    }
    // legend
    let mut lx = LEFT;
    let ly = H - 12.0;
    for s in &chart.series {
        let dash = if s.dashed { r#" stroke-dasharray="5 3""# } else { "" };
        let _ = write!(
            out,
            r#"<line x1="{lx:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="{}" stroke-width="2"{dash}/><text x="{:.1}" y="{ly:.1}">{}</text>"#,
            ly - 4.0,
            lx + 18.0,
            ly - 4.0,
            s.color,
            lx + 22.0,
            escape(&s.name)
        );
        lx += 30.0 + 6.5 * s.name.chars().count() as f64;
    }
    out.push_str("</svg>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_round() {
        assert_eq!(nice_step(10.0, 5.0), 2.0);
        assert_eq!(nice_step(7.0, 5.0), 2.0);
        assert_eq!(nice_step(1000.0, 8.0), 200.0);
        assert_eq!(nice_step(0.3, 5.0), 0.1);
        assert_eq!(nice_step(0.0, 5.0), 1.0);
    }

    #[test]
    fn a_chart_has_a_line_per_series_and_escapes_text() {
        let chart = Chart {
            title: "latency <e2e> & more".into(),
            x_label: "s".into(),
            y_label: "ms".into(),
            series: vec![
                Series {
                    name: "p50".into(),
                    color: "#1f77b4",
                    points: vec![(0.0, 1.0), (1.0, 2.0)],
                    step: false,
                    dashed: false,
                },
                Series {
                    name: "workers".into(),
                    color: "#d62728",
                    points: vec![(0.0, 1.0), (1.0, 3.0)],
                    step: true,
                    dashed: true,
                },
            ],
            x_ticks: None,
        };
        let svg = line_chart(&chart);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("latency &lt;e2e&gt; &amp; more"));
        assert!(!svg.contains("NaN"));
    }

    #[test]
    fn an_empty_chart_says_so() {
        let chart =
            Chart { title: "t".into(), x_label: "x".into(), y_label: "y".into(), series: vec![], x_ticks: None };
        assert!(line_chart(&chart).contains("no data"));
    }
}
