//! The vhost-user protocol, backend side: messages read whole from the socket
//! ([`wire`]), decoded and size-checked ([`message`]), validated and applied per connection
//! ([`session`]) to the memory table ([`memory`]) and the rings, each served by its queue
//! thread ([`queue_thread`]).
//!
//! We handle the messages ourselves rather than through vhost-user-backend, which
//! acknowledged several invalid messages before our code saw them and cannot offer inflight
//! tracking (docs/decisions.md).

pub mod memory;
pub mod message;
pub mod queue_thread;
pub mod session;
pub mod wire;

pub use crate::guard::install_sigbus_guard;
pub use session::{End, Session};
