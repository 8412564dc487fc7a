//! Serving: the HTTP server and its OpenAI wire types, the engine that
//! owns the model off the async runtime, the scheduler that builds each
//! iteration's row batch, metrics, the memory check and stop strings.

pub mod engine;
pub mod memory;
pub mod metrics;
pub mod openai;
pub mod scheduler;
pub mod server;
pub mod stop;
