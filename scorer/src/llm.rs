//! LLM judges: a rubric rendered from the call, sent to any OpenAI-compatible chat endpoint,
//! and the answer turned into a verdict.
//!
//! Design notes
//! - Structured output is asked for with a JSON-schema `response_format`; a server that
//!   rejects it (a 400 naming `response_format`) is asked again without it, and the endpoint
//!   is remembered as plain-text only. Either way the answer goes through a tolerant parser:
//!   JSON, JSON inside prose or code fences, then phrases such as `Score: 4/5` or `Verdict:
//!   fail`. Anything it cannot read is an error verdict carrying the text, never a guess.
//! - Every call is bounded: a timeout per attempt, retries with exponential backoff and jitter
//!   (honouring `Retry-After`) on 429, 5xx, timeouts and connection errors, a concurrency
//!   limit and a request-rate limit shared by every judge on the same endpoint.
//! - A judge's own calls carry `x-llmtap-score: off` and the tag `llmtap_judge`, so a judge
//!   pointed back through llmtap is traced but never scored.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use llmtap_ingest::pricing::PriceTable;
use llmtap_ingest::provider::Usage;
use llmtap_ingest::record::{ScoreRecord, Timestamp, TraceRecord};
use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::config::{IntentConfig, OutputConfig, Selector};

/// The HTTP client judges share with the proxy (pooled, rustls, h1/h2 by ALPN).
pub type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// The tag every judge request carries; records with it are never scored.
pub const JUDGE_TAG: &str = "llmtap_judge";

/// Largest judge response read.
const MAX_RESPONSE: usize = 4 << 20;
/// Longest reasoning or unreadable answer stored in a verdict.
const MAX_REASONING: usize = 4096;

/// The rubric variables.
pub const VARIABLES: &[&str] = &["input", "messages", "output", "tool_calls", "objective", "target_user", "edge_cases"];

/// A rubric split into text and `{{variable}}` slots.
#[derive(Clone, Debug, PartialEq)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Clone, Debug, PartialEq)]
enum Part {
    Text(String),
    Var(&'static str),
}

impl Template {
    /// Parses `{{ name }}` slots; an unknown name or an unclosed `{{` is an error.
    pub fn parse(src: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut rest = src;
        while let Some(open) = rest.find("{{") {
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_owned()));
            }
            let after = &rest[open + 2..];
            let Some(close) = after.find("}}") else {
                return Err(format!("unclosed {{{{ at byte {}", src.len() - rest.len() + open));
            };
            let name = after[..close].trim();
            let Some(var) = VARIABLES.iter().find(|v| **v == name) else {
                return Err(format!("unknown variable {{{{{name}}}}}; known: {}", VARIABLES.join(", ")));
            };
            parts.push(Part::Var(var));
            rest = &after[close + 2..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_owned()));
        }
        Ok(Template { parts })
    }

    fn uses(&self, var: &str) -> bool {
        self.parts.iter().any(|p| matches!(p, Part::Var(v) if *v == var))
    }

    /// Renders the rubric for one call.
    pub fn render(&self, r: &TraceRecord, intent: Option<&IntentConfig>) -> Result<String, String> {
        let conversation = if self.uses("input") || self.uses("messages") {
            if r.request_body.is_empty() {
                return Err("the rubric needs the request, but its body was not captured (capture.bodies)".into());
            }
            let turns = conversation(&r.request_body);
            if turns.is_empty() {
                return Err("no messages found in the captured request body".into());
            }
            turns
        } else {
            Vec::new()
        };
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Text(t) => out.push_str(t),
                Part::Var("input") => {
                    let last = conversation.iter().rev().find(|(role, _)| role == "user").or(conversation.last());
                    out.push_str(last.map(|(_, t)| t.as_str()).unwrap_or(""));
                }
                Part::Var("messages") => {
                    for (i, (role, text)) in conversation.iter().enumerate() {
                        if i > 0 {
                            out.push_str("\n\n");
                        }
                        out.push_str(role);
                        out.push_str(": ");
                        out.push_str(text);
                    }
                }
                Part::Var("output") => out.push_str(&r.output_text),
                Part::Var("tool_calls") => {
                    if r.tool_calls.is_empty() {
                        out.push_str("(none)");
                    }
                    for (i, name) in r.tool_calls.iter().enumerate() {
                        if i > 0 {
                            out.push('\n');
                        }
                        out.push_str(name);
                        out.push('(');
                        out.push_str(r.tool_call_args.get(i).map(String::as_str).unwrap_or(""));
                        out.push(')');
                    }
                }
                Part::Var("objective") => out.push_str(intent.map(|i| i.objective.as_str()).unwrap_or("")),
                Part::Var("target_user") => out.push_str(intent.map(|i| i.target_user.as_str()).unwrap_or("")),
                Part::Var("edge_cases") => {
                    for (i, e) in intent.map(|i| i.edge_cases.as_slice()).unwrap_or(&[]).iter().enumerate() {
                        if i > 0 {
                            out.push('\n');
                        }
                        out.push_str("- ");
                        out.push_str(e);
                    }
                }
                Part::Var(_) => {}
            }
        }
        Ok(out)
    }
}

