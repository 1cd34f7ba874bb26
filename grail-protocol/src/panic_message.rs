//! The message of a caught panic: code that calls into other crates or user closures (rewards,
//! file parsers) turns their panics into errors, and an error should say what the panic said.

use std::any::Any;

/// The text a panic was raised with (`panic!("...")` carries a `&str` or a `String`), or
/// "a panic without a message" for any other payload.
///
/// ```
/// let caught = std::panic::catch_unwind(|| panic!("bad input at {}", 3)).unwrap_err();
/// assert_eq!(grail_protocol::panic_message(caught.as_ref()), "bad input at 3");
/// ```
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".into()
    }
}
