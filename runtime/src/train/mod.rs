//! On-device tuning: LoRA adapters and exit heads ([`lora`]), the truncated training
//! graph built from the forward IR ([`graph`]), the gradient rules of each op ([`grad`]),
//! the interpreter of a training step ([`run`]).

pub mod grad;
pub mod graph;
pub mod job;
pub mod lora;
pub mod optim;
pub mod run;
pub mod tune;
pub mod vote;

pub use graph::{TrainGraph, WindowSpec};
pub use lora::{LoraConfig, Module, ParamId, Params};
pub use run::{Grads, LossStats, TrainRunner};
