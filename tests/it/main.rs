//! kiln's one integration-test binary (pingora links once). Every test
//! starts what it needs: its own `redis-server`, a loopback origin, a
//! callback sink, and kiln itself in-process or as child processes.

mod support;

mod cli;
mod distributed;
mod fetch;
mod flow;
mod kiln;
mod queue_contract;
