//! kiln's one integration-test binary (pingora links once). Every test
//! starts what it needs: its own `redis-server`, a loopback origin, a
//! callback sink, and kiln itself in-process or as child processes.

mod support;
#[macro_use]
mod kiln;

mod cdn;
mod cli;
mod connections;
mod distributed;
mod docker;
mod eager;
mod faults;
mod fetch;
mod flow;
mod hostile;
mod index;
mod liip;
mod negotiate;
mod observability;
mod placeholders;
mod purge;
mod queue_contract;
mod resilience;
mod sais;
mod sizes;
mod storage_contract;
mod storage_s3;
mod upgrade;
