//! `[[intent]]` and `[[judge]]` in `llmtap.toml`. These keys are an interface (users' files,
//! the Helm chart and tests depend on them). Validation compiles every judge and names the
//! judge and the key of anything wrong.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::rule::{RuleJudge, RuleSpec};

/// What an app is for: the source of its budget and safety judges.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IntentConfig {
    pub app: String,
    pub objective: String,
    pub target_user: String,
    /// Becomes the rule judge `intent_latency_budget` (`max_latency_ms`).
    pub latency_budget_ms: Option<f64>,
    /// Becomes the rule judge `intent_cost_envelope` (`max_cost_usd`).
    pub cost_budget_usd: Option<f64>,
    /// Regexes the output must not match; become the rule judge `intent_safety`.
    pub safety: Vec<String>,
    pub edge_cases: Vec<String>,
}

/// Output scale of an LLM judge.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutputConfig {
    /// `numeric`, `boolean` or `categorical`.
    pub kind: String,
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub pass_at: Option<f64>,
    pub review_band: Option<f64>,
    /// Categorical choices and their scores.
    pub choices: BTreeMap<String, f64>,
}

/// One `[[judge]]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JudgeConfig {
    pub name: String,
    /// `rule` or `llm`.
    pub kind: String,
    /// Changes when the judge's meaning changes; verdicts are keyed by (trace, judge, version).
    pub version: String,
    /// Filters; a filter left out matches everything.
    pub apps: Vec<String>,
    pub routes: Vec<String>,
    pub models: Vec<String>,
    /// Every `key = value` must be in the call's tags.
    pub tags: BTreeMap<String, String>,
    /// Share of matching calls judged (0 to 1), decided from the trace id.
    pub sample_rate: f64,
    /// Judge failed calls (error_kind set) too.
    pub score_failed: bool,
    /// Rule judges: exactly one rule, e.g. `{ regex = "(?i)plan:" }`.
    pub rule: Option<RuleSpec>,
    /// LLM judges: a route name (`openai`, or a `[[route]]`) or the URL of any
    /// OpenAI-compatible server.
    pub endpoint: String,
    pub model: String,
    /// The variable holding the endpoint's API key (sent as a bearer token).
    pub api_key_env: String,
    /// The prompt, with `{{input}}`, `{{messages}}`, `{{output}}`, `{{tool_calls}}`,
    /// `{{objective}}`, `{{target_user}}` and `{{edge_cases}}`.
    pub rubric: String,
    pub output: Option<OutputConfig>,
    /// Per attempt.
    pub timeout_ms: u64,
    /// Retries after 429, 5xx, timeouts and connection errors.
    pub max_retries: u32,
    /// Ask for a JSON-schema `response_format` (servers that reject it are asked without).
    pub structured_output: bool,
    pub temperature: f64,
}

impl Default for JudgeConfig {
    fn default() -> Self {
        JudgeConfig {
            name: String::new(),
            kind: "rule".into(),
            version: "1".into(),
            apps: Vec::new(),
            routes: Vec::new(),
            models: Vec::new(),
            tags: BTreeMap::new(),
            sample_rate: 1.0,
            score_failed: false,
            rule: None,
            endpoint: String::new(),
            model: String::new(),
            api_key_env: String::new(),
            rubric: String::new(),
            output: None,
            timeout_ms: 30_000,
            max_retries: 3,
            structured_output: true,
            temperature: 0.0,
        }
    }
}

/// `[scorer]`: the in-process scoring queue.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScorerConfig {
    /// Judge sampled calls inside `serve`. Turn off when `llmtap score` jobs do it for the
    /// fleet from ClickHouse.
    pub in_process: bool,
    /// Sampled calls waiting for judges; when full, new ones are dropped and counted.
    pub queue_capacity: usize,
    /// LLM judge calls started but not finished, over all endpoints.
    pub max_in_flight: usize,
    /// Verdict keys (judge, version, trace, span) remembered so nothing is judged twice.
    pub cache_entries: usize,
    /// Limits per judge endpoint (by the name or URL judges give as `endpoint`).
    pub endpoints: BTreeMap<String, crate::llm::EndpointLimits>,
}

impl Default for ScorerConfig {
    fn default() -> Self {
        ScorerConfig {
            in_process: true,
            queue_capacity: 4096,
            max_in_flight: 64,
            cache_entries: 100_000,
            endpoints: BTreeMap::new(),
        }
    }
}

/// What judge validation needs from the rest of the config.
pub struct JudgeEnv<'a> {
    /// The config file's folder: relative schema paths resolve from it.
    pub base: &'a Path,
    /// A route name to its upstream base URL, for OpenAI-compatible routes
    /// (`Err` says why a route cannot serve judges).
    pub route_url: &'a dyn Fn(&str) -> Option<Result<String, String>>,
    /// Environment lookup for `api_key_env`.
    pub var: &'a dyn Fn(&str) -> Option<String>,
}

impl<'a> JudgeEnv<'a> {
    /// No routes, the process environment.
    pub fn plain(base: &'a Path) -> Self {
        JudgeEnv { base, route_url: &|_| None, var: &|k| std::env::var(k).ok() }
    }
}

