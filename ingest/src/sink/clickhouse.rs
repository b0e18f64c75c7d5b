//! The ClickHouse sink: schema migrations, row encoding, the insert service with its retry
//! policy, and the shipper that tails the local log and checkpoints what ClickHouse has
//! acknowledged.

pub mod config;
pub mod encode;
pub mod schema;
pub mod service;
pub mod shipper;
pub mod stats;

pub use config::{ClickHouseConfig, ValidatedClickHouse};
pub use service::ClickHouseSink;
pub use shipper::{spawn_shipper, ShipperHandle, ShipperSettings, ShipperStats};
