//! Real etcd clusters for tests. PLACEHOLDER: being implemented.
