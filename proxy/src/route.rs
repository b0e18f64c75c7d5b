//! Longest-prefix routing from a client path to an upstream base URL and a provider adapter.
//! Built-in routes cover OpenAI (`/openai` and bare `/v1`), Anthropic, Gemini and Azure
//! (`/azure/<resource>`); `[[route]]` entries add OpenAI-compatible servers or override a
//! built-in by name, and `LLMTAP_UPSTREAM_<ROUTE>` replaces a route's upstream.

use http::uri::{Authority, Scheme};
use http::Uri;
use llmtap_ingest::ProviderKind;
use serde::{Deserialize, Serialize};

use crate::config::ConfigError;

/// One `[[route]]` table. For a built-in name, fields left out keep the built-in values.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouteConfig {
    /// Route name: the record's `route`, and `<ROUTE>` in `LLMTAP_UPSTREAM_<ROUTE>`.
    pub name: String,
    /// Path prefix that selects this route (e.g. `/vllm`).
    pub prefix: Option<String>,
    /// Upstream base URL; the path after the prefix is appended to it.
    pub upstream: Option<String>,
    /// `openai`, `anthropic` or `gemini` (default `openai`, for OpenAI-compatible servers).
    pub adapter: Option<String>,
    /// Remove the prefix before forwarding (default true).
    pub strip_prefix: Option<bool>,
    /// Per-route override of `client.inject_stream_usage` (some servers reject `stream_options`).
    pub inject_stream_usage: Option<bool>,
}

/// Where a route sends requests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upstream {
    pub scheme: Scheme,
    /// Host and port; for Azure it may contain `{resource}`, filled from the path.
    pub authority: String,
    /// Path of the base URL without a trailing slash (`""` for none).
    pub base_path: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prefix {
    pub path: String,
    pub strip: bool,
    /// The segment after the prefix names an Azure resource and is consumed.
    pub resource_segment: bool,
}

/// A checked route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub name: String,
    pub prefixes: Vec<Prefix>,
    pub upstream: Upstream,
    pub adapter: ProviderKind,
    pub inject_stream_usage: bool,
    /// Azure OpenAI route (OTLP reports `azure.ai.openai`).
    pub azure: bool,
}

/// The outcome of routing one request.
#[derive(Debug)]
pub struct RouteMatch<'a> {
    pub route: &'a Route,
    /// Upstream URI (base + remaining path + query).
    pub uri: Uri,
    /// Path as the upstream sees it, without query (what adapters parse).
    pub upstream_path: String,
}

/// All routes, longest prefix first.
#[derive(Debug, Default)]
pub struct RouteTable {
    routes: Vec<Route>,
    /// (prefix, route index) sorted by prefix length, longest first.
    index: Vec<(Prefix, usize)>,
}

fn builtin() -> Vec<RouteConfig> {
    let r = |name: &str, prefix: &str, upstream: &str, adapter: &str| RouteConfig {
        name: name.into(),
        prefix: Some(prefix.into()),
        upstream: Some(upstream.into()),
        adapter: Some(adapter.into()),
        strip_prefix: Some(true),
        inject_stream_usage: None,
    };
    vec![
        r("openai", "/openai", "https://api.openai.com", "openai"),
        r("anthropic", "/anthropic", "https://api.anthropic.com", "anthropic"),
        r("gemini", "/gemini", "https://generativelanguage.googleapis.com", "gemini"),
        r("azure", "/azure", "https://{resource}.openai.azure.com", "openai"),
    ]
}

