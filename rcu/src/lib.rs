//! Userspace read-copy-update of the QSBR flavour, the Bonsai tree and an RCU range map.
#![deny(missing_docs)]
