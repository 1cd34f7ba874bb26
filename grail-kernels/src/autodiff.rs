//! What every op's autodiff node shares.

/// Registers each gradient for its parent when that input is tracked.
macro_rules! give {
    ($b:ty, $grads:expr, $parents:expr, [$($grad:expr),+]) => {{
        let mut parents = $parents.into_iter();
        $(
            if let Some(p) = parents.next().flatten() {
                $grads.register::<$b>(p.id, $grad);
            }
        )+
    }};
}

pub(crate) use give;
