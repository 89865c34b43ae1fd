//! End-to-end: erlang (tests are added with the erlang story).
