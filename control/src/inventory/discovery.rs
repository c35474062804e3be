//! Which version the API server serves a kind at, found once by discovery and remembered, so
//! the watches and the status writers address the same one (UDPRoute and TCPRoute are served
//! at v1, or at v1alpha2 from the Gateway API's experimental channel).

use std::collections::BTreeMap;

/// The versions this API server serves UDPRoute and TCPRoute at, as found by [`served`].
static SERVED: std::sync::OnceLock<parking_lot::Mutex<BTreeMap<String, String>>> =
    std::sync::OnceLock::new();

/// `resource` at the version the API server serves its kind at: its own version when served,
/// else another the group serves it at (`v1alpha2` from the experimental channel), else as
/// given. Remembered for status writes ([`served_version`]).
pub async fn served(
    client: &kube::Client,
    resource: kube::api::ApiResource,
) -> kube::api::ApiResource {
    let Ok(group) = kube::discovery::group(client, &resource.group).await else {
        return resource;
    };
    let mut versions = vec![resource.version.clone()];
    versions.extend(group.versions().map(str::to_string));
    let found = versions.iter().find_map(|v| {
        group
            .versioned_resources(v)
            .into_iter()
            .find(|(ar, _)| ar.kind == resource.kind)
            .map(|(ar, _)| ar)
    });
    let Some(found) = found else { return resource };
    if found.version != resource.version {
        log::info!(
            "{} is served at {}, not {}: using it",
            found.kind,
            found.api_version,
            resource.api_version
        );
    }
    SERVED
        .get_or_init(Default::default)
        .lock()
        .insert(found.kind.clone(), found.version.clone());
    found
}

/// The version `kind` was found served at, if it was looked up.
pub fn served_version(kind: &str) -> Option<String> {
    SERVED.get()?.lock().get(kind).cloned()
}
