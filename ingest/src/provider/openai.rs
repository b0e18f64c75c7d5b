//! OpenAI wire formats: Chat Completions (JSON and SSE, tool-call deltas by index), legacy
//! Completions, Embeddings and the Responses API. Also serves Azure OpenAI (deployment in
//! the path) and OpenAI-compatible servers (vLLM, Ollama, …), which may report no usage.

use std::borrow::Cow;

use serde::Deserialize;

use super::{null_default, parse_json, Facts, MalformedBody, Protocol, RequestOptions, RequestView, ToolCall, Usage};
use crate::record::Operation;

#[derive(Debug, Default)]
pub struct OpenAiProtocol {
    /// Tool-call index in the Responses stream → position in `facts.tool_calls`.
    responses_items: Vec<(u64, usize)>,
}

#[derive(Deserialize)]
struct Request<'a> {
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(borrow, default)]
    user: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "null_default")]
    tools: Vec<ToolDef<'a>>,
    #[serde(borrow, default, deserialize_with = "null_default")]
    functions: Vec<FunctionDef<'a>>,
    #[serde(default, alias = "max_completion_tokens", alias = "max_output_tokens")]
    max_tokens: Option<u64>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

#[derive(Deserialize)]
struct ToolDef<'a> {
    #[serde(borrow, default)]
    function: Option<FunctionDef<'a>>,
    /// Responses API tools carry the name at the top level.
    #[serde(borrow, default)]
    name: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct FunctionDef<'a> {
    #[serde(borrow, default)]
    name: Option<Cow<'a, str>>,
}

/// Usage of every OpenAI API: Chat/Completions/Embeddings name it `prompt_*`/`completion_*`,
/// the Responses API `input_*`/`output_*`.
#[derive(Deserialize, Default)]
pub(crate) struct OaUsage {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
    #[serde(default, alias = "input_tokens_details")]
    prompt_tokens_details: Option<PromptDetails>,
    #[serde(default, alias = "output_tokens_details")]
    completion_tokens_details: Option<CompletionDetails>,
}

#[derive(Deserialize, Default)]
struct PromptDetails {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

#[derive(Deserialize, Default)]
struct CompletionDetails {
    #[serde(default)]
    reasoning_tokens: Option<u64>,
}

impl OaUsage {
    fn to_usage(&self) -> Usage {
        Usage {
            input: self.prompt_tokens.or(self.input_tokens).unwrap_or(0),
            output: self.completion_tokens.or(self.output_tokens).unwrap_or(0),
            cache_read: self.prompt_tokens_details.as_ref().and_then(|d| d.cached_tokens).unwrap_or(0),
            cache_write: 0,
            reasoning: self.completion_tokens_details.as_ref().and_then(|d| d.reasoning_tokens).unwrap_or(0),
        }
    }
}

#[derive(Deserialize)]
struct Chunk<'a> {
    #[serde(borrow, default)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "null_default")]
    choices: Vec<Choice<'a>>,
    #[serde(default)]
    usage: Option<OaUsage>,
}

#[derive(Deserialize)]
struct Choice<'a> {
    #[serde(default)]
    index: Option<u64>,
    #[serde(borrow, default)]
    delta: Option<Message<'a>>,
    #[serde(borrow, default)]
    message: Option<Message<'a>>,
    /// Legacy completions.
    #[serde(borrow, default)]
    text: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    finish_reason: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Message<'a> {
    #[serde(borrow, default)]
    content: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    reasoning_content: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    refusal: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "null_default")]
    tool_calls: Vec<ToolCallDelta<'a>>,
}

#[derive(Deserialize)]
struct ToolCallDelta<'a> {
    #[serde(default)]
    index: Option<usize>,
    #[serde(borrow, default)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    function: Option<FunctionDelta<'a>>,
}

