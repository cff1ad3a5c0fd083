//! The job state machine and the other small enums the
//! coordinator and store share.
//!
//! ```text
//! queued → dispatched → running → succeeded | failed | cancelled
//!   ↑          │           │
//!   └──────────┴───────────┘  retry (attempt + 1) while attempts remain, else dead
//! ```

use std::fmt;
use std::str::FromStr;

/// Where a job is in its life. The string forms are what the store keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum JobState {
    Queued,
    Dispatched,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    Dead,
}

impl JobState {
    pub const ALL: [JobState; 7] = [
        JobState::Queued,
        JobState::Dispatched,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
        JobState::Dead,
    ];

    /// The lower-case name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Dispatched => "dispatched",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
            JobState::Dead => "dead",
        }
    }

    /// No transition leaves a terminal state, except an operator's retry.
    pub fn is_terminal(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed | JobState::Cancelled | JobState::Dead)
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that names no job state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown job state `{0}` (expected one of queued, dispatched, running, succeeded, failed, cancelled, dead)")]
pub struct UnknownJobState(pub String);

impl FromStr for JobState {
    type Err = UnknownJobState;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobState::ALL.into_iter().find(|state| state.as_str() == s).ok_or_else(|| UnknownJobState(s.to_owned()))
    }
}

/// Every way a job may change state. The store applies a transition only to
/// jobs in one of its [`Transition::from_states`], so an illegal move is
/// impossible whatever the caller does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Handed to the work queue.
    Dispatch,
    /// A worker claimed it and holds a lease.
    Start,
    /// The worker stored its result.
    Succeed,
    /// The worker reported a non-retryable error.
    Fail,
    /// A retryable failure or an expired lease with attempts left: back to
    /// the queue with attempt + 1.
    Retry,
    /// A retryable failure or an expired lease on the last attempt.
    Die,
    /// A user or operator cancelled it.
    Cancel,
    /// An operator put a finished, unsuccessful job back in the queue.
    Resubmit,
    /// An operator took a dispatched or running job back (attempt + 1).
    Requeue,
    /// A worker passed on a dispatched job it had failed before, so that
    /// another worker can take it (same attempt).
    Decline,
}

impl Transition {
    /// States this transition may start from.
    pub fn from_states(self) -> &'static [JobState] {
        use JobState::*;
        match self {
            Transition::Dispatch => &[Queued],
            Transition::Start => &[Dispatched],
            Transition::Succeed | Transition::Fail => &[Running],
            Transition::Retry | Transition::Die => &[Dispatched, Running],
            Transition::Cancel => &[Queued, Dispatched, Running],
            Transition::Resubmit => &[Failed, Cancelled, Dead],
            Transition::Requeue => &[Dispatched, Running],
            Transition::Decline => &[Dispatched],
        }
    }

    /// The state it leads to.
    pub fn to_state(self) -> JobState {
        match self {
            Transition::Dispatch => JobState::Dispatched,
            Transition::Start => JobState::Running,
            Transition::Succeed => JobState::Succeeded,
            Transition::Fail => JobState::Failed,
            Transition::Retry | Transition::Resubmit | Transition::Requeue | Transition::Decline => JobState::Queued,
            Transition::Die => JobState::Dead,
            Transition::Cancel => JobState::Cancelled,
        }
    }

    /// Whether it begins a new attempt (the job's attempt number goes up by one).
    pub fn starts_new_attempt(self) -> bool {
        matches!(self, Transition::Retry | Transition::Resubmit | Transition::Requeue)
    }

    /// Whether `from → to` is a legal move of any transition.
    pub fn is_legal(from: JobState, to: JobState) -> bool {
        ALL_TRANSITIONS.iter().any(|t| t.to_state() == to && t.from_states().contains(&from))
    }
}

const ALL_TRANSITIONS: [Transition; 10] = [
    Transition::Dispatch,
    Transition::Start,
    Transition::Succeed,
    Transition::Fail,
    Transition::Retry,
    Transition::Die,
    Transition::Cancel,
    Transition::Resubmit,
    Transition::Requeue,
    Transition::Decline,
];

/// A worker's standing in the fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WorkerState {
    Active,
    Draining,
    Cordoned,
    Lost,
    Gone,
}

impl WorkerState {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Active => "active",
            WorkerState::Draining => "draining",
            WorkerState::Cordoned => "cordoned",
            WorkerState::Lost => "lost",
            WorkerState::Gone => "gone",
        }
    }

    /// Parses the stored form; `None` for anything else.
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Active, Self::Draining, Self::Cordoned, Self::Lost, Self::Gone].into_iter().find(|w| w.as_str() == s)
    }
}

/// What an API token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// RenderService: submit, watch, cancel and fetch its results.
    Submit,
    /// AdminService, and RenderService too.
    Admin,
    /// WorkerService only.
    Worker,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Submit => "submit",
            Role::Admin => "admin",
            Role::Worker => "worker",
        }
    }

    /// Parses `submit`, `admin` or `worker`.
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Submit, Self::Admin, Self::Worker].into_iter().find(|r| r.as_str() == s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use JobState::*;

    #[test]
    fn states_round_trip_through_strings() {
        for state in JobState::ALL {
            assert_eq!(state.as_str().parse::<JobState>(), Ok(state));
        }
        assert!("running ".parse::<JobState>().is_err());
    }

    #[test]
    fn legal_moves_are_exactly_the_design() {
        let legal = [
            (Queued, Dispatched),
            (Dispatched, Running),
            (Running, Succeeded),
            (Running, Failed),
            (Running, Cancelled),
            (Queued, Cancelled),
            (Dispatched, Cancelled),
            (Dispatched, Queued),
            (Running, Queued),
            (Dispatched, Dead),
            (Running, Dead),
            (Failed, Queued),
            (Cancelled, Queued),
            (Dead, Queued),
        ];
        for from in JobState::ALL {
            for to in JobState::ALL {
                assert_eq!(Transition::is_legal(from, to), legal.contains(&(from, to)), "{from} → {to}");
            }
        }
    }

    #[test]
    fn nothing_leaves_success() {
        assert!(JobState::ALL.iter().all(|&to| !Transition::is_legal(Succeeded, to)));
    }

    #[test]
    fn only_retries_start_a_new_attempt() {
        assert!(Transition::Retry.starts_new_attempt());
        assert!(Transition::Requeue.starts_new_attempt());
        assert!(!Transition::Start.starts_new_attempt());
        assert!(!Transition::Die.starts_new_attempt());
    }
}
