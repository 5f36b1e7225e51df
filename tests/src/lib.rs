//! End-to-end tests of VICTOR and the victor-lab testbed.
