//! Anthropic Messages: JSON and SSE (`message_start` usage with cache tokens, cumulative
//! `message_delta` usage, `tool_use` blocks whose input arrives as `input_json_delta` pieces).

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

use super::{null_default, parse_json, Facts, MalformedBody, Protocol, RequestOptions, RequestView, ToolCall, Usage};
use crate::record::Operation;

#[derive(Debug, Default)]
pub struct AnthropicProtocol {
    /// Content block index → position in `facts.tool_calls` (tool_use blocks only), with the
    /// block's initial `input` text used when no `input_json_delta` arrives.
    blocks: Vec<(u64, usize, String)>,
}

#[derive(Deserialize)]
struct Request<'a> {
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(borrow, default)]
    metadata: Option<Metadata<'a>>,
    #[serde(borrow, default, deserialize_with = "null_default")]
    tools: Vec<ToolDef<'a>>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
}

#[derive(Deserialize)]
struct Metadata<'a> {
    #[serde(borrow, default)]
    user_id: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct ToolDef<'a> {
    #[serde(borrow, default)]
    name: Option<Cow<'a, str>>,
}

#[derive(Deserialize, Default)]
struct AnUsage {
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct MessageObj<'a> {
    #[serde(borrow, default)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    stop_reason: Option<Cow<'a, str>>,
    #[serde(default)]
    usage: Option<AnUsage>,
    #[serde(borrow, default, deserialize_with = "null_default")]
    content: Vec<Block<'a>>,
}

#[derive(Deserialize)]
struct Block<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Cow<'a, str>,
    #[serde(borrow, default)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    text: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    name: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    input: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Event<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Cow<'a, str>,
    #[serde(borrow, default)]
    message: Option<MessageObj<'a>>,
    #[serde(default)]
    index: Option<u64>,
    #[serde(borrow, default)]
    content_block: Option<Block<'a>>,
    #[serde(borrow, default)]
    delta: Option<Delta<'a>>,
    #[serde(default)]
    usage: Option<AnUsage>,
}

#[derive(Deserialize)]
struct Delta<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    text: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    partial_json: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    thinking: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    stop_reason: Option<Cow<'a, str>>,
}

/// Raw counts as Anthropic reports them; folded into `Usage` at the end.
#[derive(Debug, Default, Clone, Copy)]
struct Raw {
    input: u64,
    output: u64,
    cache_write: u64,
    cache_read: u64,
}

impl Raw {
    fn merge(&mut self, u: &AnUsage) {
        if let Some(v) = u.input_tokens {
            self.input = v;
        }
        if let Some(v) = u.output_tokens {
            self.output = v;
        }
        if let Some(v) = u.cache_creation_input_tokens {
            self.cache_write = v;
        }
        if let Some(v) = u.cache_read_input_tokens {
            self.cache_read = v;
        }
    }

    fn to_usage(self) -> Usage {
        Usage {
            input: self.input + self.cache_write + self.cache_read,
            output: self.output,
            cache_read: self.cache_read,
            cache_write: self.cache_write,
            reasoning: 0,
        }
    }
}

fn apply_usage(facts: &mut Facts, u: &AnUsage) {
    let mut raw = facts
        .usage
        .map(|u| Raw {
            input: u.input - u.cache_read - u.cache_write,
            output: u.output,
            cache_write: u.cache_write,
            cache_read: u.cache_read,
        })
        .unwrap_or_default();
    raw.merge(u);
    facts.usage = Some(raw.to_usage());
}

