
mod s3_store;