/// (role, text) turns of a captured request: OpenAI and Anthropic `messages` (plus Anthropic
/// `system`), Gemini `contents` (plus `systemInstruction`), Responses `instructions`/`input`.
pub fn conversation(body: &str) -> Vec<(String, String)> {
    let Ok(v) = serde_json::from_str::<Value>(body) else { return Vec::new() };
    fn text(content: &Value) -> String {
        match content {
            Value::String(s) => s.clone(),
            Value::Array(parts) => parts
                .iter()
                .filter_map(|p| match p {
                    Value::String(s) => Some(s.as_str()),
                    _ => p.get("text").and_then(Value::as_str),
                })
                .collect::<Vec<_>>()
                .join("\n"),
            Value::Object(_) => content.get("parts").map(text).unwrap_or_default(),
            _ => String::new(),
        }
    }
    let mut out = Vec::new();
    for key in ["system", "systemInstruction", "instructions"] {
        if let Some(s) = v.get(key) {
            let t = text(s);
            if !t.is_empty() {
                out.push(("system".to_owned(), t));
            }
        }
    }
    let turns = |items: &Vec<Value>, content_key: &str, out: &mut Vec<(String, String)>| {
        for m in items {
            let role = m.get("role").and_then(Value::as_str).unwrap_or("user");
            let t = text(m.get(content_key).unwrap_or(&Value::Null));
            if !t.is_empty() {
                out.push((if role == "model" { "assistant".into() } else { role.to_owned() }, t));
            }
        }
    };
    if let Some(m) = v.get("messages").and_then(Value::as_array) {
        turns(m, "content", &mut out);
    }
    if let Some(c) = v.get("contents").and_then(Value::as_array) {
        turns(c, "parts", &mut out);
    }
    match v.get("input") {
        Some(Value::String(s)) => out.push(("user".into(), s.clone())),
        Some(Value::Array(items)) => turns(items, "content", &mut out),
        _ => {}
    }
    if let Some(p) = v.get("prompt").and_then(Value::as_str) {
        out.push(("user".into(), p.to_owned()));
    }
    out
}

/// What a judge's answer means.
#[derive(Clone, Debug, PartialEq)]
pub enum Scale {
    /// A number in `min..=max`; passes at `pass_at` or above.
    Numeric { min: f64, max: f64, pass_at: f64, review_band: Option<f64> },
    /// Pass or fail (score 1 or 0).
    Boolean,
    /// One of the labels, each mapped to a score; passes at `pass_at` or above.
    Categorical { choices: Vec<(String, f64)>, pass_at: f64, review_band: Option<f64> },
}

impl Scale {
    /// Checks `output = { … }`; `Err((key, value, reason))`.
    pub fn from_config(o: Option<&OutputConfig>) -> Result<Scale, (String, String, String)> {
        let default = OutputConfig { kind: "numeric".into(), ..OutputConfig::default() };
        let o = o.unwrap_or(&default);
        let bad = |k: &str, v: String, why: &str| (format!("output.{k}"), v, why.to_owned());
        let band = match o.review_band {
            Some(b) if !(b >= 0.0 && b.is_finite()) => return Err(bad("review_band", b.to_string(), "must be >= 0")),
            b => b,
        };
        match o.kind.as_str() {
            "numeric" | "" => {
                let (min, max) = (o.min.unwrap_or(1.0), o.max.unwrap_or(5.0));
                if min.partial_cmp(&max) != Some(std::cmp::Ordering::Less) {
                    return Err(bad("max", max.to_string(), "must be greater than output.min"));
                }
                let pass_at = o.pass_at.unwrap_or((min + max) / 2.0);
                if !(min..=max).contains(&pass_at) {
                    return Err(bad("pass_at", pass_at.to_string(), "must lie between output.min and output.max"));
                }
                Ok(Scale::Numeric { min, max, pass_at, review_band: band })
            }
            "boolean" => Ok(Scale::Boolean),
            "categorical" => {
                if o.choices.len() < 2 {
                    return Err(bad("choices", format!("{:?}", o.choices), "a categorical judge needs two or more"));
                }
                let choices: Vec<(String, f64)> = o.choices.iter().map(|(k, v)| (k.clone(), *v)).collect();
                let lo = choices.iter().map(|c| c.1).fold(f64::INFINITY, f64::min);
                let hi = choices.iter().map(|c| c.1).fold(f64::NEG_INFINITY, f64::max);
                Ok(Scale::Categorical { choices, pass_at: o.pass_at.unwrap_or((lo + hi) / 2.0), review_band: band })
            }
            other => Err(bad("kind", format!("{other:?}"), "expected numeric, boolean or categorical")),
        }
    }

