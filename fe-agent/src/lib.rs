//! The VICTOR forwarding-element agent.
