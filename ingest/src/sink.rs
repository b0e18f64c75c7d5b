//! Where records go besides the local log. Each sink tails the log's folders and
//! acknowledges a segment range only after its destination confirmed it.

pub mod clickhouse;
