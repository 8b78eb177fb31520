//! Pieces the load generator and the drift-recovery scenario share: feedback posted after a delay, as users
//! clicking "spam" / "not spam" would, and the scenario's timeline chart.

pub mod chart;
pub mod delayed;
pub mod rng;
