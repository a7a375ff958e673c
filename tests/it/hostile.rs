//! Hostile input and hostile neighbours (issue 14 and every finding since): one regression test
//! per case, named after what broke.
//!
//! - `api`: the supervisor API, the token, signals, the environment etcd inherits, a lying
//!   server a joiner talks to
//! - `files`: zip bombs, restores beside a different snapshot of the same name, planted symlinks,
//!   directories others own or can write, foreign `.part` files, loose modes
//! - `s3`: an S3 endpoint that answers at a trickle, a link that flips a bit of an upload
//! - `imds`: an instance metadata service that hangs or answers garbage
//! - `credentials`: a container credentials endpoint that hangs or answers garbage, an STS that
//!   answers garbage
//! - `encrypted`: encrypted restores without the right key, with a damaged file, or with an
//!   identity file others can read
//! - `verify`: restore drills of backups that would not restore, or not as the cluster was

mod api;
mod credentials;
mod encrypted;
mod files;
mod imds;
mod inspect;
mod s3;
mod verify;
