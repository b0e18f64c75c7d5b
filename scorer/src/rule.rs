//! Rule judges: hard pass/fail checks on a finished call. Text rules test `output_text`
//! unless `field = "request_body"`. A verdict says why it passed or failed.

use std::path::Path;

use llmtap_ingest::record::{ErrorKind, TraceRecord};
use regex::Regex;
use serde::{Deserialize, Serialize};

/// One string or a list of them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn items(&self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

/// `true` for the built-in list, or your own list.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum DefaultOrList {
    Default(bool),
    List(Vec<String>),
}

/// `rule = { … }`: set exactly one rule (`field` and `tool_path_match` qualify it).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuleSpec {
    /// `output_text` (default) or `request_body`.
    pub field: Option<String>,
    pub json_valid: Option<bool>,
    /// Path of a JSON Schema file (relative to the config file).
    pub json_schema: Option<String>,
    /// Every pattern must match.
    pub regex: Option<OneOrMany>,
    /// No pattern may match.
    pub not_regex: Option<OneOrMany>,
    pub contains: Option<OneOrMany>,
    pub not_contains: Option<OneOrMany>,
    pub max_latency_ms: Option<f64>,
    pub max_ttft_ms: Option<f64>,
    pub max_cost_usd: Option<f64>,
    pub max_output_tokens: Option<u64>,
    pub finish_reason_in: Option<Vec<String>>,
    pub tool_called: Option<String>,
    pub tool_not_called: Option<String>,
    /// The expected sequence of tool calls.
    pub tool_path: Option<Vec<String>>,
    /// `exact` (default) or `subsequence`.
    pub tool_path_match: Option<String>,
    /// Fails answers that refuse (phrase list, or `true` for the built-in one).
    pub refusal: Option<DefaultOrList>,
    /// Fails text with personal data (patterns, or `true` for email, phone, card, SSN).
    pub pii: Option<DefaultOrList>,
}

pub const REFUSALS: &[&str] = &[
    "i can't help with",
    "i cannot help with",
    "i can't assist with",
    "i cannot assist with",
    "i'm sorry, but i can't",
    "i am sorry, but i cannot",
    "i'm unable to",
    "i am unable to",
    "i won't be able to",
    "as an ai",
];

const PII: &[(&str, &str)] = &[
    ("email", r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}"),
    ("phone", r"\+?\d{1,3}[\s.-]?\(?\d{3}\)?[\s.-]?\d{3}[\s.-]?\d{4}\b"),
    ("credit_card", r"\b(?:\d[ -]?){13,16}\b"),
    ("us_ssn", r"\b\d{3}-\d{2}-\d{4}\b"),
];

/// A compiled rule.
#[derive(Debug)]
pub enum RuleJudge {
    JsonValid { field: Field },
    JsonSchema { field: Field, schema: Box<jsonschema::Validator>, path: String },
    Regex { field: Field, all: Vec<Regex> },
    NotRegex { field: Field, none: Vec<Regex> },
    Contains { field: Field, all: Vec<String> },
    NotContains { field: Field, none: Vec<String> },
    MaxLatencyMs(f64),
    MaxTtftMs(f64),
    MaxCostUsd(f64),
    MaxOutputTokens(u64),
    FinishReasonIn(Vec<String>),
    ToolCalled(String),
    ToolNotCalled(String),
    ToolPath { expected: Vec<String>, subsequence: bool },
    Refusal { field: Field, phrases: Vec<String> },
    Pii { field: Field, patterns: Vec<(String, Regex)> },
}

/// Which text a rule reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    OutputText,
    RequestBody,
}

/// A rule's outcome.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    pub passed: bool,
    pub score: f64,
    pub label: String,
    pub reasoning: String,
}

impl Verdict {
    fn of(passed: bool, reasoning: String) -> Self {
        Verdict {
            passed,
            score: if passed { 1.0 } else { 0.0 },
            label: if passed { "pass" } else { "fail" }.into(),
            reasoning,
        }
    }
}

