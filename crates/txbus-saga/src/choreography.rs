//! Choreography.
