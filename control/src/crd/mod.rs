//! Custom resources of udp-director, as Rust types: the CRDs are generated from them
//! (`udp-director crds`), and the copies under `deploy/crds/` are checked against the
//! generated ones by a test.

mod forwarder;
mod route;

pub use forwarder::{
    ForwardPort, Forwarder, ForwarderInstance, ForwarderSpec, ForwarderStatus, ProxyProtocol,
};
pub use route::{
    Route, RouteBackendRef, RouteInstance, RouteMatch, RouteRule, RouteSpec, RouteStatus,
    ServicePortRef,
};

use kube::CustomResourceExt;

/// Every CRD, as one multi-document YAML stream.
pub fn all_yaml() -> Result<String, serde_yaml::Error> {
    let crds = [Forwarder::crd(), Route::crd()];
    let mut out = String::new();
    for crd in &crds {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(crd)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    /// The checked-in CRDs are what the types generate: regenerate with
    /// `cargo run -- crds > deploy/crds/udp-director.dev.yaml` after changing a type.
    #[test]
    fn the_checked_in_crds_are_the_generated_ones() {
        let checked_in = include_str!("../../../deploy/crds/udp-director.dev.yaml");
        assert_eq!(
            checked_in,
            super::all_yaml().unwrap(),
            "deploy/crds/udp-director.dev.yaml is stale: run `cargo run -- crds > deploy/crds/udp-director.dev.yaml`"
        );
    }
}
