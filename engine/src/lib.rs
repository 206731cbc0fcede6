//! herald: the embeddable campaign push engine.