type CompileError = (&'static str, String, String);

fn regexes(key: &'static str, v: &OneOrMany) -> Result<Vec<Regex>, CompileError> {
    v.items().into_iter().map(|p| Regex::new(&p).map_err(|e| (key, format!("{p:?}"), e.to_string()))).collect()
}

impl RuleSpec {
    /// Checks that exactly one rule is set and compiles it; errors are (key, value, reason).
    pub fn compile(&self, base: &Path) -> Result<RuleJudge, CompileError> {
        let field = match self.field.as_deref() {
            None | Some("output_text") => Field::OutputText,
            Some("request_body") => Field::RequestBody,
            Some(other) => return Err(("field", format!("{other:?}"), "expected output_text or request_body".into())),
        };
        let mut rules: Vec<RuleJudge> = Vec::new();
        let mut keys: Vec<&str> = Vec::new();
        if let Some(v) = self.json_valid {
            if !v {
                return Err(("json_valid", "false".into(), "omit the rule instead".into()));
            }
            keys.push("json_valid");
            rules.push(RuleJudge::JsonValid { field });
        }
        if let Some(p) = &self.json_schema {
            keys.push("json_schema");
            let path = crate::config::resolve(base, p);
            let text = std::fs::read_to_string(&path)
                .map_err(|e| ("json_schema", format!("{p:?}"), format!("cannot read {}: {e}", path.display())))?;
            let schema: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| ("json_schema", format!("{p:?}"), format!("not JSON: {e}")))?;
            let v = jsonschema::validator_for(&schema)
                .map_err(|e| ("json_schema", format!("{p:?}"), format!("not a valid JSON Schema: {e}")))?;
            rules.push(RuleJudge::JsonSchema { field, schema: Box::new(v), path: p.clone() });
        }
        if let Some(v) = &self.regex {
            keys.push("regex");
            rules.push(RuleJudge::Regex { field, all: regexes("regex", v)? });
        }
        if let Some(v) = &self.not_regex {
            keys.push("not_regex");
            rules.push(RuleJudge::NotRegex { field, none: regexes("not_regex", v)? });
        }
        if let Some(v) = &self.contains {
            keys.push("contains");
            rules.push(RuleJudge::Contains { field, all: v.items() });
        }
        if let Some(v) = &self.not_contains {
            keys.push("not_contains");
            rules.push(RuleJudge::NotContains { field, none: v.items() });
        }
        for (key, v, mk) in [
            ("max_latency_ms", self.max_latency_ms, RuleJudge::MaxLatencyMs as fn(f64) -> RuleJudge),
            ("max_ttft_ms", self.max_ttft_ms, RuleJudge::MaxTtftMs),
            ("max_cost_usd", self.max_cost_usd, RuleJudge::MaxCostUsd),
        ] {
            if let Some(x) = v {
                if !(x.is_finite() && x >= 0.0) {
                    return Err((key, x.to_string(), "must be a number >= 0".into()));
                }
                keys.push(key);
                rules.push(mk(x));
            }
        }
        if let Some(n) = self.max_output_tokens {
            keys.push("max_output_tokens");
            rules.push(RuleJudge::MaxOutputTokens(n));
        }
        if let Some(v) = &self.finish_reason_in {
            keys.push("finish_reason_in");
            rules.push(RuleJudge::FinishReasonIn(v.clone()));
        }
        if let Some(t) = &self.tool_called {
            keys.push("tool_called");
            rules.push(RuleJudge::ToolCalled(t.clone()));
        }
        if let Some(t) = &self.tool_not_called {
            keys.push("tool_not_called");
            rules.push(RuleJudge::ToolNotCalled(t.clone()));
        }
        if let Some(p) = &self.tool_path {
            keys.push("tool_path");
            let subsequence = match self.tool_path_match.as_deref() {
                None | Some("exact") => false,
                Some("subsequence") => true,
                Some(other) => {
                    return Err(("tool_path_match", format!("{other:?}"), "expected exact or subsequence".into()))
                }
            };
            rules.push(RuleJudge::ToolPath { expected: p.clone(), subsequence });
        }
        if let Some(r) = &self.refusal {
            keys.push("refusal");
            let phrases = match r {
                DefaultOrList::Default(true) => REFUSALS.iter().map(|s| s.to_string()).collect(),
                DefaultOrList::Default(false) => {
                    return Err(("refusal", "false".into(), "omit the rule instead".into()))
                }
                DefaultOrList::List(l) => l.iter().map(|s| s.to_lowercase()).collect(),
            };
            rules.push(RuleJudge::Refusal { field, phrases });
        }
        if let Some(p) = &self.pii {
            keys.push("pii");
            let patterns = match p {
                DefaultOrList::Default(true) => {
                    PII.iter().map(|(n, p)| (n.to_string(), p.to_string())).collect::<Vec<_>>()
                }
                DefaultOrList::Default(false) => return Err(("pii", "false".into(), "omit the rule instead".into())),
                DefaultOrList::List(l) => l.iter().map(|p| (p.clone(), p.clone())).collect(),
            };
            let patterns = patterns
                .into_iter()
                .map(|(n, p)| Regex::new(&p).map(|r| (n, r)).map_err(|e| ("pii", format!("{p:?}"), e.to_string())))
                .collect::<Result<_, _>>()?;
            rules.push(RuleJudge::Pii { field, patterns });
        }
        if self.tool_path_match.is_some() && self.tool_path.is_none() {
            return Err(("tool_path_match", format!("{:?}", self.tool_path_match), "only qualifies tool_path".into()));
        }
        match rules.len() {
            1 => Ok(rules.remove(0)),
            0 => Err(("", "{}".into(), "set exactly one rule (json_valid, json_schema, regex, not_regex, contains, not_contains, max_latency_ms, max_ttft_ms, max_cost_usd, max_output_tokens, finish_reason_in, tool_called, tool_not_called, tool_path, refusal, pii)".into())),
            _ => Err(("", format!("{{ {} }}", keys.join(", ")), "set exactly one rule per judge".into())),
        }
    }
}