impl Protocol for AnthropicProtocol {
    fn on_request(&mut self, req: &RequestView<'_>, _opts: RequestOptions, facts: &mut Facts) -> Option<Vec<u8>> {
        let path = req.path.trim_end_matches('/');
        facts.operation = if path.ends_with("/messages") {
            Operation::Messages
        } else if path.ends_with("/complete") {
            Operation::Completions
        } else {
            Operation::Other
        };
        if let Ok(r) = parse_json::<Request<'_>>(req.body) {
            facts.request_model = r.model.map(Cow::into_owned).unwrap_or_default();
            facts.streamed = r.stream.unwrap_or(false);
            facts.params = super::RequestParams {
                max_tokens: r.max_tokens,
                temperature: r.temperature,
                top_p: r.top_p,
                stream: facts.streamed,
            };
            if let Some(u) = r.metadata.and_then(|m| m.user_id).filter(|u| !u.is_empty()) {
                facts.user_id = u.into_owned();
            }
            facts.tools_offered = r.tools.into_iter().filter_map(|t| t.name.map(Cow::into_owned)).collect();
        }
        None
    }

    fn on_stream_event(&mut self, _event: &str, data: &str, facts: &mut Facts) -> Result<bool, MalformedBody> {
        let ev: Event<'_> = parse_json(data.as_bytes())?;
        let mut content = false;
        match ev.kind.as_ref() {
            "message_start" => {
                if let Some(m) = ev.message {
                    if let Some(id) = m.id {
                        facts.response_id = id.into_owned();
                    }
                    if let Some(model) = m.model {
                        facts.response_model = model.into_owned();
                    }
                    if let Some(u) = &m.usage {
                        apply_usage(facts, u);
                    }
                }
            }
            "content_block_start" => {
                if let Some(b) = ev.content_block {
                    if b.kind == "tool_use" || b.kind == "server_tool_use" {
                        content = true;
                        let at = facts.tool_calls.len();
                        facts.tool_calls.push(ToolCall {
                            name: b.name.map(Cow::into_owned).unwrap_or_default(),
                            arguments: String::new(),
                            id: b.id.map(Cow::into_owned).unwrap_or_default(),
                        });
                        let initial = b.input.map(|r| r.get().to_owned()).unwrap_or_default();
                        self.blocks.push((ev.index.unwrap_or(0), at, initial));
                    } else if let Some(t) = b.text.filter(|t| !t.is_empty()) {
                        facts.push_text(&t);
                        content = true;
                    }
                }
            }
            "content_block_delta" => {
                if let Some(d) = ev.delta {
                    match d.kind.as_deref() {
                        Some("text_delta") => {
                            if let Some(t) = d.text.filter(|t| !t.is_empty()) {
                                facts.push_text(&t);
                                content = true;
                            }
                        }
                        Some("input_json_delta") => {
                            content = true;
                            let idx = ev.index.unwrap_or(0);
                            if let Some((_, at, _)) = self.blocks.iter().find(|(i, _, _)| *i == idx) {
                                if let (Some(p), Some(call)) = (d.partial_json, facts.tool_calls.get_mut(*at)) {
                                    call.arguments.push_str(&p);
                                }
                            }
                        }
                        Some("thinking_delta") => content = d.thinking.is_some_and(|t| !t.is_empty()),
                        _ => {}
                    }
                }
            }
            "content_block_stop" => {
                let idx = ev.index.unwrap_or(0);
                if let Some((_, at, initial)) = self.blocks.iter().find(|(i, _, _)| *i == idx) {
                    if let Some(call) = facts.tool_calls.get_mut(*at) {
                        if call.arguments.is_empty() {
                            call.arguments = initial.clone();
                        }
                    }
                }
            }
            "message_delta" => {
                if let Some(r) = ev.delta.and_then(|d| d.stop_reason) {
                    facts.finish_reason = r.into_owned();
                }
                if let Some(u) = &ev.usage {
                    apply_usage(facts, u);
                }
            }
            "message_stop" => facts.saw_final = true,
            _ => {}
        }
        Ok(content)
    }

    fn on_json_body(&mut self, body: &[u8], facts: &mut Facts) -> Result<(), MalformedBody> {
        let m: MessageObj<'_> = parse_json(body)?;
        if let Some(id) = m.id {
            facts.response_id = id.into_owned();
        }
        if let Some(model) = m.model {
            facts.response_model = model.into_owned();
        }
        if let Some(r) = m.stop_reason {
            facts.finish_reason = r.into_owned();
        }
        if let Some(u) = &m.usage {
            apply_usage(facts, u);
        }
        for b in m.content {
            match b.kind.as_ref() {
                "text" => {
                    if let Some(t) = b.text {
                        facts.push_text(&t);
                    }
                }
                "tool_use" | "server_tool_use" => facts.tool_calls.push(ToolCall {
                    name: b.name.map(Cow::into_owned).unwrap_or_default(),
                    arguments: b.input.map(|r| r.get().to_owned()).unwrap_or_default(),
                    id: b.id.map(Cow::into_owned).unwrap_or_default(),
                }),
                _ => {}
            }
        }
        Ok(())
    }
}
