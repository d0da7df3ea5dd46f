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
