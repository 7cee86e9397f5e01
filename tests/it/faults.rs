//! Faults: processes killed mid-job, Redis restarted with AOF, storage
//! writes failing, SIGTERM drain, callback receivers that hang.