fn text(r: &TraceRecord, f: Field) -> &str {
    match f {
        Field::OutputText => &r.output_text,
        Field::RequestBody => &r.request_body,
    }
}

fn is_subsequence(want: &[String], have: &[String]) -> bool {
    let mut it = have.iter();
    want.iter().all(|w| it.any(|h| h == w))
}

impl RuleJudge {
    /// Judges one call.
    pub fn evaluate(&self, r: &TraceRecord) -> Verdict {
        match self {
            RuleJudge::JsonValid { field } => match serde_json::from_str::<serde_json::Value>(text(r, *field)) {
                Ok(_) => Verdict::of(true, "valid JSON".into()),
                Err(e) => Verdict::of(false, format!("not valid JSON: {e}")),
            },
            RuleJudge::JsonSchema { field, schema, path } => {
                match serde_json::from_str::<serde_json::Value>(text(r, *field)) {
                    Err(e) => Verdict::of(false, format!("not valid JSON: {e}")),
                    Ok(v) => {
                        let errors: Vec<String> =
                            schema.iter_errors(&v).take(3).map(|e| format!("{} at {}", e, e.instance_path())).collect();
                        if errors.is_empty() {
                            Verdict::of(true, format!("matches {path}"))
                        } else {
                            Verdict::of(false, format!("does not match {path}: {}", errors.join("; ")))
                        }
                    }
                }
            }
            RuleJudge::Regex { field, all } => match all.iter().find(|re| !re.is_match(text(r, *field))) {
                None => Verdict::of(true, "every pattern matches".into()),
                Some(re) => Verdict::of(false, format!("no match for {}", re.as_str())),
            },
            RuleJudge::NotRegex { field, none } => match none.iter().find(|re| re.is_match(text(r, *field))) {
                None => Verdict::of(true, "no forbidden pattern matches".into()),
                Some(re) => Verdict::of(false, format!("matches forbidden {}", re.as_str())),
            },
            RuleJudge::Contains { field, all } => match all.iter().find(|s| !text(r, *field).contains(s.as_str())) {
                None => Verdict::of(true, "contains every string".into()),
                Some(s) => Verdict::of(false, format!("does not contain {s:?}")),
            },
            RuleJudge::NotContains { field, none } => {
                match none.iter().find(|s| text(r, *field).contains(s.as_str())) {
                    None => Verdict::of(true, "contains none of the strings".into()),
                    Some(s) => Verdict::of(false, format!("contains {s:?}")),
                }
            }
            RuleJudge::MaxLatencyMs(max) => {
                Verdict::of(r.duration_ms <= *max, format!("duration {:.1} ms, budget {max} ms", r.duration_ms))
            }
            RuleJudge::MaxTtftMs(max) => {
                if r.ttft_ms <= 0.0 {
                    Verdict::of(false, "no first token".into())
                } else {
                    Verdict::of(r.ttft_ms <= *max, format!("ttft {:.1} ms, budget {max} ms", r.ttft_ms))
                }
            }
            RuleJudge::MaxCostUsd(max) => {
                Verdict::of(r.cost_usd <= *max, format!("cost ${:.6}, budget ${max}", r.cost_usd))
            }
            RuleJudge::MaxOutputTokens(max) => {
                Verdict::of(r.output_tokens <= *max, format!("{} output tokens, limit {max}", r.output_tokens))
            }
            RuleJudge::FinishReasonIn(allowed) => Verdict::of(
                allowed.contains(&r.finish_reason),
                format!("finish reason {:?}, allowed {allowed:?}", r.finish_reason),
            ),
            RuleJudge::ToolCalled(t) => Verdict::of(r.tool_calls.contains(t), format!("tool calls {:?}", r.tool_calls)),
            RuleJudge::ToolNotCalled(t) => {
                Verdict::of(!r.tool_calls.contains(t), format!("tool calls {:?}", r.tool_calls))
            }
            RuleJudge::ToolPath { expected, subsequence } => {
                let ok = if *subsequence { is_subsequence(expected, &r.tool_calls) } else { &r.tool_calls == expected };
                let how = if *subsequence { "to contain in order" } else { "to be" };
                Verdict::of(ok, format!("tool path {:?}, expected {how} {expected:?}", r.tool_calls))
            }
            RuleJudge::Refusal { field, phrases } => {
                let t = text(r, *field).to_lowercase();
                match phrases.iter().find(|p| t.contains(p.as_str())) {
                    None => Verdict { label: "answered".into(), ..Verdict::of(true, "no refusal phrase".into()) },
                    Some(p) => {
                        Verdict { label: "refusal".into(), ..Verdict::of(false, format!("refusal phrase {p:?}")) }
                    }
                }
            }
            RuleJudge::Pii { field, patterns } => match patterns.iter().find(|(_, re)| re.is_match(text(r, *field))) {
                None => Verdict::of(true, "no personal data found".into()),
                Some((name, _)) => Verdict { label: "pii".into(), ..Verdict::of(false, format!("found {name}")) },
            },
        }
    }
}

