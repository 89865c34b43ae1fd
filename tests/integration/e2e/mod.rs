//! End-to-end: each app a user runs, reloaded by anchorage the way that app
//! takes new trust, through a whole CA rotation written kubelet-style.

mod caddy;
mod erlang;
mod haproxy;
mod java;
mod manifests;
mod nats;
mod nginx;
mod pm2;
mod proxy;
mod traefik;
