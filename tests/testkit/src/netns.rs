//! Network namespaces and veth links for tests. PLACEHOLDER: being implemented.
