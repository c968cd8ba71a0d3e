//! Envoy proxy-wasm filter. Placeholder until the filter issue lands.
