//! agent (in progress)
