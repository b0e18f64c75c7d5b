//! Token estimates with tiktoken for calls whose upstream reported no usage. Runs in the
//! record writer (the encoders load lazily, once), never on the request path.

use tiktoken_rs::tokenizer::{get_tokenizer, Tokenizer};

use crate::provider::{ToolCall, Usage};

/// Tokens of `text` in the encoding of `model`'s family (`o200k_base` for GPT-4o, 4.1, 5 and
/// the o-series, `cl100k_base` for GPT-4/3.5 and embeddings, and `cl100k_base` as the
/// approximation for non-OpenAI models).
pub fn count_tokens(model: &str, text: &str) -> u64 {
    if text.is_empty() {
        return 0;
    }
    let bpe = match get_tokenizer(model) {
        Some(Tokenizer::O200kBase) => tiktoken_rs::o200k_base_singleton(),
        Some(Tokenizer::P50kBase) | Some(Tokenizer::P50kEdit) => tiktoken_rs::p50k_base_singleton(),
        Some(Tokenizer::R50kBase) | Some(Tokenizer::Gpt2) => tiktoken_rs::r50k_base_singleton(),
        _ => tiktoken_rs::cl100k_base_singleton(),
    };
    let n = bpe.lock().encode_ordinary(text).len();
    n as u64
}

/// Overhead tokens per chat message and for priming the reply (OpenAI's published rule).
const PER_MESSAGE: u64 = 3;
const REPLY_PRIMING: u64 = 3;

/// Estimates usage from the request body and the model's output.
/// `output_text` may be a prefix of `output_len` bytes; its count is scaled up.
pub fn estimate_usage(
    model: &str,
    request_body: &[u8],
    output_text: &str,
    output_len: usize,
    tool_calls: &[ToolCall],
) -> Usage {
    let (prompt, messages) = prompt_text(request_body);
    let input =
        if prompt.is_empty() { 0 } else { count_tokens(model, &prompt) + messages * PER_MESSAGE + REPLY_PRIMING };
    let mut output = count_tokens(model, output_text);
    if output_len > output_text.len() && !output_text.is_empty() {
        output = (output as f64 * output_len as f64 / output_text.len() as f64).round() as u64;
    }
    for t in tool_calls {
        output += count_tokens(model, &t.name) + count_tokens(model, &t.arguments);
    }
    Usage { input, output, cache_read: 0, cache_write: 0, reasoning: 0 }
}

/// The text a request sends the model, and how many messages carry it.
fn prompt_text(body: &[u8]) -> (String, u64) {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return (String::new(), 0);
    };
    let mut out = String::new();
    let mut messages = 0;
    for key in ["system", "instructions", "prompt", "input", "systemInstruction"] {
        if let Some(x) = v.get(key) {
            collect_text(x, &mut out);
        }
    }
    for key in ["messages", "contents"] {
        if let Some(list) = v.get(key).and_then(|m| m.as_array()) {
            messages += list.len() as u64;
            for m in list {
                collect_text(m, &mut out);
            }
        }
    }
    (out, messages)
}

fn collect_text(v: &serde_json::Value, out: &mut String) {
    match v {
        serde_json::Value::String(s) => {
            out.push_str(s);
            out.push('\n');
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| collect_text(x, out)),
        serde_json::Value::Object(o) => {
            for (k, x) in o {
                // Structure and binary payloads are not prompt text.
                if matches!(
                    k.as_str(),
                    "role" | "type" | "image_url" | "data" | "mimeType" | "media_type" | "id" | "cache_control"
                ) {
                    continue;
                }
                collect_text(x, out);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_with_the_model_family_encoding() {
        assert_eq!(count_tokens("gpt-4o", "Hello world"), 2);
        assert_eq!(count_tokens("gpt-4", "Hello world"), 2);
        assert_eq!(count_tokens("llama3.2", ""), 0);
    }

    #[test]
    fn estimates_chat_prompt_and_output() {
        let body = br#"{"model":"gpt-4o","messages":[{"role":"user","content":"Hello world"}]}"#;
        let u = estimate_usage("gpt-4o", body, "Hello world", 11, &[]);
        // "Hello world\n" is 3 tokens in o200k, plus 3 for the message and 3 for the reply.
        assert_eq!(u.input, count_tokens("gpt-4o", "Hello world\n") + 6);
        assert_eq!(u.output, 2);
    }
}
