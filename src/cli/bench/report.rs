//! The bench's results as markdown: the plain figures per model and
//! backend, the re-measured references beside ours with ratios, and one
//! table of the speculative modes per prompt source and temperature.

use serde_json::Value;

/// The re-measured references (if any) as rows of the plain table, then
/// ours over them for each random-weight model.
fn reference_markdown(result: &Value) -> String {
    let mut s = String::new();
    fn rows(v: &Value) -> &[Value] {
        v.as_array().map_or(&[], Vec::as_slice)
    }
    let (refs, plain) = (rows(&result["reference"]["rows"]), rows(&result["plain"]));
    let mut ratios = String::new();
    for r in refs {
        // "served": the checkpoint under test (`cpu_reference.py --hf`).
        let model = match r["preset"].as_str().unwrap_or("") {
            "served" => "served".to_string(),
            preset => format!("random {preset}"),
        };
        let ours = plain
            .iter()
            .find(|p| p["model"].as_str() == Some(model.as_str()));
        for engine in ["pytorch_eager_f32", "llama_cpp_f32"] {
            let p = &r[engine];
            let Some(theirs) = p["decode_tok_s"].as_f64() else {
                continue;
            };
            s += &format!(
                "| {model} (reference) | {engine} | {:.0} | {:.0} | {:.2}x | {:.2}x |\n",
                theirs,
                p["prefill_64_tok_s"].as_f64().unwrap_or(0.0),
                p["verify_4_over_1"].as_f64().unwrap_or(0.0),
                p["verify_8_over_1"].as_f64().unwrap_or(0.0)
            );
            if let Some(o) = ours {
                let f = |b: &str| o["backends"][b]["decode_tok_s"].as_f64().unwrap_or(0.0) / theirs;
                ratios += &format!(
                    "| {model} | {engine} | {:.2}x | {:.2}x |\n",
                    f("fast_f32"),
                    f("fast_f16")
                );
            }
        }
    }
    if !ratios.is_empty() {
        s += "\n| model | reference | ours f32 / reference decode | ours f16 / reference decode |\n|---|---|---|---|\n";
        s += &ratios;
    }
    s
}

/// A markdown table of the speculative results.
pub fn markdown(result: &Value) -> String {
    let mut s = String::new();
    s += "| model | backend | decode tok/s | prefill-64 tok/s | verify 4/1 | verify 8/1 | verify 16/1 | verify 64/1 |\n|---|---|---|---|---|---|---|---|\n";
    let rows = result["plain"].as_array().into_iter().flatten();
    for (name, p) in rows.flat_map(|r| {
        let model = format!(
            "{} ({})",
            r["model"].as_str().unwrap_or(""),
            r["backends"]["fast_f32"]["config"].as_str().unwrap_or("")
        );
        // fast_q8_0 / fast_q4_0 only with `bench --weights`.
        let names = [
            "fast_f32",
            "fast_f16",
            "fast_q8_0",
            "fast_q4_0",
            "candle_f32",
        ];
        names
            .into_iter()
            .filter(|b| r["backends"].get(b).is_some())
            .map(|b| (format!("| {model} | {b}"), r["backends"][b].clone()))
            .collect::<Vec<_>>()
    }) {
        s += &format!(
            "{} | {:.0} | {:.0} | {:.2}x | {:.2}x | {:.2}x | {:.2}x |\n",
            name,
            p["decode_tok_s"].as_f64().unwrap_or(0.0),
            p["prefill_64_tok_s"].as_f64().unwrap_or(0.0),
            p["verify_4_over_1"].as_f64().unwrap_or(0.0),
            p["verify_8_over_1"].as_f64().unwrap_or(0.0),
            p["verify_16_over_1"].as_f64().unwrap_or(0.0),
            p["verify_64_over_1"].as_f64().unwrap_or(0.0)
        );
    }
    s += &reference_markdown(result);
    for suite in result["speculative"].as_array().into_iter().flatten() {
        s += &format!(
            "\n{} prompts, temperature {}, {} new tokens, distinct-4 {:.2}, non-repeating tokens {:.0}% (4-gram new in prompt + output)\n\n| mode | tok/s | speedup | non-repeating speedup | tokens/step | acceptance | drafting share of time | identical / near-tie / diverged |\n|---|---|---|---|---|---|---|---|\n",
            suite["source"].as_str().unwrap_or(""),
            suite["temperature"],
            suite["new_tokens"],
            suite["distinct4"].as_f64().unwrap_or(0.0),
            100.0 * suite["non_repeating_share"].as_f64().unwrap_or(0.0)
        );
        for m in suite["modes"].as_array().into_iter().flatten() {
            s += &format!(
                "| {} | {:.1} | {:.2}x | {} | {:.2} | {:.2} | {:.1}% | {} / {} / {} |\n",
                m["mode"].as_str().unwrap_or(""),
                m["tok_s"].as_f64().unwrap_or(0.0),
                m["speedup"].as_f64().unwrap_or(0.0),
                m["speedup_non_repeating"]
                    .as_f64()
                    .map_or("-".into(), |x| format!("{x:.2}x")),
                m["tokens_per_step"].as_f64().unwrap_or(0.0),
                m["acceptance"].as_f64().unwrap_or(0.0),
                100.0 * m["draft_share"].as_f64().unwrap_or(0.0),
                m["identical_to_plain"],
                m["near_tie_divergences"],
                m["divergences"]
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn reference_figures_print_beside_ours_with_ratios() {
        let fig = |d: f64| json!({"decode_tok_s": d, "prefill_64_tok_s": 1000.0, "verify_4_over_1": 1.5, "verify_8_over_1": 2.0});
        let result = json!({
            "plain": [{"model": "random small", "backends": {"fast_f32": fig(300.0), "fast_f16": fig(600.0), "candle_f32": fig(100.0)}}],
            "reference": {"rows": [{"preset": "small", "pytorch_eager_f32": fig(200.0), "llama_cpp_f32": fig(600.0)}]},
        });
        let md = markdown(&result);
        assert!(
            md.contains(
                "| random small (reference) | llama_cpp_f32 | 600 | 1000 | 1.50x | 2.00x |"
            ),
            "{md}"
        );
        assert!(
            md.contains("| random small | llama_cpp_f32 | 0.50x | 1.00x |"),
            "{md}"
        );
        assert!(
            md.contains("| random small | pytorch_eager_f32 | 1.50x | 3.00x |"),
            "{md}"
        );
        // Without a reference file nothing is added.
        let plain_only = json!({"plain": result["plain"].clone()});
        assert!(!markdown(&plain_only).contains("reference"));
    }
}