/// Whether a call failed (judged only by judges that ask for failed calls).
pub fn failed(r: &TraceRecord) -> bool {
    r.error_kind != ErrorKind::None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec() -> TraceRecord {
        TraceRecord {
            output_text: r#"{"answer":"Your plan: Pro","refund":false}"#.into(),
            request_body: r#"{"messages":[{"role":"user","content":"my email is ann@example.com"}]}"#.into(),
            duration_ms: 1200.0,
            ttft_ms: 300.0,
            cost_usd: 0.004,
            output_tokens: 120,
            finish_reason: "stop".into(),
            tool_calls: vec!["lookup_account".into(), "search_kb".into(), "answer".into()],
            ..TraceRecord::default()
        }
    }

    fn spec(toml_text: &str) -> RuleSpec {
        let v: toml::Value = toml::from_str(toml_text).unwrap();
        v.try_into().unwrap()
    }

    #[test]
    fn every_rule_passes_and_fails_as_it_should() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("answer.json"),
            r#"{"type":"object","required":["answer","refund"],"properties":{"refund":{"type":"boolean"}}}"#,
        )
        .unwrap();
        std::fs::write(dir.path().join("strict.json"), r#"{"type":"object","required":["citation"]}"#).unwrap();
        let r = rec();
        let table: &[(&str, bool, &str)] = &[
            ("json_valid = true", true, "valid JSON"),
            ("json_schema = 'answer.json'", true, "matches answer.json"),
            ("json_schema = 'strict.json'", false, "does not match strict.json: \"citation\" is a required property at "),
            ("regex = '(?i)plan:'", true, "every pattern matches"),
            ("regex = ['plan', 'refund', 'invoice']", false, "no match for invoice"),
            ("not_regex = '(?i)wire the money'", true, "no forbidden pattern matches"),
            ("not_regex = 'Pro'", false, "matches forbidden Pro"),
            ("contains = 'Pro'", true, "contains every string"),
            ("not_contains = ['Pro']", false, "contains \"Pro\""),
            ("max_latency_ms = 1500", true, "duration 1200.0 ms, budget 1500 ms"),
            ("max_latency_ms = 1000", false, "duration 1200.0 ms, budget 1000 ms"),
            ("max_ttft_ms = 250", false, "ttft 300.0 ms, budget 250 ms"),
            ("max_cost_usd = 0.01", true, "cost $0.004000, budget $0.01"),
            ("max_output_tokens = 100", false, "120 output tokens, limit 100"),
            ("finish_reason_in = ['stop', 'end_turn']", true, "finish reason \"stop\", allowed [\"stop\", \"end_turn\"]"),
            ("finish_reason_in = ['tool_calls']", false, "finish reason \"stop\", allowed [\"tool_calls\"]"),
            ("tool_called = 'search_kb'", true, "tool calls [\"lookup_account\", \"search_kb\", \"answer\"]"),
            ("tool_not_called = 'search_kb'", false, "tool calls [\"lookup_account\", \"search_kb\", \"answer\"]"),
            ("tool_path = ['lookup_account', 'answer']", false, "tool path [\"lookup_account\", \"search_kb\", \"answer\"], expected to be [\"lookup_account\", \"answer\"]"),
            ("tool_path = ['lookup_account', 'answer']\ntool_path_match = 'subsequence'", true, "tool path [\"lookup_account\", \"search_kb\", \"answer\"], expected to contain in order [\"lookup_account\", \"answer\"]"),
            ("refusal = true", true, "no refusal phrase"),
            ("pii = true", true, "no personal data found"),
            ("pii = true\nfield = 'request_body'", false, "found email"),
        ];
        for (src, passed, reasoning) in table {
            let judge = spec(src).compile(dir.path()).unwrap_or_else(|e| panic!("{src}: {e:?}"));
            let v = judge.evaluate(&r);
            assert_eq!(v.passed, *passed, "{src}: {v:?}");
            assert_eq!(v.score, if *passed { 1.0 } else { 0.0 });
            assert!(v.reasoning.starts_with(reasoning), "{src}: {:?} does not start with {reasoning:?}", v.reasoning);
        }
        let refusing = TraceRecord { output_text: "I'm sorry, but I can't help with that.".into(), ..rec() };
        let v = spec("refusal = true").compile(dir.path()).unwrap().evaluate(&refusing);
        assert_eq!((v.passed, v.label.as_str()), (false, "refusal"));
        let no_ttft = TraceRecord { ttft_ms: 0.0, ..rec() };
        assert!(!spec("max_ttft_ms = 1000").compile(dir.path()).unwrap().evaluate(&no_ttft).passed);
    }

    #[test]
    fn bad_rules_say_which_key_and_why() {
        let base = Path::new("/nonexistent");
        let err = |s: &str| spec(s).compile(base).unwrap_err();
        assert_eq!(err("regex = '('").0, "regex");
        assert!(err("regex = '('").2.contains("regex parse error"));
        let e = err("json_schema = 'schemas/answer.json'");
        assert_eq!((e.0, e.1.as_str()), ("json_schema", "\"schemas/answer.json\""));
        assert!(e.2.starts_with("cannot read /nonexistent/schemas/answer.json"), "{}", e.2);
        let e = err("regex = 'a'\ncontains = 'b'");
        assert_eq!(e.2, "set exactly one rule per judge");
        assert!(err("").2.starts_with("set exactly one rule"));
        assert_eq!(err("tool_path = ['a']\ntool_path_match = 'fuzzy'").0, "tool_path_match");
        assert!(toml::from_str::<RuleSpec>("regx = 'a'").unwrap_err().to_string().contains("unknown field `regx`"));
    }
}
