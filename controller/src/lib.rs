//! The VICTOR controller.
