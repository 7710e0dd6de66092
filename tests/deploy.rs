//! Deployment scripts (placeholder while being written).
