//! Integration tests live in `tests.rs` (one binary); this library target is empty.