/// A judge or intent that cannot work: which one, which key, what value, why.
#[derive(Debug, thiserror::Error)]
#[error("{what} {name:?}: {key} = {value}: {reason}")]
pub struct JudgeConfigError {
    pub what: &'static str,
    pub name: String,
    pub key: String,
    pub value: String,
    pub reason: String,
}

/// Filters and sampling of one judge.
#[derive(Clone, Debug)]
pub struct Selector {
    pub apps: Vec<String>,
    pub routes: Vec<String>,
    pub models: Vec<String>,
    pub tags: BTreeMap<String, String>,
    pub sample_rate: f64,
    pub score_failed: bool,
}

/// A checked judge.
#[derive(Debug)]
pub struct ValidatedJudge {
    pub name: String,
    pub version: String,
    pub selector: Selector,
    pub rule: RuleJudge,
}

/// Every judge: rules from `[[judge]]` and from `[[intent]]` budgets, and LLM judges.
#[derive(Debug, Default)]
pub struct ValidatedJudges {
    pub rules: Vec<ValidatedJudge>,
    pub llm: Vec<crate::llm::LlmJudge>,
    pub intents: Vec<IntentConfig>,
}

impl ValidatedJudges {
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty() && self.llm.is_empty()
    }
}

impl ValidatedJudges {
    /// Validates `[[judge]]` and `[[intent]]`; relative schema paths resolve from `base`.
    pub fn build(
        judges: &[JudgeConfig],
        intents: &[IntentConfig],
        env: &JudgeEnv<'_>,
    ) -> Result<Self, JudgeConfigError> {
        let base = env.base;
        let mut out = ValidatedJudges { intents: intents.to_vec(), ..ValidatedJudges::default() };
        let mut names = std::collections::HashSet::new();
        for j in judges {
            let err = |key: &str, value: String, reason: &str| JudgeConfigError {
                what: "judge",
                name: j.name.clone(),
                key: key.to_owned(),
                value,
                reason: reason.to_owned(),
            };
            if j.name.is_empty() || !j.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
                return Err(err("name", format!("{:?}", j.name), "must be non-empty letters, digits, '_' or '-'"));
            }
            if !names.insert(j.name.clone()) {
                return Err(err("name", format!("{:?}", j.name), "another judge has this name"));
            }
            if !(0.0..=1.0).contains(&j.sample_rate) {
                return Err(err("sample_rate", j.sample_rate.to_string(), "must be between 0 and 1"));
            }
            let selector = Selector {
                apps: j.apps.clone(),
                routes: j.routes.clone(),
                models: j.models.clone(),
                tags: j.tags.clone(),
                sample_rate: j.sample_rate,
                score_failed: j.score_failed,
            };
            match j.kind.as_str() {
                "rule" => {
                    let Some(spec) = &j.rule else {
                        return Err(err("rule", "(missing)".into(), "a rule judge needs rule = { … }"));
                    };
                    let rule = spec
                        .compile(base)
                        .map_err(|(key, value, reason)| err(&format!("rule.{key}"), value, &reason))?;
                    out.rules.push(ValidatedJudge { name: j.name.clone(), version: j.version.clone(), selector, rule });
                }
                "llm" => {
                    if j.model.is_empty() {
                        return Err(err("model", "\"\"".into(), "an llm judge needs a model"));
                    }
                    if j.rubric.is_empty() {
                        return Err(err("rubric", "\"\"".into(), "an llm judge needs a rubric"));
                    }
                    let rubric = crate::llm::Template::parse(&j.rubric).map_err(|reason| {
                        err("rubric", format!("{:?}", crate::llm::truncate(&j.rubric, 60)), &reason)
                    })?;
                    let scale = crate::llm::Scale::from_config(j.output.as_ref())
                        .map_err(|(key, value, reason)| err(&key, value, &reason))?;
                    let base_url = match (env.route_url)(&j.endpoint) {
                        Some(Ok(url)) => url,
                        Some(Err(reason)) => return Err(err("endpoint", format!("{:?}", j.endpoint), &reason)),
                        None if j.endpoint.contains("://") => j.endpoint.clone(),
                        None => {
                            return Err(err(
                                "endpoint",
                                format!("{:?}", j.endpoint),
                                "neither a route name nor an http(s) URL",
                            ))
                        }
                    };
                    let url = crate::llm::chat_url(&base_url)
                        .map_err(|reason| err("endpoint", format!("{:?}", j.endpoint), &reason))?;
                    let api_key = if j.api_key_env.is_empty() {
                        None
                    } else {
                        match (env.var)(&j.api_key_env) {
                            Some(k) if !k.is_empty() => Some(k),
                            _ => {
                                return Err(err(
                                    "api_key_env",
                                    format!("{:?}", j.api_key_env),
                                    "the variable is not set in the environment",
                                ))
                            }
                        }
                    };
                    if j.timeout_ms == 0 {
                        return Err(err("timeout_ms", "0".into(), "must be above 0"));
                    }
                    out.llm.push(crate::llm::LlmJudge {
                        name: j.name.clone(),
                        version: j.version.clone(),
                        selector,
                        endpoint: j.endpoint.clone(),
                        url,
                        model: j.model.clone(),
                        api_key,
                        rubric,
                        scale,
                        timeout: std::time::Duration::from_millis(j.timeout_ms),
                        max_retries: j.max_retries,
                        structured_output: j.structured_output,
                        temperature: j.temperature,
                    });
                }
                other => return Err(err("kind", format!("{other:?}"), "expected rule or llm")),
            }
        }
        for i in intents {
            let err = |key: &str, value: String, reason: &str| JudgeConfigError {
                what: "intent",
                name: i.app.clone(),
                key: key.to_owned(),
                value,
                reason: reason.to_owned(),
            };
            if i.app.is_empty() {
                return Err(err("app", "\"\"".into(), "an intent names its app"));
            }
            let selector = |rate: f64| Selector {
                apps: vec![i.app.clone()],
                routes: Vec::new(),
                models: Vec::new(),
                tags: BTreeMap::new(),
                sample_rate: rate,
                score_failed: true,
            };
            let mut add = |name: &str, spec: RuleSpec, key: &str| -> Result<(), JudgeConfigError> {
                let rule = spec.compile(base).map_err(|(_, value, reason)| err(key, value, &reason))?;
                out.rules.push(ValidatedJudge {
                    name: name.to_owned(),
                    version: "1".into(),
                    selector: selector(1.0),
                    rule,
                });
                Ok(())
            };
            if let Some(ms) = i.latency_budget_ms {
                add(
                    "intent_latency_budget",
                    RuleSpec { max_latency_ms: Some(ms), ..RuleSpec::default() },
                    "latency_budget_ms",
                )?;
            }
            if let Some(usd) = i.cost_budget_usd {
                add(
                    "intent_cost_envelope",
                    RuleSpec { max_cost_usd: Some(usd), ..RuleSpec::default() },
                    "cost_budget_usd",
                )?;
            }
            if !i.safety.is_empty() {
                add(
                    "intent_safety",
                    RuleSpec { not_regex: Some(crate::rule::OneOrMany::Many(i.safety.clone())), ..RuleSpec::default() },
                    "safety",
                )?;
            }
        }
        Ok(out)
    }
}