fn parse_upstream(key: &str, raw: &str) -> Result<Upstream, ConfigError> {
    let bad = |why: &str| ConfigError::invalid(key, format!("{raw:?}"), why.to_owned());
    // `{resource}` is not valid in a URI authority; check the URL with a stand-in.
    let probe = raw.replace("{resource}", "resource");
    let uri: Uri = probe.parse().map_err(|_| bad("not a URL"))?;
    let scheme = match uri.scheme_str() {
        Some("http") => Scheme::HTTP,
        Some("https") => Scheme::HTTPS,
        _ => return Err(bad("scheme must be http or https")),
    };
    let Some(auth) = uri.authority() else { return Err(bad("URL has no host")) };
    if auth.as_str().contains('@') {
        return Err(bad("credentials in the URL are not supported; send them as headers"));
    }
    if uri.query().is_some() {
        return Err(bad("URL must not have a query"));
    }
    let authority = if raw.contains("{resource}") {
        auth.as_str().replace("resource", "{resource}")
    } else {
        auth.as_str().to_owned()
    };
    Ok(Upstream { scheme, authority, base_path: uri.path().trim_end_matches('/').to_owned() })
}

fn env_name(route: &str) -> String {
    format!("LLMTAP_UPSTREAM_{}", route.to_ascii_uppercase().replace(['-', '.'], "_"))
}

impl RouteTable {
    /// Built-ins, then `[[route]]` entries (overriding built-ins by name), then the
    /// `LLMTAP_UPSTREAM_<ROUTE>` variables in `env`.
    pub fn build(
        configured: &[RouteConfig],
        env: &[(String, String)],
        inject_default: bool,
    ) -> Result<Self, ConfigError> {
        let mut merged = builtin();
        for (i, rc) in configured.iter().enumerate() {
            let key = |f: &str| format!("route[{i}].{f}");
            if rc.name.is_empty() || !rc.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
                return Err(ConfigError::invalid(
                    key("name"),
                    format!("{:?}", rc.name),
                    "must be non-empty letters, digits, '-' or '_'",
                ));
            }
            match merged.iter_mut().find(|m| m.name == rc.name) {
                Some(m) => {
                    if let Some(p) = &rc.prefix {
                        m.prefix = Some(p.clone());
                    }
                    if let Some(u) = &rc.upstream {
                        m.upstream = Some(u.clone());
                    }
                    if let Some(a) = &rc.adapter {
                        m.adapter = Some(a.clone());
                    }
                    if rc.strip_prefix.is_some() {
                        m.strip_prefix = rc.strip_prefix;
                    }
                    if rc.inject_stream_usage.is_some() {
                        m.inject_stream_usage = rc.inject_stream_usage;
                    }
                }
                None => {
                    if rc.prefix.is_none() {
                        return Err(ConfigError::invalid(key("prefix"), "(missing)", "a new route needs a prefix"));
                    }
                    if rc.upstream.is_none() {
                        return Err(ConfigError::invalid(
                            key("upstream"),
                            "(missing)",
                            "a new route needs an upstream URL",
                        ));
                    }
                    merged.push(rc.clone());
                }
            }
        }
        let mut table = RouteTable::default();
        for rc in &merged {
            let ctx = |f: &str| format!("route {}: {f}", rc.name);
            let env_var = env_name(&rc.name);
            let (upstream_raw, upstream_key) = match env.iter().find(|(k, _)| *k == env_var) {
                Some((_, v)) => (v.clone(), env_var.clone()),
                None => (rc.upstream.clone().unwrap_or_default(), ctx("upstream")),
            };
            let upstream = parse_upstream(&upstream_key, &upstream_raw)?;
            let adapter_raw = rc.adapter.clone().unwrap_or_else(|| "openai".into());
            let adapter = ProviderKind::parse(&adapter_raw).ok_or_else(|| {
                ConfigError::invalid(ctx("adapter"), format!("{adapter_raw:?}"), "expected openai, anthropic or gemini")
            })?;
            let prefix = rc.prefix.clone().unwrap_or_default();
            if !prefix.starts_with('/') || prefix.contains(['?', '#']) {
                return Err(ConfigError::invalid(
                    ctx("prefix"),
                    format!("{prefix:?}"),
                    "must start with '/' and hold no query",
                ));
            }
            let prefix = if prefix == "/" { prefix } else { prefix.trim_end_matches('/').to_owned() };
            let azure = rc.name == "azure";
            let mut prefixes =
                vec![Prefix { path: prefix, strip: rc.strip_prefix.unwrap_or(true), resource_segment: azure }];
            if rc.name == "openai" {
                // OPENAI_BASE_URL=http://host:8080/v1 works unchanged: `/v1/...` is forwarded as is.
                prefixes.push(Prefix { path: "/v1".into(), strip: false, resource_segment: false });
            }
            let idx = table.routes.len();
            for p in &prefixes {
                if let Some((_, other)) = table.index.iter().find(|(q, _)| q.path == p.path) {
                    return Err(ConfigError::invalid(
                        ctx("prefix"),
                        format!("{:?}", p.path),
                        format!("already used by route {}", table.routes[*other].name),
                    ));
                }
                table.index.push((p.clone(), idx));
            }
            table.routes.push(Route {
                name: rc.name.clone(),
                prefixes,
                upstream,
                adapter,
                inject_stream_usage: rc.inject_stream_usage.unwrap_or(inject_default),
                azure,
            });
        }
        table.index.sort_by_key(|(p, _)| std::cmp::Reverse(p.path.len()));
        Ok(table)
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The prefixes, for the 404 message.
    pub fn describe_prefixes(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .index
            .iter()
            .map(|(p, _)| if p.resource_segment { format!("{}/<resource>", p.path) } else { p.path.clone() })
            .collect();
        v.sort();
        v
    }