    /// The JSON schema of the answer; reasoning comes first so the model reasons, then rates.
    fn schema(&self) -> Value {
        let verdict = match self {
            Scale::Numeric { min, max, .. } => json!({"type": "number", "minimum": min, "maximum": max}),
            Scale::Boolean => json!({"type": "boolean"}),
            Scale::Categorical { choices, .. } => {
                json!({"type": "string", "enum": choices.iter().map(|c| c.0.as_str()).collect::<Vec<_>>()})
            }
        };
        let key = self.key();
        json!({
            "type": "object",
            "properties": {"reasoning": {"type": "string"}, key: verdict},
            "required": ["reasoning", key],
            "additionalProperties": false,
        })
    }

    fn key(&self) -> &'static str {
        match self {
            Scale::Numeric { .. } => "score",
            Scale::Boolean => "pass",
            Scale::Categorical { .. } => "label",
        }
    }

    /// What the system prompt tells the judge to answer.
    fn instruction(&self) -> String {
        let shape = match self {
            Scale::Numeric { min, max, .. } => format!("\"score\": a number from {min} to {max}"),
            Scale::Boolean => "\"pass\": true or false".to_owned(),
            Scale::Categorical { choices, .. } => format!(
                "\"label\": exactly one of {}",
                choices.iter().map(|c| format!("\"{}\"", c.0)).collect::<Vec<_>>().join(", ")
            ),
        };
        format!(
            "You are an evaluator. Follow the rubric. Answer with only a JSON object with two keys: \
             \"reasoning\": a short explanation, then {shape}."
        )
    }
}

/// A parsed answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Parsed {
    pub score: f64,
    pub passed: bool,
    pub label: String,
    pub reasoning: String,
    pub needs_review: bool,
}

pub fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// JSON objects in `text`: the whole text, then each balanced `{…}` found in it.
fn json_objects(text: &str) -> Vec<serde_json::Map<String, Value>> {
    let t = text.trim();
    if let Ok(Value::Object(m)) = serde_json::from_str(t) {
        return vec![m];
    }
    let mut out = Vec::new();
    let bytes = t.as_bytes();
    let mut start = 0;
    while let Some(off) = t[start..].find('{') {
        let open = start + off;
        let (mut depth, mut in_str, mut esc) = (0i32, false, false);
        let mut end = None;
        for (i, &b) in bytes.iter().enumerate().skip(open) {
            if in_str {
                match (esc, b) {
                    (true, _) => esc = false,
                    (false, b'\\') => esc = true,
                    (false, b'"') => in_str = false,
                    _ => {}
                }
                continue;
            }
            match b {
                b'"' => in_str = true,
                b'{' => depth += 1,
                b'}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = Some(i);
                        break;
                    }
                }
                _ => {}
            }
        }
        let Some(end) = end else { break };
        if let Ok(Value::Object(m)) = serde_json::from_str(&t[open..=end]) {
            out.push(m);
            start = end + 1;
        } else {
            start = open + 1;
        }
    }
    out
}

fn field<'a>(m: &'a serde_json::Map<String, Value>, names: &[&str]) -> Option<&'a Value> {
    names.iter().find_map(|n| m.iter().find(|(k, _)| k.eq_ignore_ascii_case(n)).map(|(_, v)| v))
}

fn as_number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().trim_end_matches(|c: char| c == '.' || c.is_whitespace()).parse().ok(),
        _ => None,
    }
}

fn as_bool(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        Value::Number(n) => n.as_f64().map(|x| x >= 0.5),
        Value::String(s) => word_bool(s.trim()),
        _ => None,
    }
}

