//! The binding registry: applies the pure [`rules`] to the store with compare-and-swap.

pub mod rules;
