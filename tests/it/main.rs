mod snapshot;
mod s3_store;
mod server;
mod snapshot_s3;
mod reset;
mod ha;
