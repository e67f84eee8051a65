//! The run over time, a sample a second, and the self-contained HTML page of `--report`: plots
//! (SVG, drawn by plotters) of the rate offered and achieved, setup latency, failures, and the
//! target's CPU and memory when it runs on this machine. The page loads nothing: it opens
//! offline.

use plotters::prelude::*;
use serde::Serialize;
use serde_json::Value;

/// Latencies since the progress line last read them.
#[derive(Default)]
pub struct Recent(std::sync::Mutex<Vec<std::time::Duration>>);

impl Recent {
    pub fn push(&self, latency: std::time::Duration) {
        if let Ok(mut recent) = self.0.lock() {
            recent.push(latency);
        }
    }

    /// p50, p99 and max of the latencies since the last call (zero when there were none).
    pub fn take(
        &self,
    ) -> (
        std::time::Duration,
        std::time::Duration,
        std::time::Duration,
    ) {
        let mut recent = self
            .0
            .lock()
            .map(|mut r| std::mem::take(&mut *r))
            .unwrap_or_default();
        recent.sort();
        (
            super::sip_text::quantile(&recent, 0.5),
            super::sip_text::quantile(&recent, 0.99),
            super::sip_text::quantile(&recent, 1.0),
        )
    }
}

/// One second of the run.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Seconds since the first call.
    pub t: f64,
    pub offered: f64,
    pub achieved: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Calls that failed in this second.
    pub failed: u64,
    /// The target's CPU (cores) and RSS (MiB), when its process is on this machine.
    pub target_cores: Option<f64>,
    pub target_rss_mib: Option<f64>,
    /// Of that RSS, the part that is files and shared memory mapped (SQLite's log index, a
    /// database on tmpfs): what is not the heap.
    pub target_rss_file_mib: Option<f64>,
}

/// A line of a plot: its name, colour and points.
type Series<'a> = (&'a str, RGBColor, Vec<(f64, f64)>);

/// `y_floor`: the least top of the y axis (a count of 0 still gets an axis of whole numbers).
fn plot(title: &str, y_desc: &str, y_floor: f64, series: &[Series<'_>]) -> Result<String, String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (760, 280)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let x_max = series
            .iter()
            .flat_map(|(_, _, p)| p.iter().map(|(x, _)| *x))
            .fold(1.0f64, f64::max);
        let y_max = series
            .iter()
            .flat_map(|(_, _, p)| p.iter().map(|(_, y)| *y))
            .fold(0.0f64, f64::max)
            .max(y_floor)
            * 1.1;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(32)
            .y_label_area_size(56)
            .build_cartesian_2d(0f64..x_max, 0f64..y_max)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc("seconds")
            .y_desc(y_desc)
            .draw()
            .map_err(|e| e.to_string())?;
        for (name, colour, points) in series {
            let colour = *colour;
            chart
                .draw_series(LineSeries::new(
                    points.iter().copied(),
                    colour.stroke_width(2),
                ))
                .map_err(|e| e.to_string())?
                .label(*name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| e.to_string())?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}

fn capitalised(text: &str) -> String {
    let mut chars = text.chars();
    chars
        .next()
        .map(|c| c.to_uppercase().chain(chars).collect())
        .unwrap_or_default()
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The page: the summary (`summary`, the run's JSON) and one plot per measure.
pub fn html(summary: &Value, samples: &[Sample]) -> Result<String, String> {
    let points = |f: &dyn Fn(&Sample) -> Option<f64>| -> Vec<(f64, f64)> {
        samples
            .iter()
            .filter_map(|s| f(s).map(|y| (s.t, y)))
            .collect()
    };
    let blue = RGBColor(31, 119, 180);
    let orange = RGBColor(255, 127, 14);
    let red = RGBColor(214, 39, 40);
    let green = RGBColor(44, 160, 44);
    // What the scenario counts and times ("calls/s", "INVITE → 200", "calls").
    let unit = |name: &str, default: &'static str| -> String {
        summary["units"][name]
            .as_str()
            .unwrap_or(default)
            .to_owned()
    };
    let (rate, latency, items) = (
        unit("rate", "calls/s"),
        unit("latency", "INVITE → 200"),
        unit("items", "calls"),
    );
    let rate_title = format!("{} a second", capitalised(&items));
    let failed_title = format!("Failed {items} a second");
    let mut plots = vec![
        plot(
            &rate_title,
            &rate,
            1.0,
            &[
                ("offered", blue, points(&|s| Some(s.offered))),
                ("achieved", orange, points(&|s| Some(s.achieved))),
            ],
        )?,
        plot(
            &latency,
            "ms",
            1.0,
            &[
                ("p50", green, points(&|s| Some(s.p50_ms))),
                ("p99", orange, points(&|s| Some(s.p99_ms))),
                ("max", red, points(&|s| Some(s.max_ms))),
            ],
        )?,
        plot(
            &failed_title,
            &items,
            5.0,
            &[("failed", red, points(&|s| Some(s.failed as f64)))],
        )?,
    ];
    if samples.iter().any(|s| s.target_cores.is_some()) {
        plots.push(plot(
            "Target CPU",
            "cores",
            0.1,
            &[("cores", blue, points(&|s| s.target_cores))],
        )?);
        plots.push(plot(
            "Target RSS",
            "MiB",
            1.0,
            &[("RSS", green, points(&|s| s.target_rss_mib))],
        )?);
    }
    let summary_text = escape(&serde_json::to_string_pretty(summary).unwrap_or_default());
    let figures: String = plots
        .iter()
        .map(|svg| format!("<figure>{svg}</figure>\n"))
        .collect();
    Ok(format!(
        r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>sautikit loadtest</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
figure {{ margin: 1em 0; }}
pre {{ background: #f6f6f6; padding: 1em; overflow-x: auto; }}
</style>
</head>
<body>
<h1>sautikit loadtest: {scenario}</h1>
<p>Result: <strong>{result}</strong></p>
{figures}<h2>Summary</h2>
<pre>{summary_text}</pre>
<script>
// How many plotted lines the browser laid out: a check that the page draws, offline.
window.addEventListener("load", () => {{
  const drawn = [...document.querySelectorAll("svg polyline")]
    .filter(p => {{ const b = p.getBBox(); return b.width > 0 || b.height > 0; }}).length;
  document.body.setAttribute("data-lines-drawn", String(drawn));
}});
</script>
</body>
</html>
"#,
        scenario = escape(summary["scenario"].as_str().unwrap_or("")),
        result = if summary["pass"] == true {
            "PASS"
        } else {
            "FAIL"
        },
    ))
}
