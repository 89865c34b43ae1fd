//! End-to-end: nginx (tests are added with the nginx story).
