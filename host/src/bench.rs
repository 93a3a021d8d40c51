//! Decode benchmark harness (used by `pagedattn bench`).