fn word_bool(w: &str) -> Option<bool> {
    match w.to_ascii_lowercase().trim_matches(|c: char| !c.is_ascii_alphanumeric()) {
        "pass" | "passed" | "yes" | "true" | "correct" | "good" => Some(true),
        "fail" | "failed" | "no" | "false" | "incorrect" | "bad" => Some(false),
        _ => None,
    }
}

struct Patterns {
    score: Regex,
    ratio: Regex,
    verdict: Regex,
    bool_word: Regex,
    reasoning: Regex,
}

fn patterns() -> &'static Patterns {
    static P: std::sync::OnceLock<Patterns> = std::sync::OnceLock::new();
    #[allow(clippy::expect_used)] // literals, checked by the tests
    P.get_or_init(|| Patterns {
        score: Regex::new(r"(?i)\b(?:score|rating|grade)\b\s*(?:is|of|=|:)?\s*[*_`]*\s*(-?\d+(?:\.\d+)?)")
            .expect("score pattern"),
        ratio: Regex::new(r"(?i)(-?\d+(?:\.\d+)?)\s*[*_`]*\s*(?:/|out of)\s*\d+(?:\.\d+)?").expect("ratio pattern"),
        verdict: Regex::new(
            r"(?i)\b(?:verdict|result|answer|label|category|decision)\b\s*(?:is|=|:)?\s*[*_`]*\s*([A-Za-z_-]+)",
        )
        .expect("verdict pattern"),
        bool_word: Regex::new(r"(?i)\b(pass|passed|fail|failed)\b").expect("bool pattern"),
        reasoning: Regex::new(r"(?is)\b(?:reasoning|explanation|rationale)\b\s*[:=]\s*(.+?)(?:\n\s*\n|$)")
            .expect("reasoning pattern"),
    })
}

/// Reads a judge's answer on `scale`: JSON first, then the phrases judges write in prose.
pub fn parse_verdict(scale: &Scale, content: &str) -> Result<Parsed, String> {
    let objects = json_objects(content);
    let mut reasoning = objects
        .iter()
        .find_map(|m| field(m, &["reasoning", "explanation", "rationale", "reason"]).and_then(Value::as_str))
        .map(str::to_owned);
    let p = patterns();
    let unreadable = || format!("unreadable judge answer: {:?}", truncate(content.trim(), 300));
    let (score, passed, label) = match scale {
        Scale::Numeric { min, max, pass_at, .. } => {
            let from_json =
                objects.iter().find_map(|m| field(m, &["score", "rating", "value", "grade"]).and_then(as_number));
            let score = from_json
                .or_else(|| p.score.captures(content).and_then(|c| c[1].parse().ok()))
                .or_else(|| p.ratio.captures(content).and_then(|c| c[1].parse().ok()))
                .or_else(|| content.trim().trim_end_matches('.').parse().ok())
                .ok_or_else(unreadable)?;
            if !(*min..=*max).contains(&score) {
                return Err(format!("score {score} is outside {min}..={max}"));
            }
            (score, score >= *pass_at, String::new())
        }
        Scale::Boolean => {
            let from_json = objects
                .iter()
                .find_map(|m| field(m, &["pass", "passed", "verdict", "result", "answer"]).and_then(as_bool));
            let from_text = || {
                if let Some(b) = p.verdict.captures(content).and_then(|c| word_bool(&c[1])) {
                    return Some(b);
                }
                // Prose with only one kind of pass/fail word.
                let words: Vec<bool> = p.bool_word.captures_iter(content).filter_map(|c| word_bool(&c[1])).collect();
                match words.first() {
                    Some(&first) if words.iter().all(|w| *w == first) => Some(first),
                    _ => word_bool(content.trim()),
                }
            };
            let b = from_json.or_else(from_text).ok_or_else(unreadable)?;
            (if b { 1.0 } else { 0.0 }, b, if b { "pass" } else { "fail" }.to_owned())
        }
        Scale::Categorical { choices, pass_at, .. } => {
            let find = |s: &str| {
                let s = s.trim().trim_matches(|c: char| !c.is_alphanumeric() && c != '_' && c != '-');
                choices.iter().find(|c| c.0.eq_ignore_ascii_case(s))
            };
            let from_json = objects.iter().find_map(|m| {
                field(m, &["label", "category", "choice", "verdict", "answer"]).and_then(Value::as_str).and_then(find)
            });
            let from_text = || {
                if let Some(c) = p.verdict.captures(content).and_then(|c| find(&c[1])) {
                    return Some(c);
                }
                let lower = content.to_ascii_lowercase();
                let mentioned: Vec<&(String, f64)> = choices
                    .iter()
                    .filter(|c| {
                        Regex::new(&format!(r"\b{}\b", regex::escape(&c.0.to_ascii_lowercase())))
                            .is_ok_and(|re| re.is_match(&lower))
                    })
                    .collect();
                (mentioned.len() == 1).then(|| mentioned[0])
            };
            let c = from_json.or_else(from_text).ok_or_else(unreadable)?;
            (c.1, c.1 >= *pass_at, c.0.clone())
        }
    };
    if reasoning.is_none() {
        reasoning = p.reasoning.captures(content).map(|c| c[1].trim().to_owned());
    }
    let reasoning = truncate(reasoning.as_deref().unwrap_or(content.trim()), MAX_REASONING);
    let needs_review = match scale {
        Scale::Numeric { pass_at, review_band: Some(b), .. }
        | Scale::Categorical { pass_at, review_band: Some(b), .. } => (score - pass_at).abs() <= *b,
        _ => false,
    };
    Ok(Parsed { score, passed, label, reasoning, needs_review })
}

