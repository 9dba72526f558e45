//! pgfleet (skeleton).
