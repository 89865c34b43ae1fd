//! Integration tests: the real `anchorage` binary against real files, and
//! real peers (openssl) where a format must match theirs.

mod support;

mod atomicity;
mod check;
mod config;
mod e2e;
mod health;
mod observability;
mod render;
mod rotation;
mod run;
mod static_image;
mod strict;
