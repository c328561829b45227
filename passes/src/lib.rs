//! attune-passes: the rewrites `attune compile` runs (attention, LoRA, ToMe, controller hooks, lowering).
