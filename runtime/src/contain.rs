//! The backend boundary: a panic inside tract or the ort crate becomes an error naming the
//! model and the backend, not a crash of attune. While a backend call runs, the panic hook
//! keeps the message for the error instead of printing it.
use std::cell::{Cell, RefCell};
use std::panic::{self, AssertUnwindSafe};
use std::path::Path;
use std::sync::Once;

use crate::error::{Error, Result};

thread_local! {
    static INSIDE: Cell<bool> = const { Cell::new(false) };
    static WHERE: RefCell<Option<String>> = const { RefCell::new(None) };
}

static HOOK: Once = Once::new();

/// Chains a hook that, inside [`contained`], records where the panic happened and prints
/// nothing; elsewhere the previous hook runs as before.
fn install_hook() {
    HOOK.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if INSIDE.get() {
                let at = info
                    .location()
                    .map(|l| format!("{}:{}", l.file(), l.line()));
                WHERE.set(at);
            } else {
                previous(info);
            }
        }));
    });
}

/// Runs one backend call; a panic in it is an [`Error::Backend`] naming `backend` and `model`.
pub fn contained<T>(backend: &str, model: &Path, f: impl FnOnce() -> Result<T>) -> Result<T> {
    install_hook();
    let outer = INSIDE.replace(true);
    let result = panic::catch_unwind(AssertUnwindSafe(f));
    INSIDE.set(outer);
    result.unwrap_or_else(|payload| {
        let msg = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".into());
        let at = WHERE.take().map(|w| format!(" at {w}")).unwrap_or_default();
        Err(Error::Backend {
            backend: backend.to_string(),
            model: model.to_path_buf(),
            msg: format!("{msg}{at}"),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_is_an_error_naming_backend_and_model() {
        let r: Result<()> = contained("tract", Path::new("m.onnx"), || {
            panic!("index out of range")
        });
        let e = r.unwrap_err().to_string();
        assert!(
            e.contains("tract") && e.contains("m.onnx") && e.contains("index out of range"),
            "{e}"
        );
        assert_eq!(
            contained("tract", Path::new("m.onnx"), || Ok(3)).unwrap(),
            3
        );
    }
}