/// `[scorer.endpoints."<endpoint>"]`: limits shared by the judges calling one endpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EndpointLimits {
    /// Judge requests in flight at once.
    pub concurrency: usize,
    /// Requests started per second; 0 for no limit.
    pub rate_limit_rps: f64,
}

impl Default for EndpointLimits {
    fn default() -> Self {
        EndpointLimits { concurrency: 4, rate_limit_rps: 0.0 }
    }
}

/// A checked LLM judge.
#[derive(Clone, Debug)]
pub struct LlmJudge {
    pub name: String,
    pub version: String,
    pub selector: Selector,
    /// The endpoint as configured (a route name or URL): the key of its limits.
    pub endpoint: String,
    /// `…/chat/completions`.
    pub url: Uri,
    pub model: String,
    /// Read from `api_key_env` at start; never logged.
    pub api_key: Option<String>,
    pub rubric: Template,
    pub scale: Scale,
    pub timeout: Duration,
    pub max_retries: u32,
    pub structured_output: bool,
    pub temperature: f64,
}

/// The chat-completions URL of an OpenAI-compatible base URL: `…/chat/completions` is kept,
/// `…/v1` gets `/chat/completions`, anything else `/v1/chat/completions`.
pub fn chat_url(base: &str) -> Result<Uri, String> {
    let b = base.trim_end_matches('/');
    let full =
        if b.ends_with("/chat/completions") {
            b.to_owned()
        } else if b.rsplit('/').next().is_some_and(|last| {
            last.len() >= 2 && last.starts_with('v') && last[1..].chars().all(|c| c.is_ascii_digit())
        }) {
            format!("{b}/chat/completions")
        } else {
            format!("{b}/v1/chat/completions")
        };
    let uri: Uri = full.parse().map_err(|_| "not a URL".to_owned())?;
    match uri.scheme_str() {
        Some("http") | Some("https") if uri.authority().is_some() => Ok(uri),
        _ => Err("expected an http(s) URL with a host, or a route name".into()),
    }
}

/// Shared state of one endpoint: its limits and whether it takes `response_format`.
struct Endpoint {
    permits: tokio::sync::Semaphore,
    interval: Option<Duration>,
    next_start: tokio::sync::Mutex<Instant>,
    no_schema: AtomicBool,
}

impl Endpoint {
    /// Waits for the rate limit's next slot.
    async fn pace(&self) {
        let Some(interval) = self.interval else { return };
        let slot = {
            let mut next = self.next_start.lock().await;
            let now = Instant::now();
            let slot = (*next).max(now);
            *next = slot + interval;
            slot
        };
        tokio::time::sleep_until(slot.into()).await;
    }
}

/// Calls LLM judges: owns the client, the per-endpoint limits and the price table.
pub struct LlmCaller {
    client: HttpClient,
    endpoints: HashMap<String, Arc<Endpoint>>,
    prices: Arc<PriceTable>,
    intents: BTreeMap<String, IntentConfig>,
    /// First retry delay; doubles per attempt, with jitter.
    pub backoff: Duration,
}

/// The verdict skeleton for `r`.
pub fn blank_verdict(name: &str, version: &str, kind: &str, r: &TraceRecord) -> ScoreRecord {
    ScoreRecord {
        ts: Timestamp::now(),
        trace_id: r.trace_id.clone(),
        span_id: r.span_id.clone(),
        judge: name.to_owned(),
        judge_version: version.to_owned(),
        judge_kind: kind.to_owned(),
        app: r.app.clone(),
        route: r.route.clone(),
        request_model: r.request_model.clone(),
        ..ScoreRecord::default()
    }
}

