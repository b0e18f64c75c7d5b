//! Gemini `generateContent` and `streamGenerateContent` (JSON-array stream or `alt=sse`):
//! model from the path, `usageMetadata` incl. cached and thought tokens, `functionCall` parts.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

use super::{null_default, parse_json, Facts, MalformedBody, Protocol, RequestOptions, RequestView, ToolCall, Usage};
use crate::record::Operation;

#[derive(Debug, Default)]
pub struct GeminiProtocol;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Request<'a> {
    #[serde(borrow, default, deserialize_with = "null_default")]
    tools: Vec<ToolGroup<'a>>,
    #[serde(default)]
    generation_config: Option<GenerationConfig>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct GenerationConfig {
    #[serde(default)]
    max_output_tokens: Option<u64>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ToolGroup<'a> {
    #[serde(borrow, default, deserialize_with = "null_default")]
    function_declarations: Vec<FunctionDecl<'a>>,
}

#[derive(Deserialize)]
struct FunctionDecl<'a> {
    #[serde(borrow, default)]
    name: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Chunk<'a> {
    #[serde(borrow, default, deserialize_with = "null_default")]
    candidates: Vec<Candidate<'a>>,
    #[serde(default)]
    usage_metadata: Option<UsageMetadata>,
    #[serde(borrow, default)]
    model_version: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    response_id: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Candidate<'a> {
    #[serde(borrow, default)]
    content: Option<Content<'a>>,
    #[serde(borrow, default)]
    finish_reason: Option<Cow<'a, str>>,
    #[serde(default)]
    index: Option<u64>,
}

#[derive(Deserialize)]
struct Content<'a> {
    #[serde(borrow, default, deserialize_with = "null_default")]
    parts: Vec<Part<'a>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Part<'a> {
    #[serde(borrow, default)]
    text: Option<Cow<'a, str>>,
    #[serde(default)]
    thought: Option<bool>,
    #[serde(borrow, default)]
    function_call: Option<FunctionCall<'a>>,
}

#[derive(Deserialize)]
struct FunctionCall<'a> {
    #[serde(borrow, default)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    name: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    args: Option<&'a RawValue>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct UsageMetadata {
    #[serde(default)]
    prompt_token_count: u64,
    #[serde(default)]
    candidates_token_count: u64,
    #[serde(default)]
    cached_content_token_count: u64,
    #[serde(default)]
    thoughts_token_count: u64,
    #[serde(default)]
    tool_use_prompt_token_count: u64,
}

/// `…/models/<model>:<method>` → (model, method).
fn model_and_method(path: &str) -> (&str, &str) {
    let tail = path.rsplit("/models/").next().unwrap_or("");
    if !path.contains("/models/") {
        return ("", "");
    }
    match tail.split_once(':') {
        Some((m, method)) => (m, method),
        None => (tail, ""),
    }
}

impl GeminiProtocol {
    fn apply(&mut self, c: Chunk<'_>, facts: &mut Facts) -> bool {
        if let Some(m) = c.model_version.filter(|m| !m.is_empty()) {
            facts.response_model = m.into_owned();
        }
        if let Some(id) = c.response_id.filter(|m| !m.is_empty()) {
            facts.response_id = id.into_owned();
        }
        if let Some(u) = c.usage_metadata {
            facts.usage = Some(Usage {
                input: u.prompt_token_count + u.tool_use_prompt_token_count,
                output: u.candidates_token_count + u.thoughts_token_count,
                cache_read: u.cached_content_token_count,
                cache_write: 0,
                reasoning: u.thoughts_token_count,
            });
        }
        let mut content = false;
        for cand in c.candidates {
            if cand.index.unwrap_or(0) != 0 {
                continue;
            }
            if let Some(r) = cand.finish_reason.filter(|r| !r.is_empty()) {
                facts.finish_reason = r.into_owned();
                facts.saw_final = true;
            }
            for part in cand.content.map(|c| c.parts).unwrap_or_default() {
                if let Some(fc) = part.function_call {
                    content = true;
                    facts.tool_calls.push(ToolCall {
                        name: fc.name.map(Cow::into_owned).unwrap_or_default(),
                        arguments: fc.args.map(|a| a.get().to_owned()).unwrap_or_default(),
                        id: fc.id.map(Cow::into_owned).unwrap_or_default(),
                    });
                } else if let Some(t) = part.text.filter(|t| !t.is_empty()) {
                    content = true;
                    if part.thought != Some(true) {
                        facts.push_text(&t);
                    }
                }
            }
        }
        content
    }
}

impl Protocol for GeminiProtocol {
    fn on_request(&mut self, req: &RequestView<'_>, _opts: RequestOptions, facts: &mut Facts) -> Option<Vec<u8>> {
        let (model, method) = model_and_method(req.path);
        facts.request_model = model.to_owned();
        facts.operation = match method {
            "generateContent" | "streamGenerateContent" => Operation::GenerateContent,
            "embedContent" | "batchEmbedContents" => Operation::Embeddings,
            _ => Operation::Other,
        };
        facts.streamed = method == "streamGenerateContent";
        facts.params.stream = facts.streamed;
        if let Ok(r) = parse_json::<Request<'_>>(req.body) {
            if let Some(g) = &r.generation_config {
                facts.params.max_tokens = g.max_output_tokens;
                facts.params.temperature = g.temperature;
                facts.params.top_p = g.top_p;
            }
            facts.tools_offered = r
                .tools
                .into_iter()
                .flat_map(|g| g.function_declarations)
                .filter_map(|f| f.name.map(Cow::into_owned))
                .collect();
        }
        None
    }

    fn on_stream_event(&mut self, _event: &str, data: &str, facts: &mut Facts) -> Result<bool, MalformedBody> {
        let c: Chunk<'_> = parse_json(data.as_bytes())?;
        Ok(self.apply(c, facts))
    }

    fn on_json_body(&mut self, body: &[u8], facts: &mut Facts) -> Result<(), MalformedBody> {
        let c: Chunk<'_> = parse_json(body)?;
        self.apply(c, facts);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_and_method_from_paths() {
        assert_eq!(
            model_and_method("/v1beta/models/gemini-2.5-flash:streamGenerateContent"),
            ("gemini-2.5-flash", "streamGenerateContent")
        );
        assert_eq!(
            model_and_method("/v1/projects/p/locations/l/publishers/google/models/gemini-2.0-flash:generateContent"),
            ("gemini-2.0-flash", "generateContent")
        );
        assert_eq!(model_and_method("/v1beta/files"), ("", ""));
    }
}