#[derive(Deserialize)]
struct FunctionDelta<'a> {
    #[serde(borrow, default)]
    name: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    arguments: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct ResponsesEvent<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Cow<'a, str>,
    #[serde(borrow, default)]
    delta: Option<Cow<'a, str>>,
    #[serde(default)]
    output_index: Option<u64>,
    #[serde(borrow, default)]
    item: Option<ResponsesItem<'a>>,
    #[serde(borrow, default)]
    response: Option<ResponsesObject<'a>>,
}

#[derive(Deserialize)]
struct ResponsesObject<'a> {
    #[serde(borrow, default)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    status: Option<Cow<'a, str>>,
    #[serde(default)]
    usage: Option<OaUsage>,
    #[serde(borrow, default, deserialize_with = "null_default")]
    output: Vec<ResponsesItem<'a>>,
}

#[derive(Deserialize)]
struct ResponsesItem<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Cow<'a, str>,
    #[serde(borrow, default)]
    call_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    name: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    arguments: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "null_default")]
    content: Vec<ResponsesContent<'a>>,
}

#[derive(Deserialize)]
struct ResponsesContent<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Cow<'a, str>,
    #[serde(borrow, default)]
    text: Option<Cow<'a, str>>,
}

/// The operation an OpenAI-style path names.
pub(crate) fn operation_for_path(path: &str) -> Operation {
    let path = path.trim_end_matches('/');
    if path.ends_with("/chat/completions") {
        Operation::Chat
    } else if path.ends_with("/completions") {
        Operation::Completions
    } else if path.ends_with("/embeddings") {
        Operation::Embeddings
    } else if path.ends_with("/responses") {
        Operation::Responses
    } else {
        Operation::Other
    }
}

/// Azure OpenAI names the deployment in the path: `/openai/deployments/<name>/…`.
fn azure_deployment(path: &str) -> Option<&str> {
    let rest = path.split("/deployments/").nth(1)?;
    rest.split('/').next().filter(|s| !s.is_empty())
}

