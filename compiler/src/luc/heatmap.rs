//! Renders a sensitivity profile: an SVG heatmap (layers × candidates, colour = log10 of
//! the layer's normalized output MSE) and a markdown table.

use std::fmt::Write;

use super::sensitivity::Sensitivity;

/// Viridis-like colour stops, from low to high.
const STOPS: [(f64, [u8; 3]); 5] = [
    (0.0, [68, 1, 84]),
    (0.25, [59, 82, 139]),
    (0.5, [33, 145, 140]),
    (0.75, [94, 201, 98]),
    (1.0, [253, 231, 37]),
];

fn colour(t: f64) -> String {
    let t = t.clamp(0.0, 1.0);
    let k = STOPS.iter().position(|s| s.0 >= t).unwrap_or(4).max(1);
    let (t0, c0) = STOPS[k - 1];
    let (t1, c1) = STOPS[k];
    let f = (t - t0) / (t1 - t0);
    let mix = |a: u8, b: u8| (a as f64 + (b as f64 - a as f64) * f).round() as u8;
    format!(
        "#{:02x}{:02x}{:02x}",
        mix(c0[0], c1[0]),
        mix(c0[1], c1[1]),
        mix(c0[2], c1[2])
    )
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// The range of log10 of the positive finite values (None when there are none).
fn log_range(s: &Sensitivity) -> Option<(f64, f64)> {
    let logs = s
        .layers
        .iter()
        .flat_map(|l| &l.nmse)
        .filter(|v| v.is_finite() && **v > 0.0)
        .map(|v| v.log10());
    let (lo, hi) = logs.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
        (a.min(v), b.max(v))
    });
    (lo <= hi).then_some((lo, if hi > lo { hi } else { lo + 1.0 }))
}

/// The SVG heatmap. Cells with a zero error (e.g. a candidate that reproduces the weights
/// exactly) are drawn grey.
pub fn svg(s: &Sensitivity) -> String {
    let (cell_w, cell_h) = (22.0, 14.0);
    let (left, top) = (70.0, 40.0);
    let nc = s.candidates.len() as f64;
    let nl = s.layers.len() as f64;
    let label_h = 150.0;
    let legend_w = 90.0;
    let width = left + nc * cell_w + legend_w + 20.0;
    let height = top + nl * cell_h + label_h;
    let range = log_range(s);
    let mut o = String::new();
    let _ = writeln!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="10">"#
    );
    let _ = writeln!(o, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        o,
        r#"<text x="{left}" y="16" font-size="13">Layer output sensitivity: log10 normalized MSE ({} / {}, {} samples x {} tokens)</text>"#,
        escape(&s.quantizer),
        escape(&s.pruner),
        s.calibration.samples,
        s.calibration.seq
    );
    let _ = writeln!(
        o,
        r#"<text x="14" y="{}" transform="rotate(-90 14 {})" text-anchor="middle">decoder layer</text>"#,
        top + nl * cell_h / 2.0,
        top + nl * cell_h / 2.0
    );
    for (li, l) in s.layers.iter().enumerate() {
        let y = top + li as f64 * cell_h;
        let _ = writeln!(
            o,
            r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
            left - 4.0,
            y + cell_h - 3.0,
            l.layer
        );
        for (ci, v) in l.nmse.iter().enumerate() {
            let x = left + ci as f64 * cell_w;
            let fill = match range {
                Some((lo, hi)) if *v > 0.0 && v.is_finite() => colour((v.log10() - lo) / (hi - lo)),
                _ => "#bbbbbb".into(),
            };
            let _ = writeln!(
                o,
                r#"<rect x="{x}" y="{y}" width="{cell_w}" height="{cell_h}" fill="{fill}"><title>layer {} {}: nmse {:.3e}</title></rect>"#,
                l.layer,
                s.candidates[ci].label(),
                v
            );
        }
    }
    let ly = top + nl * cell_h + 6.0;
    for (ci, c) in s.candidates.iter().enumerate() {
        let x = left + ci as f64 * cell_w + cell_w / 2.0 + 3.0;
        let _ = writeln!(
            o,
            r#"<text x="{x}" y="{ly}" transform="rotate(-70 {x} {ly})" text-anchor="end">{}</text>"#,
            c.label()
        );
    }
    let _ = writeln!(
        o,
        r#"<text x="{}" y="{}" text-anchor="middle">candidate (bits, group, scheme, sparsity)</text>"#,
        left + nc * cell_w / 2.0,
        height - 8.0
    );
    // Legend: a vertical colour bar with its log10 range.
    let lx = left + nc * cell_w + 20.0;
    let steps = 20;
    let bar_h = (nl * cell_h).max(100.0);
    for k in 0..steps {
        let t = 1.0 - k as f64 / (steps - 1) as f64;
        let y = top + k as f64 * bar_h / steps as f64;
        let _ = writeln!(
            o,
            r#"<rect x="{lx}" y="{y}" width="14" height="{}" fill="{}"/>"#,
            bar_h / steps as f64 + 0.5,
            colour(t)
        );
    }
    if let Some((lo, hi)) = range {
        let _ = writeln!(o, r#"<text x="{}" y="{}">{hi:.1}</text>"#, lx + 18.0, top + 8.0);
        let _ = writeln!(o, r#"<text x="{}" y="{}">{lo:.1}</text>"#, lx + 18.0, top + bar_h);
    }
    let _ = writeln!(o, r#"<text x="{lx}" y="{}">log10 nmse</text>"#, top - 6.0);
    o.push_str("</svg>\n");
    o
}

/// A markdown table: one row per layer, one column per candidate (layer nmse), then the
/// end-to-end loss deltas.
pub fn table(s: &Sensitivity) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "# Sensitivity of {}\n\nCalibration: `{}`, {} samples x {} tokens; quantizer `{}`, pruner `{}`. \
Cells: normalized output MSE of the decoder layer with all seven linears compressed.\n",
        s.model, s.calibration.file, s.calibration.samples, s.calibration.seq, s.quantizer, s.pruner
    );
    let _ = write!(o, "| layer |");
    for c in &s.candidates {
        let _ = write!(o, " {} |", c.label());
    }
    let _ = write!(o, "\n|---:|");
    for _ in &s.candidates {
        let _ = write!(o, "---:|");
    }
    o.push('\n');
    for l in &s.layers {
        let _ = write!(o, "| {} |", l.layer);
        for v in &l.nmse {
            let _ = write!(o, " {v:.2e} |");
        }
        o.push('\n');
    }
    let _ = writeln!(
        o,
        "\n## End-to-end\n\nBase calibration loss {:.5}. Loss change with only one layer compressed:\n\n| layer | candidate | loss delta |\n|---:|---|---:|",
        s.base_loss
    );
    for e in &s.end_to_end {
        let _ = writeln!(
            o,
            "| {} | {} | {:+.5} |",
            e.layer,
            s.candidates[e.candidate].label(),
            e.loss_delta
        );
    }
    o
}
