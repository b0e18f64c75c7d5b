//! llmtap-scorer: what a good answer is for each app (intent), how to tell (judges), and
//! which calls to look at (sampling). Rule judges run on sampled records off the request
//! path and write `llm_scores` verdicts to the local log.

pub mod agreement;
pub mod config;
pub mod drift;
pub mod llm;
pub mod report;
pub mod rule;
pub mod runner;
pub mod sample;

pub use config::{IntentConfig, JudgeConfig, ScorerConfig, ValidatedJudges};
