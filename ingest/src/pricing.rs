//! Model prices and cost. An embedded, dated table (`pricing/prices.json`) covers the
//! current OpenAI, Anthropic and Google models; `LLMTAP_PRICING_FILE` adds or overrides
//! entries from LiteLLM's `model_prices_and_context_window.json` or llmtap's own format.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde::Deserialize;

use crate::provider::Usage;

const EMBEDDED: &str = include_str!("pricing/prices.json");

/// USD per token for each part of a call.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Price {
    pub input: f64,
    pub output: f64,
    pub cache_read: Option<f64>,
    pub cache_write: Option<f64>,
    pub reasoning: Option<f64>,
}

impl Price {
    /// Cost of one call: every part of the token split at its own price.
    pub fn cost(&self, u: &Usage) -> f64 {
        let uncached = u.input.saturating_sub(u.cache_read + u.cache_write);
        let visible_output = u.output.saturating_sub(u.reasoning);
        uncached as f64 * self.input
            + u.cache_read as f64 * self.cache_read.unwrap_or(self.input)
            + u.cache_write as f64 * self.cache_write.unwrap_or(self.input)
            + visible_output as f64 * self.output
            + u.reasoning as f64 * self.reasoning.unwrap_or(self.output)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PricingError {
    #[error("pricing file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("pricing file {path}: not valid JSON: {source}")]
    Json { path: String, source: serde_json::Error },
    #[error("pricing file {path}: model {model:?}: {reason}")]
    Entry { path: String, model: String, reason: String },
}

/// The price table in use. Lookups never block on I/O; the "unknown model" counter and
/// its once-per-model log are the only shared state.
#[derive(Debug, Default)]
pub struct PriceTable {
    prices: HashMap<String, Price>,
    pub as_of: String,
    unknown_total: AtomicU64,
    unknown_seen: Mutex<std::collections::HashSet<String>>,
}

#[derive(Deserialize)]
struct OwnFormat {
    #[serde(default)]
    as_of: String,
    #[serde(default)]
    unit: Option<String>,
    models: HashMap<String, OwnEntry>,
}

#[derive(Deserialize)]
struct OwnEntry {
    input: f64,
    output: f64,
    #[serde(default)]
    cache_read: Option<f64>,
    #[serde(default)]
    cache_write: Option<f64>,
    #[serde(default)]
    reasoning: Option<f64>,
}

#[derive(Deserialize)]
struct LiteLlmEntry {
    #[serde(default)]
    input_cost_per_token: Option<f64>,
    #[serde(default)]
    output_cost_per_token: Option<f64>,
    #[serde(default)]
    cache_read_input_token_cost: Option<f64>,
    #[serde(default)]
    cache_creation_input_token_cost: Option<f64>,
    #[serde(default)]
    output_cost_per_reasoning_token: Option<f64>,
}

impl PriceTable {
    /// The embedded table alone.
    pub fn embedded() -> Self {
        let mut t = PriceTable::default();
        // The embedded file is part of the build and covered by a test; a failure here
        // would leave every cost at 0, never fail a request.
        if let Err(e) = t.merge_json(EMBEDDED, "<embedded>") {
            tracing::error!(error = %e, "embedded price table is invalid");
        }
        t
    }

    /// The embedded table with a user file's entries on top.
    pub fn load(path: Option<&Path>) -> Result<Self, PricingError> {
        let mut t = Self::embedded();
        if let Some(p) = path {
            let name = p.display().to_string();
            let text =
                std::fs::read_to_string(p).map_err(|source| PricingError::Read { path: name.clone(), source })?;
            t.merge_json(&text, &name)?;
        }
        Ok(t)
    }

    /// Adds entries from either supported format; later entries override earlier ones.
    pub fn merge_json(&mut self, text: &str, path: &str) -> Result<usize, PricingError> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|source| PricingError::Json { path: path.into(), source })?;
        if value.get("models").is_some_and(|m| m.is_object()) {
            let own: OwnFormat =
                serde_json::from_value(value).map_err(|source| PricingError::Json { path: path.into(), source })?;
            let scale = match own.unit.as_deref() {
                None | Some("usd_per_million_tokens") => 1e-6,
                Some("usd_per_token") => 1.0,
                Some(other) => {
                    return Err(PricingError::Entry {
                        path: path.into(),
                        model: String::new(),
                        reason: format!("unknown unit {other:?} (expected usd_per_million_tokens or usd_per_token)"),
                    })
                }
            };
            let n = own.models.len();
            for (name, e) in own.models {
                if e.input < 0.0 || e.output < 0.0 {
                    return Err(PricingError::Entry {
                        path: path.into(),
                        model: name,
                        reason: "negative price".into(),
                    });
                }
                let price = Price {
                    input: e.input * scale,
                    output: e.output * scale,
                    cache_read: e.cache_read.map(|v| v * scale),
                    cache_write: e.cache_write.map(|v| v * scale),
                    reasoning: e.reasoning.map(|v| v * scale),
                };
                self.prices.insert(name.to_ascii_lowercase(), price);
            }
            if !own.as_of.is_empty() {
                self.as_of = own.as_of;
            }
            return Ok(n);
        }
        // LiteLLM: a map of model name → entry; `sample_spec` and non-text entries are skipped.
        let Some(map) = value.as_object() else {
            return Err(PricingError::Entry {
                path: path.into(),
                model: String::new(),
                reason: "expected a JSON object".into(),
            });
        };
        let mut n = 0;
        let mut unprefixed = Vec::new();
        for (name, entry) in map {
            if name == "sample_spec" {
                continue;
            }
            let Ok(e) = serde_json::from_value::<LiteLlmEntry>(entry.clone()) else { continue };
            let (Some(input), Some(output)) = (e.input_cost_per_token, e.output_cost_per_token) else { continue };
            let price = Price {
                input,
                output,
                cache_read: e.cache_read_input_token_cost,
                cache_write: e.cache_creation_input_token_cost,
                reasoning: e.output_cost_per_reasoning_token,
            };
            let key = name.to_ascii_lowercase();
            // `gemini/gemini-2.5-pro` is also reachable as `gemini-2.5-pro` unless that
            // name has an entry of its own.
            if let Some((_, bare)) = key.split_once('/') {
                unprefixed.push((bare.to_owned(), price));
            }
            self.prices.insert(key, price);
            n += 1;
        }
        for (bare, price) in unprefixed {
            if !map.contains_key(&bare) {
                self.prices.insert(bare, price);
            }
        }
        Ok(n)
    }

