//! End-to-end: java (tests are added with the java story).
