//! End-to-end: manifests (tests are added with the manifests story).
