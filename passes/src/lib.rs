//! attune-passes: the rewrites `attune compile` runs, one module per pass.
pub mod attention;
pub mod cache;
pub mod canonical;
pub mod cleanup;
pub mod controller;
pub mod emit;
pub mod folder;
pub mod glob;
pub mod ip_adapter;
pub mod layer_norm;
pub mod lora;
pub mod lower;
pub mod merge_controlnet;
pub mod pipeline;
pub mod tome;
