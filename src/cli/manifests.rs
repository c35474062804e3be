//! `udp-director crds`, `udp-director rbac` and `udp-director config-reference`: the manifests
//! and the reference generated from the code, so what `deploy/` installs is what the proxy is
//! and needs, and what `docs/` says is what it reads.

use std::path::Path;

use control::config::Config;

/// Prints udp-director's CRDs, or the Gateway API CRDs a test API server needs.
pub(crate) fn crds(gateway_api_for_tests: bool) -> anyhow::Result<()> {
    let yaml = if gateway_api_for_tests {
        control::crd::gateway_api_yaml()
    } else {
        control::crd::all_yaml()
    }?;
    print!("{yaml}");
    Ok(())
}

/// Prints the configuration reference (`docs/configuration.md`).
pub(crate) fn config_reference() -> anyhow::Result<()> {
    print!("{}", control::config::reference::markdown());
    Ok(())
}

/// Prints the RBAC a config needs: the ClusterRole of what it watches, the forwarders' Role in
/// their namespace, the status Lease's Role in the proxy's.
pub(crate) fn rbac(file: &Path, name: &str) -> anyhow::Result<()> {
    let config = Config::load(file)?;
    print!("{}", control::inventory::kube::cluster_role(&config, name));
    print!(
        "{}",
        control::inventory::kube::forwarders_role(&config, name)
    );
    print!("{}", control::reconcile::status::lease::role(&config, name));
    print!(
        "{}",
        control::inventory::kube::allocation_roles(&config, name)
    );
    Ok(())
}
