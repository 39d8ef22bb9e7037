//! Progress: the one place that turns prompt events into what users see.
//!
//! * [`tracker`]: `ProgressTracker`, prompt events in, snapshots out (percentages, steps,
//!   cached nodes, ETA, queue position).
//! * [`snapshot`]: `ProgressSnapshot`, what every front end (CLI bar, `/status`, webhooks,
//!   SSE) renders or forwards.
//! * [`channel`]: how snapshots (and [`node_event`]s) leave the engine without ever blocking it.
//! * [`node_event`]: what nodes produced on the way (outputs as they finish, previews, text).
//! * [`preview_gate`]: which previews a job relays (rate and size caps).
//! * [`step_name`]: human names for what a node does.

pub mod channel;
pub mod node_event;
pub mod preview_gate;
pub mod snapshot;
pub mod step_name;
pub mod tracker;

pub use channel::{channel, ProgressSender, Update};
pub use node_event::{preview_body, NodeEvent};
pub use preview_gate::{PreviewGate, PreviewRefusal};
pub use snapshot::{Num, ProgressKind, ProgressSnapshot};
pub use step_name::step_name;
pub use tracker::ProgressTracker;