enum Attempt {
    Done(Value),
    /// Worth another try; the server's `Retry-After`, when it gave one.
    Retry(String, Option<Duration>),
    Fail(String),
    SchemaRejected,
}

impl LlmCaller {
    pub fn new(
        client: HttpClient,
        judges: &[LlmJudge],
        limits: &BTreeMap<String, EndpointLimits>,
        prices: Arc<PriceTable>,
        intents: &[IntentConfig],
    ) -> Self {
        let mut endpoints = HashMap::new();
        for j in judges {
            endpoints.entry(j.endpoint.clone()).or_insert_with(|| {
                let l = limits.get(&j.endpoint).cloned().unwrap_or_default();
                Arc::new(Endpoint {
                    permits: tokio::sync::Semaphore::new(l.concurrency.max(1)),
                    interval: (l.rate_limit_rps > 0.0).then(|| Duration::from_secs_f64(1.0 / l.rate_limit_rps)),
                    next_start: tokio::sync::Mutex::new(Instant::now()),
                    no_schema: AtomicBool::new(false),
                })
            });
        }
        let intents = intents.iter().map(|i| (i.app.clone(), i.clone())).collect();
        LlmCaller { client, endpoints, prices, intents, backoff: Duration::from_millis(500) }
    }

    /// Judges one call. Always returns a verdict: an error verdict says why there is no score.
    pub async fn judge(&self, j: &LlmJudge, r: &TraceRecord) -> ScoreRecord {
        let start = Instant::now();
        let mut v = blank_verdict(&j.name, &j.version, "llm", r);
        v.judge_model = j.model.clone();
        match self.run(j, r).await {
            Ok((parsed, cost)) => {
                v.score = parsed.score;
                v.passed = u8::from(parsed.passed);
                v.label = parsed.label;
                v.reasoning = parsed.reasoning;
                v.needs_review = u8::from(parsed.needs_review);
                v.judge_cost_usd = cost;
            }
            Err((reason, cost)) => {
                v.error = reason;
                v.judge_cost_usd = cost;
            }
        }
        v.judge_ms = start.elapsed().as_secs_f64() * 1000.0;
        v.ts = Timestamp::now();
        v
    }

