//! The Git source. Lands with the Git source issue.
//!
//! It will own the local clone of the policy repository: fetching the
//! configured branch with git2 (inside `spawn_blocking`, since libgit2
//! blocks), resolving it to a commit SHA, and handing the pipeline that
//! commit's tree. Credentials come from files or the environment and never
//! appear in logs, including inside remote URLs.
//!
//! It does not decide when to fetch ([`crate::trigger`]) or what a commit
//! means ([`crate::pipeline`]).
