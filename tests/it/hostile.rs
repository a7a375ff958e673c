//! Hostile input and hostile neighbours (issue 14 and every finding since): one regression test
//! per case, named after what broke.
//!
//! - `api`: the supervisor API, the token, signals, the environment etcd inherits, a lying
//!   server a joiner talks to
//! - `files`: zip bombs, restores beside a different snapshot of the same name, planted symlinks,
//!   directories others own or can write, foreign `.part` files, loose modes

mod api;
mod files;