    pub fn len(&self) -> usize {
        self.prices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.prices.is_empty()
    }

    /// Looks a model up, resolving dated snapshot names to their base model.
    pub fn lookup(&self, model: &str) -> Option<&Price> {
        let mut name = model.trim().to_ascii_lowercase();
        if let Some(rest) = name.strip_prefix("models/") {
            name = rest.to_owned();
        }
        loop {
            if let Some(p) = self.prices.get(&name) {
                return Some(p);
            }
            name = strip_snapshot_suffix(&name)?;
        }
    }

    /// Cost in USD; an unknown model costs 0, is counted, and is logged once.
    pub fn cost(&self, model: &str, usage: &Usage) -> f64 {
        if model.is_empty() {
            return 0.0;
        }
        match self.lookup(model) {
            Some(p) => p.cost(usage),
            None => {
                self.unknown_total.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut seen) = self.unknown_seen.lock() {
                    if seen.len() < 10_000 && seen.insert(model.to_owned()) {
                        tracing::warn!(model, "no price for model; its calls are recorded with cost 0 (set LLMTAP_PRICING_FILE to add it)");
                    }
                }
                0.0
            }
        }
    }

    /// Calls priced at 0 because their model was unknown.
    pub fn unknown_model_calls(&self) -> u64 {
        self.unknown_total.load(Ordering::Relaxed)
    }
}

