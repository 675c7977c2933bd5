//! The static memory plan: every activation value gets an offset in one arena, and values
//! whose lifetimes do not overlap share bytes.
//!
//! The types and the planner live in the runtime (`edge_runtime::plan`), which follows
//! the plan and checks it against the graph when it loads a bundle; the runtime never
//! depends on the compiler, so the compiler re-exports them. A value lives from the node
//! that defines it to the last node that reads it (the logits to the end); offsets are
//! chosen largest value first at the lowest 64-byte-aligned offset that no value live at
//! the same time occupies. [`Arena::verify`] checks the result independently.

pub use edge_runtime::plan::{ALIGN, Arena, Buffer, lifetimes};