/// Resolves a path from the config file's folder.
pub fn resolve(base: &Path, p: &str) -> PathBuf {
    let path = Path::new(p);
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        base.join(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intents_become_budget_and_safety_judges() {
        let intents = vec![IntentConfig {
            app: "support-bot".into(),
            latency_budget_ms: Some(4000.0),
            cost_budget_usd: Some(0.01),
            safety: vec!["(?i)social security number".into(), "(?i)wire the money".into()],
            ..IntentConfig::default()
        }];
        let j = ValidatedJudges::build(&[], &intents, &JudgeEnv::plain(Path::new("."))).unwrap();
        let names: Vec<&str> = j.rules.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, vec!["intent_latency_budget", "intent_cost_envelope", "intent_safety"]);
        assert!(j
            .rules
            .iter()
            .all(|r| r.selector.apps == vec!["support-bot".to_owned()] && r.selector.sample_rate == 1.0));
        let bad = vec![IntentConfig { app: "x".into(), safety: vec!["(".into()], ..IntentConfig::default() }];
        let e = ValidatedJudges::build(&[], &bad, &JudgeEnv::plain(Path::new("."))).unwrap_err().to_string();
        assert!(e.starts_with("intent \"x\": safety = \"(\": regex parse error"), "{e}");
    }

    #[test]
    fn judge_errors_name_the_judge_and_key() {
        let j = |name: &str, kind: &str, rule: Option<RuleSpec>| JudgeConfig {
            name: name.into(),
            kind: kind.into(),
            rule,
            ..JudgeConfig::default()
        };
        let e = ValidatedJudges::build(
            &[j(
                "cites_plan",
                "rule",
                Some(RuleSpec { regex: Some(crate::rule::OneOrMany::One("(".into())), ..RuleSpec::default() }),
            )],
            &[],
            &JudgeEnv::plain(Path::new(".")),
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("judge \"cites_plan\": rule.regex = \"(\": regex parse error"), "{e}");
        let e = ValidatedJudges::build(&[j("x", "vibes", None)], &[], &JudgeEnv::plain(Path::new(".")))
            .unwrap_err()
            .to_string();
        assert_eq!(e, "judge \"x\": kind = \"vibes\": expected rule or llm");
        let e = ValidatedJudges::build(&[j("x", "rule", None)], &[], &JudgeEnv::plain(Path::new(".")))
            .unwrap_err()
            .to_string();
        assert_eq!(e, "judge \"x\": rule = (missing): a rule judge needs rule = { … }");
        let mut rate = j("x", "rule", Some(RuleSpec { json_valid: Some(true), ..RuleSpec::default() }));
        rate.sample_rate = 1.5;
        assert_eq!(
            ValidatedJudges::build(&[rate], &[], &JudgeEnv::plain(Path::new("."))).unwrap_err().to_string(),
            "judge \"x\": sample_rate = 1.5: must be between 0 and 1"
        );
    }
}