    /// Routes a path (and query); `None` when no prefix matches.
    pub fn route(&self, path: &str, query: Option<&str>) -> Option<RouteMatch<'_>> {
        for (p, idx) in &self.index {
            let rest = if p.path == "/" {
                Some(path)
            } else {
                path.strip_prefix(p.path.as_str()).filter(|r| r.is_empty() || r.starts_with('/'))
            };
            let Some(rest) = rest else { continue };
            let route = &self.routes[*idx];
            let mut rest = if p.strip { rest } else { path };
            let mut authority = route.upstream.authority.clone();
            if p.resource_segment {
                let trimmed = rest.trim_start_matches('/');
                let (resource, tail) = trimmed.split_once('/').map_or((trimmed, ""), |(r, t)| (r, t));
                if resource.is_empty() || !resource.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
                    return None;
                }
                authority = authority.replace("{resource}", resource);
                rest = &path[path.len() - tail.len()..];
                if !tail.is_empty() {
                    rest = &path[path.len() - tail.len() - 1..];
                }
            }
            let upstream_path = format!("{}{}", route.upstream.base_path, if rest.is_empty() { "/" } else { rest });
            let pq = match query {
                Some(q) => format!("{upstream_path}?{q}"),
                None => upstream_path.clone(),
            };
            let authority: Authority = authority.parse().ok()?;
            let uri = Uri::builder()
                .scheme(route.upstream.scheme.clone())
                .authority(authority)
                .path_and_query(pq)
                .build()
                .ok()?;
            return Some(RouteMatch { route, uri, upstream_path });
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(cfg: &[RouteConfig], env: &[(&str, &str)]) -> RouteTable {
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        RouteTable::build(cfg, &env, true).unwrap()
    }

    fn target(t: &RouteTable, path: &str, q: Option<&str>) -> Option<(String, String)> {
        t.route(path, q).map(|m| (m.route.name.clone(), m.uri.to_string()))
    }

