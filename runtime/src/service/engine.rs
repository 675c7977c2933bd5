//! The compute threads.
//!
//! Model work never runs on the async workers: each request becomes a [`Task`] that the
//! engine's own threads advance one [`Task::step`] at a time (a prefill, one generated token,
//! one evaluation chunk). After a step a task goes to the back of the queue, so concurrent
//! requests share the threads in round-robin order and none waits for another to finish.
//! Each step's kernels still use the whole rayon pool.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

/// What a task wants after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Continue,
    Done,
}

pub trait Task: Send {
    /// Runs one bounded piece of work.
    fn step(&mut self) -> Step;
}

struct Queue {
    tasks: Mutex<VecDeque<Box<dyn Task>>>,
    ready: Condvar,
    stop: AtomicBool,
}

pub struct Engine {
    queue: Arc<Queue>,
    workers: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// Requests admitted and not finished (see [`Slot`]).
    in_flight: Arc<AtomicUsize>,
    max_in_flight: usize,
}

/// A place among the engine's `max_in_flight` requests, released when dropped (when the
/// task holding it finishes or is dropped).
pub struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Engine {
    pub fn new(workers: usize, max_in_flight: usize) -> Engine {
        let queue = Arc::new(Queue {
            tasks: Mutex::new(VecDeque::new()),
            ready: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let handles = (0..workers.max(1))
            .map(|i| {
                let q = queue.clone();
                std::thread::Builder::new()
                    .name(format!("edge-compute-{i}"))
                    .spawn(move || worker(&q))
                    .expect("spawning a compute thread")
            })
            .collect();
        Engine {
            queue,
            workers: Mutex::new(handles),
            in_flight: Arc::new(AtomicUsize::new(0)),
            max_in_flight,
        }
    }

    /// Takes one of the request slots, or `None` when all are in use.
    pub fn admit(&self) -> Option<Slot> {
        let mut cur = self.in_flight.load(Ordering::Acquire);
        loop {
            if cur >= self.max_in_flight {
                return None;
            }
            match self
                .in_flight
                .compare_exchange(cur, cur + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Some(Slot(self.in_flight.clone())),
                Err(now) => cur = now,
            }
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight
    }

    pub fn submit(&self, task: Box<dyn Task>) {
        self.queue
            .tasks
            .lock()
            .expect("engine queue poisoned")
            .push_back(task);
        self.queue.ready.notify_one();
    }

    /// Stops the threads after their current step; queued tasks are dropped (their streams
    /// end).
    pub fn shutdown(&self) {
        self.queue.stop.store(true, Ordering::Release);
        self.queue.tasks.lock().expect("engine queue poisoned").clear();
        self.queue.ready.notify_all();
        for h in self.workers.lock().expect("engine workers poisoned").drain(..) {
            let _ = h.join();
        }
    }
}

fn worker(q: &Queue) {
    loop {
        let mut task = {
            let mut tasks = q.tasks.lock().expect("engine queue poisoned");
            loop {
                if q.stop.load(Ordering::Acquire) {
                    return;
                }
                if let Some(t) = tasks.pop_front() {
                    break t;
                }
                tasks = q.ready.wait(tasks).expect("engine queue poisoned");
            }
        };
        // A panicking step ends its task (its stream closes) but not the thread.
        let step = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| task.step()));
        match step {
            Ok(Step::Continue) => {
                q.tasks.lock().expect("engine queue poisoned").push_back(task);
                q.ready.notify_one();
            }
            Ok(Step::Done) => {}
            Err(_) => tracing::error!("a compute task panicked; its request was ended"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    struct Counter {
        id: usize,
        left: usize,
        log: mpsc::Sender<usize>,
    }

    impl Task for Counter {
        fn step(&mut self) -> Step {
            self.log.send(self.id).unwrap();
            self.left -= 1;
            if self.left == 0 {
                Step::Done
            } else {
                Step::Continue
            }
        }
    }

    #[test]
    fn tasks_take_turns() {
        let engine = Engine::new(1, 4);
        let (tx, rx) = mpsc::channel();
        // Submitted while the single worker is free: the first may start early, but after
        // that the two alternate instead of one running to completion.
        let block = Arc::new(Mutex::new(()));
        let guard = block.lock().unwrap();
        struct Gate(Arc<Mutex<()>>);
        impl Task for Gate {
            fn step(&mut self) -> Step {
                drop(self.0.lock().unwrap());
                Step::Done
            }
        }
        engine.submit(Box::new(Gate(block.clone())));
        engine.submit(Box::new(Counter {
            id: 1,
            left: 3,
            log: tx.clone(),
        }));
        engine.submit(Box::new(Counter {
            id: 2,
            left: 3,
            log: tx,
        }));
        drop(guard);
        let order: Vec<usize> = rx.iter().take(6).collect();
        assert_eq!(order, vec![1, 2, 1, 2, 1, 2]);
        engine.shutdown();
    }

    #[test]
    fn slots_are_limited_and_released() {
        let engine = Engine::new(1, 2);
        let a = engine.admit().unwrap();
        let _b = engine.admit().unwrap();
        assert!(engine.admit().is_none());
        drop(a);
        assert_eq!(engine.in_flight(), 1);
        assert!(engine.admit().is_some());
        engine.shutdown();
    }
}
