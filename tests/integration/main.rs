//! Integration tests: the real `anchorage` binary against real files, and
//! real peers (openssl) where a format must match theirs.

mod support;

mod actions;
mod atomicity;
mod check;
mod config;
mod e2e;
mod hang;
mod hardening;
mod health;
mod kubernetes;
mod observability;
mod ownership;
mod render;
mod rotation;
mod run;
mod spiffe;
mod static_image;
mod strict;