    #[test]
    fn builtin_routes() {
        let t = table(&[], &[]);
        assert_eq!(
            target(&t, "/v1/chat/completions", None),
            Some(("openai".into(), "https://api.openai.com/v1/chat/completions".into()))
        );
        assert_eq!(
            target(&t, "/openai/v1/responses", None),
            Some(("openai".into(), "https://api.openai.com/v1/responses".into()))
        );
        assert_eq!(
            target(&t, "/anthropic/v1/messages", None),
            Some(("anthropic".into(), "https://api.anthropic.com/v1/messages".into()))
        );
        assert_eq!(
            target(&t, "/gemini/v1beta/models/gemini-2.5-flash:streamGenerateContent", Some("alt=sse")),
            Some(("gemini".into(), "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse".into()))
        );
        assert_eq!(
            target(&t, "/azure/myres/openai/deployments/gpt4o/chat/completions", Some("api-version=2024-10-21")),
            Some((
                "azure".into(),
                "https://myres.openai.azure.com/openai/deployments/gpt4o/chat/completions?api-version=2024-10-21"
                    .into()
            ))
        );
        assert_eq!(target(&t, "/v10/x", None), None);
        assert_eq!(target(&t, "/other", None), None);
    }

    #[test]
    fn configured_routes_env_overrides_and_longest_prefix() {
        let cfg = vec![
            RouteConfig {
                name: "vllm".into(),
                prefix: Some("/vllm".into()),
                upstream: Some("http://10.0.0.5:8000/v1".into()),
                ..Default::default()
            },
            RouteConfig {
                name: "openai-eu".into(),
                prefix: Some("/openai/eu".into()),
                upstream: Some("https://eu.example".into()),
                ..Default::default()
            },
        ];
        let t = table(
            &cfg,
            &[("LLMTAP_UPSTREAM_OPENAI", "http://127.0.0.1:9000"), ("LLMTAP_UPSTREAM_AZURE", "http://127.0.0.1:9001")],
        );
        assert_eq!(
            target(&t, "/vllm/chat/completions", None),
            Some(("vllm".into(), "http://10.0.0.5:8000/v1/chat/completions".into()))
        );
        assert_eq!(target(&t, "/openai/eu/v1/x", None), Some(("openai-eu".into(), "https://eu.example/v1/x".into())));
        assert_eq!(target(&t, "/v1/models", None), Some(("openai".into(), "http://127.0.0.1:9000/v1/models".into())));
        assert_eq!(
            target(&t, "/azure/r1/openai/deployments/d/chat/completions", None),
            Some(("azure".into(), "http://127.0.0.1:9001/openai/deployments/d/chat/completions".into()))
        );
        assert_eq!(
            t.describe_prefixes(),
            vec!["/anthropic", "/azure/<resource>", "/gemini", "/openai", "/openai/eu", "/v1", "/vllm"]
        );
    }

    #[test]
    fn bad_routes_name_the_key() {
        let env: Vec<(String, String)> = vec![];
        let cfg = vec![RouteConfig {
            name: "x".into(),
            prefix: Some("/x".into()),
            upstream: Some("ftp://h".into()),
            ..Default::default()
        }];
        assert_eq!(
            RouteTable::build(&cfg, &env, true).unwrap_err().to_string(),
            "route x: upstream = \"ftp://h\": scheme must be http or https"
        );
        let cfg = vec![RouteConfig {
            name: "x".into(),
            prefix: Some("/x".into()),
            upstream: Some("http://h".into()),
            adapter: Some("cohere".into()),
            ..Default::default()
        }];
        assert_eq!(
            RouteTable::build(&cfg, &env, true).unwrap_err().to_string(),
            "route x: adapter = \"cohere\": expected openai, anthropic or gemini"
        );
        let cfg = vec![RouteConfig {
            name: "y".into(),
            prefix: Some("/v1".into()),
            upstream: Some("http://h".into()),
            ..Default::default()
        }];
        assert_eq!(
            RouteTable::build(&cfg, &env, true).unwrap_err().to_string(),
            "route y: prefix = \"/v1\": already used by route openai"
        );
        let env = vec![("LLMTAP_UPSTREAM_GEMINI".to_string(), "nope".to_string())];
        assert_eq!(
            RouteTable::build(&[], &env, true).unwrap_err().to_string(),
            "LLMTAP_UPSTREAM_GEMINI = \"nope\": scheme must be http or https"
        );
    }
}
