//! Judge–human agreement: Cohen's kappa for boolean and categorical verdicts, Spearman's
//! rank correlation for numeric scores, over calls that have both a verdict and feedback.
//! Falling agreement says the judge, not the model, needs work.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::Path;

use llmtap_ingest::record::{FeedbackRecord, ScoreRecord};

/// Cohen's kappa of paired labels; `None` with no pairs or when chance agreement is total.
pub fn cohens_kappa<L: Ord + Clone>(pairs: &[(L, L)]) -> Option<f64> {
    if pairs.is_empty() {
        return None;
    }
    let n = pairs.len() as f64;
    let observed = pairs.iter().filter(|(a, b)| a == b).count() as f64 / n;
    let mut a_counts: BTreeMap<L, f64> = BTreeMap::new();
    let mut b_counts: BTreeMap<L, f64> = BTreeMap::new();
    for (a, b) in pairs {
        *a_counts.entry(a.clone()).or_default() += 1.0;
        *b_counts.entry(b.clone()).or_default() += 1.0;
    }
    let expected: f64 = a_counts.iter().map(|(k, ca)| ca / n * b_counts.get(k).copied().unwrap_or(0.0) / n).sum();
    if (1.0 - expected).abs() < f64::EPSILON {
        return None;
    }
    Some((observed - expected) / (1.0 - expected))
}

/// Ranks with ties sharing their average rank (1-based).
fn ranks(v: &[f64]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
    let mut out = vec![0.0; v.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && v[idx[j + 1]] == v[idx[i]] {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        for k in i..=j {
            out[idx[k]] = avg;
        }
        i = j + 1;
    }
    out
}

/// Spearman's rank correlation; `None` with fewer than two pairs or a constant side.
pub fn spearman(pairs: &[(f64, f64)]) -> Option<f64> {
    if pairs.len() < 2 {
        return None;
    }
    let a = ranks(&pairs.iter().map(|p| p.0).collect::<Vec<_>>());
    let b = ranks(&pairs.iter().map(|p| p.1).collect::<Vec<_>>());
    let n = a.len() as f64;
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let cov: f64 = a.iter().zip(&b).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = a.iter().map(|x| (x - ma).powi(2)).sum();
    let vb: f64 = b.iter().map(|y| (y - mb).powi(2)).sum();
    if va == 0.0 || vb == 0.0 {
        return None;
    }
    Some(cov / (va.sqrt() * vb.sqrt()))
}

/// Recent verdicts and human feedback, for the live agreement of each judge (the metric and
/// the drift signal). Bounded: the oldest verdicts and feedback are forgotten first.
#[derive(Debug)]
pub struct AgreementTracker {
    /// judge → its recent verdicts (errors excluded).
    verdicts: HashMap<String, VecDeque<ScoreRecord>>,
    /// trace → the latest feedback on it.
    feedback: HashMap<String, FeedbackRecord>,
    feedback_order: VecDeque<String>,
    capacity: usize,
}

/// Agreement of one judge.
#[derive(Clone, Debug, PartialEq)]
pub struct JudgeAgreement {
    pub judge: String,
    pub method: &'static str,
    pub value: Option<f64>,
    /// Verdicts with feedback.
    pub pairs: u64,
}

impl AgreementTracker {
    pub fn new(capacity: usize) -> Self {
        AgreementTracker {
            verdicts: HashMap::new(),
            feedback: HashMap::new(),
            feedback_order: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    pub fn add_verdict(&mut self, v: &ScoreRecord) {
        if !v.error.is_empty() {
            return;
        }
        let q = self.verdicts.entry(v.judge.clone()).or_default();
        q.push_back(v.clone());
        if q.len() > self.capacity {
            q.pop_front();
        }
    }

    pub fn add_feedback(&mut self, f: &FeedbackRecord) {
        if self.feedback.insert(f.trace_id.clone(), f.clone()).is_none() {
            self.feedback_order.push_back(f.trace_id.clone());
            if self.feedback_order.len() > self.capacity {
                if let Some(old) = self.feedback_order.pop_front() {
                    self.feedback.remove(&old);
                }
            }
        }
    }

    /// Reads what the local log already holds (after a restart).
    pub fn load(&mut self, data_dir: &Path) -> std::io::Result<()> {
        llmtap_ingest::log::for_each_line(&data_dir.join("feedback"), |_, line| {
            if let Ok(f) = serde_json::from_str::<FeedbackRecord>(line) {
                self.add_feedback(&f);
            }
        })?;
        llmtap_ingest::log::for_each_line(&data_dir.join("scores"), |_, line| {
            if let Ok(v) = serde_json::from_str::<ScoreRecord>(line) {
                self.add_verdict(&v);
            }
        })
    }

    /// Each judge's agreement over its verdicts that have feedback.
    pub fn agreement(&self) -> Vec<JudgeAgreement> {
        let mut out: Vec<JudgeAgreement> = self
            .verdicts
            .iter()
            .map(|(judge, vs)| {
                let paired: Vec<(&ScoreRecord, &FeedbackRecord)> =
                    vs.iter().filter_map(|v| self.feedback.get(&v.trace_id).map(|f| (v, f))).collect();
                let (value, method) = crate::report::agreement(&paired);
                JudgeAgreement { judge: judge.clone(), method, value, pairs: paired.len() as u64 }
            })
            .collect();
        out.sort_by(|a, b| a.judge.cmp(&b.judge));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kappa_of_a_known_table() {
        // judge × human: 20 yes/yes, 5 yes/no, 10 no/yes, 15 no/no. Observed 0.7, chance
        // 0.5 × 0.6 + 0.5 × 0.4 = 0.5, so kappa = (0.7 − 0.5) / (1 − 0.5) = 0.4.
        let mut pairs = Vec::new();
        pairs.extend(std::iter::repeat_n((true, true), 20));
        pairs.extend(std::iter::repeat_n((true, false), 5));
        pairs.extend(std::iter::repeat_n((false, true), 10));
        pairs.extend(std::iter::repeat_n((false, false), 15));
        assert!((cohens_kappa(&pairs).unwrap() - 0.4).abs() < 1e-12);
        // Perfect agreement is 1; chance-level agreement is 0.
        assert_eq!(cohens_kappa(&[("a", "a"), ("b", "b")]), Some(1.0));
        let chance = [("a", "a"), ("a", "b"), ("b", "a"), ("b", "b")];
        assert!(cohens_kappa(&chance).unwrap().abs() < 1e-12);
        assert_eq!(cohens_kappa::<&str>(&[]), None);
    }

    #[test]
    fn spearman_with_ties_matches_a_hand_computation() {
        // y ranks with the tie at 7 averaged: [1, 2, 3.5, 5, 3.5]; rho = 8 / sqrt(10 × 9.5).
        let pairs = [(1.0, 5.0), (2.0, 6.0), (3.0, 7.0), (4.0, 8.0), (5.0, 7.0)];
        assert!((spearman(&pairs).unwrap() - 8.0 / (95.0f64).sqrt()).abs() < 1e-12);
        assert!((spearman(&[(1.0, 3.0), (2.0, 2.0), (3.0, 1.0)]).unwrap() + 1.0).abs() < 1e-12);
        assert_eq!(spearman(&[(1.0, 1.0), (2.0, 1.0)]), None);
    }
}
