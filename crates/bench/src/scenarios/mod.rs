//! The scenarios, one module each; `crate::run` picks them by name.

mod backlog;
mod bridge;
mod consume;
mod failover;
mod fanout;
mod group;
mod publish;
mod receipts;

pub(crate) use backlog::backlog;
pub(crate) use bridge::bridge;
pub(crate) use consume::consume;
pub(crate) use failover::failover;
pub(crate) use fanout::fanout;
pub(crate) use group::group;
pub(crate) use publish::publish;
pub(crate) use receipts::receipts;