    async fn run(&self, j: &LlmJudge, r: &TraceRecord) -> Result<(Parsed, f64), (String, f64)> {
        let prompt = j.rubric.render(r, self.intents.get(&r.app)).map_err(|e| (e, 0.0))?;
        let Some(ep) = self.endpoints.get(&j.endpoint) else {
            return Err((format!("endpoint {:?} has no limits registered", j.endpoint), 0.0));
        };
        let mut cost = 0.0;
        let mut attempt = 0u32;
        loop {
            let schema = j.structured_output && !ep.no_schema.load(Ordering::Relaxed);
            let body = self.request_body(j, &prompt, schema);
            let outcome = {
                let Ok(_permit) = ep.permits.acquire().await else {
                    return Err(("scorer shutting down".into(), cost));
                };
                ep.pace().await;
                self.send(j, body, schema).await
            };
            match outcome {
                Attempt::Done(resp) => {
                    cost += self.cost(j, &resp);
                    let content = resp
                        .pointer("/choices/0/message/content")
                        .and_then(Value::as_str)
                        .or_else(|| resp.pointer("/choices/0/message/refusal").and_then(Value::as_str));
                    let Some(content) = content else {
                        return Err((
                            format!("judge response has no message content: {}", truncate(&resp.to_string(), 300)),
                            cost,
                        ));
                    };
                    return parse_verdict(&j.scale, content).map(|p| (p, cost)).map_err(|e| (e, cost));
                }
                Attempt::SchemaRejected => {
                    tracing::info!(endpoint = %j.endpoint, "judge endpoint rejects response_format; asking for JSON in the prompt");
                    ep.no_schema.store(true, Ordering::Relaxed);
                    continue;
                }
                Attempt::Fail(reason) => return Err((reason, cost)),
                Attempt::Retry(reason, after) => {
                    if attempt >= j.max_retries {
                        return Err((format!("{reason} (after {} attempts)", attempt + 1), cost));
                    }
                    let backoff = self.backoff.saturating_mul(1 << attempt.min(10));
                    let jitter = backoff.mul_f64(fastrand::f64() * 0.5);
                    let wait = after.unwrap_or(backoff + jitter).min(Duration::from_secs(60));
                    tracing::debug!(judge = %j.name, %reason, ?wait, "judge call retried");
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
            }
        }
    }

    fn request_body(&self, j: &LlmJudge, prompt: &str, schema: bool) -> Vec<u8> {
        let mut body = json!({
            "model": j.model,
            "temperature": j.temperature,
            "messages": [
                {"role": "system", "content": j.scale.instruction()},
                {"role": "user", "content": prompt},
            ],
        });
        if schema {
            body["response_format"] = json!({
                "type": "json_schema",
                "json_schema": {"name": "verdict", "strict": true, "schema": j.scale.schema()},
            });
        }
        body.to_string().into_bytes()
    }

    async fn send(&self, j: &LlmJudge, body: Vec<u8>, schema: bool) -> Attempt {
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(j.url.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::ACCEPT, "application/json")
            .header("x-llmtap-score", "off")
            .header("x-llmtap-app", "llmtap-judge")
            .header(format!("x-llmtap-tag-{JUDGE_TAG}"), j.name.as_str());
        if let Some(key) = &j.api_key {
            match HeaderValue::from_str(&format!("Bearer {key}")) {
                Ok(mut v) => {
                    v.set_sensitive(true);
                    req = req.header(header::AUTHORIZATION, v);
                }
                Err(_) => return Attempt::Fail("the API key is not a valid header value".into()),
            }
        }
        let req = match req.body(Full::new(Bytes::from(body))) {
            Ok(r) => r,
            Err(e) => return Attempt::Fail(format!("cannot build the judge request: {e}")),
        };
        let call = async {
            let resp = self.client.request(req).await.map_err(|e| format!("judge endpoint unreachable: {e}"))?;
            let status = resp.status();
            let retry_after = resp
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|s| s.trim().parse::<f64>().ok())
                .filter(|s| s.is_finite() && *s >= 0.0)
                .map(Duration::from_secs_f64);
            let bytes = Limited::new(resp.into_body(), MAX_RESPONSE)
                .collect()
                .await
                .map_err(|e| format!("reading the judge response: {e}"))?
                .to_bytes();
            Ok::<_, String>((status, retry_after, bytes))
        };
        let (status, retry_after, bytes) = match tokio::time::timeout(j.timeout, call).await {
            Err(_) => return Attempt::Retry(format!("judge call timed out after {} ms", j.timeout.as_millis()), None),
            Ok(Err(e)) => return Attempt::Retry(e, None),
            Ok(Ok(x)) => x,
        };
        let text = String::from_utf8_lossy(&bytes);
        if status.is_success() {
            return match serde_json::from_slice::<Value>(&bytes) {
                Ok(v) => Attempt::Done(v),
                Err(_) => Attempt::Fail(format!("judge response is not JSON: {:?}", truncate(&text, 300))),
            };
        }
        let what = format!("judge endpoint answered {status}: {}", truncate(text.trim(), 300));
        if schema
            && status == StatusCode::BAD_REQUEST
            && (text.contains("response_format") || text.contains("json_schema"))
        {
            return Attempt::SchemaRejected;
        }
        if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() || status == StatusCode::REQUEST_TIMEOUT
        {
            Attempt::Retry(what, retry_after)
        } else {
            Attempt::Fail(what)
        }
    }

    fn cost(&self, j: &LlmJudge, resp: &Value) -> f64 {
        let Some(u) = resp.get("usage") else { return 0.0 };
        let n = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0);
        let usage = Usage {
            input: n("prompt_tokens"),
            output: n("completion_tokens"),
            cache_read: u.pointer("/prompt_tokens_details/cached_tokens").and_then(Value::as_u64).unwrap_or(0),
            ..Usage::default()
        };
        let model = resp.get("model").and_then(Value::as_str).unwrap_or(&j.model);
        self.prices.cost(model, &usage)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn numeric() -> Scale {
        Scale::Numeric { min: 1.0, max: 5.0, pass_at: 4.0, review_band: Some(0.5) }
    }

    fn categorical() -> Scale {
        Scale::Categorical {
            choices: vec![("correct".into(), 1.0), ("partial".into(), 0.5), ("wrong".into(), 0.0)],
            pass_at: 0.75,
            review_band: None,
        }
    }

