//! Front threads give up their core every few answers.
//!
//! Under sustained load a front thread always has a connection ready, so it
//! never blocks, and the kernel switches it out only at a scheduler tick
//! (4 ms at HZ=250): every connection of that thread then waits the whole
//! tick. Yielding every `server.yield_every_responses` answers lets what
//! else is runnable on the core (the other front threads, renders, the load
//! generator) take short turns instead (README.md, "Benchmarks").

use std::cell::Cell;

thread_local! {
    /// Answers written by this thread since it last yielded.
    static ANSWERED: Cell<u32> = const { Cell::new(0) };
}

/// Counts the answers each thread writes; yields the core every `every`.
#[derive(Debug, Clone, Copy)]
pub struct CoreYield {
    every: u32,
}

impl CoreYield {
    /// `every = 0` never yields.
    pub fn new(every: u32) -> CoreYield {
        CoreYield { every }
    }

    /// Counts an answer written by the calling thread, and yields its core
    /// when it is the `every`-th; says whether it did.
    pub fn answered(&self) -> bool {
        if self.every == 0 {
            return false;
        }
        let due = ANSWERED.with(|answered| {
            let count = answered.get() + 1;
            let due = count >= self.every;
            answered.set(if due { 0 } else { count });
            due
        });
        if due {
            std::thread::yield_now();
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yields_on_a_fresh_thread(every: u32, answers: usize) -> Vec<bool> {
        std::thread::spawn(move || {
            let core_yield = CoreYield::new(every);
            (0..answers).map(|_| core_yield.answered()).collect()
        })
        .join()
        .unwrap()
    }

    #[test]
    fn yields_every_nth_answer_and_never_when_off() {
        assert_eq!(
            yields_on_a_fresh_thread(3, 7),
            [false, false, true, false, false, true, false]
        );
        assert_eq!(yields_on_a_fresh_thread(1, 3), [true, true, true]);
        assert_eq!(yields_on_a_fresh_thread(0, 5), [false; 5]);
    }

    #[test]
    fn each_thread_counts_its_own_answers() {
        let core_yield = CoreYield::new(2);
        assert!(!core_yield.answered());
        // Another thread's answers do not bring this thread's yield closer.
        assert_eq!(yields_on_a_fresh_thread(2, 1), [false]);
        assert!(core_yield.answered());
    }
}
