//! End-to-end: pm2 (tests are added with the pm2 story).
