//! Drift detection: signals from calls, verdicts and feedback, one detector per (key,
//! signal), and drift events that name the control surface to revisit.
//!
//! Design notes
//! - Keys are (app, route, model, judge) and, so that a switch of model is itself visible,
//!   (app, `*`, `*`, judge) across models. Both feed the same detectors.
//! - The control surface is decided when an episode starts, from what else is firing for
//!   the same app: capability, cost, latency, error and model-mix signals are `model`;
//!   judge–human agreement and the review rate are `intent_judge`; a quality signal (judge
//!   pass rate or score, tool use) is `prompt` when nothing of the `model` kind fires for
//!   that app, and `model` when something does (the model moved, and quality with it).
//! - The engine is synchronous and owns no thread; `runner` feeds it from the record stream
//!   and writes the events.

pub mod alert;
pub mod detect;
pub mod engine;
pub mod fleet;
pub mod runner;
pub mod stats;

pub use engine::{CallObs, DriftConfig, DriftEngine, Input};
