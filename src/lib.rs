//! # outbox
//!
//! Keep an API server's state in memory and make its persistence to
//! PostgreSQL impossible to forget, fast, and observable.
//!
//! ## A tour, in the order data flows
//!
//! 1. [`api`]: the HTTP edge. Handlers of the reference items/circuits
//!    service, health, readiness and metrics routes, all from one
//!    [`api::router`].
//! 2. [`pg`]: PostgreSQL. The connection pool, embedded migrations, and the
//!    private local server ([`pg::LocalPostgres`]) used when `DATABASE_URL`
//!    is unset and by the tests.
//! 3. [`metrics`]: every metric name of the product, described and exported
//!    in the Prometheus format.
//! 4. [`config`]: one typed configuration from flags and environment.
//! 5. [`server`]: the life cycle that ties them together: start-up in
//!    order, serving, and an orderly shutdown.

pub mod api;
pub mod config;
pub mod engine;
pub mod metrics;
pub mod outbox;
pub mod pg;
pub mod server;
pub mod store;
pub mod worker;

pub use config::Config;
pub use engine::Engine;
pub use server::{ServerError, run};
