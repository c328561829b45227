//! The graph IR: nodes in a petgraph `StableGraph`, values (the tensors flowing between
//! nodes) in a table with their producer and consumers for O(1) def-use.
//!
//! Every proto field the IR does not model itself rides along in the `proto` templates of
//! `Model`, `Graph` and `Node`, so an unchanged model exports field for field as it came in.
pub mod builder;
mod graph;
mod model;

pub use graph::{Graph, Io, Node, NodeId, Use, Value, ValueId};
pub use model::Model;
