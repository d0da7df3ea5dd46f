//! Identifier newtypes, so that a shard id can never be passed as a round.

use std::fmt;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
        pub struct $name(pub u64);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, "{}"), self.0)
            }
        }
    };
}

id_type!(
    /// A worker's identity for the lifetime of its lease.
    WorkerId,
    "w"
);
id_type!(
    /// A training round. Rounds are numbered from 1; aborted rounds keep their number.
    RoundId,
    "r"
);
id_type!(
    /// One token shard file of the training or held-out split.
    ShardId,
    "s"
);
id_type!(
    /// A published model version. Version 0 is the initialisation; each committed round adds one.
    Version,
    "v"
);

impl WorkerId {
    /// Parses the wire form (`w17`) back into an id.
    pub fn parse(text: &str) -> Option<WorkerId> {
        text.strip_prefix('w')?.parse().ok().map(WorkerId)
    }
}

/// The SHA-256 digest of the secret session token a worker received when it
/// joined. The coordinator keeps only this, never the token; the digest is
/// compared in constant time and never printed.
#[derive(Clone, Copy, Default)]
pub struct SessionDigest(pub [u8; 32]);

impl PartialEq for SessionDigest {
    /// Constant time: how many leading bytes match is not observable.
    fn eq(&self, other: &SessionDigest) -> bool {
        self.0
            .iter()
            .zip(other.0.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

impl Eq for SessionDigest {}

impl fmt::Debug for SessionDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionDigest(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_digests_compare_by_every_byte_and_never_print() {
        let a = SessionDigest([7; 32]);
        let mut last_differs = [7; 32];
        last_differs[31] = 8;
        assert_eq!(a, SessionDigest([7; 32]));
        assert_ne!(a, SessionDigest(last_differs));
        assert_eq!(format!("{a:?}"), "SessionDigest(..)");
    }
}
