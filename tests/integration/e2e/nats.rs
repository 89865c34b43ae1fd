//! End-to-end: nats (tests are added with the nats story).
