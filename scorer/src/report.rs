//! `llmtap stats --judges`: per judge, app and model, from the local log's `scores/` and
//! `feedback/`: verdicts, pass rate, mean score, needs-review count, judge errors, judge
//! cost, and agreement with human feedback on the same calls (Cohen's kappa for pass/fail
//! judges, Spearman for scored ones).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::Path;

use llmtap_ingest::record::{FeedbackRecord, ScoreRecord};
use serde::Serialize;

use crate::agreement::{cohens_kappa, spearman};

/// One row of the judges table.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct JudgeRow {
    pub judge: String,
    pub app: String,
    pub model: String,
    pub verdicts: u64,
    pub pass_rate: f64,
    pub mean_score: f64,
    pub needs_review: u64,
    pub errors: u64,
    pub judge_cost_usd: f64,
    /// Calls with both a verdict and human feedback.
    pub agreement_n: u64,
    /// `kappa` or `spearman`; empty without enough pairs.
    pub agreement_method: String,
    pub agreement: Option<f64>,
}

/// Labels that count as a human "pass" when feedback has no numeric value.
pub const PASS_LABELS: &[&str] = &["pass", "good", "correct", "up", "yes", "true"];

pub fn human_pass(f: &FeedbackRecord) -> bool {
    if f.label.is_empty() {
        f.value > 0.0
    } else {
        PASS_LABELS.contains(&f.label.to_ascii_lowercase().as_str())
    }
}

/// Builds the table from `<data_dir>/scores` and `<data_dir>/feedback`.
pub fn judges_report(data_dir: &Path) -> std::io::Result<Vec<JudgeRow>> {
    let mut feedback: HashMap<String, FeedbackRecord> = HashMap::new();
    llmtap_ingest::log::for_each_line(&data_dir.join("feedback"), |_, line| {
        if let Ok(f) = serde_json::from_str::<FeedbackRecord>(line) {
            // The latest signal on a call wins.
            feedback.insert(f.trace_id.clone(), f);
        }
    })?;
    let mut groups: BTreeMap<(String, String, String), Vec<ScoreRecord>> = BTreeMap::new();
    llmtap_ingest::log::for_each_line(&data_dir.join("scores"), |_, line| {
        if let Ok(s) = serde_json::from_str::<ScoreRecord>(line) {
            groups.entry((s.judge.clone(), s.app.clone(), s.request_model.clone())).or_default().push(s);
        }
    })?;
    let mut rows = Vec::new();
    for ((judge, app, model), scores) in groups {
        let ok: Vec<&ScoreRecord> = scores.iter().filter(|s| s.error.is_empty()).collect();
        let n = ok.len() as f64;
        let mut row = JudgeRow {
            judge,
            app,
            model,
            verdicts: ok.len() as u64,
            pass_rate: if n > 0.0 { ok.iter().filter(|s| s.passed == 1).count() as f64 / n } else { 0.0 },
            mean_score: if n > 0.0 { ok.iter().map(|s| s.score).sum::<f64>() / n } else { 0.0 },
            needs_review: scores.iter().filter(|s| s.needs_review == 1).count() as u64,
            errors: scores.iter().filter(|s| !s.error.is_empty()).count() as u64,
            judge_cost_usd: scores.iter().map(|s| s.judge_cost_usd).sum(),
            ..JudgeRow::default()
        };
        let paired: Vec<(&ScoreRecord, &FeedbackRecord)> =
            ok.iter().filter_map(|s| feedback.get(&s.trace_id).map(|f| (*s, f))).collect();
        row.agreement_n = paired.len() as u64;
        let (agreement, method) = agreement(&paired);
        row.agreement = agreement;
        row.agreement_method = method.into();
        rows.push(row);
    }
    Ok(rows)
}

/// Judge–human agreement over (verdict, feedback) pairs of one judge: Cohen's kappa on
/// pass/fail for rule and boolean judges, on labels for categorical judges, Spearman's rho
/// on scores for numeric judges.
pub fn agreement(paired: &[(&ScoreRecord, &FeedbackRecord)]) -> (Option<f64>, &'static str) {
    let boolean = paired.iter().all(|(s, _)| s.judge_kind == "rule" || s.label == "pass" || s.label == "fail");
    let categorical = !boolean && paired.iter().all(|(s, _)| !s.label.is_empty());
    if boolean {
        let pairs: Vec<(bool, bool)> = paired.iter().map(|(s, f)| (s.passed == 1, human_pass(f))).collect();
        (cohens_kappa(&pairs), "kappa")
    } else if categorical {
        let pairs: Vec<(String, String)> =
            paired.iter().map(|(s, f)| (s.label.to_ascii_lowercase(), f.label.to_ascii_lowercase())).collect();
        (cohens_kappa(&pairs), "kappa")
    } else {
        let pairs: Vec<(f64, f64)> = paired.iter().map(|(s, f)| (s.score, f.value)).collect();
        (spearman(&pairs), "spearman")
    }
}

/// One verdict waiting for a human.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ReviewItem {
    pub ts: String,
    pub judge: String,
    pub app: String,
    pub model: String,
    pub trace_id: String,
    pub span_id: String,
    pub score: f64,
    pub label: String,
    pub reasoning: String,
}

