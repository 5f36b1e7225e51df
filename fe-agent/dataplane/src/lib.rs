//! The VICTOR data plane.
