//! What a k3s-like server embeds to run etcd and its snapshots.
