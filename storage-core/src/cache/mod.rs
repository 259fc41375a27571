//! Block caching: the eviction/admission policies ([`policy`]) that decide which capacity-tier
//! blocks live on the cache device. The tier that moves the data is in `crate::tier`.

pub mod policy;
