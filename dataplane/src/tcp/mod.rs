//! TCP data ports: the token at the start of a connection ([`prefix`], sans-io) and the
//! splice that copies bytes both ways once a connection has its backend ([`splice`]). The
//! worker side (accept, token wait, admission) lives in `worker/tcp.rs`.

pub(crate) mod prefix;
pub(crate) mod splice;
