//! llmtap-ingest: what the bytes of an LLM call mean and where records go. Provider
//! adapters, pricing, capture and redaction, token estimation, the record types and the
//! local log. No sockets: the proxy feeds bytes in, records come out.

pub mod background;
pub mod capture;
pub mod decode;
pub mod estimate;
pub mod exchange;
pub mod export;
pub mod jsonseq;
pub mod log;
pub mod pricing;
pub mod provider;
pub mod record;
pub mod recorder;
pub mod sink;
pub mod sse;
pub mod stats;

pub use exchange::{CallMeta, EndedCall, Exchange, ExchangeLimits, OpenStreams, PendingTrace, StreamPiece};
pub use provider::{ProviderKind, RequestOptions, RequestView};
pub use record::{ErrorKind, Operation, Timestamp, TraceRecord, UsageSource};
