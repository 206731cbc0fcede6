//! herald: the embeddable campaign push engine.

pub mod providers;
pub mod testkit;
