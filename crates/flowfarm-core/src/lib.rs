//! flowfarm's domain model, with no I/O.
//!
//! - [`spec`]: what a job asks for ([`JobRequest`]), its validation against
//!   [`Limits`] and the [`ModelRegistry`], and its resolution into a
//!   [`ResolvedJob`] that holds every value needed to render it again.
//! - [`state`]: the job state machine ([`JobState`], [`Transition`]).
//! - [`shift`]: the rectified-flow timestep shift and the sampling sigmas.
//! - [`registry`]: model registry types ([`ModelConfig`], [`ShiftPolicy`]).
//!
//! Everything here is pure: the coordinator, the store and the engine build on it.

pub mod registry;
pub mod shift;
pub mod spec;
pub mod state;

pub use registry::{ModelConfig, ModelRegistry, RegistryError, ShiftPolicy, TextEncoderSet, Variant};
pub use spec::{FieldError, GridRequest, JobRequest, Limits, ResolvedJob, ValidationErrors};
pub use state::{JobState, Role, Transition, WorkerState};
