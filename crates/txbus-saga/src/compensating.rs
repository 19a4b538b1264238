//! Compensating transacts.