/// Verdicts flagged `needs_review` whose call has no human feedback yet, oldest first.
pub fn review_queue(data_dir: &Path, judge: Option<&str>, limit: usize) -> std::io::Result<Vec<ReviewItem>> {
    let mut reviewed = std::collections::HashSet::new();
    llmtap_ingest::log::for_each_line(&data_dir.join("feedback"), |_, line| {
        if let Ok(f) = serde_json::from_str::<FeedbackRecord>(line) {
            reviewed.insert(f.trace_id);
        }
    })?;
    let mut out = Vec::new();
    llmtap_ingest::log::for_each_line(&data_dir.join("scores"), |_, line| {
        let Ok(s) = serde_json::from_str::<ScoreRecord>(line) else { return };
        if s.needs_review == 1 && judge.is_none_or(|j| j == s.judge) && !reviewed.contains(&s.trace_id) {
            out.push((s.ts, s));
        }
    })?;
    out.sort_by_key(|a| a.0);
    Ok(out
        .into_iter()
        .take(limit)
        .map(|(ts, s)| ReviewItem {
            ts: llmtap_ingest::record::ts_format::format(ts.0),
            judge: s.judge,
            app: s.app,
            model: s.request_model,
            trace_id: s.trace_id,
            span_id: s.span_id,
            score: s.score,
            label: s.label,
            reasoning: s.reasoning,
        })
        .collect())
}

/// The review table.
pub fn render_review(items: &[ReviewItem]) -> String {
    let mut out = String::new();
    if items.is_empty() {
        out.push_str("nothing to review\n");
        return out;
    }
    let _ = writeln!(
        out,
        "{:<23} {:<20} {:<14} {:<32} {:>6} {:<10} reasoning",
        "ts", "judge", "app", "trace_id", "score", "label"
    );
    for i in items {
        let mut reasoning: String = i.reasoning.replace('\n', " ").chars().take(60).collect();
        if i.reasoning.chars().count() > 60 {
            reasoning.push('…');
        }
        let _ = writeln!(
            out,
            "{:<23} {:<20} {:<14} {:<32} {:>6.2} {:<10} {}",
            i.ts, i.judge, i.app, i.trace_id, i.score, i.label, reasoning
        );
    }
    out.push_str("Answer with POST /v1/feedback on the admin port (trace_id, name, value or label).\n");
    out
}

/// The human table.
pub fn render(rows: &[JudgeRow]) -> String {
    let mut out = String::new();
    if rows.is_empty() {
        out.push_str("no verdicts yet\n");
        return out;
    }
    let _ = writeln!(
        out,
        "{:<24} {:<16} {:<20} {:>8} {:>6} {:>6} {:>7} {:>6} {:>10} {:>9}",
        "judge", "app", "model", "verdicts", "pass%", "mean", "review", "errors", "cost usd", "agreement"
    );
    for r in rows {
        let agreement = match r.agreement {
            Some(a) => format!("{} {a:.2} (n={})", r.agreement_method, r.agreement_n),
            None => format!("- (n={})", r.agreement_n),
        };
        let _ = writeln!(
            out,
            "{:<24} {:<16} {:<20} {:>8} {:>6.1} {:>6.2} {:>7} {:>6} {:>10.6} {}",
            r.judge,
            if r.app.is_empty() { "(none)" } else { &r.app },
            r.model,
            r.verdicts,
            r.pass_rate * 100.0,
            r.mean_score,
            r.needs_review,
            r.errors,
            r.judge_cost_usd,
            agreement
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, folder: &str, lines: &[String]) {
        std::fs::create_dir_all(dir.join(folder)).unwrap();
        std::fs::write(dir.join(folder).join("0001.ndjson"), lines.join("\n") + "\n").unwrap();
    }

    #[test]
    fn pass_rates_and_kappa_against_feedback() {
        let dir = tempfile::tempdir().unwrap();
        // 10 verdicts of a rule judge: 6 pass. Humans agree on 8 of 10 calls.
        let judge_passes = [1, 1, 1, 1, 1, 1, 0, 0, 0, 0];
        let human_ups = [1, 1, 1, 1, 1, 0, 0, 0, 0, 1];
        let scores: Vec<String> = (0..10)
            .map(|i| {
                serde_json::to_string(&ScoreRecord {
                    trace_id: format!("t{i}"),
                    judge: "cites_plan".into(),
                    judge_kind: "rule".into(),
                    app: "bot".into(),
                    request_model: "gpt-4o".into(),
                    passed: judge_passes[i],
                    score: f64::from(judge_passes[i]),
                    ..ScoreRecord::default()
                })
                .unwrap()
            })
            .collect();
        let fb: Vec<String> = (0..10)
            .map(|i| {
                serde_json::to_string(&FeedbackRecord {
                    trace_id: format!("t{i}"),
                    name: "thumbs".into(),
                    value: f64::from(human_ups[i]),
                    ..FeedbackRecord::default()
                })
                .unwrap()
            })
            .collect();
        write(dir.path(), "scores", &scores);
        write(dir.path(), "feedback", &fb);
        let rows = judges_report(dir.path()).unwrap();
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        assert_eq!((r.verdicts, r.agreement_n, r.agreement_method.as_str()), (10, 10, "kappa"));
        assert!((r.pass_rate - 0.6).abs() < 1e-12);
        // Observed 0.8; chance 0.6 × 0.6 + 0.4 × 0.4 = 0.52; kappa = 0.28 / 0.48.
        assert!((r.agreement.unwrap() - 0.28 / 0.48).abs() < 1e-12);
        assert!(render(&rows).contains("kappa 0.58 (n=10)"));
    }
}