    #[test]
    fn answers_parse_from_json_prose_and_fences() {
        // (scale, answer, Some((score, passed, label, needs_review)) or None for unreadable)
        type Want = Option<(f64, bool, &'static str, bool)>;
        let cases: &[(&Scale, &str, Want)] = &[
            (&numeric(), r#"{"reasoning":"cites the plan","score":5}"#, Some((5.0, true, "", false))),
            (&numeric(), "```json\n{\"score\": \"4\", \"reasoning\": \"ok\"}\n```", Some((4.0, true, "", true))),
            (&numeric(), "The answer is polite. Score: 3", Some((3.0, false, "", false))),
            (&numeric(), "I'd rate it **4.5**/5 overall.", Some((4.5, true, "", true))),
            (&numeric(), "3.6", Some((3.6, false, "", true))),
            (&numeric(), "Rating: 9", None),
            (&numeric(), "no idea", None),
            (&Scale::Boolean, r#"{"reasoning":"x","pass":false}"#, Some((0.0, false, "fail", false))),
            (&Scale::Boolean, r#"{"verdict":"PASS"}"#, Some((1.0, true, "pass", false))),
            (&Scale::Boolean, "Verdict: fail. The output invents a plan.", Some((0.0, false, "fail", false))),
            (&Scale::Boolean, "This passed every check.", Some((1.0, true, "pass", false))),
            (&Scale::Boolean, "Some parts pass, others fail.", None),
            (&categorical(), r#"{"label":"Partial","reasoning":"half"}"#, Some((0.5, false, "partial", false))),
            (&categorical(), "Label: correct", Some((1.0, true, "correct", false))),
            (&categorical(), "The answer is wrong about the refund window.", Some((0.0, false, "wrong", false))),
            (&categorical(), "between correct and wrong", None),
        ];
        for (scale, text, want) in cases {
            let got = parse_verdict(scale, text);
            match want {
                Some((score, passed, label, review)) => {
                    let p = got.unwrap_or_else(|e| panic!("{text:?}: {e}"));
                    assert_eq!(
                        (p.score, p.passed, p.label.as_str(), p.needs_review),
                        (*score, *passed, *label, *review),
                        "{text:?}"
                    );
                }
                None => assert!(got.is_err(), "{text:?} parsed as {got:?}"),
            }
        }
        let p = parse_verdict(&numeric(), r#"{"reasoning":"cites the plan","score":5}"#).unwrap();
        assert_eq!(p.reasoning, "cites the plan");
        let e = parse_verdict(&numeric(), "Rating: 9").unwrap_err();
        assert_eq!(e, "score 9 is outside 1..=5");
    }

    #[test]
    fn templates_render_every_variable() {
        let t = Template::parse("O={{objective}} U={{ target_user }} E=\n{{edge_cases}}\nI={{input}}\nM=\n{{messages}}\nA={{output}} T={{tool_calls}}").unwrap();
        let r = TraceRecord {
            request_body: r#"{"model":"m","messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hi"},{"role":"assistant","content":"hello"},{"role":"user","content":[{"type":"text","text":"my plan?"}]}]}"#.into(),
            output_text: "Plan: Pro".into(),
            tool_calls: vec!["lookup".into()],
            tool_call_args: vec![r#"{"id":1}"#.into()],
            ..TraceRecord::default()
        };
        let intent = IntentConfig {
            objective: "answer billing".into(),
            target_user: "owners".into(),
            edge_cases: vec!["old refunds".into(), "chargebacks".into()],
            ..IntentConfig::default()
        };
        assert_eq!(
            t.render(&r, Some(&intent)).unwrap(),
            "O=answer billing U=owners E=\n- old refunds\n- chargebacks\nI=my plan?\nM=\nsystem: be brief\n\nuser: hi\n\nassistant: hello\n\nuser: my plan?\nA=Plan: Pro T=lookup({\"id\":1})"
        );
        assert_eq!(
            Template::parse("{{nope}}").unwrap_err(),
            "unknown variable {{nope}}; known: input, messages, output, tool_calls, objective, target_user, edge_cases"
        );
        assert!(Template::parse("{{input").is_err());
        let no_body = TraceRecord::default();
        assert!(t.render(&no_body, None).unwrap_err().contains("not captured"));
        assert_eq!(Template::parse("{{output}}").unwrap().render(&no_body, None).unwrap(), "");
    }

    #[test]
    fn chat_urls() {
        assert_eq!(
            chat_url("https://api.openai.com").unwrap().to_string(),
            "https://api.openai.com/v1/chat/completions"
        );
        assert_eq!(chat_url("http://h:8000/v1/").unwrap().to_string(), "http://h:8000/v1/chat/completions");
        assert_eq!(chat_url("http://h/x/chat/completions").unwrap().to_string(), "http://h/x/chat/completions");
        assert!(chat_url("judge").is_err());
    }
}