/// Returns the body with `stream_options.include_usage = true`.
fn with_include_usage(body: &[u8], has_stream_options: bool) -> Option<Vec<u8>> {
    if !has_stream_options {
        // Insert right after the opening brace so every other byte stays as the client sent it.
        let start = body.iter().position(|b| !b.is_ascii_whitespace())?;
        if body.get(start) != Some(&b'{') {
            return None;
        }
        let rest = &body[start + 1..];
        let empty = rest.iter().all(|b| b.is_ascii_whitespace() || *b == b'}');
        let mut out = Vec::with_capacity(body.len() + 40);
        out.extend_from_slice(&body[..=start]);
        out.extend_from_slice(br#""stream_options":{"include_usage":true}"#);
        if !empty {
            out.push(b',');
        }
        out.extend_from_slice(rest);
        return Some(out);
    }
    let mut v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let opts = v.as_object_mut()?.entry("stream_options").or_insert_with(|| serde_json::json!({}));
    if !opts.is_object() {
        *opts = serde_json::json!({});
    }
    opts.as_object_mut()?.insert("include_usage".into(), serde_json::Value::Bool(true));
    serde_json::to_vec(&v).ok()
}

impl OpenAiProtocol {
    fn apply_chunk(&mut self, chunk: Chunk<'_>, facts: &mut Facts, streaming: bool) -> bool {
        if let Some(id) = chunk.id.filter(|s| !s.is_empty()) {
            if facts.response_id.is_empty() {
                facts.response_id = id.into_owned();
            }
        }
        if let Some(m) = chunk.model.filter(|s| !s.is_empty()) {
            if facts.response_model.is_empty() {
                facts.response_model = m.into_owned();
            }
        }
        if let Some(u) = &chunk.usage {
            facts.usage = Some(u.to_usage());
        }
        let mut content = false;
        for choice in chunk.choices {
            if choice.index.unwrap_or(0) != 0 {
                continue;
            }
            if let Some(r) = choice.finish_reason.filter(|s| !s.is_empty()) {
                facts.finish_reason = r.into_owned();
            }
            if let Some(t) = choice.text.filter(|s| !s.is_empty()) {
                facts.push_text(&t);
                content = true;
            }
            let Some(msg) = (if streaming { choice.delta } else { choice.message }) else {
                continue;
            };
            if let Some(t) = msg.content.filter(|s| !s.is_empty()) {
                facts.push_text(&t);
                content = true;
            }
            if let Some(t) = msg.refusal.filter(|s| !s.is_empty()) {
                facts.push_text(&t);
                content = true;
            }
            if msg.reasoning_content.is_some_and(|s| !s.is_empty()) {
                content = true;
            }
            for (pos, tc) in msg.tool_calls.into_iter().enumerate() {
                content = true;
                let idx = if streaming { tc.index.unwrap_or(pos) } else { facts.tool_calls.len() };
                let call = facts.tool_call_at(idx);
                if let Some(id) = tc.id.filter(|s| !s.is_empty()) {
                    if call.id.is_empty() {
                        call.id = id.into_owned();
                    }
                }
                if let Some(f) = tc.function {
                    if let Some(n) = f.name.filter(|s| !s.is_empty()) {
                        if call.name.is_empty() {
                            call.name = n.into_owned();
                        }
                    }
                    if let Some(a) = f.arguments {
                        call.arguments.push_str(&a);
                    }
                }
            }
        }
        content
    }

    fn apply_responses_object(&mut self, r: ResponsesObject<'_>, facts: &mut Facts, items: bool) {
        if let Some(id) = r.id.filter(|s| !s.is_empty()) {
            facts.response_id = id.into_owned();
        }
        if let Some(m) = r.model.filter(|s| !s.is_empty()) {
            facts.response_model = m.into_owned();
        }
        if let Some(s) = r.status.filter(|s| !s.is_empty() && s != "in_progress" && s != "queued") {
            facts.finish_reason = s.into_owned();
        }
        if let Some(u) = &r.usage {
            facts.usage = Some(u.to_usage());
        }
        if items {
            for item in r.output {
                apply_responses_item(item, facts);
            }
        }
    }
}

fn apply_responses_item(item: ResponsesItem<'_>, facts: &mut Facts) {
    match item.kind.as_ref() {
        "function_call" | "custom_tool_call" => facts.tool_calls.push(ToolCall {
            name: item.name.map(Cow::into_owned).unwrap_or_default(),
            arguments: item.arguments.map(Cow::into_owned).unwrap_or_default(),
            id: item.call_id.map(Cow::into_owned).unwrap_or_default(),
        }),
        "message" => {
            for c in item.content {
                if c.kind == "output_text" || c.kind == "refusal" {
                    if let Some(t) = c.text {
                        facts.push_text(&t);
                    }
                }
            }
        }
        _ => {}
    }
}

impl Protocol for OpenAiProtocol {
    fn on_request(&mut self, req: &RequestView<'_>, opts: RequestOptions, facts: &mut Facts) -> Option<Vec<u8>> {
        facts.operation = operation_for_path(req.path);
        if let Some(dep) = azure_deployment(req.path) {
            facts.request_model = dep.to_owned();
        }
        if req.body.is_empty() {
            return None;
        }
        let Ok(r) = parse_json::<Request<'_>>(req.body) else {
            // Not JSON (multipart audio, say): forwarded as is, nothing to learn.
            return None;
        };
        if let Some(m) = r.model.filter(|m| !m.is_empty()) {
            facts.request_model = m.into_owned();
        }
        facts.streamed = r.stream.unwrap_or(false);
        facts.params = super::RequestParams {
            max_tokens: r.max_tokens,
            temperature: r.temperature,
            top_p: r.top_p,
            stream: facts.streamed,
        };
        if let Some(u) = r.user.filter(|u| !u.is_empty()) {
            facts.user_id = u.into_owned();
        }
        facts.tools_offered = r
            .tools
            .into_iter()
            .filter_map(|t| t.function.and_then(|f| f.name).or(t.name))
            .chain(r.functions.into_iter().filter_map(|f| f.name))
            .map(Cow::into_owned)
            .collect();
        let wants_usage = r.stream_options.as_ref().and_then(|o| o.include_usage) == Some(true);
        if opts.inject_stream_usage
            && facts.streamed
            && !wants_usage
            && matches!(facts.operation, Operation::Chat | Operation::Completions)
        {
            let rewritten = with_include_usage(req.body, r.stream_options.is_some());
            facts.injected_stream_usage = rewritten.is_some();
            return rewritten;
        }
        None
    }

    fn on_stream_event(&mut self, event: &str, data: &str, facts: &mut Facts) -> Result<bool, MalformedBody> {
        if data.trim() == "[DONE]" {
            facts.saw_final = true;
            return Ok(false);
        }
        if facts.operation == Operation::Responses || event.starts_with("response.") {
            let ev: ResponsesEvent<'_> = parse_json(data.as_bytes())?;
            let mut content = false;
            match ev.kind.as_ref() {
                "response.output_text.delta" | "response.refusal.delta" => {
                    if let Some(d) = ev.delta.filter(|d| !d.is_empty()) {
                        facts.push_text(&d);
                        content = true;
                    }
                }
                "response.function_call_arguments.delta" | "response.reasoning_summary_text.delta" => content = true,
                "response.output_item.added" => {
                    content = ev.item.as_ref().is_some_and(|i| i.kind == "function_call");
                }
                "response.output_item.done" => {
                    if let Some(item) = ev.item {
                        if item.kind == "function_call" || item.kind == "custom_tool_call" {
                            let at = facts.tool_calls.len();
                            self.responses_items.push((ev.output_index.unwrap_or(at as u64), at));
                            apply_responses_item(item, facts);
                        }
                    }
                }
                "response.completed" | "response.incomplete" | "response.failed" => {
                    facts.saw_final = true;
                    if let Some(r) = ev.response {
                        self.apply_responses_object(r, facts, false);
                    }
                }
                _ => {
                    if let Some(r) = ev.response {
                        self.apply_responses_object(r, facts, false);
                    }
                }
            }
            return Ok(content);
        }
        let chunk: Chunk<'_> = parse_json(data.as_bytes())?;
        Ok(self.apply_chunk(chunk, facts, true))
    }

    fn on_json_body(&mut self, body: &[u8], facts: &mut Facts) -> Result<(), MalformedBody> {
        if facts.operation == Operation::Responses {
            let r: ResponsesObject<'_> = parse_json(body)?;
            self.apply_responses_object(r, facts, true);
            return Ok(());
        }
        let chunk: Chunk<'_> = parse_json(body)?;
        self.apply_chunk(chunk, facts, false);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn include_usage_inserted_textually_when_absent() {
        let body = br#"{"model":"gpt-4o","stream":true,"messages":[]}"#;
        let out = with_include_usage(body, false).unwrap_or_default();
        assert_eq!(out, br#"{"stream_options":{"include_usage":true},"model":"gpt-4o","stream":true,"messages":[]}"#);
    }

    #[test]
    fn include_usage_set_when_options_present_but_false() {
        let body = br#"{"model":"m","stream":true,"stream_options":{"include_usage":false}}"#;
        let out = with_include_usage(body, true).unwrap_or_default();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap_or_default();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["model"], "m");
    }

    #[test]
    fn azure_deployment_from_path() {
        assert_eq!(azure_deployment("/openai/deployments/gpt4o-prod/chat/completions"), Some("gpt4o-prod"));
        assert_eq!(azure_deployment("/v1/chat/completions"), None);
    }

    #[test]
    fn operations_from_paths() {
        assert_eq!(operation_for_path("/v1/chat/completions"), Operation::Chat);
        assert_eq!(operation_for_path("/v1/completions"), Operation::Completions);
        assert_eq!(operation_for_path("/v1/embeddings"), Operation::Embeddings);
        assert_eq!(operation_for_path("/v1/responses"), Operation::Responses);
        assert_eq!(operation_for_path("/v1/models"), Operation::Other);
    }
}
