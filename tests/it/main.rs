
mod s3_store;
mod server;
mod reset;