/// Removes one trailing snapshot marker: `-2024-08-06`, `-20241022`, `-002`, `-latest`,
/// `-preview-06-17`, `@20240620`; `None` when there is nothing to strip.
fn strip_snapshot_suffix(name: &str) -> Option<String> {
    if let Some((base, _)) = name.rsplit_once('@') {
        return Some(base.to_owned());
    }
    // `gpt-3.5-turbo-instruct:20230824-v2`; fine-tunes (`ft:…`) keep their own names.
    if !name.starts_with("ft:") {
        if let Some((base, _)) = name.split_once(':') {
            return Some(base.to_owned());
        }
    }
    let parts: Vec<&str> = name.split('-').collect();
    let n = parts.len();
    let digits = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_digit());
    if n >= 4 && digits(parts[n - 3], 4) && digits(parts[n - 2], 2) && digits(parts[n - 1], 2) {
        return Some(parts[..n - 3].join("-"));
    }
    if n >= 3 && parts[n - 3] == "preview" && digits(parts[n - 2], 2) && digits(parts[n - 1], 2) {
        return Some(parts[..n - 3].join("-"));
    }
    if n >= 2 {
        let last = parts[n - 1];
        if digits(last, 8)
            || digits(last, 3)
            || digits(last, 4)
            || last == "latest"
            || last == "preview"
            || last == "exp"
        {
            return Some(parts[..n - 1].join("-"));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u(input: u64, output: u64, cr: u64, cw: u64, r: u64) -> Usage {
        Usage { input, output, cache_read: cr, cache_write: cw, reasoning: r }
    }

    #[test]
    fn embedded_table_loads_and_is_dated() {
        let t = PriceTable::embedded();
        assert!(t.len() > 30, "{} entries", t.len());
        assert_eq!(t.as_of, "2025-11-20");
    }

    #[test]
    fn snapshots_resolve_to_base_models() {
        let t = PriceTable::embedded();
        let base = t.lookup("gpt-4o").copied();
        assert!(base.is_some());
        assert_eq!(t.lookup("gpt-4o-2024-08-06").copied(), base);
        assert_eq!(t.lookup("claude-sonnet-4-5-20250929").copied(), t.lookup("claude-sonnet-4-5").copied());
        assert_eq!(t.lookup("gemini-1.5-pro-002").copied(), t.lookup("gemini-1.5-pro").copied());
        assert_eq!(t.lookup("models/gemini-2.5-flash").copied(), t.lookup("gemini-2.5-flash").copied());
        assert_eq!(t.lookup("claude-3-5-sonnet@20240620").copied(), t.lookup("claude-3-5-sonnet").copied());
        // A mini model must not fall back to its bigger sibling's price.
        assert_ne!(t.lookup("gpt-4o-mini-2024-07-18").copied(), base);
        assert!(t.lookup("llama3.2").is_none());
        assert_eq!(
            t.lookup("gpt-3.5-turbo-instruct:20230824-v2").copied(),
            t.lookup("gpt-3.5-turbo-instruct").copied()
        );
    }

    #[test]
    fn cost_prices_each_part_of_the_split() {
        let t = PriceTable::embedded();
        // claude-sonnet-4-5: 3 / 15 per M, cache read 0.3, cache write 3.75.
        let c = t.cost("claude-sonnet-4-5", &u(1000 + 200 + 300, 50, 300, 200, 0));
        let want = 1000.0 * 3e-6 + 300.0 * 0.3e-6 + 200.0 * 3.75e-6 + 50.0 * 15e-6;
        assert!((c - want).abs() < 1e-15, "{c} vs {want}");
        // o3: reasoning priced as output when no separate price.
        let c = t.cost("o3", &u(100, 80, 0, 0, 60));
        assert!((c - (100.0 * 2e-6 + 80.0 * 8e-6)).abs() < 1e-15);
    }

    #[test]
    fn unknown_model_costs_zero_and_is_counted() {
        let t = PriceTable::embedded();
        assert_eq!(t.cost("my-finetune", &u(10, 10, 0, 0, 0)), 0.0);
        assert_eq!(t.cost("my-finetune", &u(10, 10, 0, 0, 0)), 0.0);
        assert_eq!(t.unknown_model_calls(), 2);
    }

    #[test]
    fn litellm_format_overrides_and_unprefixes() {
        let mut t = PriceTable::embedded();
        let file = r#"{
          "sample_spec": {"input_cost_per_token": 0, "output_cost_per_token": 0},
          "gpt-4o": {"input_cost_per_token": 5e-6, "output_cost_per_token": 2e-5, "cache_read_input_token_cost": 2.5e-6, "litellm_provider": "openai", "mode": "chat"},
          "groq/llama-3.3-70b-versatile": {"input_cost_per_token": 5.9e-7, "output_cost_per_token": 7.9e-7},
          "dall-e-3": {"output_cost_per_image": 0.04}
        }"#;
        assert_eq!(t.merge_json(file, "test").ok(), Some(2));
        assert_eq!(t.lookup("gpt-4o-2024-08-06").map(|p| p.input), Some(5e-6));
        assert_eq!(t.lookup("llama-3.3-70b-versatile").map(|p| p.output), Some(7.9e-7));
        assert!(t.lookup("dall-e-3").is_none());
    }

    #[test]
    fn own_format_rejects_unknown_unit_naming_it() {
        let mut t = PriceTable::default();
        let err = t.merge_json(r#"{"unit":"eur","models":{}}"#, "f.json").err().map(|e| e.to_string());
        assert_eq!(err.as_deref(), Some("pricing file f.json: model \"\": unknown unit \"eur\" (expected usd_per_million_tokens or usd_per_token)"));
    }
}
