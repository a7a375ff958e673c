mod ha;
mod hostile;
mod k3s_node;
mod reset;
mod s3_store;
mod server;
mod snapshot;
mod snapshot_s3;
